"""The distribution kind over a real store: each method through the kind equals evaluator.stats on the same data,
histogram sums, categories, windows (relative, absolute, frozen), min_samples, group_by, the YAML parser's
refusals, and the payments paise-to-rupees scenario end to end through the engine."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from evaluator.rules import loader
from evaluator.rules.engine import MemoryState, RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.kinds.distribution import DistributionKind, DistributionSpec, parse_distribution
from evaluator.rules.model import (
    FIRING,
    INACTIVE,
    Condition,
    KindResult,
    Rule,
    RuleError,
    RuleGroup,
    RuleSet,
    Sample,
    Selector,
    SeriesCursor,
)
from evaluator.stats import drift
from evaluator.store.evaluations import EvaluationRows, write_evaluation
from evaluator.store.store import Store, StoreSettings
from evaluator.yamlsrc import Problems, parse_yaml

DAY = 86400.0
HOUR = 3600.0
TS = datetime(2026, 11, 20, 12, tzinfo=UTC).timestamp()
SPAN = "payments.transaction"
SERVICE = "payments-api"
SELECTOR = Selector(span=SPAN, service=SERVICE)
ATTR = "data.amount_paise"
DECADES = tuple(float(10**i) for i in range(9))  # 1 .. 1e8


# -- fixtures and builders ---------------------------------------------------------------------------------------

class Spans:
    """Inserts many spans and their attributes at once (arrow tables registered into DuckDB)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self.cur = cur
        self.key = 0

    def add(self, times: Sequence[float] | np.ndarray, *, numbers: dict[str, Any] | None = None,
            strings: dict[str, Any] | None = None, arrays: dict[str, Any] | None = None, name: str = SPAN,
            service: str = SERVICE) -> list[int]:
        n = len(times)
        keys = np.arange(self.key + 1, self.key + 1 + n, dtype=np.int64)
        self.key += n
        end = np.round(np.asarray(times, dtype=np.float64) * 1e6).astype(np.int64)
        base = {"k": keys, "e": end}
        self._insert(pa.table({**base, "t": [f"{k:032x}" for k in keys], "s": [f"{k:016x}" for k in keys]}),
                     "INSERT INTO spans SELECT k, t, s, NULL, $name, 1, make_timestamp(e - 60000000), "
                     "make_timestamp(e), 1, NULL, $svc, 'tests', '{}', make_timestamp(e) FROM new_rows",
                     {"name": name, "svc": service})
        for key, vals in (numbers or {}).items():
            self._insert(pa.table({**base, "v": np.broadcast_to(np.asarray(vals, dtype=np.float64), (n,))}),
                         "INSERT INTO span_numbers SELECT k, make_timestamp(e), $key, v FROM new_rows", {"key": key})
        for key, vals in (strings or {}).items():
            col = [vals] * n if isinstance(vals, str) else list(vals)
            self._insert(pa.table({**base, "v": col}),
                         "INSERT INTO span_strings SELECT k, make_timestamp(e), $key, v FROM new_rows", {"key": key})
        for key, vals in (arrays or {}).items():
            col = [[float(x) for x in a] for a in vals]
            self._insert(pa.table({**base, "v": pa.array(col, pa.list_(pa.float64()))}),
                         "INSERT INTO span_arrays SELECT k, make_timestamp(e), $key, v, NULL FROM new_rows",
                         {"key": key})
        return [int(k) for k in keys]

    def _insert(self, table: pa.Table, sql: str, params: dict[str, Any]) -> None:
        self.cur.register("new_rows", table)
        try:
            self.cur.execute(sql, params)
        finally:
            self.cur.unregister("new_rows")


@pytest.fixture
def spans(cur: duckdb.DuckDBPyConnection) -> Spans:
    return Spans(cur)


def rule(spec: DistributionSpec, *, name: str = "drift", op: str = ">", threshold: float = 0.2,
         resolve: Condition | None = None, group_by: tuple[str, ...] = (), selector: Selector = SELECTOR) -> Rule:
    return Rule(name=name, group="g", kind="distribution", rung="distribution", owner="payments", severity="page",
                spec=spec, condition=Condition(op, threshold), resolve=resolve, selector=selector, group_by=group_by)


def spec(**kw: Any) -> DistributionSpec:
    kw.setdefault("attribute", ATTR)
    kw.setdefault("current", 6 * HOUR)
    kw.setdefault("baseline_window", 30 * DAY)
    return DistributionSpec(**kw)


def run(kind: DistributionKind, r: Rule, cur: duckdb.DuckDBPyConnection, ts: float = TS) -> list[Sample] | RuleError:
    return kind.evaluate([r], ts, cur, {})[r.id]


def samples(kind: DistributionKind, r: Rule, cur: duckdb.DuckDBPyConnection, ts: float = TS) -> list[Sample]:
    got = run(kind, r, cur, ts)
    assert not isinstance(got, RuleError), got
    return got.samples if isinstance(got, KindResult) else got


def one(kind: DistributionKind, r: Rule, cur: duckdb.DuckDBPyConnection, ts: float = TS) -> Sample:
    got = samples(kind, r, cur, ts)
    assert len(got) == 1, got
    return got[0]


def times(lo: float, hi: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n times strictly inside (lo, hi)."""
    return np.sort(rng.uniform(lo + 1, hi - 1, n))


def baseline_times(n: int, rng: np.random.Generator, ts: float = TS) -> np.ndarray:
    return times(ts - 6 * HOUR - 30 * DAY, ts - 6 * HOUR, n, rng)


def current_times(n: int, rng: np.random.Generator, ts: float = TS) -> np.ndarray:
    return times(ts - 6 * HOUR, ts, n, rng)


def amounts(rng: np.random.Generator, n: int, mean: float = 10.0, sigma: float = 1.5) -> np.ndarray:
    return np.round(rng.lognormal(mean, sigma, n))


@pytest.fixture
def shifted(spans: Spans) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """2,000 baseline amounts, 500 current ones shifted down a little; the current span keys."""
    rng = np.random.default_rng(7)
    b, c = amounts(rng, 2000), amounts(rng, 500, mean=9.5)
    spans.add(baseline_times(2000, rng), numbers={ATTR: b})
    keys = spans.add(current_times(500, rng), numbers={ATTR: c})
    return b, c, keys


# -- methods through the kind equal the statistics ------------------------------------------------------------

def test_psi_on_raw_values_equals_the_statistic(cur: duckdb.DuckDBPyConnection,
                                                shifted: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    b, c, keys = shifted
    s = one(DistributionKind(), rule(spec(method="psi")), cur)
    expected = drift.psi(b, c, bins=10, eps=1e-4)
    assert s.value == expected.value
    assert s.at == TS and s.run_key is None and s.series == ()
    assert s.threshold == 0.2 and s.violated is (expected.value > 0.2)
    assert s.detail.startswith("n 500/2000 (current/baseline); ")
    assert drift.top_contributors(expected)[0] in s.detail
    assert "baseline's" in s.detail  # quantile bins are named by the baseline's percentiles
    assert s.spans == tuple((f"{k:032x}", f"{k:016x}") for k in keys[-5:])


@pytest.mark.parametrize("method", ["ks", "js", "wasserstein"])
def test_other_numeric_methods_equal_the_statistics(cur: duckdb.DuckDBPyConnection, method: str,
                                                    shifted: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    b, c, _ = shifted
    s = one(DistributionKind(), rule(spec(method=method, bins=7), threshold=0.1), cur)
    expected = {"ks": lambda: drift.ks(b, c), "js": lambda: drift.js(b, c, bins=7),
                "wasserstein": lambda: drift.wasserstein(b, c)}[method]()
    assert s.value == expected.value
    assert s.violated is (expected.value > 0.1)
    if method == "ks":
        assert expected.p_value is not None and f"p-value {expected.p_value:.3g}" in s.detail
        assert "largest CDF gap" in s.detail
    if method == "wasserstein":
        assert "mean moved" in s.detail


def test_fixed_bounds_replace_quantile_bins(cur: duckdb.DuckDBPyConnection,
                                            shifted: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    b, c, _ = shifted
    s = one(DistributionKind(), rule(spec(method="psi", fixed_bounds=DECADES, epsilon=1e-3)), cur)
    assert s.value == drift.psi(b, c, bounds=DECADES, eps=1e-3).value
    assert "baseline's" not in s.detail


def test_spans_outside_the_selector_or_windows_are_ignored(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(1)
    b, c = amounts(rng, 300), amounts(rng, 300)
    spans.add(baseline_times(300, rng), numbers={ATTR: b})
    spans.add(current_times(300, rng), numbers={ATTR: c})
    spans.add(current_times(50, rng), numbers={ATTR: np.full(50, 1.0)}, name="other.span")
    spans.add(current_times(50, rng), numbers={ATTR: np.full(50, 1.0)}, service="other-service")
    spans.add([TS + 1, TS - 40 * DAY], numbers={ATTR: [1.0, 1.0]})  # after ts, before the baseline
    spans.add(current_times(50, rng), numbers={"other.attr": np.ones(50)})
    s = one(DistributionKind(), rule(spec(method="psi")), cur)
    assert s.value == drift.psi(b, c).value


# -- histograms ----------------------------------------------------------------------------------------------------

HIST = "data.amount_paise"


def _hist_runs(spans: Spans, when: Sequence[float], counts: Sequence[Sequence[int]],
               bounds: Sequence[float] = (10, 100, 1000)) -> None:
    spans.add(when, arrays={f"{HIST}.histogram.bounds": [list(bounds)] * len(when),
                            f"{HIST}.histogram.counts": [list(c) for c in counts]}, name="features.daily.run")


def test_histogram_source_sums_counts_over_each_window(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    _hist_runs(spans, [TS - 10 * DAY, TS - 3 * DAY, TS - 40 * DAY],
               [[10, 200, 500, 290], [20, 180, 520, 280], [1000, 0, 0, 0]])  # the last is before the baseline
    _hist_runs(spans, [TS - 3 * HOUR, TS - 1 * HOUR], [[100, 300, 100, 0], [120, 280, 100, 0]])
    spans.add([TS - 2 * HOUR], name="features.daily.run")  # a run without histogram: not counted
    sel = Selector(span="features.daily.run", service=SERVICE)
    for method in ("psi", "js"):
        s = one(DistributionKind(), rule(spec(source="histogram", attribute=HIST, method=method, min_samples=10),
                                         selector=sel), cur)
        base = drift.Histogram([10, 100, 1000], [30, 380, 1020, 570])
        current = drift.Histogram([10, 100, 1000], [220, 580, 200, 0])
        expected = drift.psi(base, current) if method == "psi" else drift.js(base, current)
        assert s.value == expected.value
        assert s.detail.startswith("n 1000/2000 (current/baseline)")
        assert len(s.spans) == 2
    ks = run(DistributionKind(), rule(spec(source="histogram", attribute=HIST, method="ks"), selector=sel), cur)
    assert isinstance(ks, RuleError) and "raw values" in str(ks)


def test_a_series_with_mixed_bucket_layouts_is_no_data_alone(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    """Two datasets under one rule: one producer sends a histogram with other bounds (or a wrong count length);
    that series is "no data" with the reason, and the healthy dataset is judged as usual."""
    for dataset, bounds in (("good", (10, 100, 1000)), ("mixed", (10, 100, 2000))):
        spans.add([TS - 10 * DAY], arrays={f"{HIST}.histogram.bounds": [[10, 100, 1000]],
                                           f"{HIST}.histogram.counts": [[10, 200, 500, 290]]},
                  strings={"data.dataset": [dataset]}, name="features.daily.run")
        spans.add([TS - HOUR], arrays={f"{HIST}.histogram.bounds": [list(bounds)],
                                       f"{HIST}.histogram.counts": [[100, 300, 100, 0]]},
                  strings={"data.dataset": [dataset]}, name="features.daily.run")
    spans.add([TS - 2 * HOUR], arrays={f"{HIST}.histogram.bounds": [[10, 100, 1000]],
                                       f"{HIST}.histogram.counts": [[1, 2, 3]]},
              strings={"data.dataset": ["short"]}, name="features.daily.run")
    r = rule(spec(source="histogram", attribute=HIST, method="psi", min_samples=10),
             selector=Selector(span="features.daily.run"), group_by=("data.dataset",))
    got = {dict(x.series)["data.dataset"]: x for x in samples(DistributionKind(), r, cur)}
    assert got["good"].value is not None and got["good"].violated is True
    assert got["mixed"].value is None and got["mixed"].violated is None
    assert "3 bounds [10, 100, 2000]" in got["mixed"].detail and "3 bounds [10, 100, 1000]" in got["mixed"].detail
    assert got["short"].violated is None and "counts" in got["short"].detail


# -- categories ------------------------------------------------------------------------------------------------------

def test_categorical_chi2_and_psi(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(3)
    b = list(rng.choice(["INR", "USD", "EUR"], 1000, p=[0.8, 0.15, 0.05]))
    c = list(rng.choice(["INR", "USD", "EUR", "GBP"], 400, p=[0.5, 0.3, 0.1, 0.1]))
    spans.add(baseline_times(1000, rng), strings={"data.currency": b})
    spans.add(current_times(400, rng), strings={"data.currency": c})
    spans.add(current_times(30, rng), numbers={ATTR: np.ones(30)})  # spans without the attribute: not counted
    kind = DistributionKind()
    s = one(kind, rule(spec(attribute="data.currency", categorical=True, method="chi2"), threshold=10), cur)
    expected = drift.chi2(b, c)
    assert s.value == pytest.approx(expected.value, rel=1e-12)
    assert s.violated is True and "'GBP'" in s.detail and "p-value" in s.detail
    s = one(kind, rule(spec(attribute="data.currency", categorical=True, method="psi")), cur)
    assert s.value == pytest.approx(drift.psi_categorical(b, c).value, rel=1e-12)


# -- no data, series -------------------------------------------------------------------------------------------------

def test_fewer_than_min_samples_is_no_data(cur: duckdb.DuckDBPyConnection,
                                           shifted: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    s = one(DistributionKind(), rule(spec(method="psi", min_samples=501)), cur)
    assert s.value is None and s.violated is None
    assert "n 500/2000" in s.detail and "fewer than 501" in s.detail
    assert one(DistributionKind(), rule(spec(method="psi", min_samples=500)), cur).violated is not None


def test_no_spans_at_all_is_no_data_with_the_reason(cur: duckdb.DuckDBPyConnection) -> None:
    """A rule without group_by always has its series: with nothing in either window it is "no data", never a rule
    with no state at all; a grouped rule has no series until one is seen."""
    (s,) = samples(DistributionKind(), rule(spec(method="psi")), cur)
    assert s.series == () and s.violated is None and "no values of data.amount_paise in either window" in s.detail
    assert samples(DistributionKind(), rule(spec(method="psi"), group_by=("data.dataset",)), cur) == []


def test_group_by_makes_a_series_per_value(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(5)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for partner, mean, sigma in (("acme", 10.0, 1.5), ("globex", 4.0, 1.0)):
        b, c = amounts(rng, 800), amounts(rng, 300, mean=mean, sigma=sigma)
        spans.add(baseline_times(800, rng), numbers={ATTR: b}, strings={"data.partner": partner})
        spans.add(current_times(300, rng), numbers={ATTR: c}, strings={"data.partner": partner})
        data[partner] = (b, c)
    spans.add(baseline_times(50, rng), numbers={ATTR: amounts(rng, 50)}, strings={"data.partner": "initech"})
    got = samples(DistributionKind(), rule(spec(method="psi", fixed_bounds=DECADES), group_by=("data.partner",)),
                  cur)
    by = {s.series: s for s in got}
    assert set(by) == {(("data.partner", p),) for p in ("acme", "globex", "initech")}
    for partner, (b, c) in data.items():
        assert by[(("data.partner", partner),)].value == drift.psi(b, c, bounds=DECADES).value
    assert by[(("data.partner", "acme"),)].violated is False
    assert by[(("data.partner", "globex"),)].violated is True
    assert by[(("data.partner", "initech"),)].violated is None  # seen in the baseline only: no data


def test_resolve_threshold_gives_still_violated(cur: duckdb.DuckDBPyConnection,
                                                shifted: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    s = one(DistributionKind(), rule(spec(method="psi"), threshold=10.0, resolve=Condition(">", 0.0)), cur)
    assert s.violated is False and s.still_violated is True


# -- windows ---------------------------------------------------------------------------------------------------------

def test_absolute_baseline_reads_the_fixed_range(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(11)
    lo, hi = TS - 90 * DAY, TS - 60 * DAY
    fixed = amounts(rng, 500, mean=9.0)
    recent = amounts(rng, 500)
    c = amounts(rng, 300)
    spans.add(times(lo, hi, 500, rng), numbers={ATTR: fixed})
    spans.add(baseline_times(500, rng), numbers={ATTR: recent})
    spans.add(current_times(300, rng), numbers={ATTR: c})
    kind = DistributionKind()
    absolute = one(kind, rule(spec(method="psi", baseline_window=None, baseline_range=(lo, hi))), cur)
    relative = one(kind, rule(spec(method="psi")), cur)
    assert absolute.value == drift.psi(fixed, c).value
    assert relative.value == drift.psi(recent, c).value
    assert absolute.value != relative.value


def _frozen_count(cur: duckdb.DuckDBPyConnection) -> int:
    return int(cur.execute("SELECT count(*) FROM frozen_baselines").fetchall()[0][0])


def _result(kind: DistributionKind, r: Rule, cur: duckdb.DuckDBPyConnection, ts: float = TS,
            prior: Any = None) -> KindResult:
    got = kind.evaluate([r], ts, cur, prior or {})[r.id]
    assert isinstance(got, KindResult), got
    return got


def test_frozen_baseline_is_captured_once_and_kept(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    """The capture is the series' memory (handed back by the engine) and a frozen_baselines record; the kind itself
    writes nothing. Handed back, or read from the table (a daemon's file), it does not move when the baseline
    window's data does; a changed rule captures again."""
    rng = np.random.default_rng(13)
    b, c = amounts(rng, 1000), amounts(rng, 300, mean=9.5)
    spans.add(baseline_times(1000, rng), numbers={ATTR: b})
    spans.add(current_times(300, rng), numbers={ATTR: c})
    r = rule(spec(method="psi", frozen=True))
    first = _result(DistributionKind(), r, cur)
    (s,) = first.samples
    assert s.value == drift.psi(b, c).value  # at capture time it equals the unfrozen comparison
    assert "frozen baseline" in s.detail
    (record,) = first.records
    row = record.row
    assert record.table == "frozen_baselines" and _frozen_count(cur) == 0
    assert (row["rule_id"], row["fingerprint"], row["series"], row["n"], len(row["bounds"]),
            len(row["proportions"]), row["categories"]) == ("g/drift", r.fingerprint, "{}", 1000, 9, 10, None)
    assert row["window_end"] == datetime.fromtimestamp(TS - 6 * HOUR, UTC).replace(tzinfo=None)
    # the baseline window's data changes afterwards (late arrivals of very small amounts)
    spans.add(baseline_times(1000, rng), numbers={ATTR: np.ones(1000)})
    handed_back = {r.id: {(): SeriesCursor(None, None, first.memory[()])}}
    again = _result(DistributionKind(), r, cur, prior=handed_back)
    assert again.samples[0].value == s.value and again.records == []
    assert one(DistributionKind(), rule(spec(method="psi")), cur).value != s.value  # unfrozen: moves
    write_evaluation(cur, EvaluationRows(TS, records=[(record.table, record.row)]))
    from_table = _result(DistributionKind(), r, cur)  # no memory: the daemon's stored capture is used
    assert from_table.samples[0].value == s.value and from_table.records == []
    r2 = rule(spec(method="psi", frozen=True, bins=5))  # another fingerprint captures again
    changed = _result(DistributionKind(), r2, cur)
    assert changed.samples[0].value != s.value and len(changed.records) == 1


def test_frozen_categorical_and_histogram(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(17)
    b = list(rng.choice(["a", "b"], 500))
    c = list(rng.choice(["a", "b", "c"], 200))
    spans.add(baseline_times(500, rng), strings={"data.kind": b})
    spans.add(current_times(200, rng), strings={"data.kind": c})
    r = rule(spec(attribute="data.kind", categorical=True, method="psi", frozen=True))
    got = _result(DistributionKind(), r, cur)
    assert got.samples[0].value == pytest.approx(drift.psi_categorical(b, c).value, rel=1e-12)
    assert (got.records[0].row["categories"], got.records[0].row["bounds"]) == (["a", "b"], None)


def test_frozen_baseline_too_small_is_not_captured(spans: Spans, cur: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(19)
    spans.add(baseline_times(50, rng), numbers={ATTR: amounts(rng, 50)})
    spans.add(current_times(200, rng), numbers={ATTR: amounts(rng, 200)})
    got = _result(DistributionKind(), rule(spec(method="psi", frozen=True)), cur)
    assert got.samples[0].violated is None and "to freeze" in got.samples[0].detail
    assert got.records == [] and got.memory == {}


def test_eval_over_a_read_only_file_keeps_its_capture_in_memory(tmp_path: Path) -> None:
    """The engine over a read-only file (eval, replay) keeps the capture with the series' state in memory: later
    evaluations use it, nothing is written, and another engine captures its own."""
    path = str(tmp_path / "ro.duckdb")
    rng = np.random.default_rng(23)
    writable = Store(StoreSettings(path))
    writable.start()
    c0 = writable.cursor()
    spans = Spans(c0)
    # 60 days of steady data, then the last 6 h shifted
    spans.add(times(TS - 60 * DAY, TS - 6 * HOUR, 4000, rng), numbers={ATTR: amounts(rng, 4000)})
    spans.add(current_times(300, rng), numbers={ATTR: amounts(rng, 300, mean=9.0)})
    c0.close()
    writable.shutdown()
    ro = Store(StoreSettings(path, read_only=True))
    ro.start()
    try:
        r = rule(spec(method="psi", frozen=True, baseline_window=10 * DAY))
        group = RuleGroup("g", HOUR, (r,))
        engine = RuleEngine(ro.cursor, new_kinds(), MemoryState())
        engine.load(RuleSet((group,)))
        engine.evaluate_group(group, [TS])
        first = engine.state.states(r)[()]
        engine.evaluate_group(group, [TS + DAY])  # a day later: the current window is empty
        later = engine.state.states(r)[()]
        assert later.detail.split("; frozen baseline ")[1] == first.detail.split("; frozen baseline ")[1]
        assert later.value is None
        with ro.cursor() as c:
            assert c.execute("SELECT count(*) FROM frozen_baselines").fetchone() == (0,)
        other = RuleEngine(ro.cursor, new_kinds(), MemoryState())
        other.load(RuleSet((group,)))
        other.evaluate_group(group, [TS - HOUR])  # its first evaluation captures an hour earlier's window
        assert other.state.states(r)[()].detail.split("; frozen baseline ")[1] != \
            first.detail.split("; frozen baseline ")[1]
    finally:
        ro.shutdown()


# -- the parser ------------------------------------------------------------------------------------------------------

BASE_YAML = """\
alert: AmountDrift
kind: distribution
rung: distribution
owner: payments
source: values
attribute: data.amount_paise
method: psi
current: 6h
baseline: {window: 30d}
op: ">"
threshold: 0.2
"""


def parse(extra: str = "", base: str = BASE_YAML, drop: Sequence[str] = ()) -> tuple[Any, list[str]]:
    lines = [ln for ln in base.splitlines() if ln.split(":")[0] not in drop]
    keys = {ln.split(":")[0] for ln in extra.splitlines() if ln.strip()}
    lines = [ln for ln in lines if ln.split(":")[0] not in keys]
    node = parse_yaml("\n".join(lines) + "\n" + extra, "f.yaml")
    problems = Problems()
    spec_, condition, _ = parse_distribution(node, "groups.g.AmountDrift", problems)
    return (spec_, condition), [str(p) for p in problems]


def test_parser_reads_every_field() -> None:
    (s, condition), problems = parse(
        "categorical: false\nbaseline: {from: 2026-10-01T00:00:00Z, to: '2026-10-31T00:00:00Z', frozen: true}\n"
        "bounds: [1, 10, 100]\nepsilon: 0.001\nmin_samples: 1000\nresolve_threshold: 0.1\n")
    assert problems == []
    assert s == DistributionSpec(
        attribute="data.amount_paise", method="psi", source="values", categorical=False, current=6 * HOUR,
        baseline_window=None, baseline_range=(datetime(2026, 10, 1, tzinfo=UTC).timestamp(),
                                              datetime(2026, 10, 31, tzinfo=UTC).timestamp()),
        frozen=True, fixed_bounds=(1.0, 10.0, 100.0), epsilon=0.001, min_samples=1000)
    assert condition == Condition(">", 0.2)
    (s, _), problems = parse("bins: 20\nepsilon: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string: accepted
    assert problems == [] and s.bins == 20 and s.baseline_window == 30 * DAY and s.min_samples == 100
    assert s.epsilon == 1e-3


@pytest.mark.parametrize(("extra", "drop", "why"), [
    ("source: histogram\nmethod: ks\n", (), "ks needs raw values; with source histogram use psi or js"),
    ("source: histogram\nmethod: wasserstein\n", (), "wasserstein needs raw values"),
    ("categorical: true\nmethod: ks\n", (), "drift method 'ks' is only for numeric values"),
    ("categorical: true\nsource: histogram\n", (), "categorical needs source values"),
    ("method: chi2\n", (), "only for categorical values"),
    ("method: nope\n", (), "unknown drift method 'nope'"),
    ("baseline: {window: 30d, from: 2026-10-01T00:00:00Z, to: 2026-10-02T00:00:00Z}\n", (), "not both"),
    ("baseline: {from: 2026-10-01T00:00:00Z}\n", (), "baseline.to: missing"),
    ("baseline: {from: 2026-10-02T00:00:00Z, to: 2026-10-01T00:00:00Z}\n", (), "from must be before to"),
    ("baseline: {from: yesterday, to: 2026-10-01T00:00:00Z}\n", (), "must be an ISO 8601 time"),
    ("baseline: {window: 30d, frozen: true}\nmethod: ks\n", (), "ks needs the baseline's raw values"),
    ("baseline: {window: 30d, frozen: true}\nmethod: wasserstein\n", (), "a frozen baseline keeps only bins"),
    ("baseline: {}\n", (), "give window"),
    ("bins: 1\n", (), "bins: must be at least 2, got 1"),
    ("bins: 10\nbounds: [1, 10]\n", (), "not both"),
    ("bounds: [10, 1]\n", (), "strictly increasing"),
    ("bounds: []\n", (), "must not be empty"),
    ("method: ks\nbins: 5\n", (), "ks does not bin its values"),
    ("method: js\nepsilon: 0.01\n", (), "js has no empty-bin epsilon"),
    ("epsilon: 2\n", (), "must be in (0, 1)"),
    ("epsilon: tiny\n", (), "epsilon: must be a number"),
    ("min_samples: 0\n", (), "min_samples: must be >= 1"),
    ("source: stream\n", (), "must be one of values, histogram"),
    ("current: 0s\n", (), "current: must be above 0"),
    ("colour: red\n", (), "unknown key"),
    ("", ("attribute",), "attribute: missing"),
    ("", ("baseline",), "baseline: missing"),
    ("", ("current",), "current: missing"),
    ("", ("method",), "method: missing"),
    ("", ("threshold",), "threshold: missing"),
])
def test_parser_refuses(extra: str, drop: tuple[str, ...], why: str) -> None:
    _, problems = parse(extra, drop=drop)
    assert any(why in p for p in problems), problems
    assert all(p.startswith("f.yaml:") and p.split(":")[1].isdigit() for p in problems), problems


# -- the payments scenario end to end ------------------------------------------------------------------------------

RULES = """\
groups:
  - name: payments-drift
    interval: 1h
    rules:
      - alert: PaymentsAmountDrift
        kind: distribution
        rung: distribution
        owner: payments-data
        severity: page
        select: {span: payments.transaction, service: payments-api}
        source: values
        attribute: data.amount_paise
        method: psi
        current: 6h
        baseline: {window: 30d}
        bounds: [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000]
        min_samples: 500
        op: ">"
        threshold: 0.2
        annotations:
          summary: "amount distribution moved (PSI {{ value }}): {{ detail }}"
"""


@pytest.mark.parametrize("broken", [False, True])
def test_payments_paise_to_rupees_end_to_end(tmp_path: Path, store: Store, spans: Spans,
                                            monkeypatch: pytest.MonkeyPatch, broken: bool) -> None:
    monkeypatch.setitem(loader.PARSERS, "distribution", parse_distribution)
    path = tmp_path / "payments-drift.rules.yaml"
    path.write_text(RULES)
    ruleset = loader.load_rules([str(path)])
    rng = np.random.default_rng(2026)
    spans.add(baseline_times(3000, rng), numbers={ATTR: amounts(rng, 3000)})
    current = np.round(rng.lognormal(4.0, 1.0, 600)) if broken else amounts(rng, 600)
    spans.add(current_times(600, rng), numbers={ATTR: current})
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState())
    engine.load(ruleset)
    events = engine.evaluate_all(TS)
    assert engine.health == {"payments-drift/PaymentsAmountDrift": None}
    state = engine.state.load(ruleset.rules())["payments-drift/PaymentsAmountDrift"].states[()]
    assert state.value is not None
    if not broken:
        assert state.state == INACTIVE and events == []
        assert state.value < 0.2
        return
    assert state.state == FIRING and state.value > 0.2
    assert [e.transition.to_state for e in events] == [FIRING]
    summary = events[0].summary
    assert summary.startswith("amount distribution moved (PSI ")
    # the detail says where the mass moved: into the 10..100 and 100..1,000 paise bins, out of the 10,000s
    assert "n 600/3000 (current/baseline)" in summary
    assert "of current above 10 and at or below 100" in summary
    assert events[0].transition.spans  # links to transactions of the current window


def test_payments_drift_rule_file_and_its_unit_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """rules/payments-drift.test.yaml passes."""
    import io

    from evaluator.commands.rules import run_tests

    monkeypatch.setitem(loader.PARSERS, "distribution", parse_distribution)
    root = Path(__file__).resolve().parent.parent / "rules"
    out, err = io.StringIO(), io.StringIO()
    code = run_tests([str(root / "payments-drift.test.yaml")], out, err)
    assert code == 0, out.getvalue() + err.getvalue()
    assert "1 passed, 0 failed" in out.getvalue()
