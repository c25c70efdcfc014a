from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from evaluator.daemon import Daemon
from evaluator.store.store import Store, StoreSettings
from evaluator.testing import loopback_config

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class RunningDaemon:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def grpc_endpoint(self) -> str:
        assert self.daemon.grpc is not None
        return f"127.0.0.1:{self.daemon.grpc.port}"

    @property
    def http_url(self) -> str:
        assert self.daemon.http is not None
        return f"http://127.0.0.1:{self.daemon.http.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.admin.port}"

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        cur = self.daemon.store.cursor()
        try:
            return cur.execute(query, params or []).fetchall()
        finally:
            cur.close()

    def export(self, request: trace_service_pb2.ExportTraceServiceRequest | bytes,
               **kwargs: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        """A raw gRPC Export call (for what SDKs would never send)."""
        data = request if isinstance(request, bytes) else request.SerializeToString()
        with grpc.insecure_channel(self.grpc_endpoint) as channel:
            call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                       response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
            return call(data, timeout=kwargs.pop("timeout", 30), **kwargs)

    def export_with_call(self, request: trace_service_pb2.ExportTraceServiceRequest | bytes) -> Any:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        with grpc.insecure_channel(self.grpc_endpoint) as channel:
            call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                       response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
            return call.with_call(data, timeout=30)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(**changes: Any) -> RunningDaemon:
        daemon = Daemon(loopback_config(tmp_path / "evaluator.duckdb", **changes))
        daemon.start()
        started.append(daemon)
        return RunningDaemon(daemon)

    yield make
    for d in started:
        d.shutdown()


@pytest.fixture
def daemon(make_daemon: Any) -> RunningDaemon:
    running: RunningDaemon = make_daemon()
    return running


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A started store on a DuckDB file in the test's temp dir."""
    s = Store(StoreSettings(str(tmp_path / "x.duckdb")))
    s.start()
    yield s
    s.shutdown()


@pytest.fixture
def cur(store: Store) -> Iterator[duckdb.DuckDBPyConnection]:
    c = store.cursor()
    yield c
    c.close()


@pytest.fixture
def thread_guard() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, f"threads left behind: {[t.name for t in leaked]}"


def open_db(path: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(path), read_only=True)
