"""Moving already-encoded OTLP request bytes to a Collector, and saying whether a failure is worth a retry.

A transport does one attempt per `send`; retrying, backoff and queueing belong to the caller, which gets a
`SendResult` classified per the OTLP spec (otlp/#failures, #otlpgrpc-throttling, #otlphttp-throttling):

- gRPC: OK -> ok. UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED, OUT_OF_RANGE, DATA_LOSS -> retryable;
  RESOURCE_EXHAUSTED -> retryable only when the server sent RetryInfo; every other code -> permanent.
  `retry_after` comes from google.rpc.RetryInfo, looked up in the `grpc-status-details-bin` trailer (a
  google.rpc.Status whose details hold the RetryInfo) and then in a `google.rpc.retryinfo-bin` trailer.
  A refused connection is UNAVAILABLE, so retryable.
- HTTP: 2xx -> ok; 429, 502, 503, 504 -> retryable with `Retry-After` (delta seconds or an HTTP date);
  any other status -> permanent (the body's google.rpc.Status message, or its text, goes in `error`).
  Connection errors and timeouts -> retryable. Redirects are not followed (a redirected POST is permanent),
  and a server certificate that fails verification is permanent too (retrying cannot fix the trust store).
- A success carrying `partial_success` (some spans/points rejected) is still ok — retrying would be rejected
  the same way — with the server's message (or the rejected count) in `error`.

Both transports are safe to call from several threads. `timeout_seconds` is the gRPC deadline; for HTTP it
is the socket timeout of each connect/send/read step.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from evaluator.exporter.otlp_config import SIGNALS, OtlpExporterConfig, grpc_target

GRPC_METHODS = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
}
USER_AGENT = "otel-evaluator"
RETRYABLE_GRPC = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS,
})
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_MAX_ERROR_BODY = 512


@dataclass(frozen=True)
class SendResult:
    ok: bool
    retryable: bool
    retry_after: float | None
    error: str


class Transport(Protocol):
    def send(self, payload: bytes) -> SendResult: ...

    def close(self) -> None: ...


def _check_signal(signal: str) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r} is not one of {', '.join(SIGNALS)}")


def _read_file(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path!r}: {exc.strerror or exc}") from None


def _partial_success_message(signal: str, body: bytes) -> str:
    """'' for a full success; the server's message (or the rejected count) for a partial one."""
    try:
        if signal == "traces":
            traces = ExportTraceServiceResponse.FromString(body)
            if not traces.HasField("partial_success"):
                return ""
            rejected, message = traces.partial_success.rejected_spans, traces.partial_success.error_message
        else:
            metrics = ExportMetricsServiceResponse.FromString(body)
            if not metrics.HasField("partial_success"):
                return ""
            rejected, message = metrics.partial_success.rejected_data_points, metrics.partial_success.error_message
    except DecodeError:
        return ""
    noun = "spans" if signal == "traces" else "data points"
    if message:
        return f"partial success ({rejected} {noun} rejected): {message}"
    if rejected:
        return f"partial success: {rejected} {noun} rejected"
    return ""


def _retry_info_seconds(info: error_details_pb2.RetryInfo) -> float | None:
    if not info.HasField("retry_delay"):
        return None
    return max(0.0, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


def grpc_retry_after(trailers: Any) -> float | None:
    """The RetryInfo delay from a call's trailing metadata, or None."""
    found: float | None = None
    for key, value in trailers or ():
        if not isinstance(value, bytes):
            continue
        try:
            if key == "grpc-status-details-bin":
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        detail.Unpack(info)
                        delay = _retry_info_seconds(info)
                        if delay is not None:
                            return delay
            elif key == "google.rpc.retryinfo-bin" and found is None:
                found = _retry_info_seconds(error_details_pb2.RetryInfo.FromString(value))
        except DecodeError:
            continue
    return found


class GrpcTransport:
    """One channel to the Collector; each `send` is one unary Export call with the raw request bytes."""

    def __init__(self, config: OtlpExporterConfig, signal: str) -> None:
        _check_signal(signal)
        if not config.endpoint:
            raise ValueError("GrpcTransport needs an endpoint")
        self.signal = signal
        self.timeout = config.timeout_seconds
        self.target, tls = grpc_target(config.endpoint, config.insecure)
        self.metadata = tuple(config.headers)
        self.compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        options = [("grpc.primary_user_agent", USER_AGENT)]
        if tls:
            root = _read_file(config.certificate, "certificate")
            key = _read_file(config.client_key, "client key")
            chain = _read_file(config.client_certificate, "client certificate")
            if (key is None) != (chain is None):
                raise ValueError("mTLS needs both a client key and a client certificate")
            creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
            self.channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        self._call = self.channel.unary_unary(GRPC_METHODS[signal], request_serializer=None,
                                              response_deserializer=None)

    def send(self, payload: bytes) -> SendResult:
        try:
            response = self._call(payload, timeout=self.timeout, metadata=self.metadata or None,
                                  compression=self.compression)
        except grpc.RpcError as exc:
            return self._classify(exc)
        except ValueError as exc:  # e.g. the channel was closed
            return SendResult(ok=False, retryable=False, retry_after=None, error=f"grpc: {exc}")
        return SendResult(ok=True, retryable=False, retry_after=None,
                          error=_partial_success_message(self.signal, bytes(response or b"")))

    def _classify(self, exc: grpc.RpcError) -> SendResult:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        trailers = exc.trailing_metadata() if isinstance(exc, grpc.Call) else ()
        retry_after = grpc_retry_after(trailers)
        retryable = code in RETRYABLE_GRPC or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None)
        return SendResult(ok=False, retryable=retryable, retry_after=retry_after if retryable else None,
                          error=f"grpc {code.name}: {details or ''}".rstrip(": "))

    def close(self) -> None:
        self.channel.close()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta seconds or an HTTP date) -> seconds from now, or None if absent/garbled."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def _http_error_message(status: int, reason: str, content_type: str, body: bytes) -> str:
    detail = ""
    if "protobuf" in content_type:
        try:
            detail = status_pb2.Status.FromString(body).message
        except DecodeError:
            detail = ""
    if not detail and body:
        detail = body[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip()
    return f"http {status} {reason}" + (f": {detail}" if detail else "")


class HttpTransport:
    """POST application/x-protobuf to the signal's URL over one kept-alive HTTP/1.1 connection."""

    def __init__(self, config: OtlpExporterConfig, signal: str) -> None:
        _check_signal(signal)
        if not config.endpoint:
            raise ValueError("HttpTransport needs an endpoint")
        self.signal = signal
        self.timeout = config.timeout_seconds
        self.gzip = config.compression == "gzip"
        self.url = config.endpoint
        parts = urllib.parse.urlsplit(config.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {config.endpoint!r} is not an http:// or https:// URL")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        reserved = {"content-type", "content-encoding", "content-length", "host", "transfer-encoding"}
        self.headers = {k: v for k, v in config.headers if k.lower() not in reserved}
        for k, v in self.headers.items():
            try:
                k.encode("ascii")
                v.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {k!r} cannot be sent over HTTP/1.1 (non-Latin-1 characters)") from None
        self.headers["Content-Type"] = "application/x-protobuf"
        self.headers.setdefault("user-agent", USER_AGENT)
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.context: ssl.SSLContext | None = None
        if self.https:
            if (config.client_key is None) != (config.client_certificate is None):
                raise ValueError("mTLS needs both a client key and a client certificate")
            try:
                self.context = ssl.create_default_context(cafile=config.certificate)
                if config.client_certificate:
                    self.context.load_cert_chain(config.client_certificate, config.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the TLS files: {exc}") from None
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=self.context)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def send(self, payload: bytes) -> SendResult:
        body = gzip.compress(payload) if self.gzip else payload
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                conn = self._connection()
                try:
                    conn.request("POST", self.path, body=body, headers=self.headers)
                    response = conn.getresponse()
                    data = response.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    self._drop()
                    if reused and attempt == 1:
                        continue  # the server closed an idle kept-alive connection: one fresh try
                    return SendResult(ok=False, retryable=True, retry_after=None, error=f"http: {exc!r}")
                except ssl.SSLCertVerificationError as exc:
                    self._drop()
                    return SendResult(ok=False, retryable=False, retry_after=None, error=f"http: TLS: {exc}")
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    return SendResult(ok=False, retryable=True, retry_after=None,
                                      error=f"http: {exc!r} sending to {self.url}")
                if response.will_close:
                    self._drop()
                return self._classify(response, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _classify(self, response: http.client.HTTPResponse, data: bytes) -> SendResult:
        status = response.status
        if 200 <= status < 300:
            return SendResult(ok=True, retryable=False, retry_after=None,
                              error=_partial_success_message(self.signal, data))
        error = _http_error_message(status, response.reason, response.getheader("Content-Type") or "", data)
        if status in RETRYABLE_HTTP:
            return SendResult(ok=False, retryable=True,
                              retry_after=parse_retry_after(response.getheader("Retry-After")), error=error)
        return SendResult(ok=False, retryable=False, retry_after=None, error=error)

    def close(self) -> None:
        with self._lock:
            self._drop()


def make_transport(config: OtlpExporterConfig, signal: str) -> Transport | None:
    """The transport for `config.protocol`, or None when no endpoint is configured (nothing is sent)."""
    _check_signal(signal)
    if not config.endpoint:
        return None
    if config.protocol == "grpc":
        return GrpcTransport(config, signal)
    if config.protocol == "http/protobuf":
        return HttpTransport(config, signal)
    raise ValueError(f"protocol {config.protocol!r} is not one of grpc, http/protobuf")
