"""One shape for a transition and one for a series' state, wherever they are shown: `replay`, `eval`, admin
`/evaluate` and `/alerts`, `test` failures, and the `alerts` / `alert_state` tables (whose column names these are).

Times are ISO-8601 UTC strings, `series` is an object of the series' labels, thresholds are a number or a
[low, high] pair, non-finite values are strings ("inf", "nan") so the JSON stays valid.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from evaluator.rules.model import Rule, SeriesKey

if TYPE_CHECKING:
    from evaluator.rules.engine import AlertEvent
    from evaluator.rules.state import SeriesState


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def series_json(series: SeriesKey) -> str:
    """The series as the store writes it: a JSON object with sorted keys."""
    return json.dumps(dict(series), sort_keys=True, separators=(",", ":"))


def threshold_json(threshold: float | tuple[float, float] | None) -> str | None:
    if threshold is None:
        return None
    return json.dumps(list(threshold) if isinstance(threshold, tuple) else threshold)


def number(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)


def threshold_value(threshold: float | tuple[float, float] | None) -> Any:
    if isinstance(threshold, tuple):
        return [number(t) for t in threshold]
    return number(threshold)


def _rule_fields(rule: Rule) -> dict[str, Any]:
    return {"rule_id": rule.id, "alert_name": rule.name, "group_name": rule.group, "kind": rule.kind,
            "rung": rule.rung, "owner": rule.owner, "severity": rule.severity}


def transition_record(ev: AlertEvent) -> dict[str, Any]:
    """A transition as JSON: the `alerts` table's columns."""
    t = ev.transition
    return {
        "changed_at": iso(t.at), "evaluated_at": iso(t.evaluated_at), **_rule_fields(ev.rule),
        "series": dict(t.series), "from_state": t.from_state, "state": t.to_state, "value": number(t.value),
        "threshold": threshold_value(t.threshold), "consecutive_violations": t.consecutive,
        "run_at": iso(t.run_at), "started_at": iso(t.started_at), "summary": ev.summary, "detail": t.detail,
        "labels": dict(ev.rule.labels), "annotations": ev.annotations,
        "violating_spans": [{"trace_id": a, "span_id": b} for a, b in t.spans], "inhibited": ev.inhibited,
    }


def state_record(rule: Rule, s: SeriesState, error: str | None = None) -> dict[str, Any]:
    """A series' current state as JSON: the `alert_state` table's columns (plus the rule's)."""
    return {
        **_rule_fields(rule), "series": dict(s.series), "state": s.state, "value": number(s.value),
        "threshold": threshold_value(s.threshold), "detail": s.detail, "active_at": iso(s.active_at),
        "fired_at": iso(s.fired_at), "resolved_at": iso(s.resolved_at),
        "last_violation_at": iso(s.last_violation_at), "consecutive_violations": s.consecutive,
        "last_run_at": iso(s.last_run_at),
    }


def error_record(rule: Rule, error: str) -> dict[str, Any]:
    """A rule that could not be evaluated, in the state shape: state "error", the error as its detail."""
    return {**_rule_fields(rule), "series": {}, "state": "error", "value": None, "threshold": None,
            "detail": error, "active_at": None, "fired_at": None, "resolved_at": None, "last_violation_at": None,
            "consecutive_violations": 0, "last_run_at": None}
