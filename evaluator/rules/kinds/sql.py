"""sql: a SELECT returning a numeric `value` and series labels, judged at the evaluation time.

Every other column of the result is a series label, rendered as text (NULL as "", numbers like group_by values:
integral doubles without ".0"). One Sample per row, at = ts; a NULL (or NaN) value is "no data"; violated =
rule.condition on the value. The evaluation time is the named parameter `$ts` (TIMESTAMP, naive UTC) for
queries that use it; no other parameter exists.

Read-only in spirit, checked by DuckDB itself rather than by pattern matching: the text must parse as exactly
one statement of type SELECT (`extract_statements`), and its physical plan (`EXPLAIN (FORMAT json)`) must not
contain a writing operator, because DuckDB accepts data-modifying CTEs inside a SELECT
(`WITH d AS (DELETE ... RETURNING *) SELECT ...` parses as a SELECT and deletes). Each rule runs its own query:
these are few, hand-written, and one's error must not touch another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import duckdb

from evaluator.rules.model import Rule, RuleError, Sample, SeriesKey, SqlSpec
from evaluator.rules.select import Results, evaluate_each, render_number, to_us

NUMERIC = {"tinyint", "smallint", "integer", "bigint", "hugeint", "utinyint", "usmallint", "uinteger", "ubigint",
           "uhugeint", "float", "double", "decimal", "null"}
WRITING = ("INSERT", "DELETE", "UPDATE", "MERGE", "COPY", "CREATE", "DROP", "ALTER", "ATTACH", "DETACH", "VACUUM",
           "EXPORT")
# table functions a SELECT may call that change the database or its settings rather than read it
SIDE_EFFECTS = ("CHECKPOINT", "LOGGING", "PROFILING", "EXTERNAL_RESOURCE", "EXECUTE_SERIALIZED_SQL")
EPOCH = datetime(1970, 1, 1)
MAX_SERIES = 100_000  # rows a query may return: the memory side of a rule's budget (DuckDB's is store.memory_limit)


def ts_param(ts: float) -> datetime:
    """The evaluation time as a naive UTC datetime (DuckDB binds it as TIMESTAMP), exact to the microsecond."""
    return EPOCH + timedelta(microseconds=to_us(ts))


def _operators(plan: Any) -> Iterator[str]:
    nodes = plan if isinstance(plan, list) else [plan]
    for node in nodes:
        if isinstance(node, dict):
            yield str(node.get("name", ""))
            yield from _operators(node.get("children", []))


def writing_operator(cur: duckdb.DuckDBPyConnection, query: str, params: dict[str, Any] | None = None) -> str | None:
    """The first operator of the physical plan of `query` (one statement) that writes or changes the database (a
    data-modifying CTE, a checkpoint, ...), or None when it only reads. Shared by sql rules and the query endpoint.

    DuckDB's own errors (parse, bind, permission) propagate; ValueError when the plan cannot be read."""
    rows = cur.execute("EXPLAIN (FORMAT json) " + query, params).fetchall()
    for row in rows:
        try:
            plan = json.loads(row[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError("could not read the query plan to check it is read-only") from None
        for op in _operators(plan):
            if any(w in op.upper() for w in WRITING + SIDE_EFFECTS):
                return op
    return None


def checked_query(cur: duckdb.DuckDBPyConnection, rule_id: str, query: str,
                  params: dict[str, Any] | None = None) -> tuple[str, bool]:
    """The single SELECT of `query` and whether it uses $ts; RuleError when it is anything else."""
    try:
        statements = cur.extract_statements(query)
    except duckdb.Error as exc:
        raise RuleError(f"{rule_id}: the query does not parse: {exc}") from None
    if len(statements) != 1:
        raise RuleError(f"{rule_id}: the query must be exactly one SELECT statement, found {len(statements)}")
    stmt = statements[0]
    if stmt.type != duckdb.StatementType.SELECT:
        raise RuleError(f"{rule_id}: only a SELECT may run as a rule, not {stmt.type.name}")
    unknown = sorted(set(stmt.named_parameters) - {"ts"})
    if unknown:
        names = ", ".join("?" if p.isdigit() else f"${p}" for p in unknown)
        raise RuleError(f"{rule_id}: unknown query parameter(s) {names}; only $ts (the evaluation time) exists")
    uses_ts = "ts" in stmt.named_parameters
    try:
        op = writing_operator(cur, stmt.query, params if uses_ts else None)
    except ValueError as exc:
        raise RuleError(f"{rule_id}: {exc}") from None
    if op is not None:
        raise RuleError(f"{rule_id}: the query writes ({op}); a rule may only read")
    return stmt.query, uses_ts


def result_columns(rule_id: str, description: Sequence[Sequence[Any]]) -> tuple[int, list[int]]:
    """(index of the value column, indices of the label columns) of a result's description; RuleError when the
    result has no single numeric `value` column or two labels share a name. Shared with `check`."""
    names = [d[0] for d in description]
    value_cols = [i for i, n in enumerate(names) if n.lower() == "value"]
    if len(value_cols) != 1:
        raise RuleError(f"{rule_id}: the query must return exactly one column named value, "
                        f"got columns {', '.join(names) or '(none)'}")
    vi = value_cols[0]
    vtype = description[vi][1]
    if getattr(vtype, "id", str(vtype).lower()) not in NUMERIC:
        raise RuleError(f"{rule_id}: the value column is {vtype}, not a number (CAST it to DOUBLE)")
    label_cols = [i for i in range(len(names)) if i != vi]
    label_names = [names[i] for i in label_cols]
    if len(set(label_names)) != len(label_names):
        raise RuleError(f"{rule_id}: the query returns two label columns with the same name: "
                        f"{', '.join(label_names)}")
    return vi, label_cols


def label(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return render_number(v)
    return str(v)


class SqlKind:
    """Judges sql rules at the slots of their group (see evaluator.rules.model.RuleKind).

    The read-only check of a query (parse, plan) does not depend on the evaluation time, so its outcome is kept per
    query text for the life of the instance (one engine): a rule judged at many slots is checked once."""

    timeline = "slots"
    batched = False  # one query per rule: the engine calls it rule by rule, each within its own time budget

    def __init__(self) -> None:
        self._checked: dict[str, tuple[str, bool]] = {}

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any = None) -> Results:
        return evaluate_each(rules, lambda rule: self._one(rule, float(ts), cur))

    def _check(self, cur: duckdb.DuckDBPyConnection, rule: Rule, params: dict[str, Any]) -> tuple[str, bool]:
        text = rule.spec.query
        got = self._checked.get(text)
        if got is None:
            got = checked_query(cur, rule.id, text, params)  # a RuleError is raised, not kept: checked again
            if len(self._checked) >= 1000:
                self._checked.clear()
            self._checked[text] = got
        return got

    def _one(self, rule: Rule, ts: float, cur: duckdb.DuckDBPyConnection) -> list[Sample]:
        if not isinstance(rule.spec, SqlSpec):
            raise RuleError(f"{rule.id}: an sql rule needs an SqlSpec, not {type(rule.spec).__name__}")
        cond = rule.condition
        if cond is None:
            raise RuleError(f"{rule.id}: an sql rule needs a condition (op and threshold)")
        params = {"ts": ts_param(ts)}
        query, uses_ts = self._check(cur, rule, params)
        try:
            cur.execute(query, params if uses_ts else None)
            rows = cur.fetchmany(MAX_SERIES + 1)  # what comes back to Python is bounded: a series per row
            description = cur.description or []
        except duckdb.Error as exc:
            raise RuleError(f"{rule.id}: the query failed: {exc}") from None
        if len(rows) > MAX_SERIES:
            raise RuleError(f"{rule.id}: the query returns more than {MAX_SERIES} rows (series); a rule's result is "
                            "held in memory: aggregate it, or split the rule")
        names = [d[0] for d in description]
        vi, label_cols = result_columns(rule.id, description)
        samples: list[Sample] = []
        seen: set[SeriesKey] = set()
        for row in rows:
            series = tuple(sorted((names[i], label(row[i])) for i in label_cols))
            if series in seen:
                raise RuleError(f"{rule.id}: the query returns series {dict(series)} more than once; "
                                "every row needs distinct label values")
            seen.add(series)
            raw = row[vi]
            x = float(raw) if isinstance(raw, int | float | Decimal) else None
            if x is None or not math.isfinite(x):
                detail = "value is NULL" if x is None else f"value is {x}"
                samples.append(Sample(series, ts, None, cond.threshold, None, None, None, (), detail, "null_value"))
                continue
            still = rule.resolve.violated(x) if rule.resolve is not None else None
            samples.append(Sample(series, ts, x, cond.threshold, cond.violated(x), still))
        samples.sort(key=lambda s: s.series)
        return samples
