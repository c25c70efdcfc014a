"""Optional Alertmanager output: alerts as Alertmanager v2 API alerts (`POST /api/v2/alerts`), so the routing to
pagers that teams already have keeps working.

Transitions to firing and to resolved go through the outbox (destination "alertmanager"), like the alert spans:
stored before sent, in order, retried. A resolved alert is sent with `endsAt` = the time it resolved. Alertmanager
also resolves by itself an alert it has not heard of for a while, so the refresher re-sends every firing alert
each `resend_interval` with `endsAt` = now + 4 intervals. Inhibited, pending and nodata transitions are not sent.

Labels: alertname, rule_id, group, rung, owner, severity, the rule's labels, and the series labels, with every
character Prometheus does not allow in a label name replaced by "_" (data.dataset -> data_dataset).
Annotations: summary, detail and the rule's other annotations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import structlog

from evaluator.clock import Clock
from evaluator.exporter.otlp_config import OtlpExporterConfig
from evaluator.exporter.transport import HttpTransport, SendResult
from evaluator.rules.engine import AlertEvent
from evaluator.rules.model import FIRING, RESOLVED, Rule
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker

ALERTMANAGER = "alertmanager"
_LABEL_RE = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class AlertmanagerSettings:
    url: str | None = None  # e.g. http://alertmanager:9093; None: no Alertmanager output
    resend_interval: float = 60.0
    timeout_seconds: float = 10.0


def label_name(name: str) -> str:
    out = _LABEL_RE.sub("_", name)
    return "_" + out if out[:1].isdigit() or not out else out


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def am_alert(rule: Rule, series: Iterable[tuple[str, str]], *, starts: float, ends: float, summary: str,
             detail: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    labels = {"alertname": rule.name, "rule_id": rule.id, "group": rule.group, "rung": rule.rung,
              "owner": rule.owner, "severity": rule.severity}
    labels.update({label_name(k): v for k, v in rule.labels})
    labels.update({label_name(k): v for k, v in series})
    notes = {label_name(k): v for k, v in (annotations or {}).items() if k != "summary"}
    notes.update({"summary": summary, "detail": detail})
    return {"labels": labels, "annotations": {k: v for k, v in notes.items() if v}, "startsAt": _iso(starts),
            "endsAt": _iso(ends)}


def transitions_payload(events: list[AlertEvent], resend_interval: float) -> bytes | None:
    """The outbox payload for an evaluation's transitions, or None when none is for Alertmanager."""
    alerts = []
    for ev in events:
        t = ev.transition
        if ev.inhibited or t.to_state not in (FIRING, RESOLVED):
            continue
        ends = t.at + 4 * resend_interval if t.to_state == FIRING else t.at
        alerts.append(am_alert(ev.rule, t.series, starts=t.at, ends=ends, summary=ev.summary, detail=t.detail,
                               annotations=ev.annotations))
    return json.dumps(alerts).encode() if alerts else None


class AlertmanagerTransport(HttpTransport):
    """POST application/json to <url>/api/v2/alerts; any 2xx acknowledges."""

    def __init__(self, settings: AlertmanagerSettings) -> None:
        assert settings.url
        super().__init__(OtlpExporterConfig(endpoint=settings.url.rstrip("/") + "/api/v2/alerts",
                                            timeout_seconds=settings.timeout_seconds), "traces")
        self.headers["Content-Type"] = "application/json"

    def _classify(self, response: Any, data: bytes) -> SendResult:
        if 200 <= response.status < 300:
            return SendResult(ok=True, retryable=False, retry_after=None, error="")
        return super()._classify(response, data)


class AlertmanagerRefresher(PeriodicWorker):
    """Re-sends every firing, not inhibited alert each resend_interval, so Alertmanager keeps it active."""

    def __init__(self, transport: AlertmanagerTransport, cursor_factory: Callable[[], duckdb.DuckDBPyConnection],
                 rules: Callable[[], Mapping[str, Rule]], clock: Clock, telemetry: Telemetry,
                 settings: AlertmanagerSettings, log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        super().__init__("alertmanager-refresher", settings.resend_interval)
        self._transport = transport
        self._cursor = cursor_factory
        self._rules = rules
        self._clock = clock
        self._settings = settings
        self._log = log or structlog.get_logger("alertmanager")
        self._resends = telemetry.counter("alertmanager_resends_total", "Re-sends of firing alerts, by outcome.",
                                          ("outcome",))

    def firing(self) -> list[dict[str, Any]]:
        rules = self._rules()
        cur = self._cursor()
        try:
            rows = cur.execute("""
                SELECT s.rule_id, s.series::VARCHAR, epoch_us(s.fired_at), s.detail,
                       (SELECT a.summary FROM alerts a WHERE a.rule_id = s.rule_id
                        AND a.series::VARCHAR = s.series::VARCHAR AND a.state = 'firing'
                        ORDER BY a.seq DESC LIMIT 1),
                       coalesce((SELECT a.inhibited FROM alerts a WHERE a.rule_id = s.rule_id
                                 AND a.series::VARCHAR = s.series::VARCHAR AND a.state = 'firing'
                                 ORDER BY a.seq DESC LIMIT 1), false)
                FROM alert_state s WHERE s.state = 'firing' ORDER BY s.rule_id, s.series""").fetchall()
        finally:
            cur.close()
        now = self._clock.now()
        out = []
        for rule_id, series, fired_us, detail, summary, inhibited in rows:
            rule = rules.get(rule_id)
            if rule is None or inhibited:
                continue
            starts = fired_us / 1e6 if fired_us is not None else now
            out.append(am_alert(rule, sorted(json.loads(series).items()), starts=starts,
                                ends=now + 4 * self._settings.resend_interval, summary=summary or rule.name,
                                detail=detail or "", annotations=dict(rule.annotations)))
        return out

    def tick(self) -> float | None:
        try:
            alerts = self.firing()
        except duckdb.Error as exc:
            self._log.warning("reading firing alerts failed", error=str(exc))
            return None
        if alerts:
            result = self._transport.send(json.dumps(alerts).encode())
            self._resends.inc(outcome="sent" if result.ok else "failed")
            if not result.ok:
                self._log.warning("re-sending firing alerts to Alertmanager failed", error=result.error)
        return None
