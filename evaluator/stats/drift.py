"""Drift between a baseline window and a current one: small pure functions over numpy arrays, registered by name.

What each method needs (the rule loader reads the same from `registry.get(name).needs_raw_values`):

| method | numeric input | categorical input | p-value |
|---|---|---|---|
| `psi` | raw values (quantile bins from the baseline, or given `bounds`) or histograms | counts or strings | no |
| `js` | raw values or histograms, like `psi` | counts or strings | no |
| `ks` | raw values only | - | yes |
| `wasserstein` | raw values only | - | no |
| `chi2` | - | counts or strings | yes |

Numeric inputs are 1-D arrays of raw values or `Histogram(bounds, counts)` as pipelines send them
(`<name>.histogram.bounds` / `.counts`, OpenTelemetry's explicit-bucket layout: right-closed bins, outer bins
open). When one side is a histogram, a raw other side is binned on its bounds, so a frozen baseline histogram can
be compared with raw current values. Categorical inputs are a mapping category -> count, or the raw strings.

A minimum sample size is the rule's business; these functions only refuse what has no answer (empty input, NaN,
histograms with different bounds) with a ValueError instead of returning nan.

The statistics are computed here and checked against scipy in tests. The p-values of `ks` and `chi2` come from
scipy's reference distributions (imported on first use): Smirnov's exact and asymptotic two-sample
distributions are hundreds of lines of numerical code that are not worth owning a copy of.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from evaluator.stats.binning import (
    as_values,
    bounds_of,
    check_bounds,
    edges_from_bounds,
    proportions,
    quantile_edges,
    shares,
    smooth,
)
from evaluator.stats.registry import register

DEFAULT_EPS = 1e-4  # Evidently's floor for empty bins; see binning.smooth for the formula


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts per bin as a pipeline sends them: `counts[i]` values in (bounds[i-1], bounds[i]], with
    len(counts) == len(bounds) + 1 because the outer bins are open."""

    bounds: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]

    def __init__(self, bounds: npt.ArrayLike, counts: npt.ArrayLike) -> None:
        b = check_bounds(bounds, "histogram bounds")
        c = np.asarray(counts)
        if c.ndim != 1 or c.size != b.size + 1:
            raise ValueError(f"a histogram with {b.size} bounds needs {b.size + 1} counts (outer bins are open), "
                             f"got {c.size}")
        if not np.isfinite(c.astype(np.float64)).all() or (c < 0).any() or (c != np.round(c)).any():
            raise ValueError("histogram counts must be non-negative whole numbers")
        object.__setattr__(self, "bounds", b)
        object.__setattr__(self, "counts", c.astype(np.int64))

    @classmethod
    def from_values(cls, values: npt.ArrayLike, bounds: npt.ArrayLike) -> Histogram:
        """What a pipeline would have sent for these raw values and bounds."""
        counts, _ = proportions(values, edges_from_bounds(bounds))
        return cls(bounds, counts)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> npt.NDArray[np.float64]:
        return np.concatenate(([-np.inf], self.bounds, [np.inf]))


NumericInput: TypeAlias = npt.ArrayLike | Histogram
CategoricalInput: TypeAlias = Mapping[str, int] | Iterable[str]


@dataclass(frozen=True, eq=False)
class DriftResult:
    """One comparison, with enough of the working to explain it in an alert.

    `baseline_props` / `current_props` are the observed shares per bin or category, before any epsilon.
    `contributions` are per-bin terms of the statistic: they sum to `value` for psi and chi2, and to `value`**2
    (the Jensen-Shannon divergence, in bits) for js. ks and wasserstein have no bins: their working is in
    `details`.
    """

    method: str
    value: float
    p_value: float | None
    n_baseline: int
    n_current: int
    binning: str  # "quantile" (from the baseline), "fixed" (given bounds or histograms), "categories", "none"
    edges: npt.NDArray[np.float64] | None = None
    categories: tuple[str, ...] | None = None
    baseline_props: npt.NDArray[np.float64] | None = None
    current_props: npt.NDArray[np.float64] | None = None
    contributions: npt.NDArray[np.float64] | None = None
    eps: float | None = None
    details: Mapping[str, float] = field(default_factory=dict)


# -- the statistics on proportion vectors -----------------------------------------------------------------------

def psi_from_props(baseline_props: npt.ArrayLike, current_props: npt.ArrayLike,
                   eps: float = DEFAULT_EPS) -> tuple[float, npt.NDArray[np.float64]]:
    """Population stability index and its per-bin terms, natural log:

        PSI = sum_i (q_i' - p_i') * ln(q_i' / p_i'),  p' = smooth(p, eps), q' = smooth(q, eps)

    Each term is >= 0 and the sum is symmetric in p and q (it is KL(p'||q') + KL(q'||p')). For two
    distributions with (almost) no overlap the value is dominated by ln(1 / eps): it says "far", not how far.
    """
    p = np.asarray(baseline_props, dtype=np.float64)
    q = np.asarray(current_props, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"baseline and current have different numbers of bins ({p.size} and {q.size})")
    ps, qs = smooth(p, eps), smooth(q, eps)
    terms = (qs - ps) * np.log(qs / ps)
    return float(terms.sum()), terms


def js_from_props(baseline_props: npt.ArrayLike,
                  current_props: npt.ArrayLike) -> tuple[float, npt.NDArray[np.float64]]:
    """Jensen-Shannon distance in base 2 (so in [0, 1]) and the per-bin terms of the divergence it is the square
    root of. Empty bins need no epsilon: with m = (p + q) / 2, a term 0 * log(0 / m) is 0.
    Equal to scipy.spatial.distance.jensenshannon(p, q, base=2)."""
    p = shares(baseline_props, "baseline proportions")
    q = shares(current_props, "current proportions")
    if p.shape != q.shape:
        raise ValueError(f"baseline and current have different numbers of bins ({p.size} and {q.size})")
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.where(p > 0, p * np.log2(p / m), 0.0)
        tq = np.where(q > 0, q * np.log2(q / m), 0.0)
    terms = (tp + tq) / 2
    divergence = max(float(terms.sum()), 0.0)  # rounding can leave -1e-17 for identical inputs
    return min(math.sqrt(divergence), 1.0), terms


# -- numeric inputs ---------------------------------------------------------------------------------------------

def _shared_bins(baseline: NumericInput, current: NumericInput, bins: int,
                 bounds: npt.ArrayLike | None) -> tuple[str, npt.NDArray[np.float64], npt.NDArray[np.int64],
                                                        npt.NDArray[np.int64]]:
    """Counts of both sides on one set of bins: the histograms' bounds, else `bounds`, else baseline quantiles."""
    hists = [h for h in (baseline, current) if isinstance(h, Histogram)]
    if hists:
        ref = hists[0].bounds
        if len(hists) == 2 and not np.array_equal(hists[0].bounds, hists[1].bounds):
            raise ValueError("baseline and current histograms have different bounds "
                             f"(baseline {_short(hists[0].bounds)}, current {_short(hists[1].bounds)}); "
                             "compare histograms from the same bucket layout, or send raw values")
        if bounds is not None and not np.array_equal(check_bounds(bounds), ref):
            raise ValueError(f"bounds {_short(check_bounds(bounds))} differ from the histogram's {_short(ref)}")
        edges, binning = edges_from_bounds(ref), "fixed"
    elif bounds is not None:
        edges, binning = edges_from_bounds(bounds), "fixed"
    else:
        edges, binning = quantile_edges(_raw(baseline, "baseline"), bins), "quantile"

    def counts_of(side: NumericInput, what: str) -> npt.NDArray[np.int64]:
        if isinstance(side, Histogram):
            if side.n == 0:
                raise ValueError(f"{what} histogram is empty (all counts are zero)")
            return side.counts
        return proportions(as_values(side, what), edges)[0]

    return binning, edges, counts_of(baseline, "baseline"), counts_of(current, "current")


def _raw(side: NumericInput, what: str) -> npt.NDArray[np.float64]:
    if isinstance(side, Histogram):
        raise ValueError(f"{what} is a histogram, but this method needs raw values")
    return as_values(side, what)


def _short(bounds: npt.NDArray[np.float64]) -> str:
    shown = ", ".join(f"{b:g}" for b in bounds[:4]) + (", ..." if bounds.size > 4 else "")
    return f"{bounds.size} bounds [{shown}]"


@register("psi", needs_raw_values=False, categorical=False)
def psi(baseline: NumericInput, current: NumericInput, *, bins: int = 10, bounds: npt.ArrayLike | None = None,
        eps: float = DEFAULT_EPS) -> DriftResult:
    """Population stability index on bins shared by both sides (see psi_from_props for the formula).

    Bins: a histogram's bounds if either side is one; else `bounds` if given (e.g. log-spaced amounts); else
    `bins` quantile bins of the raw baseline (binning.quantile_edges), so each holds about 1/bins of it.
    """
    binning, edges, cb, cc = _shared_bins(baseline, current, bins, bounds)
    p, q = cb / cb.sum(), cc / cc.sum()
    value, terms = psi_from_props(p, q, eps)
    return DriftResult("psi", value, None, int(cb.sum()), int(cc.sum()), binning, edges=edges,
                       baseline_props=p, current_props=q, contributions=terms, eps=eps)


@register("js", needs_raw_values=False, categorical=False)
def js(baseline: NumericInput, current: NumericInput, *, bins: int = 10,
       bounds: npt.ArrayLike | None = None) -> DriftResult:
    """Jensen-Shannon distance (base 2, in [0, 1]) on the same shared bins as psi; no epsilon needed."""
    binning, edges, cb, cc = _shared_bins(baseline, current, bins, bounds)
    p, q = cb / cb.sum(), cc / cc.sum()
    value, terms = js_from_props(p, q)
    return DriftResult("js", value, None, int(cb.sum()), int(cc.sum()), binning, edges=edges,
                       baseline_props=p, current_props=q, contributions=terms)


@register("ks", needs_raw_values=True, categorical=False, p_value=True)
def ks(baseline: NumericInput, current: NumericInput, *, p_value: bool = True) -> DriftResult:
    """Two-sample Kolmogorov-Smirnov: D = max_x |F_baseline(x) - F_current(x)| over the empirical CDFs.

    D equals scipy.stats.ks_2samp's statistic. The two-sided p-value is what ks_2samp(method="auto") reports:
    exact when both samples have at most 10,000 values, else Smirnov's asymptotic kstwo.sf(D, round(n1 n2 /
    (n1 + n2))). It needs scipy; `p_value=False` skips it (and the import). On large samples any shift is
    "significant": judge D, keep the p-value for small windows.
    """
    b = np.sort(_raw(baseline, "baseline"))
    c = np.sort(_raw(current, "current"))
    n1, n2 = b.size, c.size
    # The ECDF difference only changes at sample points: evaluate it at each distinct value of either sample, as
    # ks_2samp does. A sample's own ECDF at the last of a run of equal values is (position + 1) / n, so only the
    # other sample needs a search (sorted keys into a sorted array: cheap next to the two sorts).
    candidates = []
    for own, other, n_own, n_other, sign in ((b, c, n1, n2, 1.0), (c, b, n2, n1, -1.0)):
        last = np.flatnonzero(np.append(own[1:] != own[:-1], True))  # last position of each distinct value
        x = own[last]
        diff = sign * ((last + 1) / n_own - np.searchsorted(other, x, side="right") / n_other)
        candidates += [(float(diff[i]), float(x[i])) for i in (int(np.argmax(diff)), int(np.argmin(diff)))]
    d_value, location = max(((abs(d), x) for d, x in candidates), key=lambda t: t[0])
    f_b = float(np.searchsorted(b, location, side="right")) / n1
    f_c = float(np.searchsorted(c, location, side="right")) / n2
    p = _ks_p_value(b, c, d_value) if p_value else None
    return DriftResult("ks", min(d_value, 1.0), p, n1, n2, "none",
                       details={"location": location, "baseline_cdf": f_b, "current_cdf": f_c})


def _ks_p_value(b: npt.NDArray[np.float64], c: npt.NDArray[np.float64], d: float) -> float:
    try:
        from scipy import stats
    except ModuleNotFoundError as exc:  # pragma: no cover - scipy is installed wherever tests run
        raise ModuleNotFoundError("ks p-values need scipy (pip install scipy), or call ks(..., p_value=False)") \
            from exc
    if max(b.size, c.size) <= 10_000:  # ks_2samp's own exact/asymptotic switch (MAX_AUTO_N)
        return float(stats.ks_2samp(b, c, method="auto").pvalue)
    m, n = sorted((float(b.size), float(c.size)), reverse=True)
    return float(np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0))


@register("wasserstein", needs_raw_values=True, categorical=False)
def wasserstein(baseline: NumericInput, current: NumericInput) -> DriftResult:
    """Earth mover's distance between the two samples divided by the baseline's standard deviation (population,
    ddof=0): "how far the mass moved, in baseline standard deviations", comparable across attributes.

    The distance is integral |F_baseline - F_current| dx, equal to scipy.stats.wasserstein_distance. A constant
    baseline has no scale to divide by: that is a ValueError (use psi for such attributes).
    """
    b = np.sort(_raw(baseline, "baseline"))
    c = np.sort(_raw(current, "current"))
    scale = float(np.std(b))
    if scale == 0.0:
        raise ValueError("the baseline is constant (standard deviation 0): no scale for wasserstein; use psi")
    merged = np.sort(np.concatenate((b, c)), kind="stable")
    widths = np.diff(merged)
    cdf_b = np.searchsorted(b, merged[:-1], side="right") / b.size
    cdf_c = np.searchsorted(c, merged[:-1], side="right") / c.size
    distance = float(np.sum(np.abs(cdf_b - cdf_c) * widths))
    return DriftResult("wasserstein", distance / scale, None, b.size, c.size, "none",
                       details={"distance": distance, "baseline_std": scale, "baseline_mean": float(b.mean()),
                                "current_mean": float(c.mean())})


# -- categorical inputs -----------------------------------------------------------------------------------------

def count_categories(values: Iterable[str]) -> dict[str, int]:
    """Counts per distinct string (what a `GROUP BY value` would return)."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)
    if arr.size == 0:
        return {}
    cats, counts = np.unique(arr.astype(str), return_counts=True)
    return {str(k): int(v) for k, v in zip(cats, counts, strict=True)}


def _category_counts(baseline: CategoricalInput, current: CategoricalInput) -> tuple[
        tuple[str, ...], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Both sides' counts over the sorted union of categories seen on either side (zero where unseen)."""
    sides = []
    for side, what in ((baseline, "baseline"), (current, "current")):
        counts = dict(side) if isinstance(side, Mapping) else count_categories(side)
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"{what} category counts must be non-negative")
        if sum(counts.values()) == 0:
            raise ValueError(f"{what} is empty (no category has a count)")
        sides.append(counts)
    cats = tuple(sorted(k for k in set(sides[0]) | set(sides[1]) if sides[0].get(k, 0) or sides[1].get(k, 0)))
    cb = np.array([sides[0].get(k, 0) for k in cats], dtype=np.int64)
    cc = np.array([sides[1].get(k, 0) for k in cats], dtype=np.int64)
    return cats, cb, cc


@register("psi", needs_raw_values=False, categorical=True)
def psi_categorical(baseline: CategoricalInput, current: CategoricalInput, *, eps: float = DEFAULT_EPS) -> DriftResult:
    """PSI over categories: one bin per category seen on either side; a category missing on one side gets eps
    there (binning.smooth), so a new currency or a vanished country counts as a large, finite shift."""
    cats, cb, cc = _category_counts(baseline, current)
    p, q = cb / cb.sum(), cc / cc.sum()
    value, terms = psi_from_props(p, q, eps)
    return DriftResult("psi", value, None, int(cb.sum()), int(cc.sum()), "categories", categories=cats,
                       baseline_props=p, current_props=q, contributions=terms, eps=eps)


@register("js", needs_raw_values=False, categorical=True)
def js_categorical(baseline: CategoricalInput, current: CategoricalInput) -> DriftResult:
    """Jensen-Shannon distance (base 2) over categories seen on either side."""
    cats, cb, cc = _category_counts(baseline, current)
    p, q = cb / cb.sum(), cc / cc.sum()
    value, terms = js_from_props(p, q)
    return DriftResult("js", value, None, int(cb.sum()), int(cc.sum()), "categories", categories=cats,
                       baseline_props=p, current_props=q, contributions=terms)


@register("chi2", needs_raw_values=False, categorical=True, p_value=True)
def chi2(baseline: CategoricalInput, current: CategoricalInput, *, eps: float = DEFAULT_EPS) -> DriftResult:
    """Pearson's chi-square goodness-of-fit test of the current counts against the baseline's shares:

        expected_i = n_current * p_i',  p' = smooth(baseline shares, eps);  X2 = sum_i (o_i - e_i)^2 / e_i

    with k - 1 degrees of freedom over the k categories seen on either side (eps keeps a category the baseline
    never saw from dividing by zero). Equal to scipy.stats.chisquare(observed, f_exp=expected); the p-value is
    the chi-square survival function (scipy.special.chdtrc). The baseline is treated as known proportions, not
    as a sample: with a small baseline, a homogeneity test (scipy.stats.chi2_contingency) is the fairer one.
    A single category in total has nothing to test: X2 = 0, p = 1.
    """
    cats, cb, cc = _category_counts(baseline, current)
    p, q = cb / cb.sum(), cc / cc.sum()
    n = float(cc.sum())
    expected = n * smooth(p, eps)
    terms = (cc - expected) ** 2 / expected
    value = float(terms.sum())
    if len(cats) < 2:
        p_value = 1.0
    else:
        from scipy import special

        p_value = float(special.chdtrc(len(cats) - 1, value))
    return DriftResult("chi2", value, p_value, int(cb.sum()), int(cc.sum()), "categories", categories=cats,
                       baseline_props=p, current_props=q, contributions=terms, eps=eps)


# -- explaining a result ----------------------------------------------------------------------------------------

def top_contributors(result: DriftResult, k: int = 3) -> list[str]:
    """Up to `k` sentences saying where the mass moved, biggest contribution first, for an alert's summary:
    e.g. "100% of current at or below the baseline's 10th percentile (3,210); 10% expected"."""
    if k < 1:
        return []
    if result.method == "ks":
        d = result.details
        return [f"largest CDF gap at {_num(d['location'])}: {_pct(d['current_cdf'])} of current at or below it, "
                f"{_pct(d['baseline_cdf'])} of baseline"]
    if result.method == "wasserstein":
        d = result.details
        shift = (d["current_mean"] - d["baseline_mean"]) / d["baseline_std"]
        return [f"mean moved from {_num(d['baseline_mean'])} to {_num(d['current_mean'])} "
                f"({shift:+.2f} baseline standard deviations)"]
    if result.contributions is None or result.baseline_props is None or result.current_props is None:
        return []
    p, q, terms = result.baseline_props, result.current_props, result.contributions
    order = [int(i) for i in np.argsort(-terms, kind="stable") if terms[i] > 0 and p[i] != q[i]][:k]
    where = [_where(result, i) for i in order]
    return [f"{_pct(q[i])} of current {w}; {_pct(p[i])} expected" for i, w in zip(order, where, strict=True)]


def _where(result: DriftResult, i: int) -> str:
    if result.categories is not None:
        return f"is {result.categories[i]!r}"
    assert result.edges is not None and result.baseline_props is not None
    inner = bounds_of(result.edges)
    if result.binning == "quantile":
        cum = np.cumsum(result.baseline_props)  # the baseline share at or below each bound: its percentile
        names = [f"the baseline's {_ordinal(round(100 * cum[j]))} percentile ({_num(inner[j])})"
                 for j in range(inner.size)]
    else:
        names = [_num(b) for b in inner]
    if inner.size == 0:
        return "anywhere"
    if i == 0:
        return f"at or below {names[0]}"
    if i == inner.size:
        return f"above {names[-1]}"
    return f"above {names[i - 1]} and at or below {names[i]}"


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    if x < 0.001:
        return "<0.1%"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def _num(x: float) -> str:
    return f"{x:,.0f}" if 1 <= abs(x) < 1e7 else f"{x:.3g}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe(result: DriftResult) -> dict[str, Any]:
    """The result as plain JSON-friendly data (for an alert's detail or the admin API)."""
    return {
        "method": result.method, "value": result.value, "p_value": result.p_value,
        "n_baseline": result.n_baseline, "n_current": result.n_current, "binning": result.binning,
        "bounds": None if result.edges is None else bounds_of(result.edges).tolist(),
        "categories": None if result.categories is None else list(result.categories),
        "baseline_props": None if result.baseline_props is None else result.baseline_props.tolist(),
        "current_props": None if result.current_props is None else result.current_props.tolist(),
        "contributions": None if result.contributions is None else result.contributions.tolist(),
        "eps": result.eps, "details": dict(result.details), "top_contributors": top_contributors(result),
    }
