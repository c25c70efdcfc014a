"""prediction_quality (rung 4): how good a binary classifier's scores were, once their labels have arrived.

Predictions are spans the rule's selector matches that carry the prediction id and the score (the probability
of the positive class); labels are spans that carry the same prediction id attribute and the label (0/1),
usually arriving long after (chargebacks: about 30 days). Attribute names are per rule (`attributes`).

Judged at the evaluation time ts, one Sample per series (at = ts, no run_key), like absence:

- The matured window is the predictions with end time in (ts - label_delay - window, ts - label_delay]: a
  prediction younger than label_delay is not judged, so a fresh window is not scored on the few labels that
  came early. A span without the id or the score is not a prediction; when one id was predicted twice in the
  window, the latest prediction (end time, then span_key) counts.
- Labels are ANY span carrying the label attribute and the id attribute with end time <= ts: labels are not
  restricted by the rule's selector (they come from another service: a chargeback feed, a review tool) nor by
  time from below (a label may arrive before its prediction: it is still joined). A label may come twice: the
  latest (end time, then span_key) wins. Label values other than 0 and 1 are ignored. Ids are joined as text
  (a numeric id renders like the group_by values: 42.0 as "42"), so a string id on one side and a number on
  the other still match.
- Predictions LEFT JOIN labels on the id, in DuckDB; Python gets (score, label or NULL, group_by values) and
  computes the metric with evaluator.stats.classification. coverage = labelled / predictions of the series.
- value = the metric over the labelled predictions (metric `coverage`: the coverage itself, judged whenever
  the series has predictions, so "labels stopped arriving" is its own alert). "No data" (violated None, value
  None) when labelled < min_labels, coverage < min_coverage, or the metric is undefined (auc over one class,
  recall without positives): never "ok" on too little evidence. The unjudged value, when computable, is in
  the detail. A rule without group_by and no prediction in the window yields its one series as no data.
- violated = rule.condition on the value; rule.resolve (if set) gives still_violated.

History. Every evaluation returns one `quality_values` row per series (evaluated_at = ts, the window's bounds,
metric, value, predictions, labelled, coverage, details JSON), which the store records with the evaluation: as
late labels arrive, the same window is judged again and every value is kept. `eval` and `replay` keep their
state in memory and record nothing in the file.

Batching: rules with the same selector, group_by, attributes, window and label_delay (e.g. an auc rule and a
coverage rule on one model) share one query; a failing rule (or query) is a RuleError for its rules only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from evaluator.rules.model import Condition, KindResult, Record, Rule, RuleError, Sample, Selector, SeriesKey
from evaluator.rules.select import US, Results, add_group_by, render_number, rule_error, series_key, to_us
from evaluator.stats.classification import METRICS, ece
from evaluator.yamlsrc import (
    Node,
    Problems,
    check_keys,
    read_duration,
    read_float,
    read_int,
    read_map,
    read_str,
)

PQ_METRICS = ("auc", "brier", "ece", "log_loss", "accuracy", "precision", "recall", "coverage")
THRESHOLD_METRICS = ("accuracy", "precision", "recall")
ATTRIBUTE_KEYS = ("prediction_id", "score", "label")


@dataclass(frozen=True)
class PredictionQualitySpec:
    metric: str  # auc | brier | ece | log_loss | accuracy | precision | recall | coverage
    window: float  # seconds of predictions judged together, e.g. 7d
    label_delay: float  # seconds a prediction must be old before it is judged (labels have arrived)
    min_labels: int = 100  # fewer labelled predictions in a series: no data
    min_coverage: float = 0.0  # labelled / predictions below this: no data (not for metric coverage)
    threshold_score: float = 0.5  # accuracy/precision/recall: score >= threshold_score predicts positive
    ece_bins: int = 10  # ece: equal-width bins of [0, 1]
    prediction_id: str = "ml.prediction_id"
    score: str = "ml.score"
    label: str = "ml.label"


# -- YAML ----------------------------------------------------------------------------------------------------------

_KEYS = {"metric", "window", "label_delay", "min_labels", "min_coverage", "threshold_score", "ece_bins",
         "attributes", "op", "threshold", "resolve_threshold"}


def parse_prediction_quality(node: Node, where: str,
                             problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    """The loader's parser for `kind: prediction_quality` (see the module docstring for the meaning)."""
    from evaluator.rules import loader  # lazy: the loader imports this module to register the parser

    check_keys(node, loader.COMMON_KEYS | _KEYS, problems, where)
    kw: dict[str, Any] = {}

    metric_node = node.get("metric")
    metric = read_str(metric_node, f"{where}.metric", problems)
    if metric_node is None:
        problems.add(node, f"{where}.metric", f"missing (one of {', '.join(PQ_METRICS)})")
    elif metric is not None and metric not in PQ_METRICS:
        problems.add(metric_node, f"{where}.metric",
                     f"unknown metric {metric!r} (use one of {', '.join(PQ_METRICS)})")
        metric = None

    for key, why in (("window", "how much prediction time is judged together, e.g. 7d"),
                     ("label_delay", "how old a prediction must be before its label is expected, e.g. 30d "
                                     "(0s if labels arrive with the prediction)")):
        child = node.get(key)
        if child is None:
            problems.add(node, f"{where}.{key}", f"missing ({why})")
            continue
        value = read_duration(child, f"{where}.{key}", problems)
        if value is None:
            continue
        if value < 0 or (key == "window" and value == 0):
            problems.add(child, f"{where}.{key}", "must be above 0" if key == "window" else "must not be negative")
            continue
        kw[key] = value

    min_labels = read_int(node.get("min_labels"), f"{where}.min_labels", problems, minimum=1)
    if min_labels is not None:
        kw["min_labels"] = min_labels
    cov_node = node.get("min_coverage")
    min_cov = read_float(cov_node, f"{where}.min_coverage", problems)
    if min_cov is not None and not 0.0 <= min_cov <= 1.0:
        problems.add(cov_node, f"{where}.min_coverage", f"must be between 0 and 1 (a share), got {min_cov:g}")
    elif min_cov is not None:
        kw["min_coverage"] = min_cov
    if cov_node is not None and metric == "coverage":
        problems.add(cov_node, f"{where}.min_coverage", "does not apply to metric coverage (use threshold)")

    ts_node = node.get("threshold_score")
    if ts_node is not None:
        if metric is not None and metric not in THRESHOLD_METRICS:
            problems.add(ts_node, f"{where}.threshold_score",
                         f"applies to metrics {', '.join(THRESHOLD_METRICS)}, not {metric}")
        t = read_float(ts_node, f"{where}.threshold_score", problems)
        if t is not None:
            kw["threshold_score"] = t
    bins_node = node.get("ece_bins")
    if bins_node is not None:
        if metric is not None and metric != "ece":
            problems.add(bins_node, f"{where}.ece_bins", f"applies to metric ece, not {metric}")
        bins = read_int(bins_node, f"{where}.ece_bins", problems, minimum=1)
        if bins is not None:
            kw["ece_bins"] = bins

    attrs = read_map(node.get("attributes"), f"{where}.attributes", problems)
    if attrs is not None:
        check_keys(attrs, set(ATTRIBUTE_KEYS), problems, f"{where}.attributes")
        for key in ATTRIBUTE_KEYS:
            child = attrs.get(key)
            name = read_str(child, f"{where}.attributes.{key}", problems)
            if child is not None and name is not None and not name.strip():
                problems.add(child, f"{where}.attributes.{key}", "must not be empty")
            elif name is not None:
                kw[key] = name
        names = [kw.get(k, getattr(PredictionQualitySpec, k)) for k in ATTRIBUTE_KEYS]
        if len(set(names)) < len(names):
            problems.add(attrs, f"{where}.attributes", "prediction_id, score and label must be different attributes")

    condition, resolve = loader._read_condition(node, where, problems)
    if metric == "coverage" and condition is not None and isinstance(condition.threshold, float) \
            and not 0.0 <= condition.threshold <= 1.0:
        problems.add(node.get("threshold"), f"{where}.threshold", "coverage is a share between 0 and 1")
    spec = PredictionQualitySpec(metric=metric or "", window=kw.pop("window", 0.0),
                                 label_delay=kw.pop("label_delay", 0.0), **kw)
    return spec, condition, resolve


# -- the query -----------------------------------------------------------------------------------------------------

def _render_sql(expr: str) -> str:
    """A numeric id as text, integral values without '.0' (like render_number), so ids join as text."""
    return (f"CASE WHEN {expr} = trunc({expr}) AND abs({expr}) < 1e15 THEN CAST(CAST({expr} AS BIGINT) AS VARCHAR) "
            f"ELSE CAST({expr} AS VARCHAR) END")


_IN_WINDOW = "time > make_timestamp($lo) AND time <= make_timestamp($hi)"


def _attr(name: str, table: str, key_param: str, cond: str = _IN_WINDOW) -> str:
    # the last occurrence of a key repeated in one span wins, as in select.py
    return (f"{name} AS (SELECT span_key, arg_max(value, rowid) AS value FROM {table} "
            f"WHERE key = ${key_param} AND {cond} GROUP BY span_key)")


@dataclass(frozen=True)
class _DataKey:
    """What a rule reads; rules with equal keys share one query."""

    span: str | None
    service: str | None
    where: tuple[tuple[str, str | float], ...]
    group_by: tuple[str, ...]
    prediction_id: str
    score: str
    label: str
    window: float
    label_delay: float


def _data_key(rule: Rule) -> _DataKey:
    spec = rule.spec
    if not isinstance(spec, PredictionQualitySpec):
        raise RuleError(f"{rule.id}: a prediction_quality rule needs a PredictionQualitySpec, "
                        f"not {type(spec).__name__}")
    if spec.metric not in PQ_METRICS:
        raise RuleError(f"{rule.id}: unknown metric {spec.metric!r}")
    if not spec.window > 0 or spec.label_delay < 0:
        raise RuleError(f"{rule.id}: window must be above 0 and label_delay not negative")
    if rule.condition is None:
        raise RuleError(f"{rule.id}: a prediction_quality rule needs op and threshold")
    sel: Selector = rule.selector
    where = tuple(sorted(((k, float(v) if isinstance(v, bool | int | float) else str(v)) for k, v in sel.where),
                         key=lambda kv: (kv[0], str(kv[1]))))
    return _DataKey(sel.span, sel.service, where, tuple(rule.group_by), spec.prediction_id, spec.score, spec.label,
                    float(spec.window), float(spec.label_delay))


def _build_sql(key: _DataKey) -> str:
    ctes = []
    span_filter = ["end_time > make_timestamp($lo)", "end_time <= make_timestamp($hi)"]
    if key.span is not None:
        span_filter.append("name = $name")
    if key.service is not None:
        span_filter.append("service_name = $service")
    ctes.append(f"sp AS (SELECT span_key, end_time FROM spans WHERE {' AND '.join(span_filter)})")
    ctes.append(_attr("sc", "span_numbers", "sk"))
    ctes.append(_attr("ids", "span_strings", "pk"))
    ctes.append(_attr("idn", "span_numbers", "pk"))
    joins = ["sp JOIN sc ON sc.span_key = sp.span_key", "LEFT JOIN ids ON ids.span_key = sp.span_key",
             "LEFT JOIN idn ON idn.span_key = sp.span_key"]
    for i, (_, v) in enumerate(key.where):
        ctes.append(_attr(f"w{i}", "span_strings" if isinstance(v, str) else "span_numbers", f"wk{i}"))
        joins.append(f"JOIN w{i} ON w{i}.span_key = sp.span_key AND w{i}.value = $wv{i}")
    cols = ["sp.span_key AS span_key", "sp.end_time AS time", "sc.value AS score",
            f"coalesce(ids.value, {_render_sql('idn.value')}) AS id"]
    add_group_by(len(key.group_by), ctes, joins, cols, _attr)
    # one prediction per id: the latest
    ctes.append(f"pred AS (SELECT {', '.join(cols)} FROM {' '.join(joins)} "
                "WHERE ids.value IS NOT NULL OR idn.value IS NOT NULL "
                "QUALIFY row_number() OVER (PARTITION BY id ORDER BY sp.end_time DESC, sp.span_key DESC) = 1)")
    # labels: any span up to ts with the label and the id; not bounded below, not restricted by the selector
    upto = "time <= make_timestamp($ts)"
    ctes.append("lab AS (SELECT span_key, arg_max(value, rowid) AS label, max(time) AS time FROM span_numbers "
                f"WHERE key = $lk AND {upto} GROUP BY span_key HAVING label IN (0, 1))")
    ctes.append("lids AS (SELECT span_key, arg_max(value, rowid) AS value FROM span_strings "
                f"WHERE key = $pk AND {upto} AND span_key IN (SELECT span_key FROM lab) GROUP BY span_key)")
    ctes.append("lidn AS (SELECT span_key, arg_max(value, rowid) AS value FROM span_numbers "
                f"WHERE key = $pk AND {upto} AND span_key IN (SELECT span_key FROM lab) GROUP BY span_key)")
    ctes.append("labels AS (SELECT coalesce(lids.value, " + _render_sql("lidn.value") + ") AS id, lab.label "
                "FROM lab LEFT JOIN lids ON lids.span_key = lab.span_key "
                "LEFT JOIN lidn ON lidn.span_key = lab.span_key "
                "WHERE lids.value IS NOT NULL OR lidn.value IS NOT NULL "
                "QUALIFY row_number() OVER (PARTITION BY id ORDER BY lab.time DESC, lab.span_key DESC) = 1)")
    out = ["pred.score AS score", "labels.label AS label"]
    out += [f"pred.gs{i} AS gs{i}, pred.gn{i} AS gn{i}" for i in range(len(key.group_by))]
    return (f"WITH {', '.join(ctes)}\nSELECT {', '.join(out)} FROM pred LEFT JOIN labels ON labels.id = pred.id\n"
            "ORDER BY pred.time, pred.span_key")


def _params(key: _DataKey, ts_us: int) -> dict[str, object]:
    hi = ts_us - to_us(key.label_delay)
    p: dict[str, object] = {"lo": hi - to_us(key.window), "hi": hi, "ts": ts_us, "sk": key.score,
                            "pk": key.prediction_id, "lk": key.label}
    if key.span is not None:
        p["name"] = key.span
    if key.service is not None:
        p["service"] = key.service
    for i, (k, v) in enumerate(key.where):
        p[f"wk{i}"], p[f"wv{i}"] = k, v
    for i, g in enumerate(key.group_by):
        p[f"g{i}"] = g
    return p


@dataclass(frozen=True)
class _Joined:
    """Predictions of the window, per series: scores, and labels as floats (NaN: not labelled)."""

    series: dict[SeriesKey, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]


def _fetch(cur: duckdb.DuckDBPyConnection, key: _DataKey, ts_us: int) -> _Joined:
    res = cur.execute(_build_sql(key), _params(key, ts_us)).fetchnumpy()
    scores = np.ma.filled(np.ma.asarray(res["score"], dtype=np.float64), np.nan)
    labels = np.ma.filled(np.ma.asarray(res["label"], dtype=np.float64), np.nan)
    if not key.group_by:
        return _Joined({(): (scores, labels)} if len(scores) else {})
    rendered = [_render_group(res[f"gs{i}"], res[f"gn{i}"]) for i in range(len(key.group_by))]
    rows: dict[SeriesKey, list[int]] = {}
    cache: dict[tuple[str, ...], SeriesKey] = {}
    for i in range(len(scores)):
        values = tuple(str(g[i]) for g in rendered)
        sk = cache.get(values)
        if sk is None:
            sk = cache[values] = series_key(key.group_by, values)
        rows.setdefault(sk, []).append(i)
    return _Joined({sk: (scores[idx], labels[idx]) for sk, idx in rows.items()})


def _render_group(strings: Any, numbers: Any) -> list[str]:
    s_mask, n_mask = np.ma.getmaskarray(strings), np.ma.getmaskarray(numbers)
    s_data, n_data = np.ma.getdata(strings), np.ma.getdata(numbers)
    return [str(s_data[i]) if not s_mask[i] else render_number(float(n_data[i])) if not n_mask[i] else ""
            for i in range(len(s_data))]


# -- judging -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Judgement:
    value: float | None  # the judged value; None: no data
    unjudged: float | None  # the metric when computable but not judged (too few labels, low coverage)
    predictions: int
    labelled: int
    coverage: float | None
    reason: str  # why there is no data ("" when judged)
    details: dict[str, Any]


def _compute(spec: PredictionQualitySpec, scores: npt.NDArray[np.float64],
             labels: npt.NDArray[np.float64]) -> tuple[float, dict[str, Any]]:
    if spec.metric == "ece":
        cal = ece(scores, labels, spec.ece_bins)
        bins = [{"lower": b.lower, "upper": b.upper, "count": b.count, "mean_score": b.mean_score,
                 "positive_rate": b.positive_rate} for b in cal.bins]
        return cal.value, {"bins": bins}
    metric = METRICS[spec.metric]
    if metric.uses_threshold:
        return float(metric.func(scores, labels, threshold=spec.threshold_score)), {
            "threshold_score": spec.threshold_score}
    return float(metric.func(scores, labels)), {}


def _judge(spec: PredictionQualitySpec, scores: npt.NDArray[np.float64],
           labels: npt.NDArray[np.float64]) -> _Judgement:
    n = len(scores)
    mask = ~np.isnan(labels)
    k = int(mask.sum())
    coverage = k / n if n else None
    if spec.metric == "coverage":
        if coverage is None:
            return _Judgement(None, None, 0, 0, None, "no predictions in the window", {})
        return _Judgement(coverage, None, n, k, coverage, "", {})
    value: float | None = None
    details: dict[str, Any] = {}
    error = ""
    if k:
        try:
            value, details = _compute(spec, scores[mask], labels[mask])
        except ValueError as exc:
            error = str(exc)
    if n == 0:
        reason = "no predictions in the window"
    elif k < spec.min_labels:
        reason = f"{k} labelled, below min_labels {spec.min_labels}"
    elif coverage is not None and coverage < spec.min_coverage:
        reason = f"coverage {coverage:.1%} below min_coverage {spec.min_coverage:.1%}"
    elif value is None or not math.isfinite(value):
        reason = f"{spec.metric} undefined: {error or 'not finite'}"
        value = None
    else:
        return _Judgement(value, None, n, k, coverage, "", details)
    return _Judgement(None, value, n, k, coverage, reason, details)


def _reason_code(reason: str) -> str:
    """The short code of a "no data" reason, for the per-rule and reason counter."""
    if reason.startswith("no predictions"):
        return "no_predictions"
    if reason.startswith("coverage"):
        return "low_coverage"
    if "below min_labels" in reason:
        return "too_few_labels"
    if "undefined" in reason:
        return "undefined_metric"
    return ""


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _short_bins(bins: Sequence[dict[str, Any]]) -> str:
    """Non-empty reliability bins as 'lower-upper: mean score -> positive rate (n)'."""
    parts = [f"{b['lower']:.2g}-{b['upper']:.2g}: {b['mean_score']:.3f}->{b['positive_rate']:.3f} (n {b['count']})"
             for b in bins if b["count"]]
    return "; ".join(parts)


def _detail(spec: PredictionQualitySpec, j: _Judgement) -> str:
    if j.predictions == 0:
        return "no predictions in the matured window"
    counts = (f"{j.labelled} labelled of {j.predictions} predictions "
              f"(coverage {j.coverage:.0%})" if j.coverage is not None else "")
    if spec.metric == "coverage":
        return f"coverage {j.coverage:.1%}: {counts}"
    shown = j.value if j.value is not None else j.unjudged
    head = f"{spec.metric} {_fmt(shown)} over {counts}" if shown is not None else f"{spec.metric} over {counts}"
    if spec.metric == "ece" and "bins" in j.details:
        head += f"; reliability {_short_bins(j.details['bins'])}"
    if j.reason:
        head += f"; not judged: {j.reason}"
    return head


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / US, UTC).replace(tzinfo=None)


class PredictionQualityKind:
    """Judges prediction_quality rules at the slots of their group (see evaluator.rules.model.RuleKind)."""

    timeline = "slots"

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection, prior: Any = None) -> Results:
        ts = float(ts)
        ts_us = to_us(ts)
        out: Results = {}
        fetched: dict[_DataKey, _Joined | Exception] = {}
        for rule in rules:
            try:
                key = _data_key(rule)
                if key not in fetched:
                    try:
                        fetched[key] = _fetch(cur, key, ts_us)
                    except Exception as exc:  # every rule of this key gets the error
                        fetched[key] = exc
                data = fetched[key]
                if isinstance(data, Exception):
                    raise data
                out[rule.id] = self._samples(rule, key, data, ts, ts_us)
            except Exception as exc:
                out[rule.id] = rule_error(rule, exc)
        return out

    @staticmethod
    def _samples(rule: Rule, key: _DataKey, data: _Joined, ts: float, ts_us: int) -> KindResult:
        spec: PredictionQualitySpec = rule.spec
        assert rule.condition is not None
        hi_us = ts_us - to_us(spec.label_delay)
        lo_us = hi_us - to_us(spec.window)
        series = dict(data.series)
        if not series and not rule.group_by:
            empty = np.empty(0, np.float64)
            series[()] = (empty, empty)
        samples: list[Sample] = []
        records: list[Record] = []
        for sk in sorted(series):
            scores, labels = series[sk]
            j = _judge(spec, scores, labels)
            detail = _detail(spec, j)
            violated = still = None
            if j.value is not None:
                violated = rule.condition.violated(j.value)
                if rule.resolve is not None:
                    still = rule.resolve.violated(j.value)
            samples.append(Sample(sk, ts, j.value, rule.condition.threshold, violated, still, None, (), detail,
                                  _reason_code(j.reason)))
            details = {"window": spec.window, "label_delay": spec.label_delay, **j.details}
            if j.reason:
                details["no_data"] = j.reason
            if j.unjudged is not None:
                details["unjudged_value"] = j.unjudged
            records.append(Record("quality_values", {
                "rule_id": rule.id, "series": json.dumps(dict(sk), sort_keys=True, separators=(",", ":")),
                "evaluated_at": _dt(ts_us), "window_start": _dt(lo_us), "window_end": _dt(hi_us),
                "metric": spec.metric, "value": j.value, "predictions": j.predictions, "labelled": j.labelled,
                "coverage": j.coverage, "details": json.dumps(details)}))
        return KindResult(samples, records=records)


__all__ = ["PQ_METRICS", "PredictionQualityKind", "PredictionQualitySpec", "parse_prediction_quality"]
