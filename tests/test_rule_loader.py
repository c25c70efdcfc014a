"""Rule files: valid ones load into frozen rules; invalid ones report every problem with file, line and key."""

from __future__ import annotations

import copy
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    from evaluator.commands.ruletest import expand_series

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


# -- YAML merge keys and aliases -------------------------------------------------------------------------------

MERGED = """\
groups:
  - name: g
    rules:
      - &fresh
        alert: A
        kind: threshold
        rung: freshness
        owner: data-platform
        value: data.lag
        op: ">"
        threshold: 1
        labels: &team {team: data}
      - <<: *fresh
        alert: B
        threshold: 2
      - threshold: 3
        <<: [*fresh, {owner: other, severity: page}]
        alert: C
        labels: *team
"""


def test_merge_keys_follow_yaml_1_1(tmp_path: Path) -> None:
    """A merged map's keys are added unless the map gives them itself (before or after the <<); of several merged
    maps the earlier wins; aliases repeat a value."""
    path = tmp_path / "r.yaml"
    path.write_text(MERGED)
    a, b, c = load_rules([str(path)]).rules()
    assert (b.name, b.kind, b.owner, b.spec, b.condition) == (
        "B", "threshold", "data-platform", ThresholdSpec("data.lag"), Condition(">", 2.0))
    assert (c.name, c.owner, c.severity, c.condition) == ("C", "data-platform", "page", Condition(">", 3.0))
    assert a.labels == b.labels == c.labels == (("team", "data"),)
    assert (a.source, b.source, c.source) == (f"{path}:4", f"{path}:13", f"{path}:16")
    # a merge is the same rule as writing the keys out
    spelled = tmp_path / "s.yaml"
    written_out = ("      - alert: B\n        kind: threshold\n        rung: freshness\n        owner: data-platform\n"
                   "        value: data.lag\n        op: \">\"\n        labels: {team: data}\n")
    spelled.write_text(MERGED.replace("      - <<: *fresh\n        alert: B\n", written_out))
    assert load_rules([str(spelled)]).rules()[1].fingerprint == b.fingerprint


def test_merge_key_errors_are_positioned(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    # a value that comes from an anchor is reported where it is written, under each rule that merges it
    path.write_text(MERGED.replace("        threshold: 1\n", "        threshold: [0.01, 0.02]\n"))
    with pytest.raises(InvalidConfig) as err:
        load_rules([str(path)])
    text = str(err.value)
    assert f"{path}:11: groups.g.A.threshold: must be a number, got [0.01, 0.02]" in text, text
    assert "groups.g.B.threshold" not in text and "groups.g.C.threshold" not in text  # both override it
    path.write_text(MERGED.replace("        value: data.lag\n", "        value: data.lag\n        for: soon\n"))
    with pytest.raises(InvalidConfig) as err:
        load_rules([str(path)])
    for name in "ABC":
        assert f"{path}:10: groups.g.{name}.for: bad duration 'soon'" in str(err.value), str(err.value)

    bad = {
        "      - <<: 5\n        alert: D\n": (20, "<<: a merge key takes a mapping (<<: *defaults) or a list of "
                                                  "mappings (<<: [*a, *b]), got 5"),
        "      - <<: [*fresh, [1, 2]]\n        alert: D\n": (20, "<<: a merge key takes a mapping"),
        "      - <<: *fresh\n        <<: *team\n        alert: D\n": (21, "<<: duplicate key"),
        "      - <<: *fresh\n        alert: D\n        alert: E\n": (22, "alert: duplicate key"),
        "      - <<: *fresh\n        alert: D\n        owner: !vault secret\n": (22, "the tag !vault is not supported"),
        "      - <<: *fresh\n        alert: D\n        threshold: !!float hi\n": (22, "cannot read 'hi' as !!float"),
        "      - &loop\n        alert: D\n        labels: {again: *loop}\n": (
            20, "an alias refers to a value that contains it (a cycle)"),
        "      - <<: *fresh\n        alert: D\n        ? [a, b]\n        : x\n": (22, "mapping keys must be strings or "
                                                                                    "numbers, got [a, b]"),
    }
    for extra, (line, why) in bad.items():
        path.write_text(MERGED + extra)
        with pytest.raises(InvalidConfig) as err:
            load_rules([str(path)])
        assert f"{path}:{line}: {why}" in str(err.value), (extra, str(err.value))


def test_aliases_cannot_expand_without_bound(tmp_path: Path) -> None:
    """Nine levels of ten aliases each would be a billion values: refused at once, at the first level past the
    limit (a5: about 1.1 million)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(lines) + "\ngroups: []\n")
    with pytest.raises(InvalidConfig, match=r"r\.yaml:6: this value expands to more than 1,000,000 values"):
        load_rules([str(path)])


INTERNALS = re.compile(r"Node\(|datetime\.|NoneType|<class|object at 0x|\bTrue\b|\bFalse\b|\bNone\b|\[Node|\{'")
BAD_VALUES: list[Any] = [[0.01, 0.02], {"a": [1, {"b": None}]}, date(2018, 1, 1), datetime(2018, 1, 1, 6), True,
                         None, "soon", -3]
KIND_RULES: list[dict[str, Any]] = [
    {"alert": "T", "kind": "threshold", "rung": "freshness", "owner": "x", "value": "data.lag", "op": ">",
     "threshold": 1, "resolve_threshold": 0.5, "for": "5m", "for_runs": 2, "keep_firing_for": "1h",
     "severity": "page", "labels": {"team": "a"}, "annotations": {"summary": "{{ value }}"}, "group_by": ["d"],
     "select": {"span": "s", "service": "v", "where": {"k": "v"}}, "lookback": "1d"},
    {"alert": "B", "kind": "baseline", "rung": "completeness", "owner": "x", "value": "data.rows",
     "baseline": {"window": "7d", "method": "relative", "tolerance": 0.05, "min_history": 3,
                  "seasonality": "weekday"}},
    {"alert": "Q", "kind": "baseline", "rung": "completeness", "owner": "x", "value": "data.rows",
     "baseline": {"runs": 7, "method": "quantile_band", "quantiles": [0.05, 0.95]}},
    {"alert": "A", "kind": "absence", "rung": "freshness", "owner": "x", "expected_every": "1d", "grace": "2h"},
    {"alert": "L", "kind": "absence", "rung": "freshness", "owner": "x", "lag_attribute": "data.t", "max_lag": "1h"},
    {"alert": "S", "kind": "sql", "rung": "custom", "owner": "x", "query": "SELECT 1 AS value", "op": "outside",
     "threshold": [0, 10]},
    {"alert": "D", "kind": "distribution", "rung": "distribution", "owner": "x", "attribute": "data.amount",
     "method": "psi", "current": "6h", "baseline": {"from": "2018-01-01", "to": "2018-10-30", "frozen": True},
     "bounds": [1, 10, 100], "epsilon": 0.001, "min_samples": 10, "op": ">", "threshold": 0.2},
    {"alert": "E", "kind": "distribution", "rung": "distribution", "owner": "x", "attribute": "data.amount",
     "method": "psi", "source": "values", "categorical": False, "current": "6h", "baseline": {"window": "30d"},
     "bins": 10, "op": ">", "threshold": 0.2},
    {"alert": "P", "kind": "prediction_quality", "rung": "prediction_quality", "owner": "x", "metric": "accuracy",
     "window": "7d", "label_delay": "30d", "min_labels": 10, "min_coverage": 0.5, "threshold_score": 0.5,
     "attributes": {"prediction_id": "ml.id", "score": "ml.s", "label": "ml.l"}, "op": "<", "threshold": 0.8},
    {"alert": "C", "kind": "prediction_quality", "rung": "prediction_quality", "owner": "x", "metric": "ece",
     "window": "7d", "label_delay": "0s", "ece_bins": 10, "op": ">", "threshold": 0.1},
]


def _leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping, inner mappings included."""
    out: list[tuple[str, ...]] = []
    for k, v in value.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(_leaf_paths(v, (*prefix, k)))
    return out


def _replaced(value: dict[str, Any], path: tuple[str, ...], new: Any) -> dict[str, Any]:
    out = copy.deepcopy(value)
    target = out
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = new
    return out


def test_no_message_shows_internal_objects(tmp_path: Path) -> None:
    """Every key of every kind (and the group's), given a list, a map, a date, a time, a boolean, null, a word and
    a negative number: each message shows the value as YAML, never a Python object."""
    path = tmp_path / "r.yaml"
    messages: list[str] = []
    for bad in BAD_VALUES:
        groups = [{"name": f"g{i}", "rules": [_replaced(rule, key_path, bad)]}
                  for i, (rule, key_path) in enumerate((r, k) for r in KIND_RULES for k in _leaf_paths(r))]
        group = {"name": "h", "interval": "1m", "ladder_inhibition": {"labels": ["d"]}, "rules": [KIND_RULES[0]]}
        groups += [_replaced(group, key_path, bad) for key_path in _leaf_paths(group)]  # "duplicate group": fine
        for case in ({"groups": groups}, {"groups": bad}, bad):
            path.write_text(yaml.safe_dump(case, sort_keys=False))
            with pytest.raises(InvalidConfig) as err:
                load_rules([str(path)])
            messages.extend(str(p) for p in err.value.problems)
    assert len(messages) > 500
    shown = [m for m in messages if INTERNALS.search(m)]
    assert not shown, "\n".join(shown[:20])
    assert any("got [0.01, 0.02]" in m for m in messages) and any("got 2018-01-01" in m for m in messages)
    assert any("got null" in m for m in messages) and any("got true" in m for m in messages)


def test_a_test_file_series_that_is_a_list_says_so_in_yaml_terms(tmp_path: Path) -> None:
    from evaluator.commands.ruletest import parse_test_file
    from evaluator.yamlsrc import InvalidConfig

    path = tmp_path / "t.test.yaml"
    path.write_text("rule_files: [r.yaml]\ntests:\n  - name: t\n    start: 2026-11-01T00:00:00Z\n    input_runs:\n"
                    "      - values: {data.x: [1, 2]}\n    alert_rule_test: []\n")
    try:
        parse_test_file(str(path))
        raise AssertionError("a list is not a series")
    except InvalidConfig as exc:
        text = str(exc)
    assert "values.data.x: must be a series in the notation" in text and "Node(" not in text
