"""baseline: each run against its own history, one Sample per run.

The baseline of a run is the previous `history_runs` runs of its series, or the runs whose end time lies in
[t - history_window, t) (both ends by (time, span_key), so the run under test is never part of it), minus the
runs that themselves violated. With `seasonality: weekday` the series is split by UTC weekday first, so only
runs on the run's own weekday count (`history_runs: 4` is then the same weekday of the last four weeks).

Methods (the value reported, the band it must stay in):
- relative: (x - mean) / |mean|, within [-tolerance, +tolerance]; a baseline mean of 0 is "no data".
- zscore: (x - mean) / std with the sample std (ddof=1), within [-z, z]; std 0 (or one run) is "no data".
- quantile_band: x itself, within [q_lo, q_hi] of the baseline values, computed like numpy.quantile's default
  "linear" method (the (n-1)*q interpolation, numpy's own lerp).
A value exactly on the band's edge does not violate. With rule.resolve, still_violated is rule.resolve judged on
the same value (so for relative and zscore the resolve threshold is in deviation or z units).

Which runs violated is decided in time order over the history that is fetched: each history run is judged
against its own baseline the same way, starting from the oldest fetched run. A run whose baseline was too
small (fewer than min_history runs, or a degenerate mean/std) counts as not violating, so after a genuine
level shift the new level becomes the baseline once enough runs exist, instead of alerting forever.
Non-finite values are never part of a baseline; a judged run with one gets "no data".

The history fetched reaches three baseline spans before the first run judged in each series: 3 * history_runs
runs, or 3 * history_window of time, trimmed to exactly that so how much was over-fetched never changes a
result. The oldest runs of it are judged against a truncated baseline (whatever of it precedes them), which can
count an old violation as not violating; three spans keep that one step away from the runs that form the
judged run's baseline, so judging day by day with cursors gives the same verdicts as judging a month at once
unless violations cluster near the start of the fetched history.

Batching and pruning. Rules with one selector shape are one query per step (see select.py):
1. the runs not judged yet: per member from its lowest cursor (or the lookback) to ts; a tick without new runs
   ends here, having read only the recent rows;
2. the history of the members that have new runs, older than step 1's bound: history_window rules know the
   span exactly; history_runs rules first assume about one run a day (a week with weekday seasonality) and
   widen, doubling the distance from ts, for the series that still lack 3 * history_runs runs, until they have
   them or the oldest recorded value of the attribute is reached (a series younger than the store pays a
   full-history scan per tick until it has enough runs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import duckdb
import numpy as np

from evaluator.rules.model import BaselineSpec, Rule, RuleError, Sample, SeriesCursor, SeriesKey
from evaluator.rules.select import (
    US,
    Batch,
    Member,
    Results,
    Runs,
    RunShape,
    SeriesKeys,
    WhereValue,
    data_start_us,
    evaluate_batched,
    fetch_runs,
    is_judged,
    judged_lower_bound,
    shape_of,
    to_us,
)

METHODS = ("relative", "zscore", "quantile_band")
DAY_US = 86400 * US
MAX_WIDENINGS = 40  # doubling from a day: far beyond any store's age
HISTORY_SPANS = 3  # baseline spans of history fetched before the first judged run (see the module docstring)


def _shape(rule: Rule) -> tuple[RunShape, tuple[WhereValue, ...]]:
    spec = rule.spec
    if not isinstance(spec, BaselineSpec):
        raise RuleError(f"{rule.id}: a baseline rule needs a BaselineSpec, not {type(spec).__name__}")
    if spec.method not in METHODS:
        raise RuleError(f"{rule.id}: unknown baseline method {spec.method!r} (one of {', '.join(METHODS)})")
    if (spec.history_runs is None) == (spec.history_window is None):
        raise RuleError(f"{rule.id}: a baseline needs exactly one of history_runs and history_window")
    if spec.history_runs is not None and spec.history_runs < 1:
        raise RuleError(f"{rule.id}: history_runs must be at least 1")
    if spec.history_window is not None and spec.history_window <= 0:
        raise RuleError(f"{rule.id}: history_window must be positive")
    if spec.seasonality not in (None, "weekday"):
        raise RuleError(f"{rule.id}: unknown seasonality {spec.seasonality!r} (weekday or none)")
    return shape_of(rule.selector, spec.value, rule.group_by)


# -- statistics (pure) -------------------------------------------------------------------------------------------

def quantile_linear(sorted_values: Sequence[float], q: float) -> float:
    """numpy.quantile(values, q) with the default "linear" method, for an already sorted sequence."""
    n = len(sorted_values)
    h = (n - 1) * q
    if h >= n - 1:
        return float(sorted_values[-1])
    if h < 0:
        return float(sorted_values[0])
    lo = math.floor(h)
    gamma = h - lo
    a, b = float(sorted_values[lo]), float(sorted_values[lo + 1])
    d = b - a
    return b - d * (1 - gamma) if gamma >= 0.5 else a + d * gamma


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e15 or abs(x) < 1e-3:
        return f"{x:.6g}"
    if abs(x) >= 100:
        return str(round(x))
    return f"{x:.4g}"


@dataclass(frozen=True)
class Verdict:
    value: float | None
    threshold: tuple[float, float] | None
    violated: bool | None
    detail: str


def _outside(v: float, band: tuple[float, float]) -> bool:
    return not band[0] <= v <= band[1]


def judge(spec: BaselineSpec, x: float, baseline: Sequence[float], detail: bool = True) -> Verdict:
    """One run's value against its baseline values (detail=False skips the text, for history runs)."""
    n = len(baseline)
    if n < spec.min_history or n == 0:
        return Verdict(x, None, None, f"{n} baseline runs, fewer than min_history {spec.min_history}")
    if spec.method == "quantile_band":
        s = sorted(baseline)
        q_lo, q_hi = spec.quantiles
        band = (quantile_linear(s, q_lo), quantile_linear(s, q_hi))
        text = (f"{q_lo * 100:g}th-{q_hi * 100:g}th percentile of {n} runs [{_fmt(band[0])}, {_fmt(band[1])}]"
                if detail else "")
        return Verdict(x, band, _outside(x, band), text)
    mean = math.fsum(baseline) / n
    if spec.method == "relative":
        if mean == 0:
            return Verdict(x, None, None, f"mean of {n} runs is 0: no relative deviation")
        dev = (x - mean) / abs(mean)
        band = (-spec.tolerance, spec.tolerance)
        text = f"mean of {n} runs {_fmt(mean)}, deviation {dev * 100:+.1f}%" if detail else ""
        return Verdict(dev, band, _outside(dev, band), text)
    if n < 2:
        return Verdict(x, None, None, "one baseline run: no standard deviation")
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in baseline) / (n - 1))
    if std == 0:
        return Verdict(x, None, None, f"mean of {n} runs {_fmt(mean)}, std 0: no z-score")
    z = (x - mean) / std
    band = (-spec.z, spec.z)
    text = f"mean of {n} runs {_fmt(mean)}, std {_fmt(std)}, z {z:+.2f}" if detail else ""
    return Verdict(z, band, _outside(z, band), text)


def walk(spec: BaselineSpec, time_us: Sequence[int], values: Sequence[float], first_judged: int) -> list[Verdict]:
    """Judge every run of one (sub-)series in time order against its baseline of earlier non-violating runs.

    Runs before first_judged are history (judged only to know whether they violated); returns the verdicts of
    the runs from first_judged on.
    """
    ok: list[bool] = []
    out: list[Verdict] = []
    left = 0
    window_us = to_us(spec.history_window) if spec.history_window is not None else None
    runs_n = spec.history_runs or 0
    for p, x in enumerate(values):
        if window_us is None:
            start = p - runs_n if p > runs_n else 0
        else:
            while time_us[left] < time_us[p] - window_us:
                left += 1
            start = left
        verdict = judge(spec, x, [values[j] for j in range(start, p) if ok[j]], p >= first_judged)
        ok.append(verdict.violated is not True)
        if p >= first_judged:
            out.append(verdict)
    return out


# -- the kind ----------------------------------------------------------------------------------------------------

SubKey = tuple[SeriesKey, int]  # series, and the UTC weekday (-1 without seasonality)


def weekday(time_us: int) -> int:
    """UTC weekday, Monday 0 (the epoch was a Thursday)."""
    return (time_us // DAY_US + 3) % 7


class _Columns:
    """A batch's runs with the columns the Python loops read as lists (numpy scalar access is slow)."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.time_us: list[int] = runs.time_us.tolist()
        self.values: list[float] = runs.value.tolist()
        self.span_key: list[int] = runs.span_key.tolist()
        self.rows = {m: idx.tolist() for m, idx in runs.by_member().items()}


@dataclass
class _Plan:
    """One rule's view of its member's runs: row indices per sub-series and where judging starts."""

    rows: dict[SubKey, list[int]]
    first: dict[SubKey, int]  # position in rows[k] of the first run to judge (only sub-series with some)
    nonfinite: list[int]  # judged rows whose value is not a number


def _plan(rule: Rule, cols: _Columns, member: int, ts_us: int, cursors: dict[SeriesKey, SeriesCursor]) -> _Plan:
    plan = _Plan(defaultdict(list), {}, [])
    spec: BaselineSpec = rule.spec
    keys = SeriesKeys(rule.group_by)
    lookback_us = to_us(spec.lookback)
    seasonal = spec.seasonality == "weekday"
    times, values, span_keys = cols.time_us, cols.values, cols.span_key
    for i in cols.rows.get(member, ()):
        t = times[i]
        series = keys(cols.runs, i)
        judged = is_judged(t, span_keys[i], cursors.get(series), ts_us, lookback_us)
        if not math.isfinite(values[i]):
            if judged:
                plan.nonfinite.append(i)
            continue
        sub = (series, weekday(t) if seasonal else -1)
        rows = plan.rows[sub]
        if judged and sub not in plan.first:
            plan.first[sub] = len(rows)
        rows.append(i)
    return plan


def _history_need(rule: Rule, plan: _Plan, cols: _Columns, fetched_lo: int, ts_us: int,
                  data_start: int | None) -> int | None:
    """The lower bound (exclusive, µs) the rule's history needs, if older than what is fetched."""
    spec: BaselineSpec = rule.spec
    need: int | None = None
    period = DAY_US * (7 if spec.seasonality == "weekday" else 1)
    for sub, first in plan.first.items():
        t_first = cols.time_us[plan.rows[sub][first]]
        if spec.history_window is not None:
            lo = t_first - HISTORY_SPANS * to_us(spec.history_window) - 1
        else:
            assert spec.history_runs is not None
            if first >= HISTORY_SPANS * spec.history_runs:
                continue
            if data_start is not None and fetched_lo < data_start:
                continue  # everything there is has been read
            lo = min(t_first - (HISTORY_SPANS * spec.history_runs + 2) * period,
                     fetched_lo - max(ts_us - fetched_lo, period))
        if lo < fetched_lo:
            need = lo if need is None else min(need, lo)
    return need


def _judge_rule(rule: Rule, plan: _Plan, cols: _Columns) -> list[Sample]:
    spec: BaselineSpec = rule.spec
    keys = SeriesKeys(rule.group_by)
    runs, times, values = cols.runs, cols.time_us, cols.values
    out: list[Sample] = []

    def sample(i: int, value: float | None, threshold: tuple[float, float] | None, violated: bool | None,
               still: bool | None, detail: str) -> Sample:
        return Sample(keys(runs, i), times[i] / US, value, threshold, violated, still, cols.span_key[i],
                      ((str(runs.trace_id[i]), str(runs.span_id[i])),), detail)

    for sub, first in plan.first.items():
        rows = plan.rows[sub]
        if spec.history_runs is not None:
            start = max(0, first - HISTORY_SPANS * spec.history_runs)
        else:
            start = first
            horizon = times[rows[first]] - HISTORY_SPANS * to_us(spec.history_window or 0)
            while start > 0 and times[rows[start - 1]] >= horizon:
                start -= 1
        seq = rows[start:]
        verdicts = walk(spec, [times[i] for i in seq], [values[i] for i in seq], first - start)
        for i, v in zip(seq[first - start:], verdicts, strict=True):
            still = None
            if rule.resolve is not None and v.violated is not None and v.value is not None:
                still = rule.resolve.violated(v.value)
            out.append(sample(i, v.value, v.threshold, v.violated, still, v.detail))
    for i in plan.nonfinite:
        out.append(sample(i, None, None, None, None, f"value {values[i]} is not a number"))
    out.sort(key=lambda s: (s.at, s.run_key or 0))
    return out


class BaselineKind:
    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 cursors: dict[str, dict[SeriesKey, SeriesCursor]]) -> Results:
        ts_us = to_us(ts)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            return _run_batch(cur, shape, batch, ts_us, cursors)

        return evaluate_batched(rules, _shape, run_batch)


def _run_batch(cur: duckdb.DuckDBPyConnection, shape: RunShape, batch: Batch, ts_us: int,
               cursors: dict[str, dict[SeriesKey, SeriesCursor]]) -> Results:
    los: dict[tuple[WhereValue, ...], int] = {}
    for rule, where in batch:
        lo = judged_lower_bound(rule, rule.spec.lookback, ts_us, cursors.get(rule.id, {}))
        los[where] = min(lo, los.get(where, lo))
    wheres = list(los)
    index = {w: i for i, w in enumerate(wheres)}
    fetched_lo = [los[w] for w in wheres]
    runs = fetch_runs(cur, shape, [Member(w, los[w], ts_us) for w in wheres])
    cols = _Columns(runs)

    def plans() -> dict[str, _Plan]:
        return {rule.id: _plan(rule, cols, index[where], ts_us, cursors.get(rule.id, {})) for rule, where in batch}

    current = plans()
    data_start: int | None = None
    widened = False
    for _ in range(MAX_WIDENINGS):
        needs: dict[int, int] = {}
        for rule, where in batch:
            m = index[where]
            plan = current[rule.id]
            if plan.first:
                need = _history_need(rule, plan, cols, fetched_lo[m], ts_us, data_start)
                if need is not None:
                    needs[m] = min(need, needs.get(m, need))
        if widened and needs and data_start is None:
            data_start = data_start_us(cur, shape.value or "")
            if data_start is None:
                break
            needs = {m: lo for m, lo in needs.items() if fetched_lo[m] >= data_start}
        if not needs:
            break
        order = list(needs)
        older = fetch_runs(cur, shape, [Member(wheres[m], needs[m], fetched_lo[m]) for m in order])
        older = replace(older, member=np.asarray(order, dtype=np.int64)[older.member])
        runs = Runs.concat([older, runs], len(shape.group_by))
        cols = _Columns(runs)
        for m in order:
            fetched_lo[m] = needs[m]
        widened = True
        current = plans()
    return {rule.id: _judge_rule(rule, current[rule.id], cols) for rule, _ in batch}
