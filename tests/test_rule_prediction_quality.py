"""prediction_quality rules over a real store: metrics equal to scikit-learn on the joined data, maturity (only
predictions older than label_delay are judged), the label join (early, duplicate, missing, mixed-type ids),
no data below min_labels / min_coverage, coverage as a metric, group_by, the quality_values history, a
read-only store, the YAML parser's errors, and an end-to-end run through the engine where scores decouple from
the labels and the AUC rule fires only once those predictions' labels have matured."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, precision_score, recall_score, roc_auc_score

from evaluator.rules.backends import DuckDBState
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.kinds.prediction_quality import (
    PredictionQualityKind,
    PredictionQualitySpec,
    parse_prediction_quality,
)
from evaluator.rules.model import Condition, KindResult, Rule, RuleError, RuleGroup, RuleSet, Sample, Selector
from evaluator.stats.classification import ece
from evaluator.store.store import Store, StoreSettings
from evaluator.yamlsrc import Problems, parse_yaml

DAY = 86400.0
HOUR = 3600.0
DAY0 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()
SPAN, SERVICE = "model.predict", "fraud-model"
LABEL_SPAN, LABEL_SERVICE = "chargeback.label", "chargeback-feed"
MODEL = Selector(span=SPAN, service=SERVICE)
KIND = PredictionQualityKind()


# -- builders ------------------------------------------------------------------------------------------------------

def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


class Data:
    """Prediction and label spans, inserted in bulk (pyarrow) on flush()."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self.cur = cur
        self.key = 0
        self.spans: list[dict[str, Any]] = []
        self.numbers: list[dict[str, Any]] = []
        self.strings: list[dict[str, Any]] = []

    def span(self, end: float, attrs: dict[str, Any], name: str, service: str) -> None:
        self.key += 1
        t = _dt(end)
        self.spans.append({"span_key": self.key, "trace_id": f"{self.key:032x}", "span_id": f"{self.key:016x}",
                           "parent_span_id": None, "name": name, "kind": 1, "start_time": t, "end_time": t,
                           "status_code": 1, "status_message": None, "service_name": service,
                           "scope_name": "tests", "resource_attributes": "{}", "received_at": t})
        for k, v in attrs.items():
            row = {"span_key": self.key, "time": t, "key": k, "value": v}
            (self.strings if isinstance(v, str) else self.numbers).append(row)

    def prediction(self, end: float, pid: str | float, score: float, **attrs: Any) -> None:
        self.span(end, {"ml.prediction_id": pid, "ml.score": score, **attrs}, SPAN, SERVICE)

    def label(self, end: float, pid: str | float, label: float) -> None:
        self.span(end, {"ml.prediction_id": pid, "ml.label": label}, LABEL_SPAN, LABEL_SERVICE)

    def flush(self) -> None:
        ts = pa.timestamp("us")
        tables = {
            "spans": pa.Table.from_pylist(self.spans, schema=pa.schema([
                ("span_key", pa.int64()), ("trace_id", pa.string()), ("span_id", pa.string()),
                ("parent_span_id", pa.string()), ("name", pa.string()), ("kind", pa.int32()),
                ("start_time", ts), ("end_time", ts), ("status_code", pa.int32()), ("status_message", pa.string()),
                ("service_name", pa.string()), ("scope_name", pa.string()), ("resource_attributes", pa.string()),
                ("received_at", ts)])),
            "span_numbers": pa.Table.from_pylist(self.numbers, schema=pa.schema([
                ("span_key", pa.int64()), ("time", ts), ("key", pa.string()), ("value", pa.float64())])),
            "span_strings": pa.Table.from_pylist(self.strings, schema=pa.schema([
                ("span_key", pa.int64()), ("time", ts), ("key", pa.string()), ("value", pa.string())])),
        }
        for name, table in tables.items():
            if table.num_rows:
                self.cur.register("new_rows", table)
                self.cur.execute(f"INSERT INTO {name} SELECT * FROM new_rows")
                self.cur.unregister("new_rows")
        self.spans, self.numbers, self.strings = [], [], []


@pytest.fixture
def data(cur: duckdb.DuckDBPyConnection) -> Data:
    return Data(cur)


def pq_rule(metric: str = "auc", *, name: str | None = None, op: str = "<", threshold: float = 0.86,
            group_by: tuple[str, ...] = (), selector: Selector = MODEL, **spec: Any) -> Rule:
    kw: dict[str, Any] = {"window": 2 * DAY, "label_delay": 3 * DAY, "min_labels": 10}
    kw.update(spec)
    return Rule(name=name or metric, group="g", kind="prediction_quality", rung="prediction_quality",
                owner="ml-platform", severity="page", spec=PredictionQualitySpec(metric=metric, **kw),
                condition=Condition(op, threshold), selector=selector, group_by=group_by)


def samples(result: dict[str, Any], r: Rule) -> list[Sample]:
    got = result[r.id]
    assert not isinstance(got, RuleError), got
    return got.samples if isinstance(got, KindResult) else got


def one(result: dict[str, list[Sample] | RuleError], r: Rule) -> Sample:
    got = samples(result, r)
    assert len(got) == 1, got
    return got[0]


TS = DAY0 + 10 * DAY  # evaluation time in the unit tests: window (DAY0 + 5d, DAY0 + 7d]
IN_WINDOW = DAY0 + 6 * DAY


# -- known answers -------------------------------------------------------------------------------------------------

def test_every_metric_equals_sklearn_on_the_joined_data(cur: duckdb.DuckDBPyConnection, data: Data) -> None:
    rng = np.random.default_rng(7)
    n = 400
    y = rng.random(n) < 0.3
    scores = np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0.0, 1.0)
    scores[:3] = [0.0, 1.0, 0.5]  # edges: log_loss clipping, the 0.5 threshold
    labelled = rng.random(n) < 0.85
    for i in range(n):
        t = IN_WINDOW + i * 60.0
        data.prediction(t, f"p{i}", float(scores[i]))
        if labelled[i]:
            data.label(t + DAY, f"p{i}", float(y[i]))
    # outside the window or unrelated: must not change anything
    data.prediction(TS - DAY, "young", 0.99)  # not matured
    data.label(TS - DAY, "young", 0.0)
    data.prediction(DAY0 + 4 * DAY, "old", 0.99)  # before the window
    data.label(DAY0 + 4.5 * DAY, "old", 0.0)
    data.prediction(IN_WINDOW, "other", 0.99, **{"ml.x": 1})
    data.span(IN_WINDOW, {"ml.prediction_id": "other", "ml.score": 0.99}, "model.train", SERVICE)  # not selected
    data.flush()

    s, lab = scores[labelled], y[labelled].astype(float)
    expected = {
        "auc": roc_auc_score(lab, s), "brier": brier_score_loss(lab, s), "log_loss": log_loss(lab, s),
        "accuracy": accuracy_score(lab, s >= 0.5), "precision": precision_score(lab, s >= 0.5),
        "recall": recall_score(lab, s >= 0.5), "ece": ece(s, lab, 10).value,
        "coverage": labelled.sum() / (n + 1),
    }
    rules = [pq_rule(m) for m in expected]
    rules.append(pq_rule("precision", name="precision@0.3", threshold_score=0.3))
    rules.append(pq_rule("ece", name="ece5", ece_bins=5))
    statements: list[str] = []
    counting = _Counting(cur, statements)
    result = KIND.evaluate(rules, TS, counting, {})  # type: ignore[arg-type]
    for m, want in expected.items():
        got = one(result, rules[list(expected).index(m)])
        assert got.value == pytest.approx(want, abs=1e-9), m
        assert got.at == TS and got.run_key is None and got.series == ()
    assert one(result, rules[-2]).value == pytest.approx(precision_score(lab, s >= 0.3), abs=1e-9)
    assert one(result, rules[-1]).value == pytest.approx(ece(s, lab, 5).value, abs=1e-9)
    auc_sample = one(result, rules[0])
    assert auc_sample.violated is False
    k = int(labelled.sum())
    assert f"over {k} labelled of {n + 1} predictions (coverage {k / (n + 1):.0%})" in auc_sample.detail
    assert "reliability" in one(result, rules[6]).detail
    # all rules read the same data: one SELECT
    assert len([q for q in statements if q.lstrip().startswith("WITH")]) == 1


class _Counting:
    def __init__(self, cur: duckdb.DuckDBPyConnection, statements: list[str]) -> None:
        self._cur, self.statements = cur, statements

    def execute(self, sql: str, params: Any = None) -> Any:
        self.statements.append(sql)
        return self._cur.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)


# -- the join ------------------------------------------------------------------------------------------------------

def _good_and_bad(data: Data, start: float, n: int, prefix: str, *, good: bool = True, label_at: float | None = None,
                  attrs: dict[str, Any] | None = None) -> None:
    """n predictions from `start`, alternating labels; good: scores separate them perfectly (auc 1), else
    inverted (auc 0)."""
    for i in range(n):
        y = i % 2
        score = (0.8 if y else 0.2) if good else (0.2 if y else 0.8)
        data.prediction(start + i * 60.0, f"{prefix}{i}", score, **(attrs or {}))
        data.label(label_at if label_at is not None else start + i * 60.0 + DAY, f"{prefix}{i}", float(y))


def test_only_matured_predictions_are_judged(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    _good_and_bad(data, IN_WINDOW, 20, "ok")
    _good_and_bad(data, TS - 2 * DAY, 20, "young", good=False, label_at=TS - 60)  # labels are in, not matured
    _good_and_bad(data, DAY0 + 2 * DAY, 20, "old", good=False)  # before the window
    data.flush()
    got = one(KIND.evaluate([pq_rule()], TS, cur, {}), pq_rule())
    assert got.value == 1.0 and got.violated is False
    assert "over 20 labelled of 20 predictions" in got.detail
    # a day later the young predictions are still not 3 days old; five days later they are judged
    later = one(KIND.evaluate([pq_rule()], TS + 3 * DAY, cur, {}), pq_rule())
    assert later.value == 0.0 and later.violated is True


def test_label_before_prediction_duplicates_late_labels_and_id_types(data: Data,
                                                                    cur: duckdb.DuckDBPyConnection) -> None:
    t = IN_WINDOW
    data.label(t - HOUR, "early", 1.0)  # arrives before its prediction: still joined
    data.prediction(t, "early", 0.9)
    data.prediction(t, "dup", 0.8)
    data.label(t + HOUR, "dup", 0.0)
    data.label(t + 2 * HOUR, "dup", 1.0)  # the latest label wins
    data.prediction(t, 42, 0.1)  # numeric id, label id as a string
    data.label(t + HOUR, "42", 0.0)
    data.prediction(t, "late", 0.2)
    data.label(TS + HOUR, "late", 1.0)  # after the evaluation time: not seen yet
    data.prediction(t, "bad", 0.3)
    data.label(t + HOUR, "bad", 7.0)  # not 0/1: ignored
    data.prediction(t, "repredicted", 0.99)
    data.prediction(t + 60, "repredicted", 0.05)  # one prediction per id: the latest
    data.label(t + HOUR, "repredicted", 0.0)
    data.flush()
    r = pq_rule("accuracy", op="<", threshold=0.5, min_labels=1)
    got = one(KIND.evaluate([r], TS, cur, {}), r)
    # early (0.9, 1) dup (0.8, 1) 42 (0.1, 0) repredicted (0.05, 0): all right; late and bad unlabelled
    assert got.value == 1.0
    assert "over 4 labelled of 6 predictions (coverage 67%)" in got.detail
    cov = pq_rule("coverage", op="<", threshold=0.9)
    assert one(KIND.evaluate([cov], TS, cur, {}), cov).value == pytest.approx(4 / 6)
    # once the late label is in the store (at a later evaluation time), it counts
    got2 = one(KIND.evaluate([r], TS + 2 * HOUR, cur, {}), r)
    assert "5 labelled" in got2.detail


def test_min_labels_and_min_coverage_give_no_data_never_ok(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    _good_and_bad(data, IN_WINDOW, 20, "a")
    for i in range(30):
        data.prediction(IN_WINDOW + HOUR + i, f"unlabelled{i}", 0.5)
    data.flush()
    # 20 labelled of 50: coverage 40%
    enough = pq_rule(min_labels=20)
    too_few = pq_rule(name="few", min_labels=21)
    low_cov = pq_rule(name="cov", min_labels=10, min_coverage=0.5)
    coverage = pq_rule("coverage", op="<", threshold=0.5, min_labels=1000, min_coverage=0.9)
    result = KIND.evaluate([enough, too_few, low_cov, coverage], TS, cur, {})
    assert one(result, enough).value == 1.0
    for r in (too_few, low_cov):
        s = one(result, r)
        assert s.value is None and s.violated is None
        assert "not judged" in s.detail and "auc 1 over 20 labelled of 50 predictions (coverage 40%)" in s.detail
    assert "below min_labels 21" in one(result, too_few).detail
    assert "below min_coverage" in one(result, low_cov).detail
    c = one(result, coverage)  # judged regardless of min_labels / min_coverage
    assert c.value == pytest.approx(0.4) and c.violated is True
    assert c.detail.startswith("coverage 40.0%")


def test_undefined_metric_and_no_predictions_are_no_data(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    for i in range(20):
        data.prediction(IN_WINDOW + i, f"p{i}", 0.3)
        data.label(IN_WINDOW + DAY, f"p{i}", 0.0)  # one class only
    data.flush()
    auc, recall = pq_rule(), pq_rule("recall", op="<", threshold=0.5)
    result = KIND.evaluate([auc, recall], TS, cur, {})
    for r in (auc, recall):
        s = one(result, r)
        assert s.violated is None and s.value is None and "undefined" in s.detail
    # nothing in the window, no group_by: the one series is no data; with group_by: no series at all
    empty = KIND.evaluate([auc, pq_rule(name="g", group_by=("ml.model.version",))], TS + 30 * DAY, cur, {})
    s = one(empty, auc)
    assert s.value is None and s.violated is None and "no predictions" in s.detail
    assert samples(empty, pq_rule(name="g", group_by=("ml.model.version",))) == []


def test_group_by_gives_a_value_per_model_version(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    _good_and_bad(data, IN_WINDOW, 20, "v1-", attrs={"ml.model.version": "v1"})
    _good_and_bad(data, IN_WINDOW, 20, "v2-", good=False, attrs={"ml.model.version": "v2"})
    _good_and_bad(data, IN_WINDOW, 20, "n-", attrs={"ml.model.version": 3})
    data.flush()
    r = pq_rule(group_by=("ml.model.version",))
    got = {s.series: s for s in samples(KIND.evaluate([r], TS, cur, {}), r)}
    assert set(got) == {(("ml.model.version", "v1"),), (("ml.model.version", "v2"),), (("ml.model.version", "3"),)}
    assert got[(("ml.model.version", "v1"),)].violated is False
    assert got[(("ml.model.version", "v2"),)].value == 0.0
    assert got[(("ml.model.version", "v2"),)].violated is True


def test_a_bad_rule_fails_alone(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    _good_and_bad(data, IN_WINDOW, 20, "a")
    data.flush()
    good = pq_rule()
    no_condition = Rule(name="nc", group="g", kind="prediction_quality", rung="prediction_quality", owner="o",
                        severity="page", spec=PredictionQualitySpec("auc", DAY, DAY))
    wrong_spec = Rule(name="ws", group="g", kind="prediction_quality", rung="prediction_quality", owner="o",
                      severity="page", spec=object(), condition=Condition("<", 0.5))
    result = KIND.evaluate([no_condition, good, wrong_spec], TS, cur, {})
    assert one(result, good).value == 1.0
    assert isinstance(result[no_condition.id], RuleError)
    assert isinstance(result[wrong_spec.id], RuleError)


# -- history -------------------------------------------------------------------------------------------------------

def test_quality_values_keep_every_judgement_of_a_window(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    for i in range(40):
        data.prediction(IN_WINDOW + i * 60, f"p{i}", 0.8 if i % 2 else 0.2)
    for i in range(20):
        data.label(IN_WINDOW + DAY, f"p{i}", float(i % 2))
    data.flush()
    r = pq_rule(group_by=("ml.model.version",))
    records = KIND.evaluate([r], TS, cur, {})[r.id].records  # type: ignore[union-attr]
    # more labels arrive (ingested late, timestamped before TS): the same window is judged again
    for i in range(20, 40):
        data.label(IN_WINDOW + 2 * DAY, f"p{i}", float(i % 2))
    data.flush()
    records += KIND.evaluate([r], TS, cur, {})[r.id].records  # type: ignore[union-attr]
    assert {x.table for x in records} == {"quality_values"}
    assert cur.execute("SELECT count(*) FROM quality_values").fetchone() == (0,)  # the kind writes nothing
    cols = ("rule_id", "series", "evaluated_at", "window_start", "window_end", "metric", "value", "predictions",
            "labelled", "coverage", "details")
    rows = sorted((tuple(x.row[c] for c in cols) for x in records), key=lambda row: row[8])
    assert len(rows) == 2
    for row in rows:
        assert row[0] == "g/auc" and json.loads(row[1]) == {"ml.model.version": ""}
        assert row[2] == _dt(TS) and row[3] == _dt(TS - 5 * DAY) and row[4] == _dt(TS - 3 * DAY)
        assert row[5] == "auc" and row[6] == 1.0 and row[7] == 40
    assert [r[8] for r in rows] == [20, 40]
    assert [r[9] for r in rows] == [0.5, 1.0]
    assert json.loads(rows[0][10])["label_delay"] == 3 * DAY


def test_no_data_values_are_recorded_too(data: Data, cur: duckdb.DuckDBPyConnection) -> None:
    _good_and_bad(data, IN_WINDOW, 5, "a")
    data.flush()
    r = pq_rule("ece", min_labels=10)
    result = KIND.evaluate([r], TS, cur, {})
    s = one(result, r)
    assert s.violated is None
    (record,) = result[r.id].records  # type: ignore[union-attr]
    value, labelled, details = record.row["value"], record.row["labelled"], record.row["details"]
    assert value is None and labelled == 5
    d = json.loads(details)
    assert "below min_labels" in d["no_data"] and len(d["bins"]) == 10 and "unjudged_value" in d


def test_read_only_store_judges_without_recording(tmp_path: Path) -> None:
    path = str(tmp_path / "ro.duckdb")
    rw = Store(StoreSettings(path))
    rw.start()
    c = rw.cursor()
    d = Data(c)
    _good_and_bad(d, IN_WINDOW, 20, "a")
    d.flush()
    c.close()
    rw.shutdown()
    ro = Store(StoreSettings(path, read_only=True))
    ro.start()
    try:
        c = ro.cursor()
        r = pq_rule()
        assert one(KIND.evaluate([r], TS, c, {}), r).value == 1.0
        assert c.execute("SELECT count(*) FROM quality_values").fetchone() == (0,)
        c.close()
    finally:
        ro.shutdown()


# -- YAML ----------------------------------------------------------------------------------------------------------

GOOD = """
alert: FraudModelAUC
kind: prediction_quality
rung: prediction_quality
owner: fraud-ml
select: {span: model.predict, service: fraud-model}
group_by: [ml.model.version]
metric: auc
window: 7d
label_delay: 30d
min_labels: 200
min_coverage: 0.5
attributes: {prediction_id: txn.id, score: fraud.p, label: fraud.chargeback}
op: "<"
threshold: 0.86
resolve_threshold: 0.88
"""


def _parse(text: str) -> tuple[Any, Any, Any, list[str]]:
    problems = Problems()
    spec, cond, resolve = parse_prediction_quality(parse_yaml(text, "f.yaml"), "groups.g.r", problems)
    return spec, cond, resolve, [str(p) for p in problems]


def test_parser_reads_every_field() -> None:
    spec, cond, resolve, problems = _parse(GOOD)
    assert problems == []
    assert spec == PredictionQualitySpec("auc", 7 * DAY, 30 * DAY, min_labels=200, min_coverage=0.5,
                                         prediction_id="txn.id", score="fraud.p", label="fraud.chargeback")
    assert cond == Condition("<", 0.86) and resolve == Condition("<", 0.88)
    spec, _, _, problems = _parse("metric: precision\nwindow: 1d\nlabel_delay: 0s\nthreshold_score: 0.7\n"
                                  "op: '<'\nthreshold: 0.5\n")
    assert problems == [] and spec.threshold_score == 0.7 and spec.label_delay == 0.0
    assert spec.min_labels == 100 and spec.prediction_id == "ml.prediction_id"
    spec, _, _, problems = _parse("metric: ece\nwindow: 1d\nlabel_delay: 1d\nece_bins: 15\nop: '>'\n"
                                  "threshold: 0.05\n")
    assert problems == [] and spec.ece_bins == 15


@pytest.mark.parametrize(("text", "expected"), [
    ("window: 1d\nlabel_delay: 1d\nop: '<'\nthreshold: 1\n", "f.yaml:1: groups.g.r.metric: missing"),
    ("metric: f1\nwindow: 1d\nlabel_delay: 1d\nop: '<'\nthreshold: 1\n", "f.yaml:1: groups.g.r.metric: unknown"),
    ("metric: auc\nlabel_delay: 1d\nop: '<'\nthreshold: 1\n", "groups.g.r.window: missing"),
    ("metric: auc\nwindow: 1d\nop: '<'\nthreshold: 1\n", "groups.g.r.label_delay: missing"),
    ("metric: auc\nwindow: 0s\nlabel_delay: 1d\nop: '<'\nthreshold: 1\n", "f.yaml:2: groups.g.r.window: must be"),
    ("metric: auc\nwindow: seven\nlabel_delay: 1d\nop: '<'\nthreshold: 1\n", "f.yaml:2: groups.g.r.window: bad"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nmin_labels: 0\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.min_labels: must be >= 1"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nmin_coverage: 1.5\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.min_coverage: must be between 0 and 1"),
    ("metric: coverage\nwindow: 1d\nlabel_delay: 1d\nmin_coverage: 0.5\nop: '<'\nthreshold: 0.5\n",
     "f.yaml:4: groups.g.r.min_coverage: does not apply"),
    ("metric: coverage\nwindow: 1d\nlabel_delay: 1d\nop: '<'\nthreshold: 50\n",
     "groups.g.r.threshold: coverage is a share"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nthreshold_score: 0.5\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.threshold_score: applies to metrics accuracy, precision, recall, not auc"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nece_bins: 5\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.ece_bins: applies to metric ece"),
    ("metric: ece\nwindow: 1d\nlabel_delay: 1d\nece_bins: 0\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.ece_bins: must be >= 1"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nattributes: {score: 1}\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.attributes.score: must be a string"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nattributes: {scores: x}\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.attributes.scores: unknown key"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nattributes: {label: ml.score}\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.attributes: prediction_id, score and label must be different"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nop: '<'\n", "groups.g.r.threshold: missing"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nthreshold: 1\n", "groups.g.r.op: missing"),
    ("metric: auc\nwindow: 1d\nlabel_delay: 1d\nlookback: 1d\nop: '<'\nthreshold: 1\n",
     "f.yaml:4: groups.g.r.lookback: unknown key"),
])
def test_parser_errors_are_positioned(text: str, expected: str) -> None:
    *_, problems = _parse(text)
    assert any(expected in p for p in problems), problems


# -- end to end ------------------------------------------------------------------------------------------------------

def test_auc_rule_fires_once_the_decoupled_predictions_labels_have_matured(store: Store, data: Data) -> None:
    """Five predictions an hour for 20 days; scores track the labels (auc about 0.95) until day 10, then are
    random. Labels arrive 3 days after each prediction. With label_delay 3d and window 2d, evaluated daily, the
    rule judges only good windows through day 13 (the decoupled predictions exist but are immature) and fires
    once their labels are in (day 14 or 15), not before; a rule without the label delay never judges at all."""
    rng = np.random.default_rng(3)
    decouple = DAY0 + 10 * DAY
    i = 0
    for hour in range(20 * 24):
        for k in range(5):
            t = DAY0 + hour * HOUR + k * 60.0
            y = float(rng.random() < 0.3)
            score = 1 / (1 + np.exp(-(rng.normal(0, 1) + (2.3 * y - 1.0)))) if t < decouple else rng.random()
            data.prediction(t, f"p{i}", float(score), **{"ml.model.version": "v7"})
            data.label(t + 3 * DAY, f"p{i}", y)
            i += 1
    data.flush()
    auc = pq_rule("auc", name="FraudAUC", threshold=0.86, min_labels=200, min_coverage=0.5,
                  group_by=("ml.model.version",))
    naive = pq_rule("auc", name="NaiveAUC", threshold=0.86, label_delay=0.0, min_labels=200, min_coverage=0.5)
    coverage = pq_rule("coverage", name="LabelCoverage", threshold=0.5)
    engine = RuleEngine(store.cursor, new_kinds(), DuckDBState(store.cursor))
    group = RuleGroup("quality", DAY, (auc, naive, coverage))
    engine.load(RuleSet((group,)))
    first_fired: dict[str, float] = {}
    values: dict[int, float | None] = {}
    for day in range(1, 24):
        ts = DAY0 + day * DAY
        for ev in engine.evaluate_group(group, ts):
            if ev.transition.to_state == "firing":
                first_fired.setdefault(ev.rule.name, day)
        st = engine.state.load([auc])[auc.id].states
        values[day] = next(iter(st.values())).value if st else None
        assert engine.health == {auc.id: None, naive.id: None, coverage.id: None}
        if day <= 13:
            assert all(s.state in ("inactive", "nodata") for s in st.values()), (day, st)
    assert first_fired.get("FraudAUC") in (14, 15), (first_fired, values)
    assert "NaiveAUC" not in first_fired  # never judged: its window has no labels yet
    assert "LabelCoverage" not in first_fired  # labels keep arriving: coverage of the matured window is 100%
    good = [v for d, v in values.items() if 6 <= d <= 13]
    assert all(v is not None and v > 0.88 for v in good), values
    assert all(v is not None and v < 0.65 for d, v in values.items() if d >= 15), values
    with store.cursor() as c:
        n = c.execute("SELECT count(*) FROM quality_values WHERE rule_id = $r", {"r": auc.id}).fetchone()
    assert n == (21,)  # days 3..23: before day 3 the matured window holds no prediction, so no series


def test_a_rule_file_loads_once_the_parser_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluator.rules import loader

    monkeypatch.setitem(loader.PARSERS, "prediction_quality", parse_prediction_quality)
    text = "groups:\n- name: quality\n  interval: 1d\n  rules:\n" + "".join(
        f"  - {line}\n" if i == 0 else f"    {line}\n" for i, line in enumerate(GOOD.strip().splitlines()))
    problems = Problems()
    groups = loader.parse_rule_file(parse_yaml(text, "rules.yaml"), problems)
    assert not problems, [str(p) for p in problems]
    r = groups[0].rules[0]
    assert r.kind == "prediction_quality" and r.selector == MODEL and r.group_by == ("ml.model.version",)
    assert isinstance(r.spec, PredictionQualitySpec) and r.spec.window == 7 * DAY
