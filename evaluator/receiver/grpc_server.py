"""OTLP/gRPC receiver: TraceService/Export, grpc.health.v1 and server reflection.

The Export method is registered with raw bytes in and out, so the size and the byte budget are checked before
any parsing, and the decoder reads the wire bytes directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from evaluator.receiver.errors import Refused
from evaluator.receiver.fairness import client_key, grpc_peer_host
from evaluator.receiver.ingest import Ingestor
from evaluator.security.auth import Authenticator, GrpcAuthInterceptor, bearer_token
from evaluator.security.tls import GrpcTls, TlsSettings

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
RETRY_INFO_TRAILER = "google.rpc.retryinfo-bin"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"


@dataclass(frozen=True)
class GrpcSettings:
    listen: str = "127.0.0.1:4317"
    max_workers: int = 16
    max_concurrent_streams: int = 100  # per connection
    max_receive_bytes: int = 64 * 1024 * 1024
    tls: TlsSettings | None = None


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: Sequence[tuple[str, bytes | str]]


class _AbortStatus(_Status, grpc.Status):
    pass


def refused_status(refused: Refused) -> _AbortStatus:
    """The status for a refusal: RetryInfo in the google.rpc.Status details and in its own trailer."""
    code = refused.kind.grpc_code
    status = status_pb2.Status(code=code.value[0], message=refused.message)
    trailers: list[tuple[str, bytes | str]] = []
    if refused.retry_after is not None:
        seconds = int(refused.retry_after)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((refused.retry_after - seconds) * 1e9)))
        detail = any_pb2.Any()
        detail.Pack(retry)
        status.details.append(detail)
        trailers.append((RETRY_INFO_TRAILER, retry.SerializeToString()))
    trailers.append((STATUS_DETAILS_TRAILER, status.SerializeToString()))
    return _AbortStatus(code, refused.message, tuple(trailers))


class GrpcReceiver:
    def __init__(
        self,
        ingestor: Ingestor,
        settings: GrpcSettings,
        log: structlog.typing.FilteringBoundLogger | None = None,
        *,
        auth: Authenticator | None = None,
    ) -> None:
        """auth: require a bearer token in the `authorization` metadata of every call but health checks."""
        self._ingestor = ingestor
        self.settings = settings
        self._auth = auth
        # Each Export holds a worker thread until its commit: clients share the threads as they share the budget.
        ingestor.budget.set_handlers("grpc", settings.max_workers)
        self._log = log or structlog.get_logger("grpc")
        self.tls = GrpcTls(settings.tls, log=self._log) if settings.tls is not None else None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._lock = threading.Lock()
        self.port: int | None = None

    def _client(self, context: grpc.ServicerContext) -> str:
        """Who sent the call, for the per-client share of the budget: the client header, else the (checked)
        token, else the peer's address."""
        header = self._ingestor.settings.fairness.client_header
        named: str | None = None
        authorization: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == header:
                named = value if isinstance(value, str) else value.decode("utf-8", "replace")
            elif key == "authorization" and self._auth is not None and isinstance(value, str):
                authorization = value
        return client_key(named, bearer_token(authorization), grpc_peer_host(context.peer()))

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            result = self._ingestor.export_protobuf(request, "grpc", self._client(context))
        except Refused as refused:
            context.abort_with_status(refused_status(refused))
            raise AssertionError("abort_with_status returned") from None  # pragma: no cover
        response = trace_service_pb2.ExportTraceServiceResponse()
        if result.rejected:
            response.partial_success.rejected_spans = result.rejected
            response.partial_success.error_message = result.message
        return response.SerializeToString()

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            s = self.settings
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", s.max_receive_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                ("grpc.max_concurrent_streams", s.max_concurrent_streams),
                # Accept the Collector's and the SDKs' client keepalive pings (every 10 s or more, with or
                # without calls in flight) instead of answering GOAWAY "too_many_pings".
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
                # Two daemons must not silently share a port.
                ("grpc.so_reuseport", 0),
            ]
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="otlp-grpc"),
                options=options,
                interceptors=[GrpcAuthInterceptor(self._auth)] if self._auth is not None else None,
            )
            handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {
                "Export": grpc.unary_unary_rpc_method_handler(self._export),
            })
            server.add_generic_rpc_handlers((handler,))
            health_servicer = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(
                (TRACE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME),
                server,
            )
            try:
                if self.tls is not None:
                    port = server.add_secure_port(s.listen, self.tls.credentials())
                else:
                    port = server.add_insecure_port(s.listen)
            except RuntimeError as exc:
                raise OSError(f"cannot listen for OTLP/gRPC on {s.listen}: {exc}") from None
            if not port:
                raise OSError(f"cannot listen for OTLP/gRPC on {s.listen}")
            server.start()
            for name in ("", TRACE_SERVICE):
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._server, self._health, self.port = server, health_servicer, port
            self._log.info("otlp grpc receiver listening", address=s.listen.rsplit(":", 1)[0], port=port,
                           tls="mtls" if s.tls and s.tls.client_ca_file else bool(s.tls), auth=self._auth is not None)

    def stop_accepting(self) -> None:
        """Tell health checkers we are going away (before the grace period of shutdown)."""
        if self._health is not None:
            self._health.enter_graceful_shutdown()

    def shutdown(self, grace: float = 10.0) -> None:
        """Refuse new calls, let in-flight exports finish (up to `grace` seconds). Idempotent."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        self.stop_accepting()
        server.stop(grace).wait()
        self._log.info("otlp grpc receiver stopped")
