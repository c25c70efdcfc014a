"""absence: a run that did not happen, or data that is too old. A per-run kind whose judgements are events on the
runs' own time line, so it gives the same transitions however its evaluations are stepped:

- expected_every + grace: a series is due again expected_every + grace after its newest run. A run at or before
  that deadline is on time (an ok judgement at the run, value 0: seconds since the newest run); once time has
  passed the deadline with no run (an evaluation after it), a violating judgement placed at the deadline (value =
  seconds since the newest run, i.e. the threshold: more than it from then on), and one more at each further
  expected_every without a run (so `for_runs: 2` means two missed runs);
- lag_attribute + max_lag: the attribute on the newest run is the unix time of its newest event; the data is too
  old from that event time + max_lag on (a violating judgement then), and a run whose own event time is already
  more than max_lag behind its end time violates at the run. A newest run without the attribute is "no data".

Series are the group_by values of the runs (spans the selector matches; no value attribute is needed). Deadlines
are judged only up to `lookback` after a series' newest run: a series silent for longer is no longer expected
(its state stays as it was). A rule without group_by and no run at all is judged once, on its first evaluation:
value = lookback (not seen for at least that long), violated when that already exceeds the threshold, else "no
data" (a lookback shorter than the threshold cannot tell). rule.condition is not used; rule.resolve (if set) gives
still_violated on the same value.

Batching as for threshold: rules with one selector shape (span, service, where keys, group_by, lag attribute)
read their new runs with one query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import duckdb

from evaluator.rules.model import AbsenceSpec, KindResult, Rule, RuleError, RulePrior, Sample, SeriesKey
from evaluator.rules.select import (
    US,
    Batch,
    Results,
    RunShape,
    SeriesKeys,
    WhereValue,
    evaluate_batched,
    fetch_new_runs,
    is_new,
    priors_of,
    shape_of,
    to_us,
)


def _shape(rule: Rule) -> tuple[RunShape, tuple[WhereValue, ...]]:
    spec = rule.spec
    if not isinstance(spec, AbsenceSpec):
        raise RuleError(f"{rule.id}: an absence rule needs an AbsenceSpec, not {type(spec).__name__}")
    if (spec.expected_every is None) == (spec.lag_attribute is None):
        raise RuleError(f"{rule.id}: an absence rule needs exactly one of expected_every and lag_attribute")
    if spec.lag_attribute is not None and spec.max_lag is None:
        raise RuleError(f"{rule.id}: lag_attribute needs max_lag")
    if spec.expected_every is not None and spec.expected_every <= 0:
        raise RuleError(f"{rule.id}: expected_every must be positive")
    return shape_of(rule.selector, None, rule.group_by, extra=spec.lag_attribute)


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # e.g. milliseconds sent as seconds
        return f"{seconds:g} (unix seconds)"


def _dur(seconds: float) -> str:
    if abs(seconds) >= 86400 * 2:
        return f"{seconds / 86400:.1f} d"
    if abs(seconds) >= 3600:
        return f"{seconds / 3600:.1f} h"
    if abs(seconds) >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def threshold_of(spec: AbsenceSpec) -> float:
    if spec.lag_attribute is not None:
        assert spec.max_lag is not None
        return float(spec.max_lag)
    assert spec.expected_every is not None
    return float(spec.expected_every + spec.grace)


class _Series:
    """One series' judgements, walked in time order: its newest run, and the deadlines after it."""

    def __init__(self, rule: Rule, series: SeriesKey, out: list[Sample], newest: float | None,
                 event: float | None) -> None:
        self.rule, self.series, self.out = rule, series, out
        self.spec: AbsenceSpec = rule.spec
        self.newest = newest  # end time of the newest run (seconds)
        self.event = event  # lag variant: the newest run's event time (NaN: it has none)
        self.threshold = threshold_of(self.spec)

    def _sample(self, at: float, value: float | None, violated: bool | None, detail: str,
                run_key: int | None = None, spans: tuple[tuple[str, str], ...] = (), reason: str = "") -> None:
        rule = self.rule
        still = rule.resolve.violated(value) if rule.resolve is not None and violated is not None and \
            value is not None else None
        self.out.append(Sample(self.series, at, value, self.threshold, violated, still, run_key, spans, detail,
                               reason))

    def deadlines(self, until: float, after: float) -> None:
        """Judgements for the deadlines passed between the newest run and `until` (the next run's time, or the
        evaluation time): those strictly before it, as a run at its deadline is on time and a deadline is missed
        only once time has passed it; those at or after `after` only (not judged before), none more than lookback after
        the newest run."""
        if self.newest is None:
            return
        spec = self.spec

        def before(d: float) -> bool:
            return d < until and d <= self.newest + spec.lookback  # type: ignore[operator]

        if spec.lag_attribute is None:
            assert spec.expected_every is not None
            d = self.newest + self.threshold
            while before(d):
                if d >= after:
                    self._sample(d, d - self.newest, True,
                                 f"no run since {_iso(self.newest)}, {_dur(d - self.newest)} ago")
                d += spec.expected_every
            return
        if self.event is None or math.isnan(self.event):
            return
        d = self.event + self.threshold
        if self.newest < d and before(d) and d >= after:
            self._sample(d, d - self.event, True, f"{spec.lag_attribute} {_iso(self.event)} on the run of "
                                                  f"{_iso(self.newest)}, {_dur(d - self.event)} behind")

    def run(self, at: float, key: int, spans: tuple[tuple[str, str], ...], event: float) -> None:
        spec = self.spec
        self.newest, self.event = at, event
        if spec.lag_attribute is None:
            self._sample(at, 0.0, False, f"ran at {_iso(at)}", key, spans)
            return
        if math.isnan(event):
            self._sample(at, None, None, f"the run of {_iso(at)} has no {spec.lag_attribute}", key, spans,
                         "missing_attribute")
            return
        value = at - event
        self._sample(at, value, value > self.threshold,
                     f"{spec.lag_attribute} {_iso(event)} on the run of {_iso(at)}, {_dur(value)} behind", key, spans)


class AbsenceKind:
    """Judges absence rules on the runs' time line (a per-run kind: see evaluator.rules.model.RuleKind)."""

    timeline = "runs"

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any = None) -> Results:
        ts = float(ts)
        ts_us = to_us(ts)
        priors = priors_of(prior)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            runs, index = fetch_new_runs(cur, shape, batch, priors, ts_us)
            rows = runs.by_member()
            out: Results = {}
            for rule, where in batch:
                out[rule.id] = _judge(rule, runs, rows.get(index[where], []), priors.get(rule.id), ts)
            return out

        return evaluate_batched(rules, _shape, run_batch)


def _judge(rule: Rule, runs: Any, rows: Any, prior: RulePrior | None, ts: float) -> KindResult:
    spec: AbsenceSpec = rule.spec
    known: Mapping[SeriesKey, Any] = prior.series if prior is not None else {}
    since = prior.since if prior is not None else None
    after = -math.inf if since is None else since
    keys = SeriesKeys(rule.group_by)
    samples: list[Sample] = []
    memory: dict[SeriesKey, Any] = {}
    walkers: dict[SeriesKey, _Series] = {}
    for key, c in known.items():
        event = c.memory.get("event") if isinstance(c.memory, Mapping) else None
        walkers[key] = _Series(rule, key, samples, c.at, math.nan if event is None else float(event))
    times: list[int] = runs.time_us[rows].tolist() if len(rows) else []
    span_keys: list[int] = runs.span_key[rows].tolist() if len(rows) else []
    extra: list[float] = runs.extra[rows].tolist() if len(rows) else []
    for j, i in enumerate(rows):
        series = keys(runs, int(i))
        cursor = known.get(series)
        if not is_new(times[j], span_keys[j], cursor):
            continue  # judged before (a late run cannot move its series back in time: it is ignored here)
        w = walkers.get(series)
        if w is None:
            w = walkers[series] = _Series(rule, series, samples, None, None)
        at = times[j] / US
        w.deadlines(at, after)
        w.run(at, span_keys[j], ((str(runs.trace_id[i]), str(runs.span_id[i])),), extra[j])
        if spec.lag_attribute is not None:
            memory[series] = {"event": None if math.isnan(extra[j]) else extra[j]}
    for w in walkers.values():
        w.deadlines(ts, after)
    if since is None and not walkers and not rule.group_by:
        value = float(spec.lookback)
        threshold = threshold_of(spec)
        violated = True if value > threshold else None
        still = rule.resolve.violated(value) if rule.resolve is not None and violated else None
        samples.append(Sample((), ts, value, threshold, violated, still, None, (),
                              f"no run in the last {_dur(value)}", "" if violated else "never_ran"))
    samples.sort(key=lambda s: (s.at, s.run_key or 0))
    return KindResult(samples, memory)
