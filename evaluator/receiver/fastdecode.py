"""Bytes -> DecodeResult. Uses the C decoder when it is built; otherwise protobuf (upb) plus decode_request."""

from __future__ import annotations

from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from evaluator.receiver.decode import DecodeError, DecodeResult, decode_request

ACCELERATED = False


def decode_bytes(data: bytes, prefixes: tuple[str, ...] | None) -> DecodeResult:
    try:
        request = ExportTraceServiceRequest.FromString(data)
    except ProtobufDecodeError as exc:
        raise DecodeError(str(exc) or "malformed protobuf") from None
    return decode_request(request, prefixes)
