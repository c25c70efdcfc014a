"""threshold: each run's value against a fixed bound, one Sample per run (a per-run kind).

Batching: rules with the same selector shape (span, service, where keys, value attribute, group_by) are one
query per kind of read (`select.fetch_new_runs`): the whole history of rules evaluated for the first time, so the
state they fold to is the same however their evaluations were stepped; otherwise the runs that arrived since the
previous evaluation. Runs are then split per rule and series in Python. A run that arrives after later runs of its
series were judged (a late run) is judged when it arrives, at its own time, and says so in its detail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from evaluator.rules.model import Rule, RuleError, Sample, SeriesCursor, SeriesKey, ThresholdSpec
from evaluator.rules.select import (
    Batch,
    Results,
    Runs,
    RunShape,
    SeriesKeys,
    WhereValue,
    evaluate_batched,
    fetch_new_runs,
    is_late,
    is_new,
    priors_of,
    shape_of,
    to_us,
)


def _shape(rule: Rule) -> tuple[RunShape, tuple[WhereValue, ...]]:
    if not isinstance(rule.spec, ThresholdSpec):
        raise RuleError(f"{rule.id}: a threshold rule needs a ThresholdSpec, not {type(rule.spec).__name__}")
    if rule.condition is None:
        raise RuleError(f"{rule.id}: a threshold rule needs a condition (op and threshold)")
    return shape_of(rule.selector, rule.spec.value, rule.group_by)


class ThresholdKind:
    """Judges threshold rules run by run (a per-run kind: see evaluator.rules.model.RuleKind)."""

    timeline = "runs"

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any) -> Results:
        ts_us = to_us(ts)
        priors = priors_of(prior)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            runs, index = fetch_new_runs(cur, shape, batch, priors, ts_us)
            rows = runs.by_member()
            out: Results = {}
            for rule, where in batch:
                p = priors.get(rule.id)
                out[rule.id] = judge_runs(rule, runs, rows.get(index[where], []), p.series if p else {},
                                          p.seen_key if p else None)
            return out

        return evaluate_batched(rules, _shape, run_batch)


LATE = "late: it arrived after later runs of its series were judged"


def judge_runs(rule: Rule, runs: Runs, rows: Sequence[int] | npt.NDArray[np.intp],
               cursors: dict[SeriesKey, SeriesCursor] | Any, seen_key: int | None = None) -> list[Sample]:
    """One Sample per run after its series' cursor, and per late run, in time order."""
    cond = rule.condition
    assert cond is not None
    keys = SeriesKeys(rule.group_by)
    out: list[Sample] = []
    times: list[int] = runs.time_us[rows].tolist() if len(rows) else []
    values: list[float] = runs.value[rows].tolist() if len(rows) else []
    span_keys: list[int] = runs.span_key[rows].tolist() if len(rows) else []
    for j, i in enumerate(rows):
        series = keys(runs, int(i))
        time_us, span_key, x = times[j], span_keys[j], values[j]
        cursor = cursors.get(series)
        late = False
        if not is_new(time_us, span_key, cursor):
            if not is_late(span_key, cursor, seen_key):
                continue
            late = True
        spans = ((str(runs.trace_id[i]), str(runs.span_id[i])),)
        if not math.isfinite(x):
            out.append(Sample(series, time_us / 1e6, None, cond.threshold, None, None, span_key, spans,
                              f"value {x} is not a number", "not_a_number"))
            continue
        still = rule.resolve.violated(x) if rule.resolve is not None else None
        out.append(Sample(series, time_us / 1e6, x, cond.threshold, cond.violated(x), still, span_key, spans,
                          LATE if late else ""))
    return out
