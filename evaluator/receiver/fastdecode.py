"""Bytes -> DecodeResult. Uses the C decoder when it is built; otherwise protobuf (upb) plus decode_request.

Both paths give the same DecodeResult as `decode_request(ExportTraceServiceRequest.FromString(data), prefixes)`
and raise `DecodeError` for bytes that protobuf refuses. The C module parses the wire format directly; for the
rare values (kvlist values, mixed arrays, the resource) it hands the raw sub-message back to the helpers below,
which reuse the reference's own functions so the JSON text is identical.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from evaluator.receiver.decode import (
    DecodeError,
    DecodeResult,
    SpanBatch,
    _any_to_json,
    _append_array,
    _resource_fields,
    decode_request,
)

try:
    import evaluator.receiver._fastdecode as _c
except ImportError:  # not built (no compiler at install time): the protobuf path below
    _c = None

ACCELERATED: bool = _c is not None

# The C module returns the SpanBatch columns in this order, then received, dropped, rejected, reasons.
_COLUMNS = tuple(f.name for f in fields(SpanBatch) if f.name != "encoded_bytes")


def decode_bytes(data: bytes, prefixes: tuple[str, ...] | None) -> DecodeResult:
    """Decode a serialized ExportTraceServiceRequest; raises DecodeError if it is not one."""
    if _c is None:
        return decode_bytes_python(data, prefixes)
    out = _c.decode(data, prefixes, _resource_from_bytes, _value_from_bytes)
    n = len(_COLUMNS)
    batch = SpanBatch(**dict(zip(_COLUMNS, out[:n], strict=True)))
    return DecodeResult(batch, received=out[n], dropped=out[n + 1], rejected=out[n + 2], reasons=out[n + 3])


def decode_bytes_python(data: bytes, prefixes: tuple[str, ...] | None) -> DecodeResult:
    """The reference path: protobuf parses the request, decode_request flattens it."""
    try:
        request = ExportTraceServiceRequest.FromString(data)
    except ProtobufDecodeError as exc:
        raise DecodeError(str(exc) or "malformed protobuf") from None
    return decode_request(request, prefixes)


def _resource_from_bytes(raw: bytes) -> tuple[str | None, str]:
    """(service.name, resource JSON) of a serialized Resource (the concatenation of its occurrences)."""
    return _resource_fields(Resource.FromString(raw))


def _value_from_bytes(raw: bytes) -> str | list[str]:
    """A serialized AnyValue the C decoder leaves to Python, as decode_request would store it.

    Arrays (neither all-numeric nor all-string) -> the list of element texts (the arr_strings entry);
    any other value (kvlist, string_value_strindex) -> the str_value text.
    """
    v = AnyValue.FromString(raw)
    if v.WhichOneof("value") == "array_value":
        spans: list[int] = []
        keys: list[str] = []
        numbers: list[list[float] | None] = []
        strings: list[list[str] | None] = []
        _append_array(v.array_value.values, "", 0, spans, keys, numbers, strings)
        texts = strings[0]
        if texts is None:  # the C side only asks for arrays it did not classify as numeric
            raise TypeError("numeric array handed to the Python value helper")
        return texts
    val: Any = _any_to_json(v)
    return val if isinstance(val, str) else json.dumps(val, separators=(",", ":"))
