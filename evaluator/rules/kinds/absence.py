"""absence: a run that did not happen, or data that is too old; judged at the evaluation time, one Sample per
series (at = ts, no run_key: it is not a per-run judgement).

The series are the group_by values seen in runs (spans the selector matches; no value attribute is needed)
within (ts - lookback, ts]. Two modes, exactly one set:
- expected_every + grace: value = seconds since the series' newest run, threshold = expected_every + grace,
  violated when value > threshold.
- lag_attribute + max_lag: value = ts - the attribute on the series' newest run (unix seconds of the newest
  event), threshold = max_lag, violated when greater; a newest run without the attribute is "no data".
A rule without group_by and no run at all in the lookback still yields its one series (): value = lookback (it
has not been seen for at least that long), violated when that already exceeds the threshold, else "no data" (a
lookback shorter than the threshold cannot tell). rule.condition is not used; rule.resolve (if set) gives
still_violated on the same value.

Batching: rules with one selector shape (span, service, where keys, group_by, lag attribute) are one query over
the lookback that keeps only the newest run per where tuple and series (QUALIFY row_number() = 1), so Python
sees one row per series however often the pipelines run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb

from evaluator.rules.model import AbsenceSpec, Rule, RuleError, Sample, SeriesCursor, SeriesKey
from evaluator.rules.select import (
    US,
    Batch,
    Member,
    Results,
    RunShape,
    SeriesKeys,
    WhereValue,
    evaluate_batched,
    fetch_runs,
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


def _threshold(spec: AbsenceSpec) -> float:
    if spec.lag_attribute is not None:
        assert spec.max_lag is not None
        return float(spec.max_lag)
    assert spec.expected_every is not None
    return float(spec.expected_every + spec.grace)


class AbsenceKind:
    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 cursors: dict[str, dict[SeriesKey, SeriesCursor]]) -> Results:
        ts = float(ts)
        ts_us = to_us(ts)

        def run_batch(shape: RunShape, batch: Batch) -> Results:
            los: dict[tuple[WhereValue, ...], int] = {}
            for rule, where in batch:
                lo = ts_us - to_us(rule.spec.lookback)
                los[where] = min(lo, los.get(where, lo))
            wheres = list(los)
            runs = fetch_runs(cur, shape, [Member(w, los[w], ts_us) for w in wheres], newest_only=True)
            rows = runs.by_member()
            index = {w: i for i, w in enumerate(wheres)}
            out: Results = {}
            for rule, where in batch:
                spec: AbsenceSpec = rule.spec
                keys = SeriesKeys(rule.group_by)
                lo = ts_us - to_us(spec.lookback)
                newest: dict[SeriesKey, int] = {}
                for i in rows.get(index[where], []):
                    if runs.time_us[i] > lo:
                        newest[keys(runs, i)] = int(i)  # rows are in time order: the last one is the newest
                threshold = _threshold(spec)
                samples: list[Sample] = []
                if not newest and not rule.group_by:
                    value = float(spec.lookback)
                    samples.append(self._sample(rule, (), ts, value, threshold, value > threshold or None, (),
                                                f"no run in the last {_dur(value)}"))
                for series, i in sorted(newest.items()):
                    run_at = int(runs.time_us[i]) / US
                    spans = ((str(runs.trace_id[i]), str(runs.span_id[i])),)
                    if spec.lag_attribute is None:
                        value = ts - run_at
                        samples.append(self._sample(rule, series, ts, value, threshold, value > threshold, spans,
                                                    f"last run {_iso(run_at)}, {_dur(value)} ago"))
                        continue
                    lag = float(runs.extra[i])
                    if lag != lag:  # NaN: the newest run does not carry the attribute
                        samples.append(Sample(series, ts, None, threshold, None, None, None, spans,
                                              f"the last run ({_iso(run_at)}) has no {spec.lag_attribute}"))
                        continue
                    value = ts - lag
                    samples.append(self._sample(rule, series, ts, value, threshold, value > threshold, spans,
                                                f"{spec.lag_attribute} {_iso(lag)} on the run of {_iso(run_at)}, "
                                                f"{_dur(value)} behind"))
                out[rule.id] = samples
            return out

        return evaluate_batched(rules, _shape, run_batch)

    @staticmethod
    def _sample(rule: Rule, series: SeriesKey, ts: float, value: float, threshold: float, violated: bool | None,
                spans: tuple[tuple[str, str], ...], detail: str) -> Sample:
        still = rule.resolve.violated(value) if rule.resolve is not None and violated is not None else None
        return Sample(series, ts, value, threshold, violated, still, None, spans, detail)
