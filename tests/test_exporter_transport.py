"""The alert exporter's settings (OTEL_EXPORTER_OTLP_* per protocol/exporter.md) and its two transports, against
real in-process gRPC and HTTP servers on free loopback ports, and against the evaluator's own receiver."""

from __future__ import annotations

import email.utils
import gzip
import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from evaluator.exporter.otlp_config import OtlpExporterConfig, from_env, parse_headers
from evaluator.exporter.transport import (
    GrpcTransport,
    HttpTransport,
    SendResult,
    make_transport,
    parse_retry_after,
)
from tests.spans import request, span

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PAYLOAD = bytes(range(256)) * 40  # not a valid request: the transports must move bytes, not parse them


# ---------------------------------------------------------------------------------------------- configuration


def test_nothing_configured_means_no_endpoint_and_spec_defaults() -> None:
    cfg = from_env({}, "traces")
    assert cfg == OtlpExporterConfig(endpoint=None, protocol="http/protobuf", headers=(), compression="none",
                                     timeout_seconds=10.0, insecure=False, certificate=None, client_key=None,
                                     client_certificate=None)
    assert make_transport(cfg, "traces") is None


@pytest.mark.parametrize(("endpoint", "traces", "metrics"), [
    ("http://collector:4318", "http://collector:4318/v1/traces", "http://collector:4318/v1/metrics"),
    ("http://collector:4318/", "http://collector:4318/v1/traces", "http://collector:4318/v1/metrics"),
    ("https://gw.example/otlp", "https://gw.example/otlp/v1/traces", "https://gw.example/otlp/v1/metrics"),
    ("https://gw.example/otlp/", "https://gw.example/otlp/v1/traces", "https://gw.example/otlp/v1/metrics"),
])
def test_http_generic_endpoint_gets_the_signal_path(endpoint: str, traces: str, metrics: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    assert from_env(env, "traces").endpoint == traces
    assert from_env(env, "metrics").endpoint == metrics


def test_http_signal_specific_endpoint_is_used_as_is() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom/path",
           "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics.example:9000"}
    traces = from_env(env, "traces")
    assert traces.endpoint == "https://traces.example/custom/path"
    assert traces.insecure is False
    metrics = from_env(env, "metrics")
    assert metrics.endpoint == "http://metrics.example:9000/"  # no path -> "/"
    assert metrics.insecure is True


def test_signal_specific_variables_override_generic_ones() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=2",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "c=3",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "750",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/traces-ca.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/key.pem",
        "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE": "/metrics-cert.pem",
    }
    traces = from_env(env, "traces")
    assert traces.protocol == "http/protobuf"
    assert traces.endpoint == "http://collector:4317/v1/traces"
    assert traces.headers == (("a", "1"), ("b", "2"))
    assert traces.compression == "none"
    assert traces.timeout_seconds == 2.5
    assert (traces.certificate, traces.client_key, traces.client_certificate) == ("/traces-ca.pem", "/key.pem", None)
    metrics = from_env(env, "metrics")
    assert metrics.protocol == "grpc"
    assert metrics.endpoint == "http://collector:4317"  # gRPC: never a path appended
    assert metrics.insecure is True
    assert metrics.headers == (("c", "3"),)  # replaced, not merged
    assert metrics.compression == "gzip"
    assert metrics.timeout_seconds == 0.75
    assert (metrics.certificate, metrics.client_key, metrics.client_certificate) == \
        ("/ca.pem", "/key.pem", "/metrics-cert.pem")


def test_headers_are_percent_decoded() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": " Authorization = Basic%20dXNlcjpwYXNz , x-tenant=a%2Cb%3Dc,,empty="}
    assert from_env(env, "traces").headers == (("authorization", "Basic dXNlcjpwYXNz"), ("x-tenant", "a,b=c"),
                                               ("empty", ""))
    assert parse_headers("", "X") == ()
    with pytest.raises(ValueError, match=r"OTEL_EXPORTER_OTLP_TRACES_HEADERS.*not key=value"):
        from_env({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=1,oops"}, "traces")


@pytest.mark.parametrize(("endpoint", "insecure", "expect_insecure"), [
    ("https://collector:4317", "true", False),  # the scheme wins over INSECURE
    ("http://collector:4317", "false", True),
    ("collector:4317", None, False),  # no scheme: TLS unless INSECURE=true
    ("collector:4317", "TRUE", True),
    ("collector:4317", "false", False),
])
def test_grpc_endpoint_forms_and_insecure(endpoint: str, insecure: str | None, expect_insecure: bool) -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if insecure is not None:
        env["OTEL_EXPORTER_OTLP_INSECURE"] = insecure
    cfg = from_env(env, "traces")
    assert cfg.endpoint == endpoint
    assert cfg.insecure is expect_insecure


def test_env_overrides_the_config_file_field_by_field() -> None:
    base = OtlpExporterConfig(endpoint="http://from-file:4318", protocol="http/protobuf",
                              headers=(("x-file", "1"),), compression="gzip", timeout_seconds=3.0,
                              certificate="/file-ca.pem")
    # no env: the file's values, with the signal path added to its (base) endpoint
    cfg = from_env({}, "metrics", base)
    assert cfg.endpoint == "http://from-file:4318/v1/metrics"
    assert (cfg.headers, cfg.compression, cfg.timeout_seconds, cfg.certificate) == \
        ((("x-file", "1"),), "gzip", 3.0, "/file-ca.pem")
    # a resolved config fed back as base is stable
    assert from_env({}, "metrics", cfg) == cfg
    # generic env over the file, signal env over both
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://from-env", "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
           "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "500", "OTEL_EXPORTER_OTLP_COMPRESSION": ""}  # empty = unset
    traces = from_env(env, "traces", base)
    assert traces.endpoint == "https://from-env/v1/traces"
    assert traces.timeout_seconds == 0.5
    assert traces.compression == "gzip"
    assert traces.headers == (("x-file", "1"),)
    assert from_env(env, "metrics", base).timeout_seconds == 1.0


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL: protocol 'http/json'"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION: compression 'zstd'"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT: timeout '10s' is not a number"),
    ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "-5"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: timeout '-5' must be"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_INSECURE": "yes"}, "OTEL_EXPORTER_OTLP_INSECURE: 'yes' is not true or false"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: 'collector:4318' is not an"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://x/v1/traces"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:notaport"}, "invalid port"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x:1"}, "protocol grpc"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "x:1/path"}, "protocol grpc"),
])
def test_invalid_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_env(env, "traces")


def test_invalid_config_file_values_and_signal() -> None:
    with pytest.raises(ValueError, match="config file protocol"):
        from_env({}, "traces", OtlpExporterConfig(protocol="udp"))
    with pytest.raises(ValueError, match="config file timeout"):
        from_env({}, "traces", OtlpExporterConfig(timeout_seconds=0))
    with pytest.raises(ValueError, match="signal 'logs'"):
        from_env({}, "logs")


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    now = 1_760_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# ---------------------------------------------------------------------------------------------- fake gRPC server


@dataclass
class GrpcCall:
    method: str
    payload: bytes
    metadata: dict[str, str]


@dataclass
class FakeGrpcCollector:
    """Answers both Export methods with raw bytes; `mode` says how."""

    mode: str = "ok"
    retry_seconds: float = 2.5
    calls: list[GrpcCall] = field(default_factory=list)

    def handler(self, method: str) -> Any:
        def export(payload: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append(GrpcCall(method, payload, {k: v for k, v in context.invocation_metadata()
                                                         if isinstance(v, str)}))
            delay = Duration(seconds=int(self.retry_seconds), nanos=round(self.retry_seconds % 1 * 1e9))
            info = error_details_pb2.RetryInfo(retry_delay=delay)
            if self.mode == "unavailable_details":
                status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="collector overloaded")
                status.details.add().Pack(info)
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "collector overloaded")
            if self.mode == "unavailable_trailer":
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "collector overloaded")
            if self.mode == "unavailable":
                context.abort(grpc.StatusCode.UNAVAILABLE, "no retry info")
            if self.mode == "exhausted_with_info":
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
            if self.mode == "exhausted":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "request too large")
            if self.mode == "invalid":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad spans")
            if self.mode == "partial":
                if method == TRACE_METHOD:
                    return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
                        rejected_spans=2, error_message="2 spans had no name")).SerializeToString()
                return ExportMetricsServiceResponse(partial_success=ExportMetricsPartialSuccess(
                    rejected_data_points=3)).SerializeToString()
            return b""

        return grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=None)


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, collector: FakeGrpcCollector) -> None:
        self.collector = collector

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method in (TRACE_METHOD, METRICS_METHOD):
            return self.collector.handler(method)
        return None


def _start_grpc(collector: FakeGrpcCollector, creds: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[_Generic(collector)])
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def grpc_collector() -> Iterator[tuple[FakeGrpcCollector, int]]:
    collector = FakeGrpcCollector()
    server, port = _start_grpc(collector)
    yield collector, port
    server.stop(None)


def _grpc_config(port: int, **changes: Any) -> OtlpExporterConfig:
    return replace(OtlpExporterConfig(endpoint=f"http://127.0.0.1:{port}", protocol="grpc", timeout_seconds=5.0),
                   **changes)


@pytest.mark.parametrize(("signal", "method"), [("traces", TRACE_METHOD), ("metrics", METRICS_METHOD)])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_grpc_sends_the_bytes_to_the_signal_method(grpc_collector: tuple[FakeGrpcCollector, int], signal: str,
                                                   method: str, compression: str) -> None:
    collector, port = grpc_collector
    cfg = _grpc_config(port, compression=compression, headers=(("authorization", "Bearer t0k"), ("x-tenant", "ml")))
    transport = make_transport(cfg, signal)
    assert isinstance(transport, GrpcTransport)
    try:
        assert transport.send(PAYLOAD) == SendResult(ok=True, retryable=False, retry_after=None, error="")
    finally:
        transport.close()
    [call] = collector.calls
    assert call.method == method
    assert call.payload == PAYLOAD
    assert call.metadata["authorization"] == "Bearer t0k"
    assert call.metadata["x-tenant"] == "ml"
    assert call.metadata["user-agent"].startswith("otel-evaluator")


def test_grpc_host_port_endpoint_with_insecure(grpc_collector: tuple[FakeGrpcCollector, int]) -> None:
    collector, port = grpc_collector
    cfg = from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": f"127.0.0.1:{port}",
                    "OTEL_EXPORTER_OTLP_INSECURE": "true"}, "traces")
    transport = GrpcTransport(cfg, "traces")
    try:
        assert transport.send(b"x").ok
    finally:
        transport.close()
    assert collector.calls[0].payload == b"x"


@pytest.mark.parametrize(("mode", "retryable", "retry_after", "error"), [
    ("unavailable_details", True, 2.5, "grpc UNAVAILABLE: collector overloaded"),
    ("unavailable_trailer", True, 2.5, "grpc UNAVAILABLE: collector overloaded"),
    ("unavailable", True, None, "grpc UNAVAILABLE: no retry info"),
    ("exhausted_with_info", True, 2.5, "grpc RESOURCE_EXHAUSTED: slow down"),
    ("exhausted", False, None, "grpc RESOURCE_EXHAUSTED: request too large"),
    ("invalid", False, None, "grpc INVALID_ARGUMENT: bad spans"),
])
def test_grpc_failures_are_classified(grpc_collector: tuple[FakeGrpcCollector, int], mode: str, retryable: bool,
                                      retry_after: float | None, error: str) -> None:
    collector, port = grpc_collector
    collector.mode = mode
    transport = GrpcTransport(_grpc_config(port), "traces")
    try:
        result = transport.send(PAYLOAD)
    finally:
        transport.close()
    assert result == SendResult(ok=False, retryable=retryable, retry_after=retry_after, error=error)


def test_grpc_partial_success_is_ok_with_the_message(grpc_collector: tuple[FakeGrpcCollector, int]) -> None:
    collector, port = grpc_collector
    collector.mode = "partial"
    for signal, message in (("traces", "partial success (2 spans rejected): 2 spans had no name"),
                            ("metrics", "partial success: 3 data points rejected")):
        transport = GrpcTransport(_grpc_config(port), signal)
        try:
            assert transport.send(PAYLOAD) == SendResult(ok=True, retryable=False, retry_after=None, error=message)
        finally:
            transport.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_grpc_closed_port_is_retryable() -> None:
    transport = GrpcTransport(_grpc_config(_free_port(), timeout_seconds=2.0), "traces")
    try:
        result = transport.send(PAYLOAD)
    finally:
        transport.close()
    assert not result.ok and result.retryable
    assert result.error.startswith("grpc UNAVAILABLE") or result.error.startswith("grpc DEADLINE_EXCEEDED")


def test_grpc_deadline_is_retryable(grpc_collector: tuple[FakeGrpcCollector, int]) -> None:
    collector, port = grpc_collector
    original = collector.handler

    def slow(method: str) -> Any:
        inner = original(method)

        def export(payload: bytes, context: grpc.ServicerContext) -> bytes:
            time.sleep(0.5)
            return bytes(inner.unary_unary(payload, context))

        return grpc.unary_unary_rpc_method_handler(export)

    collector.handler = slow  # type: ignore[method-assign]
    transport = GrpcTransport(_grpc_config(port, timeout_seconds=0.1), "traces")
    try:
        result = transport.send(PAYLOAD)
    finally:
        transport.close()
    assert (result.ok, result.retryable, result.error.split(":")[0]) == (False, True, "grpc DEADLINE_EXCEEDED")


# ---------------------------------------------------------------------------------------------- fake HTTP server


@dataclass
class HttpPost:
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHttpCollector(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HttpHandler)
        self.posts: list[HttpPost] = []
        self.status = 200
        self.response_headers: dict[str, str] = {}
        self.response_body = b""
        self.delay = 0.0

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHttpCollector

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.posts.append(HttpPost(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        time.sleep(self.server.delay)
        self.send_response(self.server.status)
        for k, v in self.server.response_headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(self.server.response_body)))
        self.end_headers()
        self.wfile.write(self.server.response_body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_collector() -> Iterator[FakeHttpCollector]:
    server = FakeHttpCollector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("signal", ["traces", "metrics"])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_http_posts_the_bytes_to_the_signal_url(http_collector: FakeHttpCollector, signal: str,
                                                compression: str) -> None:
    cfg = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http_collector.port}/otlp",
                    "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20t0k,x-tenant=ml",
                    "OTEL_EXPORTER_OTLP_COMPRESSION": compression}, signal)
    transport = make_transport(cfg, signal)
    assert isinstance(transport, HttpTransport)
    try:
        assert transport.send(PAYLOAD) == SendResult(ok=True, retryable=False, retry_after=None, error="")
        assert transport.send(b"second") == SendResult(ok=True, retryable=False, retry_after=None, error="")
    finally:
        transport.close()
    first, second = http_collector.posts
    assert first.path == f"/otlp/v1/{signal}"
    assert first.headers["content-type"] == "application/x-protobuf"
    assert first.headers["authorization"] == "Bearer t0k"
    assert first.headers["x-tenant"] == "ml"
    assert first.headers["user-agent"] == "otel-evaluator"
    if compression == "gzip":
        assert first.headers["content-encoding"] == "gzip"
        assert gzip.decompress(first.body) == PAYLOAD
        assert gzip.decompress(second.body) == b"second"
    else:
        assert "content-encoding" not in first.headers
        assert (first.body, second.body) == (PAYLOAD, b"second")


def _http_config(server: FakeHttpCollector, **changes: Any) -> OtlpExporterConfig:
    return replace(OtlpExporterConfig(endpoint=f"http://127.0.0.1:{server.port}/v1/traces", timeout_seconds=5.0),
                   **changes)


def _send_once(cfg: OtlpExporterConfig, signal: str = "traces", payload: bytes = PAYLOAD) -> SendResult:
    transport = HttpTransport(cfg, signal)
    try:
        return transport.send(payload)
    finally:
        transport.close()


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_http_retryable_statuses_with_retry_after_seconds(http_collector: FakeHttpCollector, status: int) -> None:
    http_collector.status = status
    http_collector.response_headers = {"Retry-After": "7"}
    result = _send_once(_http_config(http_collector))
    assert (result.ok, result.retryable, result.retry_after) == (False, True, 7.0)
    assert result.error.startswith(f"http {status}")


def test_http_503_with_retry_after_date(http_collector: FakeHttpCollector) -> None:
    http_collector.status = 503
    http_collector.response_headers = {"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)}
    result = _send_once(_http_config(http_collector))
    assert result.retryable and result.retry_after is not None and 55 <= result.retry_after <= 60


def test_http_503_without_retry_after(http_collector: FakeHttpCollector) -> None:
    http_collector.status = 503
    result = _send_once(_http_config(http_collector))
    assert (result.ok, result.retryable, result.retry_after) == (False, True, None)


def test_http_400_is_permanent_with_the_status_message(http_collector: FakeHttpCollector) -> None:
    http_collector.status = 400
    http_collector.response_headers = {"Content-Type": "application/x-protobuf", "Retry-After": "5"}
    http_collector.response_body = status_pb2.Status(code=3, message="span 0 has an empty trace_id") \
        .SerializeToString()
    result = _send_once(_http_config(http_collector))
    assert result == SendResult(ok=False, retryable=False, retry_after=None,
                                error="http 400 Bad Request: span 0 has an empty trace_id")


def test_http_404_text_body_is_permanent(http_collector: FakeHttpCollector) -> None:
    http_collector.status = 404
    http_collector.response_headers = {"Content-Type": "text/plain"}
    http_collector.response_body = b"no such path"
    result = _send_once(_http_config(http_collector))
    assert result == SendResult(ok=False, retryable=False, retry_after=None, error="http 404 Not Found: no such path")


def test_http_partial_success_is_ok_with_the_message(http_collector: FakeHttpCollector) -> None:
    http_collector.response_headers = {"Content-Type": "application/x-protobuf"}
    http_collector.response_body = ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
        rejected_spans=1, error_message="span 3 is too big")).SerializeToString()
    assert _send_once(_http_config(http_collector)) == SendResult(
        ok=True, retryable=False, retry_after=None, error="partial success (1 spans rejected): span 3 is too big")


def test_http_closed_port_and_timeout_are_retryable(http_collector: FakeHttpCollector) -> None:
    closed = OtlpExporterConfig(endpoint=f"http://127.0.0.1:{_free_port()}/v1/traces", timeout_seconds=2.0)
    result = _send_once(closed)
    assert (result.ok, result.retryable) == (False, True)
    assert "Connection refused" in result.error or "ConnectionRefused" in result.error
    http_collector.delay = 1.0
    result = _send_once(_http_config(http_collector, timeout_seconds=0.2))
    assert (result.ok, result.retryable) == (False, True)
    assert "timed out" in result.error.lower() or "timeout" in result.error.lower()


def test_http_reconnects_after_the_server_dropped_the_connection(http_collector: FakeHttpCollector) -> None:
    transport = HttpTransport(_http_config(http_collector), "traces")
    try:
        assert transport.send(b"one").ok
        http_collector.response_headers = {"Connection": "close"}
        assert transport.send(b"two").ok  # the server closes after answering
        http_collector.response_headers = {}
        assert transport.send(b"three").ok  # a new connection
    finally:
        transport.close()
    assert [p.body for p in http_collector.posts] == [b"one", b"two", b"three"]


# ---------------------------------------------------------------------------------------------- TLS and mTLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    try:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
                 "-keyout", d / "ca.key", "-out", d / "ca.pem")
        for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                          ("client", "extendedKeyUsage=clientAuth")):
            _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                     "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")
            (d / f"{name}.ext").write_text(ext + "\n")
            _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                     "-CAcreateserial", "-days", "2", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl cannot make test certificates: {exc}")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def test_grpc_mtls(pki: Pki) -> None:
    collector = FakeGrpcCollector()
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                                        root_certificates=pki.ca.read_bytes(), require_client_auth=True)
    server, port = _start_grpc(collector, creds)
    try:
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://localhost:{port}",
               "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca), "OTEL_EXPORTER_OTLP_TIMEOUT": "5000"}
        without_client_cert = GrpcTransport(from_env(env, "traces"), "traces")
        try:
            refused = without_client_cert.send(b"x")
        finally:
            without_client_cert.close()
        assert not refused.ok
        env |= {"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert)}
        transport = GrpcTransport(from_env(env, "traces"), "traces")
        try:
            assert transport.send(PAYLOAD).ok
        finally:
            transport.close()
        assert [c.payload for c in collector.calls] == [PAYLOAD]
    finally:
        server.stop(None)


def test_https_mtls(pki: Pki, http_collector: FakeHttpCollector) -> None:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    http_collector.socket = context.wrap_socket(http_collector.socket, server_side=True)
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"https://localhost:{http_collector.port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "5000"}
    untrusted = _send_once(from_env(base, "metrics"))  # the system CAs do not know our test CA
    assert (untrusted.ok, untrusted.retryable) == (False, False)
    assert "certificate verify failed" in untrusted.error
    env = base | {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca), "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
                  "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert)}
    assert _send_once(from_env(env, "metrics")).ok
    assert [p.path for p in http_collector.posts] == ["/v1/metrics"]
    assert http_collector.posts[0].body == PAYLOAD


def test_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = OtlpExporterConfig(endpoint="https://localhost:1", protocol="grpc", certificate=str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="certificate file"):
        GrpcTransport(cfg, "traces")
    with pytest.raises(ValueError, match="TLS files"):
        HttpTransport(replace(cfg, protocol="http/protobuf"), "traces")


# ---------------------------------------------------------------------------------------------- our own receiver


@pytest.mark.parametrize(("protocol", "compression"), [("grpc", "none"), ("grpc", "gzip"),
                                                       ("http/protobuf", "none"), ("http/protobuf", "gzip")])
def test_interop_with_the_evaluator_receiver(make_daemon: Any, protocol: str, compression: str) -> None:
    d = make_daemon()
    endpoint = f"http://{d.grpc_endpoint}" if protocol == "grpc" else d.http_url
    cfg = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                    "OTEL_EXPORTER_OTLP_COMPRESSION": compression}, "traces")
    transport = make_transport(cfg, "traces")
    assert transport is not None
    req = request(span("alert firing", attrs={"data.rows": 42, "alert.rule_id": "r1"}))
    try:
        result = transport.send(req.SerializeToString())
    finally:
        transport.close()
    assert result == SendResult(ok=True, retryable=False, retry_after=None, error="")
    assert d.sql("SELECT name FROM spans") == [("alert firing",)]


def test_http_headers_cannot_override_the_framing(http_collector: FakeHttpCollector) -> None:
    cfg = _http_config(http_collector, headers=(("content-type", "text/plain"), ("x-ok", "1")))
    assert _send_once(cfg).ok
    assert http_collector.posts[0].headers["content-type"] == "application/x-protobuf"
    assert http_collector.posts[0].headers["x-ok"] == "1"
    with pytest.raises(ValueError, match="non-Latin-1"):
        HttpTransport(_http_config(http_collector, headers=(("x-name", "日本"),)), "traces")


# ------------------------------------------------------------------------------------------------- Alertmanager

def _am_transport(server: FakeHttpCollector, clock: Any, resend: float = 60.0) -> Any:
    from evaluator.exporter.alertmanager import AlertmanagerSettings, AlertmanagerTransport

    return AlertmanagerTransport(AlertmanagerSettings(url=f"http://127.0.0.1:{server.port}", resend_interval=resend,
                                                      timeout_seconds=5.0), clock)


def test_alertmanager_post_stamps_ends_at_when_sent_not_when_evaluated(http_collector: FakeHttpCollector) -> None:
    """A firing alert posted late (after an outage) must not arrive already expired: its endsAt is the send time
    plus 4 resend intervals. A resolved alert keeps its endsAt (when it resolved)."""
    import json

    from evaluator.testing import FakeClock

    clock = FakeClock(1_800_000_000.0)
    firing = {"labels": {"alertname": "A"}, "annotations": {}, "startsAt": "2027-01-15T08:00:00.000000Z"}
    resolved = {"labels": {"alertname": "B"}, "annotations": {}, "startsAt": "2027-01-15T07:00:00.000000Z",
                "endsAt": "2027-01-15T08:00:00.000000Z"}
    transport = _am_transport(http_collector, clock, resend=30.0)
    try:
        clock.advance(10)  # the post goes out 10 s after the evaluation
        assert transport.send(json.dumps([firing, resolved]).encode()).ok
    finally:
        transport.close()
    (post,) = http_collector.posts
    assert post.path == "/api/v2/alerts" and post.headers["content-type"] == "application/json"
    sent = json.loads(post.body)
    assert sent[0] == {**firing, "endsAt": "2027-01-15T08:02:10.000000Z"}  # 08:00:10 + 4 x 30 s
    assert sent[1] == resolved


@pytest.mark.parametrize("status", [429, 503])
def test_alertmanager_retry_after_is_used_and_counts_from_the_clock(http_collector: FakeHttpCollector,
                                                                    status: int) -> None:
    """Alertmanager (or a proxy in front of it) asking to wait: the delay is passed on to the outbox, in seconds or
    as an HTTP date taken relative to the daemon's clock."""
    from evaluator.testing import FakeClock

    clock = FakeClock(1_800_000_000.0)
    transport = _am_transport(http_collector, clock)
    http_collector.status = status
    try:
        http_collector.response_headers = {"Retry-After": "7"}
        seconds = transport.send(b"[]")
        http_collector.response_headers = {"Retry-After": email.utils.formatdate(clock.now() + 90, usegmt=True)}
        date = transport.send(b"[]")
    finally:
        transport.close()
    assert (seconds.ok, seconds.retryable, seconds.retry_after) == (False, True, 7.0)
    assert (date.ok, date.retryable, date.retry_after) == (False, True, 90.0)
    assert seconds.error.startswith(f"http {status}")


def test_alertmanager_resend_is_not_overtaken_by_a_post_recorded_after_it_read(
        http_collector: FakeHttpCollector) -> None:
    """The refresher reads the firing alerts and posts them under the transport's lock: an outbox post (say, the
    alert resolving) that comes in meanwhile goes out after the re-send, never before, so Alertmanager ends with
    the alert resolved rather than firing again."""
    import json

    from evaluator.testing import FakeClock

    transport = _am_transport(http_collector, FakeClock(1_800_000_000.0))
    outbox_post = threading.Thread(target=transport.send, args=(b'[{"labels": {"alertname": "resolved"}}]',))

    def read() -> list[dict[str, Any]]:
        outbox_post.start()
        outbox_post.join(0.5)  # it must wait for the re-send; without the lock it would be posted by now
        return [{"labels": {"alertname": "firing"}}]

    try:
        result = transport.send_current(read)
        outbox_post.join(10)
        assert result is not None and result.ok
        assert transport.send_current(lambda: []) is None  # nothing firing: nothing posted
    finally:
        transport.close()
    assert [json.loads(p.body)[0]["labels"]["alertname"] for p in http_collector.posts] == ["firing", "resolved"]
