"""Admin HTTP: /healthz (the process answers), /readyz (every component is up), /metrics (Prometheus text),
/ladder (per subject, the rungs with every rule's series, JSON; ?dataset=, ?model=, ?subject=, ?service= to pick; an
unknown name is 404 with the known ones), /alerts (pending and firing, JSON), POST /evaluate (evaluate every rule
group now, or at {"at": T}; the groups and the transitions, JSON) and POST /query (one read-only SQL statement over
the store, as JSON, CSV or Arrow; evaluator/postmortem/query.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import structlog

from evaluator.httpbase import BodyTooLarge, HttpServer, Request, Response, text
from evaluator.postmortem.ladder import UnknownSubject, build_ladder, current_alerts, rule_infos, select_subjects
from evaluator.postmortem.query import FORMATS, QueryLimits, QueryProblem, QueryRunner, parse_request
from evaluator.security.auth import Authenticator
from evaluator.security.tls import TlsSettings
from evaluator.telemetry import Telemetry
from evaluator.timeparse import parse_time


@dataclass(frozen=True)
class AdminSettings:
    listen: str = "127.0.0.1:13133"
    max_connections: int = 16
    tls: TlsSettings | None = None
    query: QueryLimits = field(default_factory=QueryLimits)  # POST /query: row and time limits, concurrency
    external_url: str | None = None  # where people reach this server (alert links); None: derived from listen


# Kubernetes probes need no token: with auth configured every other path (present and future) requires one.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class AdminServer:
    def __init__(
        self,
        settings: AdminSettings,
        telemetry: Telemetry,
        ready: Callable[[], str | None],
        log: structlog.typing.FilteringBoundLogger | None = None,
        cursor_factory: Callable[[], duckdb.DuckDBPyConnection] | None = None,
        auth: Authenticator | None = None,
        evaluate: Callable[[float | None], dict[str, Any]] | None = None,
        rules: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        """ready() returns None when ready, or why not; cursor_factory serves /ladder and /alerts; evaluate()
        serves POST /evaluate (it raises RuntimeError when the daemon cannot evaluate now); rules() returns the
        loaded rules, which /ladder places on their rungs (None: the rules the store knows of)."""
        self._evaluate = evaluate
        self._rules = rules
        self._telemetry = telemetry
        self._ready = ready
        self._cursor = cursor_factory
        self.query_limits = settings.query
        self.queries = QueryRunner(cursor_factory, telemetry, settings.query) if cursor_factory is not None else None
        self.server = HttpServer("admin", settings.listen, {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/ladder": self._ladder,
            "/alerts": self._alerts,
            "/evaluate": self._evaluate_now,
            "/query": self._query,
        }, max_connections=settings.max_connections, log=log, tls=settings.tls, auth=auth, open_paths=OPEN_PATHS,
            telemetry=telemetry, label="admin")

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
        def first(name: str) -> str | None:
            values = request.query.get(name)
            return values[0] if values else None

        service = first("service")
        rules = rule_infos(self._rules()) if self._rules is not None else None
        try:
            return self._from_store(lambda cur: [s.as_dict() for s in select_subjects(
                build_ladder(cur, rules, service).subjects, first("dataset"), first("model"), first("subject"),
                f" of service {service}" if service else "")])
        except UnknownSubject as exc:
            return Response(404, json.dumps({"error": str(exc), "known": exc.known}).encode(), "application/json")

    def _evaluate_now(self, request: Request) -> Response:
        if request.method != "POST":
            return text(405, "use POST /evaluate", Allow="POST")
        body = request.read_body(65536)
        if self._evaluate is None:
            return text(404, "no rule engine")
        try:
            at = _evaluate_at(body)
        except ValueError as exc:
            return text(400, str(exc))
        try:
            result = self._evaluate(at)
        except RuntimeError as exc:
            return text(503, f"cannot evaluate now: {exc}")
        return Response(200, json.dumps(result, indent=2).encode(), "application/json")

    def _query(self, request: Request) -> Response:
        if request.method != "POST":
            return text(405, 'use POST /query with {"sql": "SELECT ..."}', Allow="POST")
        try:
            body = request.read_body(self.query_limits.max_body_bytes)
        except BodyTooLarge as exc:
            return _query_error(413, {"error": f"{exc}; send one statement", "reason": "refused"})
        if self.queries is None:
            return _query_error(404, {"error": "no store", "reason": "error"})
        try:
            sql, fmt, max_rows, timeout = parse_request(body, request.headers.get("Content-Type") or "",
                                                        request.headers.get("Accept") or "")
        except QueryProblem as exc:
            self.queries.count(exc.reason)
            return _query_error(exc.status, exc.as_dict())
        try:
            result, data = self.queries.run_encoded(sql, fmt, max_rows, timeout)
        except QueryProblem as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else {}
            return _query_error(exc.status, exc.as_dict(), headers)
        return Response(200, data, FORMATS[fmt], headers={
            "X-Row-Count": str(result.row_count), "X-Truncated": "true" if result.truncated else "false"})

    def _alerts(self, request: Request) -> Response:
        return self._from_store(current_alerts)

    def _metrics(self, request: Request) -> Response:
        return Response(200, self._telemetry.render_prometheus().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")


def _query_error(status: int, doc: dict[str, str], headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(doc).encode(), "application/json", headers=headers or {})


def _evaluate_at(body: bytes) -> float | None:
    """POST /evaluate's optional JSON body {"at": <ISO-8601 or unix seconds>}: evaluate at that time instead of
    now (never before a group's last evaluation). An empty body means now."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError('the body must be empty or JSON like {"at": "2026-11-15T07:00:00Z"}') from None
    if not isinstance(data, dict) or set(data) - {"at"}:
        raise ValueError('the body must be empty or JSON like {"at": "2026-11-15T07:00:00Z"}')
    at = data.get("at")
    if at is None:
        return None
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    if isinstance(at, str):
        return parse_time(at)
    raise ValueError("at: use ISO-8601 like 2026-11-15T07:00:00Z or unix seconds")
