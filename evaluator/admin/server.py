"""Admin HTTP: /healthz (the process answers), /readyz (every component is up), /metrics (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from evaluator.httpbase import HttpServer, Request, Response, text
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
    ) -> None:
        """ready() returns None when ready, or why not."""
        self._telemetry = telemetry
        self._ready = ready
        self.server = HttpServer("admin", settings.listen, {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
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

    def _metrics(self, request: Request) -> Response:
        return Response(200, self._telemetry.render_prometheus().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")
