"""The rule engine: evaluate a group at time ts, fold the samples into alert state, record transitions.

`evaluate_group(group, ts)` never reads the clock: the scheduler passes the slot time, `eval` and `replay` pass
the times the user asked for, and tests step time without sleeping. State lives behind a StateBackend: DuckDB
tables for the daemon (it survives restarts), memory for `eval`/`replay` over a stopped daemon's file (opened
read-only, nothing written).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import structlog

from evaluator.exporter.outbox import enqueue
from evaluator.rules.model import (
    FIRING,
    RUNG_ORDER,
    Rule,
    RuleError,
    RuleGroup,
    RuleKind,
    RuleSet,
    Sample,
    SeriesCursor,
    SeriesKey,
)
from evaluator.rules.state import SeriesState, Transition, evaluate_series
from evaluator.rules.template import render
from evaluator.telemetry import Telemetry


def to_dt(seconds: float | None) -> datetime | None:
    """Unix seconds -> naive UTC datetime (the store's TIMESTAMP convention)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)


def from_dt(value: datetime | None) -> float | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC).timestamp()


def series_json(series: SeriesKey) -> str:
    return json.dumps(dict(series), sort_keys=True, separators=(",", ":"))


def threshold_json(threshold: float | tuple[float, float] | None) -> str | None:
    if threshold is None:
        return None
    return json.dumps(list(threshold) if isinstance(threshold, tuple) else threshold)


@dataclass(frozen=True)
class AlertEvent:
    """A transition with everything an output needs (alert spans, Alertmanager, logs)."""

    rule: Rule
    transition: Transition
    summary: str
    annotations: dict[str, str]
    inhibited: bool = False  # ladder inhibition: recorded, not sent


@dataclass(frozen=True)
class RuleStatus:
    """The result of evaluating one rule once: its series states, or the error that made it unhealthy."""

    rule: Rule
    states: dict[SeriesKey, SeriesState]
    error: str | None = None
    duration: float = 0.0
    changed: tuple[SeriesState, ...] = ()  # the states that differ from before this evaluation


class StateBackend(Protocol):
    def load(self, rules: list[Rule]) -> dict[str, dict[SeriesKey, SeriesState]]: ...

    def save(self, group: RuleGroup, ts: float, statuses: list[RuleStatus], events: list[AlertEvent]) -> None: ...


class MemoryState:
    """State kept in memory: for eval/replay/tests over a file that must not be written."""

    def __init__(self) -> None:
        self.states: dict[str, dict[SeriesKey, SeriesState]] = {}
        self.events: list[AlertEvent] = []
        self.health: dict[str, str | None] = {}

    def load(self, rules: list[Rule]) -> dict[str, dict[SeriesKey, SeriesState]]:
        return {r.id: dict(self.states.get(r.id, {})) for r in rules}

    def save(self, group: RuleGroup, ts: float, statuses: list[RuleStatus], events: list[AlertEvent]) -> None:
        for st in statuses:
            self.health[st.rule.id] = st.error
            if st.error is None:
                self.states[st.rule.id] = st.states
        self.events.extend(events)


_STATE_COLUMNS = (
    "rule_id, fingerprint, series, state, value, threshold, detail, active_at, fired_at, resolved_at, "
    "last_violation_at, consecutive_violations, last_run_at, last_run_key, violating_spans"
)
_STATE_NUMBERS = {"inactive": 0, "pending": 1, "firing": 2, "resolved": 3, "nodata": 4}
_TS = pa.timestamp("us")
_SPANS = pa.list_(pa.struct([("trace_id", pa.string()), ("span_id", pa.string())]))
_STATE_SCHEMA = pa.schema([
    ("rule_id", pa.string()), ("fingerprint", pa.string()), ("series", pa.string()), ("state", pa.string()),
    ("value", pa.float64()), ("threshold", pa.string()), ("detail", pa.string()), ("active_at", _TS),
    ("fired_at", _TS), ("resolved_at", _TS), ("last_violation_at", _TS), ("consecutive_violations", pa.int32()),
    ("last_run_at", _TS), ("last_run_key", pa.int64()), ("violating_spans", _SPANS),
])
_HEALTH_SCHEMA = pa.schema([
    ("rule_id", pa.string()), ("group_name", pa.string()), ("alert_name", pa.string()), ("kind", pa.string()),
    ("health", pa.string()), ("last_error", pa.string()), ("last_eval_at", _TS),
    ("last_duration_seconds", pa.float64()),
])


OutboxEncoder = Callable[[list[AlertEvent]], bytes | None]  # None: nothing for this destination


class DuckDBState:
    """State in the store's alert_state / alerts / rule_health tables (docs/schema.md).

    With an outbox encoder, each evaluation's alert events are also written to the outbox as one OTLP request,
    in the same transaction: an alert that is recorded is an alert that will be sent."""

    def __init__(self, cursor_factory: Any, outbox_encoders: Mapping[str, OutboxEncoder] | None = None,
                 on_enqueued: Callable[[], None] | None = None) -> None:
        """outbox_encoders: per outbox destination, how an evaluation's (not inhibited) events become one
        request."""
        self._cursor = cursor_factory
        self._encoders = dict(outbox_encoders or {})
        self._on_enqueued = on_enqueued

    def load(self, rules: list[Rule]) -> dict[str, dict[SeriesKey, SeriesState]]:
        out: dict[str, dict[SeriesKey, SeriesState]] = {r.id: {} for r in rules}
        if not rules:
            return out
        fingerprints = {r.id: r.fingerprint for r in rules}
        cur = self._cursor()
        try:
            rows = cur.execute(
                f"SELECT {_STATE_COLUMNS} FROM alert_state WHERE rule_id IN (SELECT unnest($ids))",
                {"ids": list(fingerprints)},
            ).fetchall()
        finally:
            cur.close()
        for row in rows:
            rule_id, fingerprint, series, state, value, threshold, detail = row[:7]
            if fingerprints.get(rule_id) != fingerprint:
                continue  # the rule changed: its old state does not apply
            key: SeriesKey = tuple(sorted(json.loads(series).items()))
            thr = json.loads(threshold) if threshold is not None else None
            out[rule_id][key] = SeriesState(
                series=key, state=state, value=value, threshold=tuple(thr) if isinstance(thr, list) else thr,
                detail=detail or "", active_at=from_dt(row[7]), fired_at=from_dt(row[8]),
                resolved_at=from_dt(row[9]), last_violation_at=from_dt(row[10]), consecutive=row[11],
                last_run_at=from_dt(row[12]), last_run_key=row[13],
                violating_spans=tuple((s["trace_id"], s["span_id"]) for s in (row[14] or [])),
            )
        return out

    def save(self, group: RuleGroup, ts: float, statuses: list[RuleStatus], events: list[AlertEvent]) -> None:
        cur = self._cursor()
        try:
            cur.execute("BEGIN")
            changed = [(st.rule, s) for st in statuses if st.error is None for s in st.changed]
            if changed:
                rows = pa.Table.from_pylist([
                    {"rule_id": r.id, "fingerprint": r.fingerprint, "series": series_json(s.series), "state": s.state,
                     "value": s.value, "threshold": threshold_json(s.threshold), "detail": s.detail,
                     "active_at": to_dt(s.active_at), "fired_at": to_dt(s.fired_at),
                     "resolved_at": to_dt(s.resolved_at), "last_violation_at": to_dt(s.last_violation_at),
                     "consecutive_violations": s.consecutive, "last_run_at": to_dt(s.last_run_at),
                     "last_run_key": s.last_run_key,
                     "violating_spans": [{"trace_id": a, "span_id": b} for a, b in s.violating_spans]}
                    for r, s in changed
                ], schema=_STATE_SCHEMA)
                cur.register("changed_states", rows)
                cur.execute("DELETE FROM alert_state USING changed_states c "
                            "WHERE alert_state.rule_id = c.rule_id AND alert_state.series::VARCHAR = c.series")
                cur.execute(f"INSERT INTO alert_state ({_STATE_COLUMNS}) SELECT {_STATE_COLUMNS} FROM changed_states")
                cur.unregister("changed_states")
            for ev in events:
                t, r = ev.transition, ev.rule
                cur.execute(
                    "INSERT INTO alerts (evaluated_at, rule_id, alert_name, group_name, kind, rung, owner, "
                    "severity, series, from_state, state, value, threshold, consecutive_violations, run_at, "
                    "summary, detail, labels, annotations, violating_spans, inhibited) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [to_dt(t.at), r.id, r.name, r.group, r.kind, r.rung, r.owner, r.severity,
                     series_json(t.series), t.from_state, t.to_state, t.value, threshold_json(t.threshold),
                     t.consecutive, to_dt(t.run_at), ev.summary, t.detail, json.dumps(dict(r.labels)),
                     json.dumps(ev.annotations), [{"trace_id": a, "span_id": b} for a, b in t.spans],
                     ev.inhibited],
                )
            to_send = [ev for ev in events if not ev.inhibited]
            enqueued = False
            for destination, encode in self._encoders.items():
                payload = encode(to_send) if to_send else None
                if payload is not None:
                    enqueue(cur, destination, payload, len(to_send), ts)
                    enqueued = True
            health = pa.Table.from_pylist([
                {"rule_id": st.rule.id, "group_name": st.rule.group, "alert_name": st.rule.name,
                 "kind": st.rule.kind, "health": "ok" if st.error is None else "error", "last_error": st.error,
                 "last_eval_at": to_dt(ts), "last_duration_seconds": st.duration}
                for st in statuses
            ], schema=_HEALTH_SCHEMA)
            if health.num_rows:
                cur.register("health_rows", health)
                cur.execute("INSERT OR REPLACE INTO rule_health SELECT * FROM health_rows")
                cur.unregister("health_rows")
            cur.execute("COMMIT")
            if enqueued and self._on_enqueued is not None:
                self._on_enqueued()
        except Exception:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()


class RuleEngine:
    def __init__(
        self,
        cursor_factory: Any,
        kinds: Mapping[str, RuleKind],
        state: StateBackend,
        telemetry: Telemetry | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """cursor_factory() returns a new DuckDB cursor (Store.cursor), closed by the engine after use."""
        self._cursor = cursor_factory
        self._kinds = kinds
        self.state = state
        self._log = log or structlog.get_logger("rules")
        self.ruleset = RuleSet()
        self.health: dict[str, str | None] = {}
        self._group_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        tel = telemetry or Telemetry()
        self._evals = tel.counter("rule_evaluations_total", "Rule evaluations, by outcome.", ("outcome",))
        self._transitions = tel.counter("alert_transitions_total", "Alert state transitions, by new state.",
                                        ("state",))
        self._group_seconds = tel.gauge("rule_group_last_duration_seconds",
                                        "How long the last evaluation of a group took.", ("group",))
        self._alert_value = tel.gauge("alert_value", "Each rule's latest value per series.", ("rule_id", "series"))
        self._alert_state = tel.gauge(
            "alert_state", "Each rule's state per series: inactive 0, pending 1, firing 2, resolved 3, nodata 4.",
            ("rule_id", "series"))
        self._rule_transitions = tel.counter("alert_rule_transitions_total",
                                             "Alert transitions per rule, by the state entered.", ("rule_id", "state"))
        unhealthy = tel.gauge("rules_unhealthy", "Rules whose last evaluation failed.")
        tel.add_collector(lambda: unhealthy.set(sum(1 for e in self.health.values() if e is not None)))

    def load(self, ruleset: RuleSet) -> None:
        """Swap in a new rule set. State is keyed by rule id and fingerprint, so unchanged rules keep it."""
        unknown = sorted({r.kind for r in ruleset.rules()} - set(self._kinds))
        if unknown:
            raise ValueError(f"no evaluator for kind(s) {', '.join(unknown)}")
        self.ruleset = ruleset
        ids = {r.id for r in ruleset.rules()}
        self.health = {k: v for k, v in self.health.items() if k in ids}

    def evaluate_group(self, group: RuleGroup, ts: float) -> list[AlertEvent]:
        with self._group_locks[group.name]:
            t0 = time.perf_counter()
            rules = list(group.rules)
            prior = self.state.load(rules)
            results: dict[str, list[Sample] | RuleError] = {}
            durations: dict[str, float] = {}
            by_kind: dict[str, list[Rule]] = defaultdict(list)
            for rule in rules:
                by_kind[rule.kind].append(rule)
            cur = self._cursor()
            try:
                for kind, batch in by_kind.items():
                    cursors = {
                        r.id: {k: SeriesCursor(s.last_run_at, s.last_run_key) for k, s in prior[r.id].items()
                               if s.last_run_at is not None and s.last_run_key is not None}
                        for r in batch
                    }
                    k0 = time.perf_counter()
                    try:
                        results.update(self._kinds[kind].evaluate(batch, ts, cur, cursors))
                    except (duckdb.Error, RuleError, ValueError, TypeError) as exc:
                        for r in batch:
                            results[r.id] = RuleError(f"{type(exc).__name__}: {exc}")
                    per_rule = (time.perf_counter() - k0) / len(batch)
                    durations.update({r.id: per_rule for r in batch})
            finally:
                cur.close()
            statuses: list[RuleStatus] = []
            events: list[AlertEvent] = []
            for rule in rules:
                outcome = results.get(rule.id, RuleError("the kind returned no result for this rule"))
                if isinstance(outcome, RuleError):
                    statuses.append(RuleStatus(rule, prior[rule.id], str(outcome), durations.get(rule.id, 0.0)))
                    if self.health.get(rule.id) != str(outcome):
                        self._log.warning("rule unhealthy", rule=rule.id, error=str(outcome))
                    self.health[rule.id] = str(outcome)
                    self._evals.inc(outcome="error")
                    continue
                if self.health.get(rule.id):
                    self._log.info("rule healthy again", rule=rule.id)
                self.health[rule.id] = None
                self._evals.inc(outcome="ok")
                states, rule_events = self._fold(rule, prior[rule.id], outcome, ts)
                changed = tuple(s for k, s in states.items() if prior[rule.id].get(k) != s)
                statuses.append(RuleStatus(rule, states, None, durations.get(rule.id, 0.0), changed))
                events.extend(rule_events)
            if group.inhibit_labels:
                events = _inhibit(group.inhibit_labels, statuses, events)
            self.state.save(group, ts, statuses, events)
            for st in statuses:
                if st.error is None:
                    for series_state in st.states.values():
                        self._publish(st.rule, series_state)
            for ev in events:
                self._transitions.inc(state=ev.transition.to_state)
                self._rule_transitions.inc(rule_id=ev.rule.id, state=ev.transition.to_state)
                self._log.info("alert " + ev.transition.to_state + (" (inhibited)" if ev.inhibited else ""),
                               rule=ev.rule.id, series=dict(ev.transition.series), value=ev.transition.value,
                               previous=ev.transition.from_state, summary=ev.summary)
            self._group_seconds.set(time.perf_counter() - t0, group=group.name)
            return events

    def _publish(self, rule: Rule, s: SeriesState) -> None:
        series = series_json(s.series)
        self._alert_state.set(_STATE_NUMBERS.get(s.state, -1), rule_id=rule.id, series=series)
        if s.value is not None and math.isfinite(s.value):
            self._alert_value.set(s.value, rule_id=rule.id, series=series)

    def evaluate_all(self, ts: float) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for group in self.ruleset.groups:
            events.extend(self.evaluate_group(group, ts))
        return events

    def _fold(self, rule: Rule, prior: dict[SeriesKey, SeriesState], samples: list[Sample],
              ts: float) -> tuple[dict[SeriesKey, SeriesState], list[AlertEvent]]:
        by_series: dict[SeriesKey, list[Sample]] = defaultdict(list)
        for s in samples:
            by_series[s.series].append(s)
        states: dict[SeriesKey, SeriesState] = {}
        events: list[AlertEvent] = []
        for key in set(prior) | set(by_series):
            prev = prior.get(key) or SeriesState(series=key)
            step = evaluate_series(rule, prev, by_series.get(key, []), ts)
            states[key] = step.state
            for t in step.transitions:
                annotations = {k: render(v, rule, t) for k, v in rule.annotations}
                summary = annotations.get("summary") or _default_summary(rule, t)
                events.append(AlertEvent(rule, t, summary, annotations))
        return states, events


def _dataset(labels: tuple[str, ...], series: SeriesKey) -> str | None:
    values = dict(series)
    return next((values[label] for label in labels if values.get(label)), None)


def _inhibit(labels: tuple[str, ...], statuses: list[RuleStatus], events: list[AlertEvent]) -> list[AlertEvent]:
    """Ladder inhibition: a transition of a rule is inhibited while, for the same dataset, an alert of a higher
    rung (freshness before completeness before distribution before prediction quality) is firing after this
    evaluation. The page goes to the owner of the rung that broke; the others are recorded, not sent."""
    highest: dict[str, int] = {}
    for st in statuses:
        if st.error is not None:
            continue
        order = RUNG_ORDER[st.rule.rung]
        for s in st.states.values():
            d = _dataset(labels, s.series) if s.state == FIRING else None
            if d is not None:
                highest[d] = min(highest.get(d, order), order)
    out = []
    for ev in events:
        d = _dataset(labels, ev.transition.series)
        above = highest.get(d) if d is not None else None
        out.append(replace(ev, inhibited=True) if above is not None and above < RUNG_ORDER[ev.rule.rung] else ev)
    return out


def _default_summary(rule: Rule, t: Transition) -> str:
    series = ", ".join(f"{k}={v}" for k, v in t.series) or "all"
    value = "no data" if t.value is None else f"{t.value:.6g}"
    return f"{rule.name} {t.to_state} for {series}: value {value}" + (f" ({t.detail})" if t.detail else "")

