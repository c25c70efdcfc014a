"""Drift statistics: known answers against scipy and against hand computations, bins and epsilon, properties."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon

from evaluator.stats import registry
from evaluator.stats.binning import edges_from_bounds, proportions, quantile_edges, smooth
from evaluator.stats.drift import (
    Histogram,
    chi2,
    describe,
    js,
    js_categorical,
    js_from_props,
    ks,
    psi,
    psi_categorical,
    psi_from_props,
    top_contributors,
    wasserstein,
)

PAYMENT_BOUNDS = np.logspace(0, 8, 9)  # 1, 10, ..., 1e8 paise: with the open outer bins, 10 bins


def right_closed_counts(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """An independent binning: np.digitize(right=True) puts x in bin i when bounds[i-1] < x <= bounds[i]."""
    return np.bincount(np.digitize(values, bounds, right=True), minlength=len(bounds) + 1)


# -- bins and epsilon -------------------------------------------------------------------------------------------

def test_quantile_edges_are_the_baselines_linear_quantiles_with_open_outer_bins() -> None:
    """1..100 in 4 bins: quantiles at 24.75, 49.5, 74.25 positions -> 25.75, 50.5, 75.25; -inf and +inf outside."""
    edges = quantile_edges(np.arange(1, 101), bins=4)
    assert edges.tolist() == [-np.inf, 25.75, 50.5, 75.25, np.inf]


def test_quantile_edges_drop_duplicates_when_the_baseline_has_ties() -> None:
    """60 zeros then 1..40: the 10%..50% quantiles are all 0 and become one edge."""
    baseline = np.concatenate([np.zeros(60), np.arange(1, 41)])
    edges = quantile_edges(baseline, bins=10)
    assert edges[0] == -np.inf and edges[-1] == np.inf
    np.testing.assert_allclose(edges[1:-1], [0.0, 0.4, 10.3, 20.2, 30.1], rtol=0, atol=1e-12)
    counts, props = proportions(baseline, edges)
    assert counts.tolist() == [60, 0, 10, 10, 10, 10]  # (-inf, 0] holds every zero
    assert props.tolist() == [0.6, 0.0, 0.1, 0.1, 0.1, 0.1]
    assert quantile_edges(np.full(50, 7.0)).tolist() == [-np.inf, 7.0, np.inf]


def test_bins_are_closed_on_the_right() -> None:
    """A value equal to a bound counts in the bin that bound closes, as in OpenTelemetry histograms."""
    edges = edges_from_bounds([1.0, 2.0])
    counts, props = proportions([-5.0, 1.0, 1.0000001, 2.0, 2.5, np.inf], edges)
    assert counts.tolist() == [2, 2, 2]
    assert props.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


@pytest.mark.parametrize("n_bounds", [3, 9, 32, 33, 200])
def test_proportions_match_an_independent_binning(n_bounds: int) -> None:
    """Both counting paths (comparisons for few bounds, binary search for many) agree with np.digitize."""
    rng = np.random.default_rng(n_bounds)
    values = np.round(rng.normal(0, 3, 20_000), 1)  # rounded, so many values sit exactly on bounds
    bounds = np.unique(np.round(rng.normal(0, 3, n_bounds), 1))
    counts, props = proportions(values, edges_from_bounds(bounds))
    assert counts.tolist() == right_closed_counts(values, bounds).tolist()
    assert props.sum() == pytest.approx(1.0)


def test_duckdb_histogram_uses_the_same_bins() -> None:
    """DuckDB's histogram(value, bounds) counts into the same right-closed bins, so SQL and numpy agree."""
    rng = np.random.default_rng(3)
    values = np.round(rng.lognormal(2, 1, 5_000), 0)
    bounds = [1.0, 3.0, 7.0, 20.0, 55.0]
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT unnest(?::DOUBLE[]) AS v", [values.tolist()])
    row = con.execute("SELECT histogram(v, ?::DOUBLE[]) FROM t", [bounds]).fetchone()
    assert row is not None
    by_bound = dict(row[0])
    sql_counts = [by_bound.get(b, 0) for b in [*bounds, math.inf]]
    assert sql_counts == proportions(values, edges_from_bounds(bounds))[0].tolist()


def test_smooth_floors_at_eps_then_renormalises() -> None:
    """p' = max(p, eps) / sum(max(p, eps)): [0.5, 0.5, 0, 0] with eps 0.01 -> [0.5, 0.5, 0.01, 0.01] / 1.02."""
    out = smooth(np.array([0.5, 0.5, 0.0, 0.0]), 0.01)
    np.testing.assert_allclose(out, [0.5 / 1.02, 0.5 / 1.02, 0.01 / 1.02, 0.01 / 1.02], rtol=1e-15)
    assert smooth(np.array([0.25, 0.75]), 1e-4).tolist() == [0.25, 0.75]  # nothing below eps: unchanged
    with pytest.raises(ValueError, match="eps"):
        smooth(np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        smooth(np.array([3.0, 1.0]), 1e-4)


# -- PSI by hand ------------------------------------------------------------------------------------------------

def test_psi_of_a_tiny_example_by_hand() -> None:
    """Bins (-inf, 1], (1, 2], (2, inf): baseline 5/3/2, current 2/3/5.

    PSI = (0.2 - 0.5) ln(0.2 / 0.5) + (0.3 - 0.3) ln(1) + (0.5 - 0.2) ln(0.5 / 0.2) = 0.6 ln 2.5 = 0.549774...
    """
    baseline = [0.5, 0.5, 0.5, 0.5, 1.0, 1.5, 1.5, 2.0, 2.5, 9.0]
    current = [0.0, 1.0, 1.2, 1.9, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    result = psi(baseline, current, bounds=[1.0, 2.0])
    assert result.value == pytest.approx(0.6 * math.log(2.5), rel=1e-12)
    assert result.value == pytest.approx(0.5497744391, rel=1e-9)
    np.testing.assert_allclose(result.baseline_props, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(result.current_props, [0.2, 0.3, 0.5])
    np.testing.assert_allclose(result.contributions, [0.3 * math.log(2.5), 0.0, 0.3 * math.log(2.5)], atol=1e-15)
    assert (result.binning, result.n_baseline, result.n_current, result.p_value) == ("fixed", 10, 10, None)


def test_psi_with_an_empty_bin_uses_the_epsilon_formula() -> None:
    """Baseline 0.5/0.5/0, current 0.25/0.25/0.5, eps 0.01: the baseline becomes [0.5, 0.5, 0.01] / 1.01."""
    p = [0.5 / 1.01, 0.5 / 1.01, 0.01 / 1.01]
    q = [0.25, 0.25, 0.5]
    by_hand = sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert by_hand == pytest.approx(2.2569905, rel=1e-6)
    value, terms = psi_from_props([0.5, 0.5, 0.0], q, eps=0.01)
    assert value == pytest.approx(by_hand, rel=1e-12)
    assert terms.sum() == pytest.approx(value, rel=1e-15)


def test_psi_from_quantile_bins_by_hand() -> None:
    """Baseline 1..10 in 2 quantile bins (median 5.5): current 1..3 and 8..12 puts 3 of 8 below, 5 above."""
    result = psi(np.arange(1, 11), [1, 2, 3, 8, 9, 10, 11, 12], bins=2)
    assert result.edges is not None and result.edges.tolist() == [-np.inf, 5.5, np.inf]
    expected = (3 / 8 - 0.5) * math.log((3 / 8) / 0.5) + (5 / 8 - 0.5) * math.log((5 / 8) / 0.5)
    assert result.value == pytest.approx(expected, rel=1e-12)
    assert result.binning == "quantile"


def test_categorical_psi_gives_missing_categories_eps() -> None:
    """INR 90 / USD 10 then INR 50 / USD 10 / EUR 40: EUR's baseline share is floored at eps."""
    eps = 1e-4
    result = psi_categorical({"INR": 90, "USD": 10}, {"INR": 50, "USD": 10, "EUR": 40}, eps=eps)
    assert result.categories == ("EUR", "INR", "USD")
    p = [eps / (1 + eps), 0.9 / (1 + eps), 0.1 / (1 + eps)]
    q = [0.4, 0.5, 0.1]
    expected = sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert result.value == pytest.approx(expected, rel=1e-12)
    same = psi_categorical(["INR"] * 90 + ["USD"] * 10, ["INR"] * 50 + ["USD"] * 10 + ["EUR"] * 40, eps=eps)
    assert same.value == result.value
    assert top_contributors(result, 1) == ["40% of current is 'EUR'; 0% expected"]


# -- known answers against scipy --------------------------------------------------------------------------------

@pytest.mark.parametrize(("n1", "n2", "seed", "ties"), [
    (200, 300, 1, False),  # exact branch, unequal sizes
    (1000, 1000, 2, False),  # exact branch, equal sizes
    (500, 400, 3, True),  # exact branch, heavy ties
    (12_000, 15_000, 4, False),  # asymptotic branch (a sample above 10,000)
    (20_000, 11_000, 5, True),
])
def test_ks_equals_scipy_ks_2samp(n1: int, n2: int, seed: int, ties: bool) -> None:
    """D and the p-value equal scipy.stats.ks_2samp(method='auto') on fixed seeds."""
    rng = np.random.default_rng(seed)
    if ties:
        b, c = rng.integers(0, 25, n1).astype(float), rng.integers(0, 26, n2).astype(float)
    else:
        b, c = rng.normal(0, 1, n1), rng.normal(0.03, 1.03, n2)
    result = ks(b, c)
    expected = scipy.stats.ks_2samp(b, c, method="auto")
    assert result.value == pytest.approx(float(expected.statistic), abs=1e-12)
    assert result.p_value is not None
    assert result.p_value == pytest.approx(float(expected.pvalue), rel=1e-9, abs=1e-300)
    assert 1e-12 < result.p_value < 1  # a case where the p-value says something
    assert ks(b, c, p_value=False).p_value is None


def test_jensen_shannon_equals_scipy_on_the_shared_bins() -> None:
    """js on quantile bins of the baseline equals jensenshannon(p, q, base=2) of the binned shares."""
    rng = np.random.default_rng(11)
    b, c = rng.gamma(2.0, 1.0, 8_000), rng.gamma(2.3, 1.0, 6_000)
    result = js(b, c, bins=10)
    edges = quantile_edges(b, 10)
    p = right_closed_counts(b, edges[1:-1]) / b.size
    q = right_closed_counts(c, edges[1:-1]) / c.size
    assert result.value == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-9)
    assert result.contributions is not None
    assert result.contributions.sum() == pytest.approx(result.value**2, rel=1e-9)
    cats = js_categorical({"a": 5, "b": 3, "c": 2}, {"b": 1, "c": 6, "d": 3})
    assert cats.value == pytest.approx(float(jensenshannon([5, 3, 2, 0], [0, 1, 6, 3], base=2)), rel=1e-9)


@pytest.mark.parametrize("seed", [21, 22])
def test_wasserstein_equals_scipy_over_the_baseline_std(seed: int) -> None:
    """wasserstein_distance(b, c) / np.std(b) (ddof=0), with unequal sizes and ties."""
    rng = np.random.default_rng(seed)
    b = np.round(rng.lognormal(3, 0.7, 3_000), 1)
    c = np.round(rng.lognormal(3.2, 0.6, 2_000), 1)
    result = wasserstein(b, c)
    expected = scipy.stats.wasserstein_distance(b, c) / np.std(b)
    assert result.value == pytest.approx(expected, rel=1e-9)
    assert result.details["distance"] == pytest.approx(scipy.stats.wasserstein_distance(b, c), rel=1e-9)


def test_chi2_equals_scipy_chisquare_against_the_baseline_shares() -> None:
    """Observed current counts against n_current * baseline shares, k - 1 degrees of freedom."""
    baseline = {"card": 6_100, "upi": 3_000, "netbanking": 800, "wallet": 100}
    current = {"card": 590, "upi": 330, "netbanking": 70, "wallet": 10}
    result = chi2(baseline, current)
    cats = sorted(baseline)
    n_b, n_c = sum(baseline.values()), sum(current.values())
    f_exp = [n_c * baseline[k] / n_b for k in cats]
    expected = scipy.stats.chisquare([current[k] for k in cats], f_exp=f_exp)
    assert result.value == pytest.approx(float(expected.statistic), rel=1e-9)
    assert result.p_value is not None
    assert result.p_value == pytest.approx(float(expected.pvalue), rel=1e-9)
    assert 0.001 < result.p_value < 0.5


def test_chi2_floors_a_category_the_baseline_never_saw() -> None:
    """A new category gets expected n_current * eps / (1 + eps) instead of 0 (which would be infinite)."""
    eps = 1e-3
    result = chi2({"a": 70, "b": 30}, {"a": 60, "b": 30, "new": 10}, eps=eps)
    shares = np.array([0.7, 0.3, eps]) / (1 + eps)  # categories sorted: a, b, new
    expected = scipy.stats.chisquare([60, 30, 10], f_exp=100 * shares)
    assert result.value == pytest.approx(float(expected.statistic), rel=1e-9)
    assert result.p_value == pytest.approx(float(expected.pvalue), rel=1e-9)
    assert chi2({"a": 5}, {"a": 9}).value == 0.0 and chi2({"a": 5}, {"a": 9}).p_value == 1.0


# -- histograms -------------------------------------------------------------------------------------------------

def test_histogram_inputs_equal_raw_values_binned_the_same_way() -> None:
    """Pipeline histograms give the same psi and js as the raw values on the same bounds, also mixed."""
    rng = np.random.default_rng(31)
    b, c = rng.lognormal(10, 1.5, 5_000), rng.lognormal(9.5, 1.6, 4_000)
    hb = Histogram(PAYMENT_BOUNDS, right_closed_counts(b, PAYMENT_BOUNDS))
    hc = Histogram(PAYMENT_BOUNDS, right_closed_counts(c, PAYMENT_BOUNDS))
    raw = psi(b, c, bounds=PAYMENT_BOUNDS)
    assert psi(hb, hc).value == raw.value
    assert psi(hb, c).value == raw.value  # a frozen baseline histogram against raw current values
    assert psi(b, hc, bounds=PAYMENT_BOUNDS).value == raw.value
    assert js(hb, hc).value == js(b, c, bounds=PAYMENT_BOUNDS).value
    assert Histogram.from_values(b, PAYMENT_BOUNDS).counts.tolist() == hb.counts.tolist()
    assert (psi(hb, hc).n_baseline, psi(hb, hc).n_current) == (5_000, 4_000)


def test_histograms_with_different_bounds_are_refused() -> None:
    """Different bucket layouts cannot be compared bin by bin: a ValueError naming both."""
    with pytest.raises(ValueError, match=r"different bounds \(baseline 2 bounds \[1, 2\], current 2 bounds \[1, 3\]"):
        psi(Histogram([1, 2], [1, 1, 1]), Histogram([1, 3], [1, 1, 1]))
    with pytest.raises(ValueError, match="different bounds"):
        js(Histogram([1, 2], [1, 1, 1]), Histogram([1, 2, 3], [1, 1, 1, 1]))
    with pytest.raises(ValueError, match="needs 3 counts"):
        Histogram([1, 2], [1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([2, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="needs raw values"):
        ks(Histogram([1, 2], [1, 1, 1]), [1.0, 2.0])


@pytest.mark.parametrize("call", [
    lambda: psi([], [1.0, 2.0]),
    lambda: psi([1.0, 2.0], []),
    lambda: psi([1.0, 2.0], [], bounds=[1.5]),
    lambda: js([], [1.0]),
    lambda: ks([1.0], []),
    lambda: wasserstein([], [1.0]),
    lambda: psi(Histogram([1.0], [0, 0]), Histogram([1.0], [3, 4])),
    lambda: psi_categorical({}, {"a": 1}),
    lambda: chi2({"a": 1}, []),
    lambda: psi([1.0, np.nan], [1.0]),
    lambda: wasserstein([3.0, 3.0], [1.0, 2.0]),
])
def test_empty_or_unanswerable_input_is_a_value_error(call: object) -> None:
    """No silent nan: empty sides, NaN, an empty histogram, a constant baseline for wasserstein."""
    assert callable(call)
    with pytest.raises(ValueError):
        call()


# -- registry ---------------------------------------------------------------------------------------------------

def test_registry_names_methods_and_what_they_need() -> None:
    """Rules name a method; the loader learns which need raw values and which are categorical."""
    assert registry.names(categorical=False) == ["js", "ks", "psi", "wasserstein"]
    assert registry.names(categorical=True) == ["chi2", "js", "psi"]
    assert [registry.get(n).needs_raw_values for n in ("psi", "js", "ks", "wasserstein")] == [False, False, True, True]
    assert registry.get("psi", categorical=True).func is psi_categorical
    assert registry.get("chi2", categorical=True).p_value and registry.get("ks").p_value
    assert not registry.get("psi").p_value
    assert registry.get("psi")([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], bins=2).value == 0.0
    with pytest.raises(ValueError, match="only for categorical values"):
        registry.get("chi2")
    with pytest.raises(ValueError, match=r"unknown drift method 'kl'.*known: js, ks, psi, wasserstein"):
        registry.get("kl")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("psi", needs_raw_values=False, categorical=False)(psi)


# -- the payments scenario --------------------------------------------------------------------------------------

def lognormal_bin_shares(mean_log: float, sigma: float, bounds: np.ndarray) -> np.ndarray:
    """Exact bin shares of a lognormal on right-closed bins with open outer bins (the normal CDF of log x)."""
    cdf = [0.5 * (1 + math.erf((math.log(b) - mean_log) / (sigma * math.sqrt(2)))) for b in bounds]
    return np.diff([0.0, *cdf, 1.0])


def test_payments_unit_change_is_far_above_the_contract() -> None:
    """Amounts in paise, lognormal(10, 1.5), against rupees, lognormal(4, 1), on decade bins 1..1e8.

    The two days barely overlap, so PSI is dominated by the epsilon: about 13.8 with eps 1e-4 (the population
    value from the exact bin shares is 13.833), far above the 0.2 contract.
    """
    rng = np.random.default_rng(2025)
    yesterday = rng.lognormal(10.0, 1.5, 100_000)
    broken = rng.lognormal(4.0, 1.0, 100_000)
    result = psi(yesterday, broken, bounds=PAYMENT_BOUNDS, eps=1e-4)
    population, _ = psi_from_props(lognormal_bin_shares(10, 1.5, PAYMENT_BOUNDS),
                                   lognormal_bin_shares(4, 1, PAYMENT_BOUNDS), eps=1e-4)
    assert population == pytest.approx(13.833, abs=1e-3)
    assert result.value > 0.2
    assert result.value == pytest.approx(population, abs=0.5)
    assert top_contributors(result, 1)[0].startswith("68% of current above 10 and at or below 100; <0.1% expected")
    quantile = psi(yesterday, broken)  # the same days on yesterday's deciles
    assert quantile.value > 0.2
    assert top_contributors(quantile, 1)[0].startswith(
        "100% of current at or below the baseline's 10th percentile (")


def test_payments_healthy_days_are_stable() -> None:
    """Two healthy days (different seeds) on the same bins: PSI well under 0.02."""
    day1 = np.random.default_rng(1).lognormal(10.0, 1.5, 100_000)
    day2 = np.random.default_rng(2).lognormal(10.0, 1.5, 100_000)
    assert psi(day1, day2, bounds=PAYMENT_BOUNDS).value < 0.02
    assert psi(day1, day2).value < 0.02
    assert js(day1, day2).value < 0.05
    assert ks(day1, day2, p_value=False).value < 0.01


def test_describe_is_plain_data() -> None:
    """The result as JSON-friendly data for an alert's detail."""
    d = describe(psi([0.5, 1.5, 2.5], [0.5, 0.5, 2.5], bounds=[1.0, 2.0]))
    assert d["bounds"] == [1.0, 2.0] and d["current_props"] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert d["top_contributors"][0] == "0% of current above 1 and at or below 2; 33% expected"


# -- properties -------------------------------------------------------------------------------------------------

samples = hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-1e6, 1e6, allow_nan=False))
count_vectors = st.integers(2, 12).flatmap(
    lambda k: st.tuples(hnp.arrays(np.int64, k, elements=st.integers(0, 1000)),
                        hnp.arrays(np.int64, k, elements=st.integers(0, 1000))))


@settings(max_examples=60, deadline=None)
@given(samples, st.integers(1, 12))
def test_a_sample_has_no_drift_from_itself(x: np.ndarray, bins: int) -> None:
    """PSI and JS of a sample with itself are exactly 0, on quantile bins of any count."""
    assert psi(x, x, bins=bins).value == 0.0
    assert js(x, x, bins=bins).value == 0.0


@settings(max_examples=100, deadline=None)
@given(count_vectors)
def test_psi_and_js_are_symmetric_and_bounded(counts: tuple[np.ndarray, np.ndarray]) -> None:
    """PSI >= 0 and symmetric in its two proportion vectors; JS in [0, 1] and symmetric."""
    a, b = counts
    if a.sum() == 0 or b.sum() == 0:
        return
    p, q = a / a.sum(), b / b.sum()
    forward, backward = psi_from_props(p, q)[0], psi_from_props(q, p)[0]
    assert forward >= 0
    assert forward == pytest.approx(backward, rel=1e-12, abs=1e-15)
    j = js_from_props(p, q)[0]
    assert 0.0 <= j <= 1.0
    assert j == pytest.approx(js_from_props(q, p)[0], rel=1e-12, abs=1e-15)
    assert j == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-9, abs=1e-12)


@pytest.mark.filterwarnings("ignore:ks_2samp. Exact calculation unsuccessful")
@settings(max_examples=100, deadline=None)
@given(samples, samples)
def test_ks_is_in_0_1_and_equals_scipy(x: np.ndarray, y: np.ndarray) -> None:
    """D in [0, 1], equal to ks_2samp's statistic for any pair of samples (ties, single values, extremes)."""
    d = ks(x, y, p_value=False).value
    assert 0.0 <= d <= 1.0
    assert d == pytest.approx(float(scipy.stats.ks_2samp(x, y).statistic), abs=1e-12)
