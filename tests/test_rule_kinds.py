"""Rule kinds over a real store: selectors, per-run judgement with cursors, baselines against numpy, absence,
SQL rules and their refusals, and batching (one query for many rules; one bad rule never breaks the others)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import duckdb
import numpy as np
import pytest

from evaluator.rules.kinds import new_kinds, register
from evaluator.rules.kinds.absence import AbsenceKind
from evaluator.rules.kinds.baseline import BaselineKind, quantile_linear
from evaluator.rules.kinds.sql import SqlKind
from evaluator.rules.kinds.threshold import ThresholdKind
from evaluator.rules.model import (
    AbsenceSpec,
    BaselineSpec,
    Condition,
    KindResult,
    Rule,
    RuleError,
    RulePrior,
    Sample,
    Selector,
    SeriesCursor,
    SqlSpec,
    ThresholdSpec,
)
from evaluator.rules.select import Member, evaluate_batched, fetch_runs, select_runs, series_key, shape_of

DAY = 86400.0
HOUR = 3600.0
DAY0 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()  # a Monday
SPAN = "features.daily.run"
SERVICE = "risk-feature-pipeline"
DATASET = "payments/transactions_yesterday"
PAYMENTS = Selector(span=SPAN, service=SERVICE, where=(("data.dataset", DATASET),))


# -- fixtures and builders ---------------------------------------------------------------------------------------

class Spans:
    """Inserts spans and their attributes straight into the store's tables."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self.cur = cur
        self.key = 0

    def add(self, end: float, attrs: dict[str, Any] | None = None, *, name: str = SPAN,
            service: str | None = SERVICE) -> int:
        self.key += 1
        key = self.key
        end_us = round(end * 1e6)
        self.cur.execute(
            "INSERT INTO spans VALUES ($k, $t, $s, NULL, $name, 1, make_timestamp($st), make_timestamp($e), 1, NULL,"
            " $svc, 'tests', '{}', make_timestamp($e))",
            {"k": key, "t": self.trace(key), "s": self.span(key), "name": name, "st": end_us - 60_000_000,
             "e": end_us, "svc": service})
        for k, v in (attrs or {}).items():
            if isinstance(v, str):
                self.cur.execute("INSERT INTO span_strings VALUES ($k, make_timestamp($e), $key, $v)",
                                 {"k": key, "e": end_us, "key": k, "v": v})
            else:
                self.cur.execute("INSERT INTO span_numbers VALUES ($k, make_timestamp($e), $key, $v)",
                                 {"k": key, "e": end_us, "key": k, "v": float(v)})
        return key

    @staticmethod
    def trace(key: int) -> str:
        return f"{key:032x}"

    @staticmethod
    def span(key: int) -> str:
        return f"{key:016x}"

    def ids(self, key: int) -> tuple[tuple[str, str], ...]:
        return ((self.trace(key), self.span(key)),)


@pytest.fixture
def spans(cur: duckdb.DuckDBPyConnection) -> Spans:
    return Spans(cur)


def rule(kind: str, spec: Any, *, name: str = "r", condition: Condition | None = None,
         resolve: Condition | None = None, selector: Selector = PAYMENTS, group_by: tuple[str, ...] = ()) -> Rule:
    return Rule(name=name, group="g", kind=kind, rung="completeness", owner="producer", severity="page", spec=spec,
                condition=condition, resolve=resolve, selector=selector, group_by=group_by)


Result = dict[str, list[Sample] | KindResult | RuleError]


def samples(result: Result, r: Rule) -> list[Sample]:
    got = result[r.id]
    assert not isinstance(got, RuleError), got
    return got.samples if isinstance(got, KindResult) else got


def memory(result: Result, r: Rule) -> dict[Any, Any]:
    got = result[r.id]
    assert isinstance(got, KindResult), got
    return got.memory


def error(result: Result, r: Rule) -> str:
    got = result[r.id]
    assert isinstance(got, RuleError), got
    return str(got)


class CountingCursor:
    """Delegates to a real cursor and records every statement executed."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._cur = cur
        self.statements: list[str] = []

    def execute(self, sql: str, params: Any = None) -> Any:
        self.statements.append(sql)
        return self._cur.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


def at(day: float, hour: float = 2.0) -> float:
    return DAY0 + day * DAY + hour * HOUR


# -- select ------------------------------------------------------------------------------------------------------

def test_select_runs_filters_by_span_service_and_where(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Name, service, string and numeric equality all filter; a span without the value attribute is no run."""
    a = spans.add(at(0), {"data.dataset": DATASET, "data.row_count": 10, "data.shard": 3})
    spans.add(at(0), {"data.dataset": DATASET, "data.row_count": 11}, name="other.run")
    spans.add(at(0), {"data.dataset": DATASET, "data.row_count": 12}, service="another-service")
    spans.add(at(0), {"data.dataset": "other/dataset", "data.row_count": 13, "data.shard": 3})
    spans.add(at(0), {"data.dataset": DATASET})  # no row count: not a run
    b = spans.add(at(1), {"data.dataset": DATASET, "data.row_count": 14, "data.shard": 4})
    runs = select_runs(cur, PAYMENTS, "data.row_count", (), at(-1), at(2))
    assert runs.span_key.tolist() == [a, b]
    assert runs.value.tolist() == [10.0, 14.0]
    assert runs.time.tolist() == [at(0), at(1)]
    assert list(runs.trace_id) == [Spans.trace(a), Spans.trace(b)]
    assert list(runs.span_id) == [Spans.span(a), Spans.span(b)]
    numeric = Selector(where=(("data.shard", 3),))
    assert select_runs(cur, numeric, "data.row_count", (), at(-1), at(2)).value.tolist() == [10.0, 13.0]
    both = Selector(span=SPAN, where=(("data.shard", 3.0), ("data.dataset", "other/dataset")))
    assert select_runs(cur, both, "data.row_count", (), at(-1), at(2)).value.tolist() == [13.0]
    assert len(select_runs(cur, Selector(service="nobody"), "data.row_count", (), at(-1), at(2))) == 0


def test_select_runs_range_is_open_below_and_closed_above(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """(lo, hi]: a run ending exactly at lo is outside, one ending exactly at hi inside."""
    keys = [spans.add(at(d), {"data.row_count": d}) for d in range(4)]
    runs = select_runs(cur, Selector(), "data.row_count", (), at(1), at(3))
    assert runs.span_key.tolist() == keys[2:]


def test_group_by_renders_strings_and_numbers(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """A string group_by attribute is its text, a number is repr without '.0', a missing one is ''."""
    spans.add(at(0), {"data.row_count": 1, "data.dataset": "a", "data.shard": 3})
    spans.add(at(0, 3), {"data.row_count": 2, "data.dataset": "b", "data.shard": 2.5})
    spans.add(at(0, 4), {"data.row_count": 3, "data.shard": 1e20})
    runs = select_runs(cur, Selector(), "data.row_count", ("data.shard", "data.dataset"), at(-1), at(1))
    assert [list(g) for g in runs.groups] == [["3", "2.5", "1e+20"], ["a", "b", ""]]
    assert series_key(("data.shard", "data.dataset"), ("3", "a")) == (("data.dataset", "a"), ("data.shard", "3"))


def test_duplicate_attribute_takes_the_last(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """A span carrying an attribute twice counts once, with the value inserted last."""
    k = spans.add(at(0), {"data.row_count": 5})
    cur.execute("INSERT INTO span_numbers VALUES ($k, make_timestamp($e), 'data.row_count', 7)",
                {"k": k, "e": round(at(0) * 1e6)})
    runs = select_runs(cur, Selector(), "data.row_count", (), at(-1), at(1))
    assert runs.value.tolist() == [7.0]


def test_fetch_runs_tags_members_and_applies_their_own_ranges(cur: duckdb.DuckDBPyConnection,
                                                               spans: Spans) -> None:
    """One query answers many where tuples; each member gets only its own runs in its own range."""
    for d in range(10):
        spans.add(at(d), {"data.dataset": "a", "data.row_count": d})
        spans.add(at(d), {"data.dataset": "b", "data.row_count": 100 + d})
    shape, _ = shape_of(Selector(where=(("data.dataset", "x"),)), "data.row_count")
    us = 1_000_000
    members = [Member(("b",), round(at(7) * us), round(at(9) * us)),
               Member(("a",), round(at(5) * us), round(at(9) * us)),
               Member(("a",), round(at(-100) * us), round(at(1) * us))]  # a stale member: its own query
    runs = fetch_runs(cur, shape, members)
    got = {m: runs.value[idx].tolist() for m, idx in runs.by_member().items()}
    assert got == {0: [108.0, 109.0], 1: [6.0, 7.0, 8.0, 9.0], 2: [0.0, 1.0]}


# -- threshold ---------------------------------------------------------------------------------------------------

def lag_rule(**kw: Any) -> Rule:
    return rule("threshold", ThresholdSpec("data.freshness_lag_hours", lookback=7 * DAY),
                condition=Condition(">", 0.5), **kw)


def test_threshold_one_sample_per_run_in_time_order(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """A rule's first evaluation judges every run of its history once, oldest first, with its value, run key, time
    and span ids."""
    lags = [0.1, 0.2, 0.3, 0.02, 6.0, 0.4, 0.45, 0.5, 0.6, 0.01]
    keys = [spans.add(at(d), {"data.dataset": DATASET, "data.freshness_lag_hours": x}) for d, x in enumerate(lags)]
    r = lag_rule(resolve=Condition(">", 0.4))
    got = samples(ThresholdKind().evaluate([r], at(9, 3), cur, {}), r)
    assert [s.run_key for s in got] == keys
    assert [s.at for s in got] == [at(d) for d in range(10)]
    assert [s.value for s in got] == lags
    assert [s.violated for s in got] == [False, False, False, False, True, False, False, False, True, False]
    assert [s.still_violated for s in got] == [False, False, False, False, True, False, True, True, True, False]
    assert all(s.threshold == 0.5 and s.series == () for s in got)
    assert got[4].spans == spans.ids(keys[4])


def test_threshold_cursor_excludes_judged_runs_and_runs_after_ts(cur: duckdb.DuckDBPyConnection,
                                                                 spans: Spans) -> None:
    """Only runs after (cursor.at, cursor.run_key) and at or before ts are judged."""
    keys = [spans.add(at(d), {"data.dataset": DATASET, "data.freshness_lag_hours": d}) for d in range(6)]
    same_time = spans.add(at(3), {"data.dataset": DATASET, "data.freshness_lag_hours": 33})
    r = lag_rule()
    cursors = {r.id: {(): SeriesCursor(at(3), keys[3])}}
    got = samples(ThresholdKind().evaluate([r], at(5, 1), cur, cursors), r)
    assert [s.run_key for s in got] == [same_time, keys[4]]  # day 5 ends after ts
    cursors = {r.id: {(): SeriesCursor(at(3), same_time)}}
    got = samples(ThresholdKind().evaluate([r], at(5, 3), cur, cursors), r)
    assert [s.run_key for s in got] == [keys[4], keys[5]]
    cursors = {r.id: {(): SeriesCursor(at(5), keys[5])}}
    assert samples(ThresholdKind().evaluate([r], at(5, 3), cur, cursors), r) == []


def test_threshold_cursor_older_than_lookback_still_catches_up(cur: duckdb.DuckDBPyConnection,
                                                               spans: Spans) -> None:
    """A series' cursor, not the lookback, decides what is new once the series has one."""
    keys = [spans.add(at(d), {"data.dataset": DATASET, "data.freshness_lag_hours": d}) for d in range(20)]
    r = lag_rule()
    got = samples(ThresholdKind().evaluate([r], at(19, 3), cur, {r.id: {(): SeriesCursor(at(9), keys[9])}}), r)
    assert [s.run_key for s in got] == keys[10:]


def test_threshold_group_by_series_have_their_own_cursors(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Series split by group_by, each from its own cursor; a series not seen yet from the previous evaluation (the
    newest cursor here); on a first evaluation every series from its first run."""
    a = [spans.add(at(d), {"data.dataset": "a", "data.freshness_lag_hours": 0.1 * d}) for d in range(4)]
    b = [spans.add(at(d, 5), {"data.dataset": "b", "data.freshness_lag_hours": 1 + d}) for d in range(4)]
    r = lag_rule(selector=Selector(span=SPAN), group_by=("data.dataset",))
    sa, sb = (("data.dataset", "a"),), (("data.dataset", "b"),)
    got = samples(ThresholdKind().evaluate([r], at(4), cur, {r.id: {sa: SeriesCursor(at(2), a[2])}}), r)
    assert [(s.series, s.run_key) for s in got] == [(sb, b[2]), (sa, a[3]), (sb, b[3])]
    assert [s.violated for s in got] == [True, False, True]
    first = samples(ThresholdKind().evaluate([r], at(4), cur, {}), r)
    assert sorted(s.run_key for s in first) == sorted(a + b)


def test_threshold_rules_of_one_shape_share_one_query(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Forty rules differing only in their where value run as a single statement, each getting its own runs."""
    for i in range(40):
        for d in range(3):
            spans.add(at(d), {"data.dataset": f"ds{i}", "data.freshness_lag_hours": i + d / 10})
    rules = [lag_rule(name=f"r{i}", selector=Selector(span=SPAN, where=(("data.dataset", f"ds{i}"),)))
             for i in range(40)]
    other = rule("threshold", ThresholdSpec("data.row_count"), name="other", condition=Condition("<", 1))
    counting = CountingCursor(cur)
    result = ThresholdKind().evaluate([*rules, other], at(3), cast(duckdb.DuckDBPyConnection, counting), {})
    runs = [q for q in counting.statements if "WITH" in q]
    assert len(runs) == 1  # the forty rules' runs; the other shape has no data at all, so only its start is read
    assert len(counting.statements) == 3
    for i, r in enumerate(rules):
        assert [s.value for s in samples(result, r)] == pytest.approx([i, i + 0.1, i + 0.2])
    assert samples(result, other) == []


def test_threshold_bad_rule_does_not_break_the_batch(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """A rule without a condition gets a RuleError; its neighbours still get their samples."""
    spans.add(at(0), {"data.dataset": DATASET, "data.freshness_lag_hours": 0.1})
    good = lag_rule(name="good")
    bad = rule("threshold", ThresholdSpec("data.freshness_lag_hours"), name="bad")
    result = ThresholdKind().evaluate([good, bad], at(1), cur, {})
    assert "condition" in error(result, bad)
    assert [s.value for s in samples(result, good)] == [0.1]


def test_batch_failure_falls_back_to_one_rule_at_a_time() -> None:
    """When a batch fails, its rules are retried alone: only the culprit carries the error."""
    rules = [lag_rule(name=f"r{i}", selector=Selector(where=(("data.dataset", f"ds{i}"),))) for i in range(3)]

    def run_batch(shape: Any, batch: list[tuple[Rule, Any]]) -> dict[str, list[Sample] | RuleError]:
        if any(where == ("ds1",) for _, where in batch):
            raise duckdb.ConversionException("boom")
        return {r.id: [] for r, _ in batch}

    result = evaluate_batched(rules, lambda r: shape_of(r.selector, "v"), run_batch)
    assert result["g/r0"] == [] and result["g/r2"] == []
    assert "boom" in str(result["g/r1"])


# -- baseline ----------------------------------------------------------------------------------------------------

HEALTHY = [10_012_345, 9_987_650, 10_003_210, 9_998_800, 10_020_000, 9_975_500, 10_001_000,
           10_010_101, 9_990_909, 10_005_555, 9_994_444, 10_015_000, 9_985_000, 10_000_500]
BROKEN = 8_412_406


def payments_rows(spans: Spans, values: list[float], start_day: int = 0) -> list[int]:
    return [spans.add(at(start_day + d), {"data.dataset": DATASET, "data.row_count": v})
            for d, v in enumerate(values)]


def row_count_rule(**spec: Any) -> Rule:
    resolve = spec.pop("resolve", None)
    return rule("baseline", BaselineSpec("data.row_count", **spec), resolve=resolve)


def test_baseline_relative_against_previous_runs(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """The broken day deviates from the mean of the previous 7 runs and violates; the day after is judged against
    the 7 runs that entered before it: the broken run never enters a baseline."""
    values = [*HEALTHY, BROKEN, 10_240_883]
    keys = payments_rows(spans, values)
    r = row_count_rule(history_runs=7, tolerance=0.05, resolve=Condition("outside", (-0.03, 0.03)))
    got = samples(BaselineKind().evaluate([r], at(15, 3), cur, {}), r)
    assert [s.run_key for s in got] == keys  # a first evaluation judges the whole history
    broken, after = got[-2:]
    mean = np.mean(HEALTHY[7:14])
    assert broken.value == pytest.approx((BROKEN - mean) / abs(mean), rel=1e-12)
    assert broken.threshold == (-0.05, 0.05)
    assert broken.violated is True and broken.still_violated is True
    assert broken.detail == f"mean of 7 runs {round(mean)}, deviation -15.9%"
    assert after.value == pytest.approx((10_240_883 - mean) / mean, rel=1e-12)
    assert after.violated is False and after.still_violated is False
    assert after.spans == spans.ids(keys[15])


def test_baseline_scenario_numbers(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """The payments story: 8,412,406 against a 7-day average of 10,240,883 is -17.8%."""
    keys = payments_rows(spans, [10_240_883] * 7 + [BROKEN])
    r = row_count_rule(history_window=7 * DAY)
    s = samples(BaselineKind().evaluate([r], at(7, 3), cur, {}), r)[-1]
    assert s.run_key == keys[7]
    assert s.value == pytest.approx((BROKEN - 10_240_883) / 10_240_883)
    assert s.detail == "mean of 7 runs 10240883, deviation -17.9%"
    assert s.violated is True


def test_baseline_warm_up_is_no_data(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Until min_history runs have entered, a run cannot be judged: violated None, the run's own value, and why."""
    payments_rows(spans, HEALTHY[:4])
    r = row_count_rule(history_runs=7, min_history=3)
    got = samples(BaselineKind().evaluate([r], at(3, 3), cur, {}), r)
    assert [s.violated for s in got] == [None, None, None, False]
    assert [s.value for s in got[:3]] == HEALTHY[:3]
    assert got[0].threshold is None
    assert got[2].detail == "warming up: 2 of min_history 3 baseline runs"


def test_an_incident_never_becomes_the_baseline(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """An incident longer than the window: its runs never enter, the window is filled with the last healthy runs
    (said in the detail), and the healthy runs after it are judged against the old level, not the broken one."""
    values = [100.0] * 10 + [40.0] * 10 + [101.0, 99.0]
    payments_rows(spans, values)
    r = row_count_rule(history_window=7 * DAY, tolerance=0.2)
    got = samples(BaselineKind().evaluate([r], at(22, 3), cur, {}), r)
    assert [s.violated for s in got[10:]] == [True] * 10 + [False, False]
    assert got[-2].value == pytest.approx(0.01)
    assert "stale: fewer than 3 runs in the window, the last 3 entered" in got[-2].detail


def test_a_lasting_shift_enters_the_baseline_only_with_exclude_none(cur: duckdb.DuckDBPyConnection,
                                                                   spans: Spans) -> None:
    """With the default exclude: violations a shifted level keeps violating (someone must look); with
    exclude: none it becomes the new normal once it dominates the baseline."""
    payments_rows(spans, [100.0] * 6 + [200.0] * 5)
    kept = row_count_rule(history_runs=3)
    let_in = rule("baseline", BaselineSpec("data.row_count", history_runs=3, exclude="none"), name="in")
    result = BaselineKind().evaluate([kept, let_in], at(10, 3), cur, {})
    assert [s.violated for s in samples(result, kept)[6:]] == [True] * 5
    assert [s.violated for s in samples(result, let_in)[6:]] == [True, True, True, False, False]


def test_baseline_zscore_over_a_window(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """zscore: (x - mean) / sample std of the runs in the 7 days before the run (the run 7 days earlier
    included)."""
    values = [1000 + 10 * math.sin(d) for d in range(20)] + [1100.0]
    payments_rows(spans, values)
    r = row_count_rule(history_window=7 * DAY, method="zscore", z=3.0)
    s = samples(BaselineKind().evaluate([r], at(20, 3), cur, {}), r)[-1]
    base = np.array(values[13:20])
    assert s.value == pytest.approx((1100 - base.mean()) / base.std(ddof=1), rel=1e-9)
    assert s.threshold == (-3.0, 3.0)
    assert s.violated is True
    assert s.detail.startswith("mean of 7 runs ")


def test_a_baseline_without_spread_judges_any_change(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """A constant history: the same value is a deviation of 0, any other an infinite one (never "no data"
    forever for a signal that never moved)."""
    payments_rows(spans, [5.0] * 5 + [6.0])
    r = row_count_rule(history_runs=5, method="zscore")
    same, moved = samples(BaselineKind().evaluate([r], at(5, 3), cur, {}), r)[-2:]
    assert (same.value, same.violated) == (0.0, False)
    assert moved.value == math.inf and moved.violated is True and "std 0" in moved.detail


def test_baseline_robust_against_numpy(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """robust: (x - median) / (1.4826 MAD) of the baseline, one outlier in it moving neither."""
    history = [100.0, 103.0, 98.0, 250.0, 101.0, 99.0, 102.0]
    payments_rows(spans, [*history, 112.0])
    r = row_count_rule(history_runs=7, method="robust", z=3.5, exclude="none")
    s = samples(BaselineKind().evaluate([r], at(7, 3), cur, {}), r)[-1]
    med = np.median(history)
    mad = np.median(np.abs(np.array(history) - med))
    assert s.value == pytest.approx((112 - med) / (1.4826 * mad), rel=1e-12)
    assert s.violated is True
    assert s.detail.startswith(f"median of 7 runs {med:g}, MAD spread")


def test_baseline_quantile_band(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """quantile_band: the run's value against numpy's 5th-95th percentiles of the previous runs."""
    history = [100.0, 300.0, 150.0, 250.0, 200.0, 190.0, 210.0, 195.0, 205.0, 200.0]  # none leaves its band
    payments_rows(spans, [*history, 0.55, 201.0])
    r = row_count_rule(history_runs=10, method="quantile_band", quantiles=(0.05, 0.95))
    low, normal = samples(BaselineKind().evaluate([r], at(11, 3), cur, {}), r)[-2:]
    lo, hi = np.quantile(history, [0.05, 0.95])
    assert low.value == 0.55 and low.violated is True
    assert low.threshold == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert low.detail == f"5th-95th percentile of 10 runs [{round(lo)}, {round(hi)}]"
    # the low run violated and never entered: the next baseline is the same 10 runs
    assert normal.threshold == low.threshold
    assert normal.value == 201.0 and normal.violated is False


def reference_baseline(values: list[float], times: list[float], spec: BaselineSpec) -> list[tuple[Any, Any]]:
    """The baseline semantics written plainly with numpy: (value, violated) per run, oldest first."""
    out: list[tuple[Any, Any]] = []
    entered: list[tuple[float, float]] = []
    for i, x in enumerate(values):
        if len(entered) < spec.min_history:
            out.append((x, None))
            entered.append((times[i], x))
            continue
        if spec.history_runs is not None:
            base = np.array([v for _, v in entered[-spec.history_runs:]])
        else:
            base = np.array([v for t, v in entered if t >= times[i] - cast(float, spec.history_window)])
            if len(base) < spec.min_history:
                base = np.array([v for _, v in entered[-spec.min_history:]])
        if spec.method == "relative":
            dev = (x - base.mean()) / abs(base.mean())
            verdict = (dev, bool(abs(dev) > spec.tolerance))
        elif spec.method == "zscore":
            z = (x - base.mean()) / base.std(ddof=1)
            verdict = (z, bool(abs(z) > spec.z))
        elif spec.method == "robust":
            med = np.median(base)
            rz = (x - med) / (1.4826 * np.median(np.abs(base - med)))
            verdict = (rz, bool(abs(rz) > spec.z))
        else:
            lo, hi = np.quantile(base, spec.quantiles)
            verdict = (x, bool(not lo <= x <= hi))
        out.append(verdict)
        if not verdict[1] or spec.exclude == "none":
            entered.append((times[i], x))
    return out


@pytest.mark.parametrize("spec", [
    BaselineSpec("data.row_count", method="relative", tolerance=0.1, history_runs=7),
    BaselineSpec("data.row_count", method="zscore", z=2.0, history_runs=10, min_history=4),
    BaselineSpec("data.row_count", method="robust", z=3.0, history_runs=9),
    BaselineSpec("data.row_count", method="robust", z=2.5, history_runs=9, exclude="none"),
    BaselineSpec("data.row_count", method="quantile_band", quantiles=(0.1, 0.9), history_runs=12),
    BaselineSpec("data.row_count", method="relative", tolerance=0.1, history_window=5 * DAY),
    BaselineSpec("data.row_count", method="quantile_band", history_window=9 * DAY),
], ids=["relative-runs", "zscore-runs", "robust-runs", "robust-no-exclusion", "quantile-runs", "relative-window",
        "quantile-window"])
def test_baseline_matches_a_plain_reference(cur: duckdb.DuckDBPyConnection, spans: Spans,
                                            spec: BaselineSpec) -> None:
    """Over noisy runs with incidents, every value and verdict equals a plain numpy reference implementation,
    warm-up, exclusion of violating runs and stale windows included."""
    rng = np.random.default_rng(3)
    values = list(rng.normal(1000, 60, size=60).round(2))
    for i in (20, 21, 40):
        values[i] *= 0.7
    times = [at(d, hour=float(rng.uniform(1, 5))) for d in range(60)]
    for t, v in zip(times, values, strict=True):
        spans.add(t, {"data.dataset": DATASET, "data.row_count": v})
    r = rule("baseline", spec)
    got = samples(BaselineKind().evaluate([r], at(60), cur, {}), r)
    expected = reference_baseline(values, times, spec)
    assert [s.violated for s in got] == [v for _, v in expected]
    assert [s.value for s in got] == pytest.approx([x for x, _ in expected], rel=1e-9)
    assert any(s.violated for s in got) and any(s.violated is False for s in got)


def test_quantile_linear_matches_numpy() -> None:
    """The hand-rolled quantile is numpy's default linear method, to the last bit."""
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 7, 10, 31):
        x = np.sort(rng.normal(size=n))
        for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0):
            assert quantile_linear(list(x), q) == np.quantile(x, q)


def test_baseline_weekday_seasonality(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """With weekday seasonality a Saturday is judged against previous Saturdays only."""
    values = [300.0 + d if datetime.fromtimestamp(at(d), UTC).weekday() >= 5 else 1000.0 + d for d in range(27)]
    payments_rows(spans, values)  # day 26 is a Saturday
    assert datetime.fromtimestamp(at(26), UTC).weekday() == 5
    seasonal = row_count_rule(history_runs=3, seasonality="weekday")
    plain = row_count_rule(history_runs=3)
    s = samples(BaselineKind().evaluate([seasonal], at(26, 3), cur, {}), seasonal)[-1]
    mean = np.mean([values[5], values[12], values[19]])
    assert s.value == pytest.approx((values[26] - mean) / mean)
    assert s.violated is False
    # without seasonality the weekends violate
    p = samples(BaselineKind().evaluate([plain], at(26, 3), cur, {}), plain)
    expected = reference_baseline(values, [at(d) for d in range(27)], plain.spec)
    assert [(x.value, x.violated) for x in p] == [(pytest.approx(v), b) for v, b in expected]
    assert p[-1].violated is True


def test_baseline_history_runs_reaches_back_for_sparse_pipelines(cur: duckdb.DuckDBPyConnection,
                                                                 spans: Spans) -> None:
    """A weekly pipeline's previous 4 runs reach a month back."""
    values = [100.0 + w % 3 for w in range(12)] + [150.0]
    for w, v in enumerate(values):
        spans.add(at(7 * w), {"data.dataset": DATASET, "data.row_count": v})
    r = row_count_rule(history_runs=4)
    s = samples(BaselineKind().evaluate([r], at(7 * 12, 3), cur, {}), r)[-1]
    mean = np.mean(values[8:12])
    assert s.value == pytest.approx((150 - mean) / mean)
    assert s.detail.startswith("mean of 4 runs")


def test_baseline_incremental_evaluations_match_one_full_evaluation(cur: duckdb.DuckDBPyConnection,
                                                                    spans: Spans) -> None:
    """Judging day by day, each evaluation handed the previous one's memory, gives the same samples as judging
    the whole month at once, an incident longer than the baseline included."""
    values = [*HEALTHY, *HEALTHY]
    for d in range(14, 22):
        values[d] = BROKEN
    values[25] = 11_000_000
    payments_rows(spans, values)
    for spec in ({"history_runs": 5}, {"history_window": 5 * DAY}, {"history_runs": 3, "method": "robust"}):
        r = row_count_rule(**spec)
        full = samples(BaselineKind().evaluate([r], at(27, 3), cur, {}), r)
        assert len(full) == 28
        result = BaselineKind().evaluate([r], at(10, 3), cur, {})
        stepped = samples(result, r)
        mem = memory(result, r)[()]
        for d in range(11, 28):
            last = stepped[-1]
            cursors = {r.id: {(): SeriesCursor(last.at, cast(int, last.run_key), mem)}}
            result = BaselineKind().evaluate([r], at(d, 3), cur, cursors)
            stepped += samples(result, r)
            mem = memory(result, r).get((), mem)
        assert stepped == full
        assert [s.violated for s in full][14:24] == [True] * 8 + [False, False]


def test_baseline_group_by_series_are_separate(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Each group_by series has its own history."""
    for d in range(5):
        spans.add(at(d), {"data.dataset": "a", "data.row_count": 100 + d})
        spans.add(at(d), {"data.dataset": "b", "data.row_count": 1000 - d})
    r = rule("baseline", BaselineSpec("data.row_count", history_runs=4),
             selector=Selector(span=SPAN), group_by=("data.dataset",))
    got = samples(BaselineKind().evaluate([r], at(4, 3), cur, {}), r)[-2:]
    assert [s.series for s in got] == [(("data.dataset", "a"),), (("data.dataset", "b"),)]
    assert got[0].value == pytest.approx((104 - 101.5) / 101.5)
    assert got[1].value == pytest.approx((996 - 998.5) / 998.5)


def test_baseline_idle_tick_reads_once(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """With memory and without a new run a tick is one query over the rows since the cursor."""
    keys = payments_rows(spans, HEALTHY)
    rules = [row_count_rule(history_runs=7), rule("baseline", BaselineSpec("data.row_count", history_runs=7),
                                                   name="r2", selector=Selector(span=SPAN, service=SERVICE,
                                                                                where=(("data.dataset", "x"),)))]
    first = BaselineKind().evaluate(rules, at(13, 3), cur, {})
    mem = memory(first, rules[0])[()]
    cursors = {rules[0].id: {(): SeriesCursor(at(13), keys[13], mem)}, rules[1].id: {}}
    priors = {rid: RulePrior(at(13, 3), c) for rid, c in cursors.items()}
    counting = CountingCursor(cur)
    result = BaselineKind().evaluate(rules, at(13, 5), cast(duckdb.DuckDBPyConnection, counting), priors)
    assert all(samples(result, r) == [] for r in rules)
    assert len(counting.statements) == 1


def test_baseline_rejects_invalid_specs(cur: duckdb.DuckDBPyConnection) -> None:
    """Neither or both history options, or an unknown method: a RuleError for that rule."""
    both = rule("baseline", BaselineSpec("data.row_count", history_runs=3, history_window=DAY), name="both")
    neither = rule("baseline", BaselineSpec("data.row_count"), name="neither")
    method = rule("baseline", BaselineSpec("data.row_count", history_runs=3, method="median"), name="method")
    result = BaselineKind().evaluate([both, neither, method], at(0), cur, {})
    assert "exactly one" in error(result, both) and "exactly one" in error(result, neither)
    assert "median" in error(result, method)


# -- absence -----------------------------------------------------------------------------------------------------

def absence_rule(**kw: Any) -> Rule:
    spec = kw.pop("spec", AbsenceSpec(expected_every=DAY, grace=2 * HOUR))
    return rule("absence", spec, **kw)


def test_absence_pipeline_that_never_ran_fires(cur: duckdb.DuckDBPyConnection) -> None:
    """No run at all in the lookback: the rule's one series fires with value = the lookback."""
    r = absence_rule()
    (s,) = samples(AbsenceKind().evaluate([r], at(10), cur, {}), r)
    assert (s.series, s.at, s.value, s.threshold, s.violated, s.spans) == ((), at(10), 35 * DAY, 26 * HOUR, True, ())
    assert s.run_key is None
    grouped = absence_rule(group_by=("data.dataset",))
    assert samples(AbsenceKind().evaluate([grouped], at(10), cur, {}), grouped) == []


def test_absence_judges_runs_and_missed_deadlines_on_their_own_times(cur: duckdb.DuckDBPyConnection,
                                                                      spans: Spans) -> None:
    """A run is an ok judgement at its time; once expected_every + grace has passed with no run, a violating one at
    the deadline (value: seconds since the newest run), and one more per further day without a run."""
    spans.add(at(0), {"data.dataset": DATASET})
    newest = spans.add(at(1), {"data.dataset": DATASET})
    spans.add(at(5), {"data.dataset": DATASET})  # after ts: not seen yet
    r = absence_rule(resolve=Condition(">", 20 * HOUR))
    got = samples(AbsenceKind().evaluate([r], at(2, 1), cur, {}), r)
    assert [(s.at, s.value, s.violated) for s in got] == [(at(0), 0.0, False), (at(1), 0.0, False)]
    assert got[-1].spans == spans.ids(newest) and got[-1].run_key == newest
    # exactly at the deadline (day 2 04:00) nothing is missed yet; after it, the deadline is judged
    assert samples(AbsenceKind().evaluate([r], at(2, 4), cur, {}), r)[-1].violated is False
    later = samples(AbsenceKind().evaluate([r], at(4, 5), cur, {}), r)
    missed = [s for s in later if s.violated]
    assert [(s.at, s.value) for s in missed] == [(at(2, 4), 26 * HOUR), (at(3, 4), 50 * HOUR), (at(4, 4), 74 * HOUR)]
    assert missed[0].still_violated is True and missed[0].run_key is None
    assert missed[0].detail == "no run since 2026-11-03T02:00:00Z, 26.0 h ago"


def test_absence_continues_from_its_cursor(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """An evaluation that knows the series' newest run judges only the deadlines since the previous evaluation:
    stepping through the days gives the judgements of one evaluation at the end."""
    spans.add(at(0), {"data.dataset": DATASET})
    r = absence_rule()
    whole = samples(AbsenceKind().evaluate([r], at(4, 5), cur, {}), r)
    stepped = samples(AbsenceKind().evaluate([r], at(1, 0), cur, {}), r)
    for d in range(1, 5):
        cursor = SeriesCursor(at(0), 1)
        prior = {r.id: RulePrior(at(d, 0) if d > 1 else at(1, 0), {(): cursor}, 1, 1)}
        stepped += samples(AbsenceKind().evaluate([r], at(d + 1, 0) if d < 4 else at(4, 5), cur, prior), r)
    assert [(s.at, s.violated) for s in stepped] == [(s.at, s.violated) for s in whole]


def test_absence_per_series(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Each dataset is its own series; one gone quiet is judged at each missed deadline, and a series silent for
    longer than the lookback is no longer expected."""
    spans.add(at(0), {"data.dataset": "a"})
    spans.add(at(3), {"data.dataset": "b"})
    spans.add(at(-40), {"data.dataset": "c"})
    r = absence_rule(selector=Selector(span=SPAN), group_by=("data.dataset",))
    got = samples(AbsenceKind().evaluate([r], at(3, 6), cur, {}), r)
    by = {k: [(s.at, s.violated) for s in got if s.series == (("data.dataset", k),)] for k in "abc"}
    assert by["a"] == [(at(0), False), (at(1, 4), True), (at(2, 4), True), (at(3, 4), True)]
    assert by["b"] == [(at(3), False)]
    assert by["c"][0] == (at(-40), False) and all(v for _, v in by["c"][1:])
    assert by["c"][-1][0] <= at(-40) + 35 * DAY  # no longer expected after the lookback


def test_absence_lag_attribute(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """The newest run's event time + max_lag is the deadline; a run already behind violates at the run; a newest
    run without the attribute is no data."""
    spec = AbsenceSpec(lag_attribute="data.max_event_time", max_lag=30 * 60)
    r = absence_rule(spec=spec, selector=Selector(span=SPAN), group_by=("data.dataset",))
    spans.add(at(0), {"data.dataset": "a", "data.max_event_time": at(0) - 60})
    k = spans.add(at(1), {"data.dataset": "a", "data.max_event_time": at(1, 0) - 6 * HOUR})
    spans.add(at(1), {"data.dataset": "b"})
    got = samples(AbsenceKind().evaluate([r], at(1, 3), cur, {}), r)
    a = [s for s in got if s.series == (("data.dataset", "a"),)]
    assert [(s.at, s.value, s.violated) for s in a] == [
        (at(0), 60.0, False), (at(0) - 60 + 1800, 1800.0, True), (at(1), 8 * HOUR, True)]
    assert a[-1].threshold == 1800 and a[-1].spans == spans.ids(k)
    (b,) = [s for s in got if s.series == (("data.dataset", "b"),)]
    assert b.value is None and b.violated is None and "data.max_event_time" in b.detail


# -- sql ---------------------------------------------------------------------------------------------------------

def sql_rule(query: str, name: str = "q", op: str = ">", threshold: float = 1.0) -> Rule:
    return rule("sql", SqlSpec(query), name=name, condition=Condition(op, threshold))


def test_sql_rows_are_series_and_ts_is_the_evaluation_time(cur: duckdb.DuckDBPyConnection, spans: Spans) -> None:
    """Every non-value column is a label; $ts is the evaluation time as a UTC TIMESTAMP."""
    for d, ds in [(0, "a"), (1, "a"), (1, "b"), (2, "a")]:
        spans.add(at(d), {"data.dataset": ds})
    r = sql_rule("""
        SELECT d.value AS dataset, count(*) AS value
        FROM spans s JOIN span_strings d ON d.span_key = s.span_key AND d.key = 'data.dataset'
        WHERE s.end_time > $ts - INTERVAL 2 DAY AND s.end_time <= $ts
        GROUP BY ALL""")
    got = samples(SqlKind().evaluate([r], at(2, 1), cur, {}), r)
    assert [(s.series, s.value, s.violated, s.at) for s in got] == [
        ((("dataset", "a"),), 2.0, True, at(2, 1)),
        ((("dataset", "b"),), 1.0, False, at(2, 1)),
    ]
    ts = sql_rule("SELECT epoch_us($ts) AS value")
    (s,) = samples(SqlKind().evaluate([ts], at(2, 1) + 0.123456, cur, {}), ts)
    assert s.value == round((at(2, 1) + 0.123456) * 1e6)


def test_sql_labels_and_null_values(cur: duckdb.DuckDBPyConnection) -> None:
    """Labels render as text (NULL as ''); a NULL value is no data; a rule without labels has series ()."""
    r = sql_rule("SELECT * FROM (VALUES (3.0, NULL, 5), (2.5, 'x', NULL)) t(shard, name, value)")
    got = samples(SqlKind().evaluate([r], at(0), cur, {}), r)
    assert [(s.series, s.value, s.violated) for s in got] == [
        ((("name", ""), ("shard", "3.0")), 5.0, True),
        ((("name", "x"), ("shard", "2.5")), None, None),
    ]
    one = sql_rule("SELECT 0.5::DECIMAL(4,2) AS value")
    assert [(s.series, s.value, s.violated) for s in samples(SqlKind().evaluate([one], at(0), cur, {}), one)] == [
        ((), 0.5, False)]


@pytest.mark.parametrize("query,message", [
    ("SELEC 1 AS value", "does not parse"),
    ("DELETE FROM spans", "only a SELECT"),
    ("INSERT INTO meta VALUES ('k', 'v')", "only a SELECT"),
    ("COPY spans TO '/tmp/rule-kinds-copy.csv'", "only a SELECT"),
    ("UPDATE spans SET name = 'x'", "only a SELECT"),
    ("WITH d AS (DELETE FROM spans RETURNING *) SELECT count(*) AS value FROM d", "writes"),
    ("SELECT 1 AS value; DELETE FROM spans", "exactly one"),
    ("SELECT 1 AS v", "column named value"),
    ("SELECT 'high' AS value", "not a number"),
    ("SELECT 1 AS value FROM no_such_table", "no_such_table"),
    ("SELECT ? AS value", "only $ts"),
    ("SELECT * FROM (VALUES ('a', 1), ('a', 2)) t(name, value)", "more than once"),
])
def test_sql_errors_are_rule_errors(cur: duckdb.DuckDBPyConnection, spans: Spans, query: str, message: str) -> None:
    """Anything but one read-only SELECT with a numeric value and distinct series is refused, nothing changes."""
    spans.add(at(0), {"data.dataset": DATASET})
    r = sql_rule(query)
    assert message in error(SqlKind().evaluate([r], at(1), cur, {}), r)
    assert cur.execute("SELECT count(*), min(name) FROM spans").fetchall() == [(1, SPAN)]
    assert cur.execute("SELECT count(*) FROM meta").fetchall() == [(1,)]
    assert not Path("/tmp/rule-kinds-copy.csv").exists()


def test_sql_one_bad_rule_does_not_break_the_others(cur: duckdb.DuckDBPyConnection) -> None:
    """A failing query marks only its own rule."""
    bad, good = sql_rule("SELECT nope", name="bad"), sql_rule("SELECT 2 AS value", name="good")
    result = SqlKind().evaluate([bad, good], at(0), cur, {})
    assert "nope" in error(result, bad)
    assert [s.value for s in samples(result, good)] == [2.0]


# -- registry ----------------------------------------------------------------------------------------------------

def test_registry_names_every_kind() -> None:
    """Every kind is registered by name, each engine gets its own instances, and register adds more."""
    kinds = new_kinds()
    assert isinstance(kinds["threshold"], ThresholdKind)
    assert isinstance(kinds["baseline"], BaselineKind)
    assert isinstance(kinds["absence"], AbsenceKind)
    assert isinstance(kinds["sql"], SqlKind)
    assert all(kinds[k] is not v for k, v in new_kinds().items())
    register("test-only", SqlKind)
    try:
        assert isinstance(new_kinds()["test-only"], SqlKind)
    finally:
        from evaluator.rules import kinds as registry

        registry._FACTORIES.pop("test-only")
