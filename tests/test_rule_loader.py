"""Rule files: valid ones load into frozen rules; invalid ones report every problem with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluator.rules.loader import load_rules
from evaluator.rules.model import AbsenceSpec, BaselineSpec, Condition, Selector, SqlSpec, ThresholdSpec
from evaluator.yamlsrc import InvalidConfig

GOOD = """\
groups:
  - name: payments
    interval: 1m
    rules:
      - alert: FreshnessLag
        kind: threshold
        rung: freshness
        owner: data-platform
        severity: page
        labels: {team: data-platform}
        annotations:
          summary: "{{ series.data.dataset }} is {{ value }} h behind (limit {{ threshold }})"
        select:
          span: features.daily.run
          service: risk-feature-pipeline
          where: {data.dataset: payments/transactions_yesterday, data.shard: 3}
        group_by: [data.dataset]
        value: data.freshness_lag_hours
        op: ">"
        threshold: 0.5
        resolve_threshold: 0.4
        for_runs: 2
        for: 10m
        keep_firing_for: 1h
      - alert: RowCount
        kind: baseline
        rung: completeness
        owner: producer-team
        value: data.row_count
        baseline: {window: 7d, method: relative, tolerance: 0.05, min_history: 5, seasonality: weekday}
        resolve_threshold: 0.03
      - alert: MissingRun
        kind: absence
        rung: freshness
        owner: data-platform
        expected_every: 1d
        grace: 2h
      - alert: Custom
        kind: sql
        rung: custom
        owner: me
        query: SELECT 1 AS value
        op: outside
        threshold: [0, 10]
"""


def test_a_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "payments.yaml"
    path.write_text(GOOD)
    rs = load_rules([str(path)])
    (group,) = rs.groups
    assert (group.name, group.interval) == ("payments", 60.0)
    lag, rows, missing, custom = group.rules
    assert lag.id == "payments/FreshnessLag"
    assert lag.spec == ThresholdSpec("data.freshness_lag_hours")
    assert lag.condition == Condition(">", 0.5) and lag.resolve == Condition(">", 0.4)
    assert lag.selector == Selector("features.daily.run", "risk-feature-pipeline",
                                    (("data.dataset", "payments/transactions_yesterday"), ("data.shard", 3.0)))
    assert (lag.for_runs, lag.for_seconds, lag.keep_firing_for) == (2, 600.0, 3600.0)
    assert lag.group_by == ("data.dataset",) and lag.labels == (("team", "data-platform"),)
    assert lag.source == f"{path}:5"
    assert rows.spec == BaselineSpec("data.row_count", method="relative", tolerance=0.05, history_window=7 * 86400,
                                     min_history=5, seasonality="weekday")
    assert rows.resolve == Condition("outside", (-0.03, 0.03)) and rows.severity == "warning"
    assert missing.spec == AbsenceSpec(expected_every=86400.0, grace=7200.0)
    assert custom.spec == SqlSpec("SELECT 1 AS value") and custom.condition == Condition("outside", (0.0, 10.0))


def test_fingerprint_changes_with_the_rule_not_with_its_position(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(GOOD)
    b.write_text("\n\n" + GOOD)  # same rules, other lines
    c.write_text(GOOD.replace("threshold: 0.5", "threshold: 0.6"))
    fa, fb, fc = ([r.fingerprint for r in load_rules([str(p)]).rules()] for p in (a, b, c))
    assert fa == fb
    assert fa[0] != fc[0] and fa[1:] == fc[1:]


BAD = """\
groups:
  - name: g
    interval: soon
    rules:
      - alert: A
        kind: threshold
        rung: freshnes
        owner: x
        value: data.x
        op: "=~"
        threshold: 1
        colour: red
      - alert: B
        kind: baseline
        rung: completeness
        owner: x
        value: data.rows
        baseline: {runs: 7, window: 7d, method: zscore, tolerance: 0.05}
      - alert: C
        kind: teleport
        rung: custom
        owner: x
      - alert: D
        kind: threshold
        rung: custom
        value: data.x
        op: outside
        threshold: [5, 1]
        for: 5 minutes
        annotations: {summary: "{{ valeu }}"}
      - alert: A
        kind: absence
        rung: freshness
        owner: x
        expected_every: 1d
        max_lag: 1h
"""


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(InvalidConfig) as err:
        load_rules([str(path)])
    text = str(err.value)
    expected = [
        (3, "groups.g.interval", "bad duration"),
        (7, "groups.g.A.rung", "unknown rung 'freshnes'"),
        (10, "groups.g.A.op", "unknown operator '=~'"),
        (12, "groups.g.A.colour", "unknown key"),
        (18, "groups.g.B.baseline", "give exactly one of runs"),
        (18, "groups.g.B.baseline.tolerance", "applies to method relative"),
        (20, "groups.g.C.kind", "unknown kind 'teleport'"),
        (23, "groups.g.D.owner", "missing"),
        (28, "groups.g.D.threshold", "low 5.0 is above high 1.0"),
        (29, "groups.g.D.for", "bad duration"),
        (30, "groups.g.D.annotations.summary", "unknown template name"),
        (31, "groups.g.A", "give either expected_every"),
    ]
    for line, key, why in expected:
        assert f"{path}:{line}: {key}: {why}" in text, (line, key, why, text)


def test_absence_lookback_must_outlast_the_absence(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("groups:\n  - name: g\n    rules:\n      - {alert: A, kind: absence, rung: freshness, owner: x,"
                    " expected_every: 1d, grace: 2h, lookback: 1d}\n")
    with pytest.raises(InvalidConfig, match="lookback: must be longer than the absence it watches for"):
        load_rules([str(path)])


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="cannot read file"):
        load_rules([str(tmp_path / "nope.yaml")])
    with pytest.raises(InvalidConfig, match="no rule files found"):
        load_rules([str(tmp_path)])


def test_a_folder_loads_its_rule_files_but_not_test_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "a.test.yaml").write_text("not: a rule file")
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(load_rules([str(tmp_path)]).rules()) == 4


def test_duplicate_group_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(InvalidConfig, match="duplicate group name"):
        load_rules([str(tmp_path)])


def test_series_notation() -> None:
    from evaluator.rules.ruletest import expand_series

    assert expand_series("10000000 10100000 _ 9900000x3 9000000+100000x4") == [
        10_000_000, 10_100_000, None, 9_900_000, 9_900_000, 9_900_000, 9_000_000, 9_100_000, 9_200_000, 9_300_000]
    assert expand_series("0.02x2 6 1-0.5x3") == [0.02, 0.02, 6.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="bad series value 'six'"):
        expand_series("1 six")


def test_ladder_inhibition_option(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    body = "    rules:\n      - {alert: A, kind: absence, rung: freshness, owner: x, expected_every: 1d}\n"
    for option, expected in (("true", ("data.dataset",)), ("{labels: [data.dataset, dataset]}",
                                                             ("data.dataset", "dataset")), ("false", ())):
        path.write_text(f"groups:\n  - name: g\n    ladder_inhibition: {option}\n" + body)
        assert load_rules([str(path)]).groups[0].inhibit_labels == expected
    path.write_text("groups:\n  - name: g\n    ladder_inhibition: {labels: []}\n" + body)
    with pytest.raises(InvalidConfig, match=r"ladder_inhibition\.labels: name the series label"):
        load_rules([str(path)])
