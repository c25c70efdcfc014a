"""The real OpenTelemetry Python SDK exporters (gRPC and HTTP/protobuf) against a daemon on loopback ports."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RunningDaemon
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode


def _provider(exporter: Any) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "risk-feature-pipeline",
                                                        "deployment.environment": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _emit_payments_run(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("pipeline")
    with tracer.start_as_current_span("features.daily.run", kind=SpanKind.INTERNAL) as run:
        run.set_attribute("data.dataset", "payments/transactions_yesterday")
        run.set_attribute("data.row_count", 10_240_883)
        run.set_attribute("data.freshness_lag_hours", 0.02)
        run.set_attribute("data.complete", True)
        run.set_attribute("amount_paise.histogram.bounds", [1.0, 10.0, 100.0])
        run.set_attribute("amount_paise.histogram.counts", [5, 10, 20, 1])
        run.set_attribute("http.method", "GET")  # a non-signal attribute on a kept span: stored too
        with tracer.start_as_current_span("db.query") as child:  # no data.* / ml.*: dropped
            child.set_attribute("db.system", "duckdb")
        run.set_status(StatusCode.OK)


def _check_stored(d: RunningDaemon) -> None:
    spans = d.sql("SELECT span_key, name, service_name, kind, status_code, parent_span_id, resource_attributes, "
                  "length(trace_id), length(span_id), end_time >= start_time FROM spans")
    assert len(spans) == 1, spans
    key, name, service, kind, status, parent, resource, tlen, slen, ordered = spans[0]
    assert (name, service, kind, status, parent, tlen, slen, ordered) == (
        "features.daily.run", "risk-feature-pipeline", 1, 1, None, 32, 16, True)
    assert json.loads(resource)["deployment.environment"] == "test"
    numbers = dict(d.sql("SELECT key, value FROM span_numbers WHERE span_key = ?", [key]))
    assert numbers == {"data.row_count": 10_240_883.0, "data.freshness_lag_hours": 0.02, "data.complete": 1.0}
    strings = dict(d.sql("SELECT key, value FROM span_strings WHERE span_key = ?", [key]))
    assert strings == {"data.dataset": "payments/transactions_yesterday", "http.method": "GET"}
    arrays = {k: v for k, v in d.sql("SELECT key, numbers FROM span_arrays WHERE span_key = ?", [key])}
    assert arrays == {"amount_paise.histogram.bounds": [1.0, 10.0, 100.0],
                      "amount_paise.histogram.counts": [5.0, 10.0, 20.0, 1.0]}
    # every numeric row carries the span's end time, so rules scan one table
    assert d.sql("SELECT count(*) FROM span_numbers n JOIN spans s USING (span_key) WHERE n.time = s.end_time") \
        == [(3,)]
    dropped = d.daemon.telemetry.get("spans_dropped_total").total()
    assert dropped == 1


def test_python_sdk_grpc_exporter_spans_are_stored(daemon: RunningDaemon) -> None:
    """Spans from the SDK's gRPC exporter land in DuckDB with every attribute; spans without a signal drop."""
    exporter = GrpcExporter(endpoint=daemon.grpc_endpoint, insecure=True)
    provider = _provider(exporter)
    _emit_payments_run(provider)
    provider.shutdown()
    _check_stored(daemon)


@pytest.mark.parametrize("compression", [HttpCompression.NoCompression, HttpCompression.Gzip])
def test_python_sdk_http_exporter_spans_are_stored(daemon: RunningDaemon, compression: HttpCompression) -> None:
    """Spans from the SDK's HTTP/protobuf exporter (plain and gzip) land in DuckDB."""
    exporter = HttpExporter(endpoint=daemon.http_url + "/v1/traces", compression=compression)
    provider = _provider(exporter)
    _emit_payments_run(provider)
    provider.shutdown()
    _check_stored(daemon)


def test_python_sdk_grpc_gzip(daemon: RunningDaemon) -> None:
    """gzip-compressed gRPC (what Collectors send by default) is accepted."""
    from grpc import Compression

    exporter = GrpcExporter(endpoint=daemon.grpc_endpoint, insecure=True, compression=Compression.Gzip)
    provider = _provider(exporter)
    _emit_payments_run(provider)
    provider.shutdown()
    _check_stored(daemon)


def test_keep_all_spans_setting(make_daemon: Any) -> None:
    """With keep_prefixes unset (keep_all_spans), spans without signal attributes are stored too."""
    from dataclasses import replace

    from evaluator.receiver.ingest import IngestSettings

    d = make_daemon(ingest=replace(IngestSettings(), keep_prefixes=None))
    provider = _provider(GrpcExporter(endpoint=d.grpc_endpoint, insecure=True))
    _emit_payments_run(provider)
    provider.shutdown()
    assert sorted(r[0] for r in d.sql("SELECT name FROM spans")) == ["db.query", "features.daily.run"]
