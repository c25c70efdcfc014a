"""Realistic OTLP payloads for the benchmarks: distinct span ids per request, 8 attributes of mixed types."""

from __future__ import annotations

import os
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def make_request(spans: int, seed: int, now_ns: int | None = None) -> ExportTraceServiceRequest:
    """One request of `spans` prediction/run spans with 8 attributes: 3 doubles, 2 ints, 2 strings, 1 bool."""
    now_ns = now_ns or time.time_ns()
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="risk-model-server")))
    rs.resource.attributes.append(KeyValue(key="host.name", value=AnyValue(string_value="bench-host")))
    ss = rs.scope_spans.add()
    ss.scope.name = "bench"
    trace = os.urandom(16)
    for i in range(spans):
        sp: Span = ss.spans.add()
        sp.trace_id = trace
        sp.span_id = (seed * spans + i + 1).to_bytes(8, "big")
        sp.name = "model.predict"
        sp.kind = Span.SPAN_KIND_SERVER
        sp.start_time_unix_nano = now_ns + i * 1000
        sp.end_time_unix_nano = now_ns + i * 1000 + 499_999
        a = sp.attributes
        a.append(KeyValue(key="ml.score", value=AnyValue(double_value=(i % 997) / 997.0)))
        a.append(KeyValue(key="ml.feature.amount", value=AnyValue(double_value=1000.0 + i)))
        a.append(KeyValue(key="ml.feature.velocity", value=AnyValue(double_value=i * 0.5)))
        a.append(KeyValue(key="data.row_count", value=AnyValue(int_value=10_000_000 + i)))
        a.append(KeyValue(key="ml.feature.merchant_age_days", value=AnyValue(int_value=i % 365)))
        a.append(KeyValue(key="ml.prediction_id", value=AnyValue(string_value=f"p-{seed}-{i}")))
        a.append(KeyValue(key="ml.model.version", value=AnyValue(string_value="v7")))
        a.append(KeyValue(key="ml.shadow", value=AnyValue(bool_value=i % 2 == 0)))
    return req
