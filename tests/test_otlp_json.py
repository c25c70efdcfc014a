"""OTLP/JSON as the OTLP spec defines it (hex ids, integer enums, 64-bit ints as strings or numbers, unknown fields
ignored), translated to the same request protobuf would carry."""

from __future__ import annotations

import base64
import json

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from evaluator.receiver.decode import DecodeError
from evaluator.receiver.otlp_json import parse_json_request

TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"
PARENT = "eee19b7ec3c1b173"


def _expected() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="my.service")))
    ss = rs.scope_spans.add()
    ss.scope.name = "my.library"
    ss.scope.version = "1.0.0"
    sp = ss.spans.add()
    sp.trace_id, sp.span_id, sp.parent_span_id = bytes.fromhex(TRACE), bytes.fromhex(SPAN), bytes.fromhex(PARENT)
    sp.name = "I'm a server span"
    sp.kind = Span.SPAN_KIND_SERVER
    sp.start_time_unix_nano = 1544712660000000000
    sp.end_time_unix_nano = 1544712661000000000
    sp.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="boom"))
    a = sp.attributes
    a.append(KeyValue(key="data.row_count", value=AnyValue(int_value=9007199254740993)))
    a.append(KeyValue(key="data.small", value=AnyValue(int_value=7)))
    a.append(KeyValue(key="data.lag", value=AnyValue(double_value=0.5)))
    a.append(KeyValue(key="data.ok", value=AnyValue(bool_value=True)))
    a.append(KeyValue(key="data.raw", value=AnyValue(bytes_value=b"\x00\xff")))
    a.append(KeyValue(key="data.bounds", value=AnyValue(array_value=ArrayValue(values=[
        AnyValue(double_value=1.0), AnyValue(int_value=10)]))))
    a.append(KeyValue(key="data.meta", value=AnyValue(kvlist_value=KeyValueList(values=[
        KeyValue(key="k", value=AnyValue(string_value="v"))]))))
    return req


def _spec_json() -> dict[str, object]:
    return {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}],
                         "futureField": {"x": 1}},
            "scopeSpans": [{
                "scope": {"name": "my.library", "version": "1.0.0"},
                "spans": [{
                    "traceId": TRACE, "spanId": SPAN, "parentSpanId": PARENT,
                    "name": "I'm a server span", "kind": 2,
                    "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": 1544712661000000000,
                    "status": {"code": 2, "message": "boom"},
                    "attributes": [
                        {"key": "data.row_count", "value": {"intValue": "9007199254740993"}},
                        {"key": "data.small", "value": {"intValue": 7}},
                        {"key": "data.lag", "value": {"doubleValue": 0.5}},
                        {"key": "data.ok", "value": {"boolValue": True}},
                        {"key": "data.raw", "value": {"bytesValue": base64.b64encode(b"\x00\xff").decode()}},
                        {"key": "data.bounds", "value": {"arrayValue": {"values": [{"doubleValue": 1.0},
                                                                                    {"intValue": "10"}]}}},
                        {"key": "data.meta", "value": {"kvlistValue": {"values": [
                            {"key": "k", "value": {"stringValue": "v"}}]}}},
                    ],
                    "someNewSpanField": [1, 2, 3],
                }],
            }],
        }],
        "unknownTopLevel": True,
    }


def test_spec_json_translates_to_the_same_request_as_protobuf() -> None:
    """Hex ids, integer enums, 64-bit ints as strings (exact beyond 2^53) and numbers, unknown fields ignored."""
    assert parse_json_request(json.dumps(_spec_json()).encode()) == _expected()


def test_proto_field_names_and_enum_names_are_accepted() -> None:
    doc = _spec_json()
    text = json.dumps(doc).replace('"resourceSpans"', '"resource_spans"').replace('"scopeSpans"', '"scope_spans"')
    text = text.replace('"startTimeUnixNano"', '"start_time_unix_nano"')
    text = text.replace('"kind": 2', '"kind": "SPAN_KIND_SERVER"')
    assert parse_json_request(text.encode()) == _expected()


def test_an_id_that_is_not_hex_invalidates_only_that_span() -> None:
    doc = _spec_json()
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "not-hex"  # type: ignore[index]
    req = parse_json_request(json.dumps(doc).encode())
    assert req.resource_spans[0].scope_spans[0].spans[0].trace_id == b""  # rejected later, individually


@pytest.mark.parametrize("body,why", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}', "not an OTLP/JSON"),
])
def test_undecodable_json_says_why(body: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        parse_json_request(body)


def test_a_null_double_is_the_non_finite_number_json_cannot_carry() -> None:
    """The JS SDK's JSON exporter sends NaN/Infinity as "doubleValue": null; such a span is rejected like a NaN
    over protobuf, not stored with the attribute silently missing."""
    from evaluator.receiver.fastdecode import decode_message

    for value, reason in (({"doubleValue": None}, "data.x is not a finite number"),
                          ({"arrayValue": {"values": [{"doubleValue": None}]}}, "data.x holds a non-finite number")):
        doc = _spec_json()
        attrs = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"]  # type: ignore[index]
        attrs.append({"key": "data.x", "value": value})
        result = decode_message(parse_json_request(json.dumps(doc).encode()), ("data.",))
        assert result.rejected == 1 and len(result.columns) == 0
        assert reason in result.error_message()
