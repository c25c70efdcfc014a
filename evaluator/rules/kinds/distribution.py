"""distribution: has the shape of an attribute moved, though every row is still valid? Judged at the evaluation
time, one Sample per series (at = ts, no run_key), like absence.

A partner that switches from paise to rupees leaves every schema check green; only the distribution moves. A rule
compares the values of the `current` window, (ts - current, ts], with a baseline:

- relative: `baseline: {window: 30d}` is (ts - current - window, ts - current], the window just before current;
- absolute: `baseline: {from: <ISO>, to: <ISO>}` is the fixed range (from, to];
- frozen: either of the above with `frozen: true` is captured once per rule and series (bin bounds or categories,
  and the proportions) and reused, so the reference does not drift with time. The capture is the series' memory
  (handed back by the engine with the series' state) and a `frozen_baselines` record; a capture already in
  `frozen_baselines` for the rule's fingerprint (e.g. the daemon's, when `eval` reads its file) is used as well.
  A rule whose fingerprint changes captures again.

Sources:
- `values`: the attribute on many spans (one per row or prediction) in each window; numbers from span_numbers, or
  with `categorical: true` the strings of span_strings (a numeric attribute's values are then rendered as
  category labels; a span without the attribute, or with an empty string, is not counted).
- `histogram`: pipeline-sent `<attribute>.histogram.bounds` / `<attribute>.histogram.counts` arrays on run spans,
  summed per window and series. Every histogram of a series, in both windows, must share the same bounds and
  have one count per bucket; a series whose histograms do not is "no data" with the reason, alone: the other
  series of the rule are judged as usual. Only methods that work on bins take histograms: psi and js; ks and
  wasserstein need raw values (evaluator.stats.registry's `needs_raw_values`), and frozen baselines cannot be used
  with them either (a frozen baseline keeps bins and proportions, not values).

Methods are evaluator.stats.registry names: numeric psi, js, ks, wasserstein; categorical psi, js, chi2. Bins for
numeric psi/js: `bounds` when given (e.g. decades for amounts), else `bins` quantile bins of the baseline (default
10), outer bins open. Empty bins get the floor `epsilon` (default 1e-4): p' = max(p, eps) / sum(max(p, eps))
(evaluator.stats.binning.smooth). A side with fewer than `min_samples` values (default 100) is "no data".

value = the statistic (PSI, KS D, JS distance, normalised Wasserstein, chi-square X2), compared with the rule's
condition (op + threshold; resolve_threshold for hysteresis). The detail gives n per side, the p-value where the
method has one, and where the mass moved (evaluator.stats.drift.top_contributors). spans: up to 5 of the newest
spans of the series in the current window, for alert links.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from evaluator.rules.model import Condition, KindResult, Record, Rule, RuleError, Sample, SeriesKey
from evaluator.rules.select import (
    US,
    Member,
    Results,
    Runs,
    evaluate_each,
    fetch_runs,
    priors_of,
    series_key,
    shape_of,
    to_us,
)
from evaluator.stats import registry
from evaluator.stats.binning import bounds_of, check_bounds, edges_from_bounds, proportions, quantile_edges
from evaluator.stats.drift import DEFAULT_EPS, DriftResult, Histogram, count_categories, top_contributors
from evaluator.yamlsrc import (
    Node,
    Problems,
    as_yaml,
    check_keys,
    read_bool,
    read_duration,
    read_float,
    read_int,
    read_map,
    read_str,
)

SOURCES = ("values", "histogram")
MAX_SPANS = 5  # spans of the current window attached to a sample, for alert links


@dataclass(frozen=True)
class DistributionSpec:
    attribute: str  # values: the attribute; histogram: the <name> of <name>.histogram.bounds / .counts
    method: str = "psi"  # an evaluator.stats.registry name
    source: str = "values"  # values | histogram
    categorical: bool = False  # string values compared per category (psi, js, chi2)
    current: float = 6 * 3600.0  # the current window: (ts - current, ts] (seconds)
    baseline_window: float | None = 30 * 86400.0  # relative baseline: this long, ending where current starts ...
    baseline_range: tuple[float, float] | None = None  # ... or the absolute range (start, end] in unix seconds
    frozen: bool = False  # capture the baseline once per series, store it and reuse it
    bins: int = 10  # quantile bins from the baseline (numeric psi/js on raw values)
    fixed_bounds: tuple[float, ...] | None = None  # explicit inner bin bounds instead of quantile bins
    epsilon: float = DEFAULT_EPS  # floor for empty bins (psi, chi2)
    min_samples: int = 100  # per side; fewer is "no data"

    def baseline_bounds(self, ts: float) -> tuple[float, float]:
        """The baseline window (lo, hi] at evaluation time ts."""
        if self.baseline_range is not None:
            return self.baseline_range
        if self.baseline_window is None:
            raise RuleError("a distribution rule needs a baseline window or range")
        hi = ts - self.current
        return hi - self.baseline_window, hi


@dataclass(frozen=True)
class FrozenBaseline:
    """A captured baseline: inner bin bounds (numeric) or categories, and the share of each, with its size."""

    window_start: float
    window_end: float
    captured_at: float
    bounds: tuple[float, ...] | None
    categories: tuple[str, ...] | None
    proportions: tuple[float, ...]
    n: int

    def counts(self) -> npt.NDArray[np.int64]:
        return np.round(np.asarray(self.proportions, dtype=np.float64) * self.n).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"frozen": [self.window_start, self.window_end, self.captured_at, self.bounds, self.categories,
                           self.proportions, self.n]}

    @staticmethod
    def from_json(data: Any) -> FrozenBaseline | None:
        try:
            ws, we, ca, bounds, categories, props, n = data["frozen"]
            return FrozenBaseline(float(ws), float(we), float(ca), None if bounds is None else tuple(bounds),
                                  None if categories is None else tuple(categories), tuple(props), int(n))
        except (KeyError, TypeError, ValueError):
            return None

    def as_input(self) -> Histogram | dict[str, int]:
        """What the drift functions take: a histogram on the frozen bounds, or counts per category."""
        counts = self.counts()
        if self.categories is not None:
            return {c: int(k) for c, k in zip(self.categories, counts, strict=True)}
        return Histogram(np.asarray(self.bounds or (), dtype=np.float64), counts)


@dataclass
class _Side:
    """One window's data for one series: raw numbers, strings or a summed histogram, and its newest spans."""

    numbers: list[npt.NDArray[np.float64]]
    strings: list[str]
    histogram: Histogram | None
    spans: list[tuple[str, str]]
    problem: str = ""  # why this series' data cannot be judged (e.g. histograms of two bucket layouts)

    @property
    def n(self) -> int:
        if self.histogram is not None:
            return self.histogram.n
        return len(self.strings) + sum(a.size for a in self.numbers)

    def values(self) -> npt.NDArray[np.float64]:
        return np.concatenate(self.numbers) if self.numbers else np.empty(0, np.float64)


def _new_side() -> _Side:
    return _Side([], [], None, [])


# -- the kind ----------------------------------------------------------------------------------------------------

class DistributionKind:
    """Judges distribution rules at the slots of their group (see evaluator.rules.model.RuleKind)."""

    timeline = "slots"
    batched = False  # rule by rule: the engine calls it so, each within its own time budget

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any = None) -> Results:
        priors = priors_of(prior)

        def one(rule: Rule) -> KindResult:
            p = priors.get(rule.id)
            return self._evaluate(rule, float(ts), cur, p.series if p is not None else {})

        return evaluate_each(rules, one)

    def _evaluate(self, rule: Rule, ts: float, cur: duckdb.DuckDBPyConnection,
                  known: Mapping[SeriesKey, Any]) -> KindResult:
        spec = rule.spec
        if not isinstance(spec, DistributionSpec):
            raise RuleError(f"{rule.id}: a distribution rule needs a DistributionSpec, not {type(spec).__name__}")
        if rule.condition is None:
            raise RuleError(f"{rule.id}: a distribution rule needs op and threshold")
        method = registry.get(spec.method, categorical=spec.categorical)
        if method.needs_raw_values and (spec.source == "histogram" or spec.frozen):
            raise RuleError(f"{rule.id}: method {spec.method} needs raw values on both sides")
        b_lo, b_hi = spec.baseline_bounds(ts)
        current = self._collect(rule, cur, ts - spec.current, ts)
        frozen = self._load_frozen(rule, cur, known) if spec.frozen else {}
        # with a frozen baseline, the baseline window is read only for series not captured yet
        need_baseline = not spec.frozen or any(k not in frozen for k in current) or not current
        baseline = self._collect(rule, cur, b_lo, b_hi) if need_baseline else {}
        result = KindResult([])
        threshold = rule.condition.threshold
        for series in sorted(set(current) | set(baseline) | set(frozen)):
            cur_side = current.get(series) or _new_side()
            base_side = baseline.get(series) or _new_side()
            spans = tuple(cur_side.spans[-MAX_SPANS:])

            def nodata(why: str, reason: str, series: SeriesKey = series,
                       spans: tuple[tuple[str, str], ...] = spans) -> None:
                result.samples.append(Sample(series, ts, None, threshold, None, None, None, spans, why, reason))

            problem = cur_side.problem or base_side.problem
            if problem:
                nodata(problem, "bad_histogram")
                continue
            base_input: Any
            note = ""
            if spec.frozen:
                fb = frozen.get(series)
                if fb is None and base_side.n >= spec.min_samples:
                    fb = _capture(rule, series, base_side, ts, b_lo, b_hi)
                    result.memory[series] = fb.to_json()
                    result.records.append(_record(rule, series, fb))
                if fb is None:
                    nodata(f"n {cur_side.n}/{base_side.n} (current/baseline): the baseline has fewer than "
                           f"{spec.min_samples} values to freeze" + _gone(spec, b_lo, b_hi, base_side),
                           "too_few_values")
                    continue
                n_base = fb.n
                base_input = fb.as_input()
                note = f"; frozen baseline {_iso(fb.window_start)}..{_iso(fb.window_end)}"
            else:
                n_base = base_side.n
                base_input = _input(spec, base_side)
            if cur_side.n < spec.min_samples or n_base < spec.min_samples:
                nodata(f"n {cur_side.n}/{n_base} (current/baseline): fewer than {spec.min_samples} values on a "
                       f"side{note}" + ("" if spec.frozen else _gone(spec, b_lo, b_hi, base_side)), "too_few_values")
                continue
            if isinstance(base_input, Histogram) and cur_side.histogram is not None \
                    and not np.array_equal(base_input.bounds, cur_side.histogram.bounds):
                nodata(f"the current window's histograms have {_short(cur_side.histogram.bounds)}, the baseline's "
                       f"{_short(base_input.bounds)}; compare histograms of one bucket layout", "bad_histogram")
                continue
            try:
                drift = method(base_input, _input(spec, cur_side), **_params(method.func, spec, base_input))
            except ValueError as exc:
                nodata(f"{spec.method} cannot be computed: {exc}", "not_computable")
                continue
            value = float(drift.value)
            violated = rule.condition.violated(value)
            still = rule.resolve.violated(value) if rule.resolve is not None else None
            result.samples.append(Sample(series, ts, value, threshold, violated, still, None, spans,
                                         _detail(drift) + note))
        if not result.samples and not rule.group_by:
            result.samples.append(Sample((), ts, None, threshold, None, None, None, (),
                                         f"no values of {spec.attribute} in either window"
                                         + _gone(spec, b_lo, b_hi, _new_side()), "no_values"))
        return result

    # -- reading the store ---------------------------------------------------------------------------------------

    def _collect(self, rule: Rule, cur: duckdb.DuckDBPyConnection, lo: float, hi: float) -> dict[SeriesKey, _Side]:
        """Per series, the data of the spans the selector matches with end time in (lo, hi]."""
        spec: DistributionSpec = rule.spec
        out: dict[SeriesKey, _Side] = defaultdict(_new_side)
        if hi <= lo:
            return out
        lo_us, hi_us = to_us(lo), to_us(hi)
        group_by = tuple(rule.group_by)
        if spec.source == "values" and not spec.categorical:
            shape, where = shape_of(rule.selector, spec.attribute, group_by)
            runs = fetch_runs(cur, shape, [Member(where, lo_us, hi_us)])
            values = runs.value
            for series, idx in _by_series(runs, group_by).items():
                side = out[series]
                v = values[idx]
                side.numbers.append(v[~np.isnan(v)])
                side.spans.extend(_spans(runs, idx))
            return out
        if spec.source == "values":  # categorical: the attribute rides along as the last group column
            shape, where = shape_of(rule.selector, None, (*group_by, spec.attribute))
            runs = fetch_runs(cur, shape, [Member(where, lo_us, hi_us)])
            category = runs.groups[-1]
            keep = np.flatnonzero(category != "")
            runs = runs.take(keep)
            for series, idx in _by_series(runs, group_by).items():
                side = out[series]
                side.strings.extend(str(c) for c in runs.groups[-1][idx])
                side.spans.extend(_spans(runs, idx))
            return out
        # histogram: the run spans first, then their arrays
        shape, where = shape_of(rule.selector, None, group_by)
        runs = fetch_runs(cur, shape, [Member(where, lo_us, hi_us)])
        if not len(runs):
            return out
        kb, kc = f"{spec.attribute}.histogram.bounds", f"{spec.attribute}.histogram.counts"
        rows = cur.execute(
            "SELECT span_key, key, numbers FROM span_arrays WHERE key IN ($kb, $kc) "
            "AND time > make_timestamp($lo) AND time <= make_timestamp($hi) "
            "AND span_key IN (SELECT unnest($keys)) ORDER BY rowid",
            {"kb": kb, "kc": kc, "lo": lo_us, "hi": hi_us, "keys": [int(k) for k in runs.span_key]},
        ).fetchall()
        arrays: dict[int, dict[str, list[float] | None]] = defaultdict(dict)
        for span_key, key, numbers in rows:
            arrays[int(span_key)][key] = numbers  # the later duplicate wins, as for scalar attributes
        for series, idx in _by_series(runs, group_by).items():
            side = out[series]
            first = ""
            for i in idx:
                got = arrays.get(int(runs.span_key[i]))
                if not got:
                    continue
                span = f"span {runs.trace_id[i]}/{runs.span_id[i]}"
                if got.get(kb) is None or got.get(kc) is None:
                    have, miss = (kb, kc) if got.get(kb) is not None else (kc, kb)
                    side.problem = side.problem or f"{span} carries {have} but no numeric {miss}"
                    continue
                try:
                    h = Histogram(np.asarray(got[kb], dtype=np.float64), np.asarray(got[kc], dtype=np.float64))
                except ValueError as exc:
                    side.problem = side.problem or f"{span}: {exc}"
                    continue
                if side.histogram is None:
                    side.histogram, first = h, span
                elif not np.array_equal(side.histogram.bounds, h.bounds):
                    side.problem = side.problem or (
                        f"histograms with different bounds: {_short(h.bounds)} on {span}, "
                        f"{_short(side.histogram.bounds)} on {first}; sum only histograms of one bucket layout")
                    continue
                else:
                    side.histogram = Histogram(side.histogram.bounds, side.histogram.counts + h.counts)
                side.spans.append((str(runs.trace_id[i]), str(runs.span_id[i])))
        return out

    # -- frozen baselines ------------------------------------------------------------------------------------------

    @staticmethod
    def _load_frozen(rule: Rule, cur: duckdb.DuckDBPyConnection,
                     known: Mapping[SeriesKey, Any]) -> dict[SeriesKey, FrozenBaseline]:
        """The rule's captures: those in its series' memory, else those in frozen_baselines for its fingerprint."""
        out: dict[SeriesKey, FrozenBaseline] = {}
        rows = cur.execute(
            "SELECT series::VARCHAR, epoch_us(window_start), epoch_us(window_end), epoch_us(captured_at), bounds, "
            "categories, proportions, n FROM frozen_baselines WHERE rule_id = $r AND fingerprint = $f",
            {"r": rule.id, "f": rule.fingerprint},
        ).fetchall()
        for series, ws, we, ca, bounds, categories, props, n in rows:
            key: SeriesKey = tuple(sorted(json.loads(series).items()))
            out[key] = FrozenBaseline(ws / US, we / US, ca / US, None if bounds is None else tuple(bounds),
                                      None if categories is None else tuple(categories), tuple(props), int(n))
        for key, c in known.items():
            memory = getattr(c, "memory", None)
            fb = FrozenBaseline.from_json(memory) if memory is not None else None
            if fb is not None:
                out[key] = fb
        return out


def _capture(rule: Rule, series: SeriesKey, side: _Side, ts: float, lo: float, hi: float) -> FrozenBaseline:
    spec: DistributionSpec = rule.spec
    bounds: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None
    if spec.categorical:
        counted = count_categories(side.strings)
        categories = tuple(counted)
        counts = np.array([counted[c] for c in categories], dtype=np.int64)
    elif side.histogram is not None:
        bounds = tuple(float(b) for b in side.histogram.bounds)
        counts = side.histogram.counts
    else:
        values = side.values()
        edges = edges_from_bounds(spec.fixed_bounds) if spec.fixed_bounds is not None else \
            quantile_edges(values, spec.bins)
        bounds = tuple(float(b) for b in bounds_of(edges))
        counts = proportions(values, edges)[0]
    n = int(counts.sum())
    return FrozenBaseline(lo, hi, ts, bounds, categories, tuple(float(c) / n for c in counts), n)


def _record(rule: Rule, series: SeriesKey, fb: FrozenBaseline) -> Record:
    return Record("frozen_baselines", {
        "rule_id": rule.id, "fingerprint": rule.fingerprint, "series": series_json(series),
        "captured_at": _dt(fb.captured_at), "window_start": _dt(fb.window_start), "window_end": _dt(fb.window_end),
        "bounds": None if fb.bounds is None else list(fb.bounds),
        "categories": None if fb.categories is None else list(fb.categories),
        "proportions": list(fb.proportions), "n": fb.n})


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def _gone(spec: DistributionSpec, lo: float, hi: float, side: _Side) -> str:
    """A fixed baseline with no data left names its range: retention or a wrong range, not a healthy series."""
    if spec.baseline_range is None or side.n:
        return ""
    return f"; no data in the fixed baseline {_iso(lo)}..{_iso(hi)} (deleted by retention, or never sent)"


# -- helpers -------------------------------------------------------------------------------------------------------

def series_json(series: SeriesKey) -> str:
    """The series as the store writes it (same as evaluator.rules.engine.series_json)."""
    return json.dumps(dict(series), sort_keys=True, separators=(",", ":"))


def _by_series(runs: Runs, group_by: tuple[str, ...]) -> dict[SeriesKey, npt.NDArray[np.intp]]:
    """Row indices per series; the series come from the first len(group_by) group columns."""
    if not len(runs):
        return {}
    if not group_by:
        return {(): np.arange(len(runs))}
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    columns = runs.groups[:len(group_by)]
    for i in range(len(runs)):
        groups[tuple(str(g[i]) for g in columns)].append(i)
    return {series_key(group_by, k): np.asarray(v, dtype=np.intp) for k, v in groups.items()}


def _spans(runs: Runs, idx: npt.NDArray[np.intp]) -> list[tuple[str, str]]:
    return [(str(runs.trace_id[i]), str(runs.span_id[i])) for i in idx[-MAX_SPANS:]]


def _input(spec: DistributionSpec, side: _Side) -> Any:
    if side.histogram is not None:
        return side.histogram
    if spec.categorical:
        return side.strings
    return side.values()


def _params(func: Any, spec: DistributionSpec, base_input: Any) -> dict[str, Any]:
    """The binning and epsilon parameters the method accepts (histogram inputs bring their own bins)."""
    accepted = inspect.signature(func).parameters
    params: dict[str, Any] = {}
    if "eps" in accepted:
        params["eps"] = spec.epsilon
    if not isinstance(base_input, Histogram) and spec.source == "values":
        if "bins" in accepted:
            params["bins"] = spec.bins
        if "bounds" in accepted and spec.fixed_bounds is not None:
            params["bounds"] = list(spec.fixed_bounds)
    return params


def _detail(result: DriftResult) -> str:
    parts = [f"n {result.n_current}/{result.n_baseline} (current/baseline)"]
    if result.p_value is not None:
        parts.append(f"p-value {result.p_value:.3g}")
    parts += top_contributors(result)
    return "; ".join(parts)


def _short(bounds: npt.NDArray[np.float64]) -> str:
    shown = ", ".join(f"{b:g}" for b in bounds[:4]) + (", ..." if bounds.size > 4 else "")
    return f"{bounds.size} bounds [{shown}]"


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{seconds:g}"


# -- the YAML parser -------------------------------------------------------------------------------------------------

_KEYS = {"source", "attribute", "categorical", "method", "current", "baseline", "bins", "bounds", "epsilon",
         "min_samples", "op", "threshold", "resolve_threshold"}


def parse_distribution(node: Node, where: str, problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    """The fields of a `kind: distribution` rule (see the module docstring); every problem is reported with its
    position. Register with `loader.register_parser("distribution", parse_distribution)`."""
    from evaluator.rules.loader import COMMON_KEYS, _read_condition  # here: the loader may import this module

    check_keys(node, COMMON_KEYS | _KEYS, problems, where)
    kw: dict[str, Any] = {}
    attr_node = node.get("attribute")
    attribute = read_str(attr_node, f"{where}.attribute", problems)
    if attr_node is None:
        problems.add(node, f"{where}.attribute", "missing (the attribute, or the <name> of a histogram)")
    elif attribute is not None and not attribute.strip():
        problems.add(attr_node, f"{where}.attribute", "must not be empty")
    source = read_str(node.get("source"), f"{where}.source", problems) or "values"
    if source not in SOURCES:
        problems.add(node.get("source"), f"{where}.source", f"must be one of {', '.join(SOURCES)}, not {source!r}")
        source = "values"
    categorical = bool(read_bool(node.get("categorical"), f"{where}.categorical", problems))
    if categorical and source == "histogram":
        problems.add(node.get("categorical"), f"{where}.categorical",
                     "histograms are numeric; categorical needs source values")
    method_node = node.get("method")
    method_name = read_str(method_node, f"{where}.method", problems)
    method: registry.DriftMethod | None = None
    if method_node is None:
        problems.add(node, f"{where}.method", f"missing (one of {', '.join(registry.names())})")
    elif method_name is not None:
        try:
            method = registry.get(method_name, categorical=categorical)
        except ValueError as exc:
            problems.add(method_node, f"{where}.method", str(exc))
    if method is not None and method.needs_raw_values and source == "histogram":
        problems.add(method_node, f"{where}.method",
                     f"{method.name} needs raw values; with source histogram use psi or js")
    cur_node = node.get("current")
    current = read_duration(cur_node, f"{where}.current", problems)
    if cur_node is None:
        problems.add(node, f"{where}.current", "missing (the current window, e.g. 6h)")
    elif current is not None and current <= 0:
        problems.add(cur_node, f"{where}.current", "must be above 0")
    elif current is not None:
        kw["current"] = current
    _parse_baseline_window(node, where, problems, kw, method)
    bins_node, bounds_node = node.get("bins"), node.get("bounds")
    if bins_node is not None and bounds_node is not None:
        problems.add(bounds_node, f"{where}.bounds", "give bins (quantile bins) or bounds (fixed bins), not both")
    for key, child in (("bins", bins_node), ("bounds", bounds_node)):
        if child is None:
            continue
        if categorical:
            problems.add(child, f"{where}.{key}", "categorical values are compared per category, without bins")
        elif source == "histogram":
            problems.add(child, f"{where}.{key}", "a histogram brings its own bounds")
        elif method is not None and "bins" not in inspect.signature(method.func).parameters:
            problems.add(child, f"{where}.{key}", f"{method.name} does not bin its values")
    bins = read_int(bins_node, f"{where}.bins", problems)
    if bins is not None and bins < 2:
        problems.add(bins_node, f"{where}.bins", f"must be at least 2, got {bins}")
    elif bins is not None:
        kw["bins"] = bins
    if bounds_node is not None:
        if not bounds_node.is_list():
            problems.add(bounds_node, f"{where}.bounds", "must be a list of numbers")
        else:
            read = [read_float(b, f"{where}.bounds", problems) for b in bounds_node.value]
            values = [v for v in read if v is not None]
            if values and len(values) == len(read):
                try:
                    kw["fixed_bounds"] = tuple(float(b) for b in check_bounds(values))
                except ValueError as exc:
                    problems.add(bounds_node, f"{where}.bounds", str(exc))
            elif not read:
                problems.add(bounds_node, f"{where}.bounds", "must not be empty")
    eps_node = node.get("epsilon")
    if eps_node is not None and isinstance(eps_node.value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            eps_node = Node(float(eps_node.value), eps_node.file, eps_node.line)
    eps = read_float(eps_node, f"{where}.epsilon", problems)
    if eps is not None and not 0 < eps < 1:
        problems.add(eps_node, f"{where}.epsilon", f"must be in (0, 1), got {eps}")
    elif eps is not None and method is not None and "eps" not in inspect.signature(method.func).parameters:
        problems.add(eps_node, f"{where}.epsilon", f"{method.name} has no empty-bin epsilon (psi and chi2 do)")
    elif eps is not None:
        kw["epsilon"] = eps
    ms = read_int(node.get("min_samples"), f"{where}.min_samples", problems, minimum=1)
    if ms is not None:
        kw["min_samples"] = ms
    condition, resolve = _read_condition(node, where, problems)
    spec = DistributionSpec(attribute or "", method=method_name or "psi", source=source, categorical=categorical,
                            **kw)
    return spec, condition, resolve


def _parse_baseline_window(node: Node, where: str, problems: Problems, kw: dict[str, Any],
                           method: registry.DriftMethod | None) -> None:
    bw = f"{where}.baseline"
    b_node = node.get("baseline")
    if b_node is None:
        problems.add(node, bw, "missing ({window: 30d} or {from: <ISO>, to: <ISO>}, optionally frozen: true)")
        return
    b = read_map(b_node, bw, problems)
    if b is None:
        return
    check_keys(b, {"window", "from", "to", "frozen"}, problems, bw)
    has_window = b.get("window") is not None
    has_range = b.get("from") is not None or b.get("to") is not None
    if has_window and has_range:
        problems.add(b, bw, "give window (relative) or from/to (absolute), not both")
    elif not has_window and not has_range:
        problems.add(b, bw, "give window (e.g. 30d, before the current window) or from and to")
    if has_window:
        window = read_duration(b.get("window"), f"{bw}.window", problems)
        if window is not None and window <= 0:
            problems.add(b.get("window"), f"{bw}.window", "must be above 0")
        elif window is not None:
            kw["baseline_window"] = window
    if has_range:
        start = _read_time(b.get("from"), f"{bw}.from", b, problems)
        end = _read_time(b.get("to"), f"{bw}.to", b, problems)
        if start is not None and end is not None:
            if start >= end:
                problems.add(b, bw, "from must be before to")
            else:
                kw["baseline_range"] = (start, end)
                kw["baseline_window"] = None
    frozen = read_bool(b.get("frozen"), f"{bw}.frozen", problems)
    if frozen:
        if method is not None and method.needs_raw_values:
            problems.add(b.get("frozen"), f"{bw}.frozen",
                         f"{method.name} needs the baseline's raw values; a frozen baseline keeps only bins and "
                         "proportions (use psi or js, or an unfrozen baseline)")
        kw["frozen"] = True


def _read_time(node: Node | None, key: str, parent: Node, problems: Problems) -> float | None:
    """An absolute time: ISO 8601 (UTC unless it says otherwise) or unix seconds."""
    if node is None:
        problems.add(parent, key, "missing")
        return None
    v = node.value
    if isinstance(v, datetime):
        return (v if v.tzinfo is not None else v.replace(tzinfo=UTC)).timestamp()
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day, tzinfo=UTC).timestamp()
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    problems.add(node, key,
                 f"must be an ISO 8601 time (e.g. 2026-10-01T00:00:00Z) or unix seconds, got {as_yaml(node)}")
    return None


__all__ = ["DistributionKind", "DistributionSpec", "FrozenBaseline", "parse_distribution"]
