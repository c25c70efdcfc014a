"""OTLP/JSON -> ExportTraceServiceRequest, following the OTLP spec rather than protobuf's generic JSON mapping.

The differences that matter (OTLP specification, "JSON Protobuf Encoding"): trace and span ids are hex strings,
not base64; enums are integers (names are accepted too); keys are lowerCamelCase (the proto field names are
accepted as well); 64-bit integers may be strings or numbers; unknown fields are ignored. Bytes attribute
values stay base64, as in protobuf's mapping.

An id that is not valid hex is not a reason to refuse the whole request: it is cleared, and the span is then
rejected individually by the decoder ("trace_id must be 16 bytes") while the rest are stored.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from evaluator.receiver.decode import DecodeError

_SPAN_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _hex_to_b64(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return base64.b64encode(bytes.fromhex(value)).decode("ascii")
    except ValueError:
        return ""


def _fix_ids(obj: dict[str, Any]) -> None:
    for key in _SPAN_ID_FIELDS:
        if key in obj:
            obj[key] = _hex_to_b64(obj[key])


def _fix_value(value: Any) -> None:
    """JSON has no NaN or Infinity: exporters (the JS SDK's) send a non-finite double as `"doubleValue": null`.
    Read it as the non-finite number it stands for, so the span is rejected as it would be over protobuf, instead
    of being stored with the attribute silently missing."""
    if not isinstance(value, dict):
        return
    if "doubleValue" in value and value["doubleValue"] is None:
        value["doubleValue"] = "NaN"
    array = value.get("arrayValue")
    if isinstance(array, dict):
        for item in _list(array, "values"):
            _fix_value(item)


def _list(obj: dict[str, Any], *names: str) -> list[Any]:
    for name in names:
        value = obj.get(name)
        if isinstance(value, list):
            return value
    return []


def parse_json_request(body: bytes) -> ExportTraceServiceRequest:
    """Raises DecodeError with a message a user can act on."""
    try:
        data = json.loads(body)
    except RecursionError:  # found by tests/test_fuzz_decoders.py: thousands of nested [ or {
        raise DecodeError("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits
        raise DecodeError(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("body must be a JSON object with a resourceSpans list")
    for rs in _list(data, "resourceSpans", "resource_spans"):
        if not isinstance(rs, dict):
            continue
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            if not isinstance(ss, dict):
                continue
            for span in _list(ss, "spans"):
                if not isinstance(span, dict):
                    continue
                _fix_ids(span)
                for kv in _list(span, "attributes"):
                    if isinstance(kv, dict):
                        _fix_value(kv.get("value"))
                for link in _list(span, "links"):
                    if isinstance(link, dict):
                        _fix_ids(link)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError, OverflowError) as exc:  # 1e400: inf
        raise DecodeError(f"body is not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    except SystemError as exc:  # upb looking up a key with an unpaired surrogate (\ud800): found by fuzzing
        why = "a key is not valid Unicode" if isinstance(exc.__context__, UnicodeError) else str(exc)
        raise DecodeError(f"body is not an OTLP/JSON ExportTraceServiceRequest: {why}") from None
    return request
