"""Optional Alertmanager output: alerts as Alertmanager v2 API alerts (`POST /api/v2/alerts`), so the routing to
pagers that teams already have keeps working.

Transitions to firing and to resolved go through the outbox (destination "alertmanager"), like the alert spans:
stored before sent, in order, retried. Alertmanager also resolves by itself an alert it has not heard of for a
while, so the refresher re-sends every firing alert each `resend_interval`. Inhibited, pending and nodata
transitions are not sent.

What Alertmanager receives for an alert is the same on every post of an episode, first send and re-sends alike:
labels, annotations (rendered when the transition was recorded; re-sends read them back from the `alerts`
table), `startsAt` (when the episode started) and `generatorURL`. Only `endsAt` moves: a firing alert is stored
without it and the transport stamps it when it posts (send time + 4 resend intervals), so a post delivered late,
after an outage, is not already expired; a resolved alert carries `endsAt` = the time it resolved.

Labels: alertname, rule_id, group, rung, owner, severity, the rule's labels, and the series labels, with every
character Prometheus does not allow in a label name replaced by "_" (data.dataset -> data_dataset).
Annotations: summary, detail and the rule's other annotations. generatorURL: the admin server's /ladder of the
alert's dataset at the alert's time (encode.ladder_url).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import duckdb
import structlog

from evaluator.clock import Clock
from evaluator.exporter.encode import alert_time, ladder_url
from evaluator.exporter.otlp_config import OtlpExporterConfig
from evaluator.exporter.transport import HttpTransport, SendResult, parse_retry_after
from evaluator.rules.engine import AlertEvent
from evaluator.rules.model import FIRING, RESOLVED, Rule
from evaluator.rules.state import Transition
from evaluator.rules.template import render
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker

ALERTMANAGER = "alertmanager"
_LABEL_RE = re.compile(r"[^a-zA-Z0-9_]")
ENDS_AFTER_INTERVALS = 4  # a firing alert's endsAt: this many resend intervals after the post


@dataclass(frozen=True)
class AlertmanagerSettings:
    url: str | None = None  # e.g. http://alertmanager:9093; None: no Alertmanager output
    resend_interval: float = 60.0
    timeout_seconds: float = 10.0
    max_backoff_seconds: float = 30.0  # the longest wait between retries of a failed post (Retry-After aside)


def label_name(name: str) -> str:
    out = _LABEL_RE.sub("_", name)
    return "_" + out if out[:1].isdigit() or not out else out


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def am_alert(rule: Rule, series: Iterable[tuple[str, str]], *, starts: float, ends: float | None, summary: str,
             detail: str, annotations: Mapping[str, str] | None = None, url: str | None = None) -> dict[str, Any]:
    """One Alertmanager alert; without `ends` (a firing alert) the transport stamps endsAt when it posts."""
    series = tuple(series)
    labels = {"alertname": rule.name, "rule_id": rule.id, "group": rule.group, "rung": rule.rung,
              "owner": rule.owner, "severity": rule.severity}
    labels.update({label_name(k): v for k, v in rule.labels})
    labels.update({label_name(k): v for k, v in series})
    notes = {label_name(k): v for k, v in (annotations or {}).items() if k != "summary"}
    notes.update({"summary": summary, "detail": detail})
    alert: dict[str, Any] = {"labels": labels, "annotations": {k: v for k, v in notes.items() if v},
                             "startsAt": _iso(starts)}
    if ends is not None:
        alert["endsAt"] = _iso(ends)
    if url is not None:
        alert["generatorURL"] = url
    return alert


def episode_start(t: Transition) -> float:
    """startsAt of a firing or resolved transition: when its firing episode started (not when it resolved)."""
    return t.started_at if t.started_at is not None else t.at


def transitions_payload(events: list[AlertEvent], base_url: str) -> bytes | None:
    """The outbox payload for an evaluation's transitions, or None when none is for Alertmanager. Firing alerts
    have no endsAt yet: AlertmanagerTransport stamps it when it posts. base_url: the admin server's external URL
    (generatorURL)."""
    alerts = []
    for ev in events:
        t = ev.transition
        if ev.inhibited or t.to_state not in (FIRING, RESOLVED):
            continue
        alerts.append(am_alert(ev.rule, t.series, starts=episode_start(t),
                               ends=t.at if t.to_state == RESOLVED else None, summary=ev.summary, detail=t.detail,
                               annotations=ev.annotations, url=ladder_url(base_url, t.series, alert_time(t))))
    return json.dumps(alerts).encode() if alerts else None


def stamp_ends(payload: bytes, now: float, resend_interval: float) -> bytes:
    """The payload with endsAt = now + 4 resend intervals on every alert that has none (the firing ones).
    A payload that is not a JSON list of alerts is returned unchanged (Alertmanager will say what is wrong)."""
    try:
        alerts = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(alerts, list) or not all(isinstance(a, dict) for a in alerts):
        return payload
    ends = _iso(now + ENDS_AFTER_INTERVALS * resend_interval)
    return json.dumps([a if a.get("endsAt") else {**a, "endsAt": ends} for a in alerts]).encode()


class AlertmanagerTransport(HttpTransport):
    """POST application/json to <url>/api/v2/alerts; any 2xx acknowledges; 429/502/503/504 and connection errors
    are retryable, with Alertmanager's (or its proxy's) Retry-After.

    Every post stamps endsAt on firing alerts at send time. The outbox's posts and the refresher's re-sends go
    through one lock (`send`, `send_current`), so a re-send never overtakes a transition recorded after it read
    the firing alerts: a resolved alert is not made firing again by a re-send that was already on its way."""

    def __init__(self, settings: AlertmanagerSettings, clock: Clock) -> None:
        assert settings.url
        super().__init__(OtlpExporterConfig(endpoint=settings.url.rstrip("/") + "/api/v2/alerts",
                                            timeout_seconds=settings.timeout_seconds), "traces")
        self.headers["Content-Type"] = "application/json"
        self._clock = clock
        self._resend_interval = settings.resend_interval
        self._order = threading.Lock()

    def send(self, payload: bytes) -> SendResult:
        with self._order:
            return self._post(payload)

    def send_current(self, read: Callable[[], list[dict[str, Any]]]) -> SendResult | None:
        """Read the alerts to re-send and post them, with no other post in between. None: nothing to send."""
        with self._order:
            alerts = read()
            return self._post(json.dumps(alerts).encode()) if alerts else None

    def _post(self, payload: bytes) -> SendResult:
        return super().send(stamp_ends(payload, self._clock.now(), self._resend_interval))

    def _classify(self, response: Any, data: bytes) -> SendResult:
        if 200 <= response.status < 300:
            return SendResult(ok=True, retryable=False, retry_after=None, error="")
        result = super()._classify(response, data)
        if result.retryable:  # an HTTP-date Retry-After counts from our clock
            result = replace(result, retry_after=parse_retry_after(response.getheader("Retry-After"),
                                                                   self._clock.now()))
        return result


# The latest firing or resolved transition per firing series: the current episode's, when it is a firing one.
# {start}: the time its first send used as startsAt (the transition's started_at, else its time), from the
# columns this store has (alert_start_sql).
_FIRING_SQL = """
    WITH latest AS (
        SELECT rule_id, series::VARCHAR AS series, state, epoch_us({start}) AS start_us, summary, detail,
               annotations::VARCHAR AS annotations, inhibited
        FROM alerts
        WHERE state IN ('firing', 'resolved')
          AND rule_id IN (SELECT rule_id FROM alert_state WHERE state = 'firing')
        QUALIFY row_number() OVER (PARTITION BY rule_id, series::VARCHAR ORDER BY seq DESC) = 1)
    SELECT s.rule_id, s.series::VARCHAR, epoch_us(s.fired_at), s.value, s.threshold::VARCHAR, s.detail,
           l.state = 'firing', l.start_us, l.summary, l.detail, l.annotations, coalesce(l.inhibited, false)
    FROM alert_state s LEFT JOIN latest l ON l.rule_id = s.rule_id AND l.series = s.series::VARCHAR
    WHERE s.state = 'firing'
    ORDER BY s.rule_id, s.series::VARCHAR"""


def alert_start_sql(cur: duckdb.DuckDBPyConnection) -> str:
    """The SQL for a recorded transition's episode start: `started_at` where the store records it, else the time
    of the transition (`changed_at`, or `evaluated_at` in stores that keep only that), as episode_start does."""
    columns = {row[0] for row in cur.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'alerts'").fetchall()}
    return "coalesce(" + ", ".join(c for c in ("started_at", "changed_at", "evaluated_at") if c in columns) + ")"


class AlertmanagerRefresher(PeriodicWorker):
    """Re-sends every firing, not inhibited alert each resend_interval, so Alertmanager keeps it active.

    A re-send is the first send again: the labels, the annotations and summary rendered in the latest firing
    transition of the current episode (the `alerts` table), the episode's start and the same generatorURL.
    While Alertmanager posts wait in the outbox, they go first: the round is skipped."""

    def __init__(self, transport: AlertmanagerTransport, cursor_factory: Callable[[], duckdb.DuckDBPyConnection],
                 rules: Callable[[], Mapping[str, Rule]], clock: Clock, telemetry: Telemetry,
                 settings: AlertmanagerSettings, base_url: Callable[[], str],
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        """base_url() gives the admin server's external URL (known once the admin server listens)."""
        super().__init__("alertmanager-refresher", settings.resend_interval)
        self._transport = transport
        self._cursor = cursor_factory
        self._rules = rules
        self._clock = clock
        self._base_url = base_url
        self._start_sql: str | None = None
        self._log = log or structlog.get_logger("alertmanager")
        self._resends = telemetry.counter("alertmanager_resends_total", "Re-sends of firing alerts, by outcome.",
                                          ("outcome",))

    def firing(self) -> list[dict[str, Any]]:
        """The firing, not inhibited alerts as their first send had them (endsAt is stamped when posted)."""
        rules = self._rules()
        cur = self._cursor()
        try:
            if self._start_sql is None:
                self._start_sql = alert_start_sql(cur)
            rows = cur.execute(_FIRING_SQL.format(start=self._start_sql)).fetchall()
        finally:
            cur.close()
        base_url = self._base_url()
        out = []
        for (rule_id, series_json, fired_us, value, threshold, state_detail, recorded, start_us, summary, detail,
             notes_json, inhibited) in rows:
            rule = rules.get(rule_id)
            if rule is None or inhibited:
                continue
            series = tuple(sorted(json.loads(series_json).items()))
            if recorded:
                starts = start_us / 1e6
                notes: dict[str, str] = json.loads(notes_json) if notes_json else {}
            else:  # the transition is no longer in `alerts` (retention): render from the current state
                starts = fired_us / 1e6 if fired_us is not None else self._clock.now()
                t = Transition(rule_id, series, starts, FIRING, FIRING, value,
                               _threshold(threshold), 0, None, detail=state_detail or "")
                notes = {k: render(v, rule, t) for k, v in rule.annotations}
                summary, detail = notes.get("summary") or f"{rule.name} firing", state_detail
            out.append(am_alert(rule, series, starts=starts, ends=None, summary=summary or rule.name,
                                detail=detail or "", annotations=notes, url=ladder_url(base_url, series, starts)))
        return out

    def _current(self) -> list[dict[str, Any]]:
        cur = self._cursor()
        try:
            waiting = cur.execute("SELECT count(*) FROM outbox WHERE destination = ? AND NOT dead",
                                  [ALERTMANAGER]).fetchone()
        finally:
            cur.close()
        return [] if waiting and waiting[0] else self.firing()

    def tick(self) -> float | None:
        try:
            result = self._transport.send_current(self._current)
        except duckdb.Error as exc:
            self._log.warning("reading firing alerts failed", error=str(exc))
            return None
        if result is not None:
            self._resends.inc(outcome="sent" if result.ok else "failed")
            if not result.ok:
                self._log.warning("re-sending firing alerts to Alertmanager failed", error=result.error)
        return None


def _threshold(text: str | None) -> float | tuple[float, float] | None:
    value = json.loads(text) if text is not None else None
    return tuple(value) if isinstance(value, list) else value
