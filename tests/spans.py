"""Builders for OTLP requests the SDKs would never send (bad ids, NaN, duplicates), for the error-path tests."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

T0 = 1_760_000_000_000_000_000  # ns


def any_value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, str):
        return AnyValue(string_value=v)
    if isinstance(v, bytes):
        return AnyValue(bytes_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
    raise TypeError(v)


def span(name: str = "features.daily.run", *, attrs: dict[str, Any] | None = None, trace_id: bytes | None = None,
         span_id: bytes | None = None, start: int = T0, end: int | None = None, parent: bytes = b"") -> Span:
    sp = Span(
        trace_id=os.urandom(16) if trace_id is None else trace_id,
        span_id=os.urandom(8) if span_id is None else span_id,
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 1_000_000 if end is None else end,
    )
    for k, v in (attrs or {}).items():
        sp.attributes.append(KeyValue(key=k, value=any_value(v)))
    return sp


def request(*spans: Span, service: str = "risk-feature-pipeline") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service)))
    ss = rs.scope_spans.add()
    ss.scope.name = "tests"
    ss.spans.extend(spans)
    return req
