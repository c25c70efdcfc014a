"""baseline: each run against its own history, one Sample per run.

The baseline of a run is made of earlier runs of its series that *entered* the baseline: the previous
`history_runs` of them, or those whose end time lies in [t - history_window, t). With `seasonality: weekday` the
series is split by UTC weekday first, so only runs on the run's own weekday count (`history_runs: 4` is then the
same weekday of the last four weeks).

Which runs enter (docs/rules.md, "Baselines"):
- warm-up: while fewer than `min_history` runs have entered, a run cannot be judged ("nodata", with how many there
  are) and enters: nothing is known to be normal yet;
- after warm-up, a run judged ok enters; a violating run enters only with `exclude: none`; a run that cannot be
  judged (a value that is not a number) never enters. So an incident, however long, never becomes the baseline
  under the default `exclude: violations`, and no "nodata" run ever does;
- a window that holds fewer than min_history entered runs (after an incident longer than the window, or a gap) is
  filled with the newest entered runs before it, and the detail says the baseline is stale.

Methods (the value reported, the band it must stay in):
- relative: (x - mean) / |mean|, within [-tolerance, +tolerance];
- zscore: (x - mean) / std with the sample std (ddof=1), within [-z, z];
- robust: (x - median) / (1.4826 * MAD), within [-z, z]: a z-score whose centre and spread one outlier cannot move,
  so it needs no exclusion to stay put during an incident (with a MAD of 0 the mean absolute deviation * 1.2533
  stands in, as for the modified z-score);
- quantile_band: x itself, within [q_lo, q_hi] of the baseline values, computed like numpy.quantile's default
  "linear" method.
A baseline with no spread (mean 0 for relative; std, MAD and mean absolute deviation 0) judges a value equal to
its centre ok (deviation 0) and any other value violating (deviation +-inf): a signal that never moved and now
moved is worth a look, and "cannot judge" forever would hide it. A value exactly on the band's edge does not
violate. With rule.resolve, still_violated is rule.resolve judged on the same value.

Memory. A run's verdict depends on which earlier runs entered, and theirs on earlier ones, back to the first run
of the series. The kind therefore walks a series from its first run the first time it sees it, and returns as the
series' memory the entered runs any later run can still need (the last history_runs per weekday, or those within
the window plus the newest min_history); the engine stores that memory with the series' state and hands it back,
so later evaluations judge only the new runs. Walking from the first run or continuing from memory gives the same
verdicts: that is what makes the daemon, `eval`, `replay` and `test` agree.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb

from evaluator.rules.kinds.threshold import LATE
from evaluator.rules.model import BaselineSpec, KindResult, Rule, RuleError, Sample, SeriesKey, fmt_number
from evaluator.rules.select import (
    US,
    Batch,
    Results,
    RulePriors,
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

METHODS = ("relative", "zscore", "robust", "quantile_band")
EXCLUDE = ("violations", "none")
DAY_US = 86400 * US
MAD_SCALE = 1.4826  # MAD * 1.4826 estimates the standard deviation of a normal distribution
MEAN_AD_SCALE = 1.2533  # mean absolute deviation * 1.2533 does too (sqrt(pi / 2))


def check_spec(rule: Rule) -> BaselineSpec:
    spec = rule.spec
    if not isinstance(spec, BaselineSpec):
        raise RuleError(f"{rule.id}: a baseline rule needs a BaselineSpec, not {type(spec).__name__}")
    if spec.method not in METHODS:
        raise RuleError(f"{rule.id}: unknown baseline method {spec.method!r} (one of {', '.join(METHODS)})")
    if spec.exclude not in EXCLUDE:
        raise RuleError(f"{rule.id}: exclude must be one of {', '.join(EXCLUDE)}, not {spec.exclude!r}")
    if (spec.history_runs is None) == (spec.history_window is None):
        raise RuleError(f"{rule.id}: a baseline needs exactly one of history_runs and history_window")
    if spec.history_runs is not None and spec.history_runs < 1:
        raise RuleError(f"{rule.id}: history_runs must be at least 1")
    if spec.history_window is not None and spec.history_window <= 0:
        raise RuleError(f"{rule.id}: history_window must be positive")
    if spec.seasonality not in (None, "weekday"):
        raise RuleError(f"{rule.id}: unknown seasonality {spec.seasonality!r} (weekday or none)")
    return spec


def _shape(rule: Rule) -> tuple[RunShape, tuple[WhereValue, ...]]:
    spec = check_spec(rule)
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


def median(sorted_values: Sequence[float]) -> float:
    return quantile_linear(sorted_values, 0.5)


@dataclass(frozen=True)
class Verdict:
    value: float | None
    threshold: tuple[float, float] | None
    violated: bool | None
    detail: str
    reason: str = ""  # for no data: why, as a short code


def _outside(v: float, band: tuple[float, float]) -> bool:
    return not band[0] <= v <= band[1]


def _scaled(x: float, centre: float, spread: float) -> float:
    """(x - centre) / spread, with a spread of 0 meaning: equal is 0, anything else is +-inf."""
    if spread > 0:
        return (x - centre) / spread
    return 0.0 if x == centre else math.copysign(math.inf, x - centre)


def judge(spec: BaselineSpec, x: float, baseline: Sequence[float], detail: bool = True) -> Verdict:
    """One run's finite value against its baseline values (at least one)."""
    n = len(baseline)
    if spec.method == "quantile_band":
        s = sorted(baseline)
        q_lo, q_hi = spec.quantiles
        band = (quantile_linear(s, q_lo), quantile_linear(s, q_hi))
        text = (f"{q_lo * 100:g}th-{q_hi * 100:g}th percentile of {n} runs [{fmt_number(band[0])}, "
                f"{fmt_number(band[1])}]" if detail else "")
        return Verdict(x, band, _outside(x, band), text)
    if spec.method == "robust":
        s = sorted(baseline)
        med = median(s)
        mad = median(sorted(abs(v - med) for v in s))
        spread = MAD_SCALE * mad
        how = "MAD"
        if spread == 0:
            spread = MEAN_AD_SCALE * math.fsum(abs(v - med) for v in s) / n
            how = "mean absolute deviation"
        rz = _scaled(x, med, spread)
        band = (-spec.z, spec.z)
        text = (f"median of {n} runs {fmt_number(med)}, {how} spread {fmt_number(spread)}, robust z {rz:+.2f}"
                if detail else "")
        return Verdict(rz, band, _outside(rz, band), text)
    mean = math.fsum(baseline) / n
    if spec.method == "relative":
        dev = _scaled(x, mean, abs(mean))
        band = (-spec.tolerance, spec.tolerance)
        text = f"mean of {n} runs {fmt_number(mean)}, deviation {dev * 100:+.1f}%" if detail else ""
        return Verdict(dev, band, _outside(dev, band), text)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in baseline) / (n - 1)) if n > 1 else 0.0
    z = _scaled(x, mean, std)
    band = (-spec.z, spec.z)
    text = f"mean of {n} runs {fmt_number(mean)}, std {fmt_number(std)}, z {z:+.2f}" if detail else ""
    return Verdict(z, band, _outside(z, band), text)


@dataclass
class Memory:
    """The runs of one (sub-)series that entered the baseline, oldest first, pruned to what a later run can need,
    and how many ever entered (warm-up ends at min_history)."""

    entered: int = 0
    times: list[int] = field(default_factory=list)  # end times, µs
    values: list[float] = field(default_factory=list)

    def to_json(self) -> list[Any]:
        return [self.entered, self.times, self.values]

    @staticmethod
    def from_json(data: Any) -> Memory:
        entered, times, values = data
        return Memory(int(entered), [int(t) for t in times], [float(v) for v in values])


def _baseline(spec: BaselineSpec, mem: Memory, t_us: int) -> tuple[list[float], str]:
    """The baseline values of a run at t_us, and a note when the window had to be filled with older runs."""
    if spec.history_runs is not None:
        return mem.values[-spec.history_runs:], ""
    assert spec.history_window is not None
    lo = t_us - to_us(spec.history_window)
    first = len(mem.times)
    while first > 0 and mem.times[first - 1] >= lo:
        first -= 1
    if len(mem.times) - first >= spec.min_history:
        return mem.values[first:], ""
    k = min(spec.min_history, len(mem.values))
    return mem.values[-k:], f"; stale: fewer than {spec.min_history} runs in the window, the last {k} entered"


def _prune(spec: BaselineSpec, mem: Memory) -> None:
    keep = spec.min_history
    if spec.history_runs is not None:
        keep = max(keep, spec.history_runs)
    else:
        assert spec.history_window is not None
        lo = mem.times[-1] - to_us(spec.history_window)
        inside = len(mem.times)
        while inside > 0 and mem.times[inside - 1] >= lo:
            inside -= 1
        keep = max(keep, len(mem.times) - inside)
    if len(mem.times) > keep:
        del mem.times[:-keep]
        del mem.values[:-keep]


def step(spec: BaselineSpec, mem: Memory, t_us: int, x: float, detail: bool = True) -> Verdict:
    """Judge one run (runs come in (time, span_key) order) and let it enter the memory when it should."""
    if not math.isfinite(x):
        return Verdict(None, None, None, f"value {x} is not a number", "not_a_number")
    if mem.entered < spec.min_history:
        verdict = Verdict(x, None, None,
                          f"warming up: {mem.entered} of min_history {spec.min_history} baseline runs", "warming_up")
        enters = True
    else:
        values, note = _baseline(spec, mem, t_us)
        verdict = judge(spec, x, values, detail)
        if note and detail:
            verdict = Verdict(verdict.value, verdict.threshold, verdict.violated, verdict.detail + note)
        enters = verdict.violated is False or (verdict.violated is True and spec.exclude == "none")
    if enters:
        mem.entered += 1
        at = bisect.bisect_right(mem.times, t_us)  # a late run goes where it belongs in time
        mem.times.insert(at, t_us)
        mem.values.insert(at, x)
        _prune(spec, mem)
    return verdict


def walk(spec: BaselineSpec, times_us: Sequence[int], values: Sequence[float],
         mem: Memory | None = None) -> tuple[list[Verdict], Memory]:
    """Every run of one (sub-)series, in order, from memory (or from the first run): the verdicts and the memory
    after them. The reference for tests and benchmarks; the kind uses `step` directly."""
    mem = mem or Memory()
    return [step(spec, mem, t, x) for t, x in zip(times_us, values, strict=True)], mem


# -- the kind ----------------------------------------------------------------------------------------------------

def weekday(time_us: int) -> int:
    """UTC weekday, Monday 0 (the epoch was a Thursday)."""
    return (time_us // DAY_US + 3) % 7


def _load(data: Any) -> dict[int, Memory] | None:
    if not isinstance(data, Mapping):
        return None
    try:
        return {int(k): Memory.from_json(v) for k, v in data.items()}
    except (TypeError, ValueError):
        return None  # a memory written by another version: walk the history again


class BaselineKind:
    """Judges baseline rules run by run (a per-run kind: see evaluator.rules.model.RuleKind)."""

    timeline = "runs"

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any) -> Results:
        ts_us = to_us(ts)
        priors = priors_of(prior)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            runs, index = fetch_new_runs(cur, shape, batch, priors, ts_us, needs_memory=True)
            rows = runs.by_member()
            return {rule.id: _judge_rule(rule, runs, rows.get(index[where], []), priors)
                    for rule, where in batch}

        return evaluate_batched(rules, _shape, run_batch)


def _judge_rule(rule: Rule, runs: Runs, rows: Sequence[int] | Any, priors: RulePriors) -> KindResult:
    spec: BaselineSpec = rule.spec
    prior = priors.get(rule.id)
    known = prior.series if prior is not None else {}
    keys = SeriesKeys(rule.group_by)
    seasonal = spec.seasonality == "weekday"
    times: list[int] = runs.time_us[rows].tolist() if len(rows) else []
    values: list[float] = runs.value[rows].tolist() if len(rows) else []
    span_keys: list[int] = runs.span_key[rows].tolist() if len(rows) else []
    memories: dict[SeriesKey, dict[int, Memory]] = {}
    fresh: set[SeriesKey] = set()  # series whose memory is rebuilt from their first run
    samples: list[Sample] = []
    for j, i in enumerate(rows):
        series = keys(runs, int(i))
        mems = memories.get(series)
        cursor = known.get(series)
        if mems is None:
            loaded = _load(cursor.memory) if cursor is not None else None
            if loaded is None:
                fresh.add(series)
                loaded = {}
            mems = memories[series] = loaded
        t, key, x = times[j], span_keys[j], values[j]
        late = False
        judged_before = not is_new(t, key, cursor)
        if judged_before and series not in fresh:
            if not is_late(key, cursor, prior.seen_key if prior is not None else None):
                continue  # its verdict is in the memory already
            judged_before, late = False, True  # judged now, against the memory as it is
        mem = mems.setdefault(weekday(t) if seasonal else -1, Memory())
        verdict = step(spec, mem, t, x, detail=not judged_before)
        if judged_before:
            continue  # rebuilding the memory of a series whose runs up to its cursor were judged before
        if late:
            verdict = Verdict(verdict.value, verdict.threshold, verdict.violated,
                              (verdict.detail + "; " if verdict.detail else "") + LATE, verdict.reason)
        still = None
        if rule.resolve is not None and verdict.violated is not None and verdict.value is not None:
            still = rule.resolve.violated(verdict.value)
        samples.append(Sample(series, t / US, verdict.value, verdict.threshold, verdict.violated, still, key,
                              ((str(runs.trace_id[i]), str(runs.span_id[i])),), verdict.detail, verdict.reason))
    memory = {series: {str(k): m.to_json() for k, m in mems.items()} for series, mems in memories.items()}
    return KindResult(samples, memory)
