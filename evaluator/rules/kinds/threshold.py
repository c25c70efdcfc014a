"""threshold: each run's value against a fixed bound, one Sample per run.

Batching: rules with the same selector shape (span, service, where keys, value attribute, group_by) are one
query (`select.fetch_runs`); each distinct where tuple is a member with its own lower bound. The bound is the
series' cursor when the rule has no group_by and a cursor (the incremental tick reads only the rows since the
last judged run), otherwise the lookback (a new series may appear) or an older cursor. Runs are then split per
rule and series in Python, and those at or before their series' cursor, or after ts, are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import duckdb
import numpy as np
import numpy.typing as npt

from evaluator.rules.model import Rule, RuleError, Sample, SeriesCursor, SeriesKey, ThresholdSpec
from evaluator.rules.select import (
    Batch,
    Member,
    Results,
    Runs,
    RunShape,
    SeriesKeys,
    WhereValue,
    evaluate_batched,
    fetch_runs,
    is_judged,
    judged_lower_bound,
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
    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 cursors: dict[str, dict[SeriesKey, SeriesCursor]]) -> Results:
        ts_us = to_us(ts)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            los: dict[tuple[WhereValue, ...], int] = {}
            for rule, where in batch:
                lo = judged_lower_bound(rule, rule.spec.lookback, ts_us, cursors.get(rule.id, {}))
                los[where] = min(lo, los.get(where, lo))
            wheres = list(los)
            runs = fetch_runs(cur, shape, [Member(w, los[w], ts_us) for w in wheres])
            rows = runs.by_member()
            index = {w: i for i, w in enumerate(wheres)}
            return {rule.id: judge_runs(rule, runs, rows.get(index[where], []), ts_us, cursors.get(rule.id, {}))
                    for rule, where in batch}

        return evaluate_batched(rules, _shape, run_batch)


def judge_runs(rule: Rule, runs: Runs, rows: Sequence[int] | npt.NDArray[np.intp], ts_us: int,
               cursors: dict[SeriesKey, SeriesCursor]) -> list[Sample]:
    """One Sample per run not judged yet, in time order."""
    cond = rule.condition
    assert cond is not None
    keys = SeriesKeys(rule.group_by)
    lookback_us = to_us(rule.spec.lookback)
    out: list[Sample] = []
    for i in rows:
        series = keys(runs, i)
        time_us, span_key = int(runs.time_us[i]), int(runs.span_key[i])
        if not is_judged(time_us, span_key, cursors.get(series), ts_us, lookback_us):
            continue
        x = float(runs.value[i])
        spans = ((str(runs.trace_id[i]), str(runs.span_id[i])),)
        if not math.isfinite(x):
            out.append(Sample(series, time_us / 1e6, None, cond.threshold, None, None, span_key, spans,
                              f"value {x} is not a number"))
            continue
        still = rule.resolve.violated(x) if rule.resolve is not None else None
        out.append(Sample(series, time_us / 1e6, x, cond.threshold, cond.violated(x), still, span_key, spans))
    return out
