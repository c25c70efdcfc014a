"""Bytes -> Decoded (the SpanColumns Arrow tables plus counts). Uses the C decoder when it is built; otherwise
protobuf (upb) plus decode_request and columns_from_batch.

Both paths give the same Decoded as `decode_message(ExportTraceServiceRequest.FromString(data), prefixes)` and
raise `DecodeError` for bytes that protobuf refuses. The C module parses the wire format directly and fills the
Arrow buffers of every column itself (no Python object per value); they are wrapped here without a copy. For the
rare values (kvlist values, mixed arrays, the resource) it hands the raw sub-message back to the helpers below,
which reuse the reference's own functions so the JSON text is identical.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from evaluator.receiver.columns import (
    ARRAY_SCHEMA,
    NUMBER_SCHEMA,
    SPAN_SCHEMA,
    STRING_SCHEMA,
    Decoded,
    SpanColumns,
    columns_from_batch,
)
from evaluator.receiver.decode import (
    DecodeError,
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

__all__ = ["ACCELERATED", "DecodeError", "Decoded", "decode_bytes", "decode_bytes_python", "decode_message"]


def decode_bytes(data: bytes, prefixes: tuple[str, ...] | None) -> Decoded:
    """Decode a serialized ExportTraceServiceRequest; raises DecodeError if it is not one."""
    if _c is None:
        return decode_bytes_python(data, prefixes)
    try:
        tables, received, dropped, rejected, reasons = _c.decode(data, prefixes, _resource_from_bytes,
                                                                 _value_from_bytes)
    except ProtobufDecodeError as exc:  # from a helper below, on a sub-message only upb refuses (found by fuzzing)
        raise DecodeError(str(exc) or "malformed protobuf") from None
    spans, numbers, strings, arrays = (_table(schema, empty, columns)
                                       for (schema, empty), columns in zip(_TABLES, tables, strict=True))
    return Decoded(SpanColumns(spans, numbers, strings, arrays), received, dropped, rejected, reasons)


def decode_message(request: ExportTraceServiceRequest, prefixes: tuple[str, ...] | None) -> Decoded:
    """The reference path for an already parsed request (also what the OTLP/JSON receiver uses)."""
    result = decode_request(request, prefixes)
    return Decoded(columns_from_batch(result.batch), result.received, result.dropped, result.rejected,
                   result.reasons)


def decode_bytes_python(data: bytes, prefixes: tuple[str, ...] | None) -> Decoded:
    """The reference path: protobuf parses the request, decode_request flattens it, columns_from_batch converts."""
    try:
        request = ExportTraceServiceRequest.FromString(data)
    except ProtobufDecodeError as exc:
        raise DecodeError(str(exc) or "malformed protobuf") from None
    return decode_message(request, prefixes)


# -- the C module's buffers -> Arrow ------------------------------------------------------------------------------
def _buffer(raw: Any) -> pa.Buffer | None:
    return None if raw is None else pa.py_buffer(raw)


def _array(type_: pa.DataType, column: tuple[Any, ...]) -> pa.Array:
    """One column as the C module returns it: (length, null_count, buffers..., [child column for lists])."""
    length, nulls, *buffers = column
    if isinstance(type_, pa.ListType):
        validity, offsets, child = buffers
        return pa.Array.from_buffers(type_, length, [_buffer(validity), pa.py_buffer(offsets)], null_count=nulls,
                                     children=[_array(type_.value_type, child)])
    return pa.Array.from_buffers(type_, length, [_buffer(b) for b in buffers], null_count=nulls)


# (schema, its empty table) of the four tables, in the order the C module returns them
_TABLES = tuple((schema, schema.empty_table()) for schema in (SPAN_SCHEMA, NUMBER_SCHEMA, STRING_SCHEMA, ARRAY_SCHEMA))


def _table(schema: pa.Schema, empty: pa.Table, columns: tuple[tuple[Any, ...], ...]) -> pa.Table:
    if columns[0][0] == 0:  # no rows (often the arrays): tables are immutable, so one empty table serves all
        return empty
    arrays = [_array(field.type, column) for field, column in zip(schema, columns, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


# -- helpers the C module calls for the rare values ---------------------------------------------------------------
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
