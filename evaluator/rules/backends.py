"""Where alert state lives: the store's tables (the daemon, `test`) or memory (`eval` and `replay` over a file
opened read-only). Both hold exactly the same things, so every mode runs the same evaluation code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from evaluator.rules.model import Record, Rule, RuleGroup, SeriesKey
from evaluator.rules.shape import series_json, threshold_json
from evaluator.rules.state import SeriesState
from evaluator.store.evaluations import (
    EvaluationRows,
    from_dt,
    read_progress,
    read_states,
    to_dt,
    write_evaluation,
)

if TYPE_CHECKING:
    from evaluator.rules.engine import AlertEvent


@dataclass(frozen=True)
class RuleSnapshot:
    """A rule's state before an evaluation: how far it has been judged (None: never, or not with this
    fingerprint) and its series."""

    judged_to: float | None
    states: dict[SeriesKey, SeriesState]
    seen_key: int | None = None  # the highest span key there was at the last evaluation


@dataclass(frozen=True)
class RuleStatus:
    """The result of evaluating one rule once: its series states, or the error that made it unhealthy."""

    rule: Rule
    states: dict[SeriesKey, SeriesState]
    error: str | None = None
    duration: float = 0.0
    changed: tuple[SeriesState, ...] = ()  # the states that differ from before this evaluation
    judged_to: float | None = None  # set when the rule was judged (not on error)
    seen_key: int | None = None  # the highest span key this evaluation saw


@dataclass
class Evaluation:
    """Everything one evaluation of a group decided, handed to the state backend to record at once."""

    group: RuleGroup
    at: float  # the last step
    statuses: list[RuleStatus]
    events: list[AlertEvent]
    records: list[Record] = field(default_factory=list)


class StateBackend(Protocol):
    def load(self, rules: list[Rule]) -> dict[str, RuleSnapshot]: ...

    def save(self, evaluation: Evaluation) -> None: ...


class MemoryState:
    """State kept in memory: for eval/replay over a file that must not be written."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[str, RuleSnapshot]] = {}  # rule id -> (fingerprint, snapshot)
        self.events: list[AlertEvent] = []
        self.health: dict[str, str | None] = {}
        self.records: list[Record] = []

    def load(self, rules: list[Rule]) -> dict[str, RuleSnapshot]:
        out: dict[str, RuleSnapshot] = {}
        for r in rules:
            kept = self.snapshots.get(r.id)
            out[r.id] = kept[1] if kept is not None and kept[0] == r.fingerprint else RuleSnapshot(None, {})
        return out

    def save(self, evaluation: Evaluation) -> None:
        for st in evaluation.statuses:
            self.health[st.rule.id] = st.error
            if st.error is None:
                self.snapshots[st.rule.id] = (st.rule.fingerprint,
                                              RuleSnapshot(st.judged_to, dict(st.states), st.seen_key))
        self.events.extend(evaluation.events)
        self.records.extend(evaluation.records)

    def states(self, rule: Rule) -> dict[SeriesKey, SeriesState]:
        kept = self.snapshots.get(rule.id)
        return dict(kept[1].states) if kept is not None and kept[0] == rule.fingerprint else {}


OutboxEncoder = Callable[[list["AlertEvent"]], bytes | None]  # None: nothing for this destination


class DuckDBState:
    """State in the store's alert_state / alerts / rule_health / rule_progress tables (docs/schema.md).

    With outbox encoders, each evaluation's alert events (those not inhibited) are also written to the outbox as
    one request per destination, in the same transaction: an alert that is recorded is an alert that will be
    sent."""

    def __init__(self, cursor_factory: Any, outbox_encoders: Mapping[str, OutboxEncoder] | None = None,
                 on_enqueued: Callable[[], None] | None = None) -> None:
        self._cursor = cursor_factory
        self._encoders = dict(outbox_encoders or {})
        self._on_enqueued = on_enqueued

    def load(self, rules: list[Rule]) -> dict[str, RuleSnapshot]:
        fingerprints = {r.id: r.fingerprint for r in rules}
        cur = self._cursor()
        try:
            rows = read_states(cur, list(fingerprints))
            progress = read_progress(cur, list(fingerprints))
        finally:
            cur.close()
        states: dict[str, dict[SeriesKey, SeriesState]] = {r: {} for r in fingerprints}
        for row in rows:
            if fingerprints.get(row["rule_id"]) != row["fingerprint"]:
                continue  # the rule changed: its old state does not apply
            s = state_from_row(row)
            states[row["rule_id"]][s.series] = s
        out: dict[str, RuleSnapshot] = {}
        for rule_id, fingerprint in fingerprints.items():
            fp, judged, seen = progress.get(rule_id, ("", None, None))
            if fp != fingerprint:
                judged = seen = None
            out[rule_id] = RuleSnapshot(judged, states[rule_id], seen)
        return out

    def save(self, evaluation: Evaluation) -> None:
        rows = EvaluationRows(evaluation.at)
        for st in evaluation.statuses:
            rows.health.append({
                "rule_id": st.rule.id, "group_name": st.rule.group, "alert_name": st.rule.name,
                "kind": st.rule.kind, "health": "ok" if st.error is None else "error", "last_error": st.error,
                "last_eval_at": to_dt(evaluation.at), "last_duration_seconds": st.duration})
            if st.error is not None:
                continue
            rows.states.extend(state_row(st.rule, s) for s in st.changed)
            if st.judged_to is not None:
                rows.progress.append((st.rule.id, st.rule.fingerprint, st.judged_to, st.seen_key))
        rows.alerts = [alert_row(ev) for ev in evaluation.events]
        to_send = [ev for ev in evaluation.events if not ev.inhibited]
        if to_send:
            for destination, encode in self._encoders.items():
                payload = encode(to_send)
                if payload is not None:
                    rows.outbox.append((destination, payload, len(to_send)))
        rows.records = [(r.table, r.row) for r in evaluation.records]
        cur = self._cursor()
        try:
            write_evaluation(cur, rows)
        finally:
            cur.close()
        if rows.outbox and self._on_enqueued is not None:
            self._on_enqueued()


# -- rows -------------------------------------------------------------------------------------------------------

def state_row(rule: Rule, s: SeriesState) -> dict[str, Any]:
    return {
        "rule_id": rule.id, "fingerprint": rule.fingerprint, "series": series_json(s.series), "state": s.state,
        "value": s.value, "threshold": threshold_json(s.threshold), "detail": s.detail,
        "active_at": to_dt(s.active_at), "fired_at": to_dt(s.fired_at), "resolved_at": to_dt(s.resolved_at),
        "last_violation_at": to_dt(s.last_violation_at), "consecutive_violations": s.consecutive,
        "last_run_at": to_dt(s.last_run_at), "last_run_key": s.last_run_key,
        "violating_spans": [{"trace_id": a, "span_id": b} for a, b in s.violating_spans],
        "memory": None if s.memory is None else json.dumps(s.memory, separators=(",", ":")),
        "announced": s.announced,
    }


def state_from_row(row: Mapping[str, Any]) -> SeriesState:
    key: SeriesKey = tuple(sorted(json.loads(row["series"]).items()))
    thr = json.loads(row["threshold"]) if row["threshold"] is not None else None
    return SeriesState(
        series=key, state=row["state"], value=row["value"], threshold=tuple(thr) if isinstance(thr, list) else thr,
        detail=row["detail"] or "", active_at=from_dt(row["active_at"]), fired_at=from_dt(row["fired_at"]),
        resolved_at=from_dt(row["resolved_at"]), last_violation_at=from_dt(row["last_violation_at"]),
        consecutive=row["consecutive_violations"], last_run_at=from_dt(row["last_run_at"]),
        last_run_key=row["last_run_key"],
        violating_spans=tuple((s["trace_id"], s["span_id"]) for s in (row["violating_spans"] or [])),
        memory=json.loads(row["memory"]) if row["memory"] is not None else None,
        announced=bool(row["announced"]),
    )


def alert_row(ev: AlertEvent) -> dict[str, Any]:
    t, r = ev.transition, ev.rule
    return {
        "changed_at": to_dt(t.at), "evaluated_at": to_dt(t.evaluated_at if t.evaluated_at is not None else t.at),
        "rule_id": r.id, "alert_name": r.name, "group_name": r.group, "kind": r.kind, "rung": r.rung,
        "owner": r.owner, "severity": r.severity, "series": series_json(t.series), "from_state": t.from_state,
        "state": t.to_state, "value": t.value, "threshold": threshold_json(t.threshold),
        "consecutive_violations": t.consecutive, "run_at": to_dt(t.run_at), "started_at": to_dt(t.started_at),
        "summary": ev.summary, "detail": t.detail, "labels": json.dumps(dict(r.labels)),
        "annotations": json.dumps(ev.annotations),
        "violating_spans": [{"trace_id": a, "span_id": b} for a, b in t.spans], "inhibited": ev.inhibited,
    }
