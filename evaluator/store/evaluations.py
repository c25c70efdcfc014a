"""The rule engine's tables: how one evaluation is written (one transaction) and how state is read back.

The store is the one writer. The rule engine hands over plain rows (it owns what a rule, a state or a transition
is; this module owns the tables): the changed `alert_state` rows, the new `alerts` rows, the outbox requests, the
`rule_health` and `rule_progress` rows and the kinds' side records (`quality_values`, `frozen_baselines`), all
committed together, so an evaluation is recorded whole or not at all (a crash in between leaves the previous
evaluation's state, and the next one does the same work again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from evaluator.store.outbox import enqueue

_TS = pa.timestamp("us")
_SPANS = pa.list_(pa.struct([("trace_id", pa.string()), ("span_id", pa.string())]))

STATE_COLUMNS = (
    "rule_id", "fingerprint", "series", "state", "value", "threshold", "detail", "active_at", "fired_at",
    "resolved_at", "last_violation_at", "consecutive_violations", "last_run_at", "last_run_key", "violating_spans",
    "memory", "announced",
)
STATE_SCHEMA = pa.schema([
    ("rule_id", pa.string()), ("fingerprint", pa.string()), ("series", pa.string()), ("state", pa.string()),
    ("value", pa.float64()), ("threshold", pa.string()), ("detail", pa.string()), ("active_at", _TS),
    ("fired_at", _TS), ("resolved_at", _TS), ("last_violation_at", _TS), ("consecutive_violations", pa.int32()),
    ("last_run_at", _TS), ("last_run_key", pa.int64()), ("violating_spans", _SPANS), ("memory", pa.string()),
    ("announced", pa.bool_()),
])
ALERT_COLUMNS = (
    "changed_at", "evaluated_at", "rule_id", "alert_name", "group_name", "kind", "rung", "owner", "severity",
    "series", "from_state", "state", "value", "threshold", "consecutive_violations", "run_at", "started_at",
    "summary", "detail", "labels", "annotations", "violating_spans", "inhibited",
)
ALERT_SCHEMA = pa.schema([
    ("changed_at", _TS), ("evaluated_at", _TS), ("rule_id", pa.string()), ("alert_name", pa.string()),
    ("group_name", pa.string()), ("kind", pa.string()), ("rung", pa.string()), ("owner", pa.string()),
    ("severity", pa.string()), ("series", pa.string()), ("from_state", pa.string()), ("state", pa.string()),
    ("value", pa.float64()), ("threshold", pa.string()), ("consecutive_violations", pa.int32()), ("run_at", _TS),
    ("started_at", _TS), ("summary", pa.string()), ("detail", pa.string()), ("labels", pa.string()),
    ("annotations", pa.string()), ("violating_spans", _SPANS), ("inhibited", pa.bool_()),
])
HEALTH_SCHEMA = pa.schema([
    ("rule_id", pa.string()), ("group_name", pa.string()), ("alert_name", pa.string()), ("kind", pa.string()),
    ("health", pa.string()), ("last_error", pa.string()), ("last_eval_at", _TS),
    ("last_duration_seconds", pa.float64()),
])
PROGRESS_SCHEMA = pa.schema([
    ("rule_id", pa.string()), ("fingerprint", pa.string()), ("judged_to", _TS), ("seen_key", pa.int64()),
])
RECORD_TABLES = ("quality_values", "frozen_baselines")


def to_dt(seconds: float | None) -> datetime | None:
    """Unix seconds -> naive UTC datetime (the store's TIMESTAMP convention)."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)


def from_dt(value: datetime | None) -> float | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC).timestamp()


@dataclass
class EvaluationRows:
    """Everything one evaluation writes. Rows are column -> value dicts (times as naive UTC datetimes)."""

    at: float  # the evaluation time (outbox rows are created at it)
    states: list[dict[str, Any]] = field(default_factory=list)  # alert_state rows to insert or replace
    alerts: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[tuple[str, bytes, int]] = field(default_factory=list)  # (destination, payload, items)
    health: list[dict[str, Any]] = field(default_factory=list)  # rule_health rows to insert or replace
    # (rule_id, fingerprint, judged_to, the highest span key seen by this evaluation)
    progress: list[tuple[str, str, float, int | None]] = field(default_factory=list)
    records: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)  # (table, row)


def write_evaluation(cur: duckdb.DuckDBPyConnection, rows: EvaluationRows) -> None:
    """Write one evaluation in one transaction (rolled back whole on any error, which is re-raised)."""
    cur.execute("BEGIN")
    try:
        if rows.states:
            _register(cur, "changed_states", rows.states, STATE_SCHEMA)
            cur.execute("DELETE FROM alert_state USING changed_states c "
                        "WHERE alert_state.rule_id = c.rule_id AND alert_state.series::VARCHAR = c.series")
            cols = ", ".join(STATE_COLUMNS)
            cur.execute(f"INSERT INTO alert_state ({cols}) SELECT {cols} FROM changed_states")
            cur.unregister("changed_states")
        if rows.alerts:
            _register(cur, "new_alerts", rows.alerts, ALERT_SCHEMA)
            cols = ", ".join(ALERT_COLUMNS)
            cur.execute(f"INSERT INTO alerts ({cols}) SELECT {cols} FROM new_alerts ORDER BY evaluated_at, "
                        "changed_at")
            cur.unregister("new_alerts")
        for destination, payload, items in rows.outbox:
            enqueue(cur, destination, payload, items, rows.at)
        if rows.health:
            _register(cur, "health_rows", rows.health, HEALTH_SCHEMA)
            cur.execute("INSERT OR REPLACE INTO rule_health SELECT * FROM health_rows")
            cur.unregister("health_rows")
        if rows.progress:
            _register(cur, "progress_rows", [
                {"rule_id": r, "fingerprint": f, "judged_to": to_dt(t), "seen_key": k} for r, f, t, k in rows.progress],
                PROGRESS_SCHEMA)
            cur.execute("INSERT OR REPLACE INTO rule_progress SELECT * FROM progress_rows")
            cur.unregister("progress_rows")
        for table, row in rows.records:
            _insert_record(cur, table, row)
        cur.execute("COMMIT")
    except Exception:
        cur.execute("ROLLBACK")
        raise


def _register(cur: duckdb.DuckDBPyConnection, name: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    cur.register(name, pa.Table.from_pylist(rows, schema=schema))


def _insert_record(cur: duckdb.DuckDBPyConnection, table: str, row: Mapping[str, Any]) -> None:
    if table not in RECORD_TABLES:
        raise ValueError(f"not a side-record table: {table}")
    if table == "frozen_baselines":  # one capture per rule and series
        cur.execute("DELETE FROM frozen_baselines WHERE rule_id = $r AND series::VARCHAR = $s",
                    {"r": row["rule_id"], "s": row["series"]})
    cols = list(row)
    cur.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [row[c] for c in cols])


def read_states(cur: duckdb.DuckDBPyConnection, rule_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The alert_state rows of these rules, as column -> value."""
    if not rule_ids:
        return []
    cols = ", ".join(STATE_COLUMNS)
    res = cur.execute(f"SELECT {cols} FROM alert_state WHERE rule_id IN (SELECT unnest($ids))",
                      {"ids": list(rule_ids)})
    names = [d[0] for d in res.description]
    return [dict(zip(names, row, strict=True)) for row in res.fetchall()]


def read_progress(cur: duckdb.DuckDBPyConnection,
                  rule_ids: Sequence[str]) -> dict[str, tuple[str, float, int | None]]:
    """Per rule id, the fingerprint it was evaluated with, the time it has been judged up to and the highest span
    key its last evaluation saw."""
    if not rule_ids:
        return {}
    rows = cur.execute("SELECT rule_id, fingerprint, judged_to, seen_key FROM rule_progress "
                       "WHERE rule_id IN (SELECT unnest($ids))", {"ids": list(rule_ids)}).fetchall()
    return {r: (f, from_dt(t) or 0.0, k) for r, f, t, k in rows}
