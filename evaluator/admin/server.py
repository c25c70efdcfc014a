"""Admin HTTP: /healthz (the process answers), /readyz (every component is up), /metrics (Prometheus text),
/ladder (the four rungs per dataset, JSON; ?dataset= to pick one) and /alerts (pending and firing, JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import structlog

from evaluator.httpbase import HttpServer, Request, Response, text
from evaluator.postmortem.ladder import build_ladder, current_alerts
from evaluator.telemetry import Telemetry


@dataclass(frozen=True)
class AdminSettings:
    listen: str = "127.0.0.1:13133"
    max_connections: int = 16


class AdminServer:
    def __init__(
        self,
        settings: AdminSettings,
        telemetry: Telemetry,
        ready: Callable[[], str | None],
        log: structlog.typing.FilteringBoundLogger | None = None,
        cursor_factory: Callable[[], duckdb.DuckDBPyConnection] | None = None,
    ) -> None:
        """ready() returns None when ready, or why not; cursor_factory serves /ladder and /alerts."""
        self._telemetry = telemetry
        self._ready = ready
        self._cursor = cursor_factory
        self.server = HttpServer("admin", settings.listen, {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/ladder": self._ladder,
            "/alerts": self._alerts,
        }, max_connections=settings.max_connections, log=log)

    @property
    def port(self) -> int | None:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def shutdown(self, grace: float = 5.0) -> None:
        self.server.shutdown(grace)

    def _healthz(self, request: Request) -> Response:
        return text(200, "ok")

    def _readyz(self, request: Request) -> Response:
        why = self._ready()
        return text(200, "ready") if why is None else text(503, f"not ready: {why}")

    def _from_store(self, build: Callable[[duckdb.DuckDBPyConnection], Any]) -> Response:
        if self._cursor is None:
            return text(404, "no store")
        try:
            cur = self._cursor()
        except Exception as exc:  # the store is closed (shutting down)
            return text(503, f"store unavailable: {exc}")
        try:
            return Response(200, json.dumps(build(cur), indent=2).encode(), "application/json")
        finally:
            cur.close()

    def _ladder(self, request: Request) -> Response:
        values = request.query.get("dataset")
        dataset = values[0] if values else None
        return self._from_store(lambda cur: [lad.as_dict() for lad in build_ladder(cur, dataset)])

    def _alerts(self, request: Request) -> Response:
        return self._from_store(current_alerts)

    def _metrics(self, request: Request) -> Response:
        return Response(200, self._telemetry.render_prometheus().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")
