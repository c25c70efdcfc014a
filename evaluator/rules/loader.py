"""Rule files (YAML, Prometheus-style groups) -> RuleSet, with every problem reported by file, line and key.

Kinds parse their own fields through PARSERS, so a new kind plugs in by adding a parser here and a kind in
evaluator/rules/kinds. docs/rules.md is the reference for the format and must match this file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from evaluator.rules.model import (
    OPS,
    RUNGS,
    AbsenceSpec,
    BaselineSpec,
    Condition,
    Rule,
    RuleGroup,
    RuleSet,
    Selector,
    SqlSpec,
    ThresholdSpec,
)
from evaluator.yamlsrc import (
    InvalidConfig,
    Node,
    Problem,
    Problems,
    check_keys,
    load_yaml_file,
    read_duration,
    read_float,
    read_int,
    read_map,
    read_str,
    read_str_list,
    read_str_map,
)

COMMON_KEYS = {
    "alert", "kind", "rung", "owner", "severity", "labels", "annotations", "select", "group_by", "for_runs", "for",
    "keep_firing_for", "budget",
}
TEMPLATE_RE = re.compile(r"{{\s*([A-Za-z_][\w.\-]*)\s*}}")
TEMPLATE_NAMES = {"value", "threshold", "rule", "alert", "owner", "rung", "severity", "detail", "state"}
RULE_FILE_SUFFIXES = (".yaml", ".yml")

KindParser = Callable[[Node, str, Problems], "tuple[Any, Condition | None, Condition | None] | None"]


# -- shared readers -------------------------------------------------------------------------------------------

def _read_condition(node: Node, where: str, problems: Problems, threshold_key: str = "threshold",
                    required: bool = True) -> tuple[Condition | None, Condition | None]:
    """op + threshold (+ resolve_threshold) -> (condition, resolve condition)."""
    op_node, thr_node, res_node = node.get("op"), node.get(threshold_key), node.get("resolve_threshold")
    if op_node is None and thr_node is None and not required:
        if res_node is not None:
            problems.add(res_node, f"{where}.resolve_threshold", "needs op and threshold")
        return None, None
    op = read_str(op_node, f"{where}.op", problems)
    if op_node is None:
        problems.add(node, f"{where}.op", f"missing (one of {', '.join(OPS)})")
    elif op is not None and op not in OPS:
        problems.add(op_node, f"{where}.op", f"unknown operator {op!r} (use one of {', '.join(OPS)})")
        op = None
    if thr_node is None:
        problems.add(node, f"{where}.{threshold_key}", "missing")
        return None, None
    threshold = _read_threshold(thr_node, op, f"{where}.{threshold_key}", problems)
    resolve = _read_threshold(res_node, op, f"{where}.resolve_threshold", problems) if res_node else None
    if op is None or threshold is None:
        return None, None
    return Condition(op, threshold), (Condition(op, resolve) if resolve is not None else None)


def _read_threshold(node: Node | None, op: str | None, key: str, problems: Problems) -> Any:
    if node is None:
        return None
    if op in ("outside", "inside"):
        if not node.is_list() or len(node.value) != 2:
            problems.add(node, key, f"{op} needs a [low, high] pair")
            return None
        low, high = (read_float(n, key, problems) for n in node.value)
        if low is None or high is None:
            return None
        if low > high:
            problems.add(node, key, f"low {low} is above high {high}")
            return None
        return (low, high)
    return read_float(node, key, problems)


def _require_str(node: Node, key: str, where: str, problems: Problems) -> str | None:
    child = node.get(key)
    if child is None:
        problems.add(node, f"{where}.{key}", "missing")
        return None
    value = read_str(child, f"{where}.{key}", problems)
    if value is not None and not value.strip():
        problems.add(child, f"{where}.{key}", "must not be empty")
        return None
    return value


def _lookback(node: Node, where: str, problems: Problems, default: float) -> float:
    value = read_duration(node.get("lookback"), f"{where}.lookback", problems)
    return default if value is None else value


# -- kinds ---------------------------------------------------------------------------------------------------

def _parse_threshold(node: Node, where: str, problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    check_keys(node, COMMON_KEYS | {"value", "op", "threshold", "resolve_threshold", "lookback"}, problems, where)
    value = _require_str(node, "value", where, problems)
    condition, resolve = _read_condition(node, where, problems)
    spec = ThresholdSpec(value or "", _lookback(node, where, problems, ThresholdSpec.lookback))
    return spec, condition, resolve


_BASELINE_KEYS = {"runs", "window", "method", "tolerance", "z", "quantiles", "min_history", "seasonality", "exclude"}
BASELINE_METHODS = ("relative", "zscore", "robust", "quantile_band")


def _parse_baseline(node: Node, where: str, problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    check_keys(node, COMMON_KEYS | {"value", "baseline", "resolve_threshold", "lookback"}, problems, where)
    value = _require_str(node, "value", where, problems)
    b = read_map(node.get("baseline"), f"{where}.baseline", problems)
    if node.get("baseline") is None:
        problems.add(node, f"{where}.baseline", "missing (runs or window, and a method)")
    kw: dict[str, Any] = {}
    resolve: Condition | None = None
    if b is not None:
        bw = f"{where}.baseline"
        check_keys(b, _BASELINE_KEYS, problems, bw)
        runs = read_int(b.get("runs"), f"{bw}.runs", problems, minimum=1)
        window = read_duration(b.get("window"), f"{bw}.window", problems)
        if (b.get("runs") is None) == (b.get("window") is None):
            problems.add(b, bw, "give exactly one of runs (previous N runs) or window (e.g. 7d)")
        kw["history_runs"], kw["history_window"] = runs, window
        method = read_str(b.get("method"), f"{bw}.method", problems) or "relative"
        if method not in BASELINE_METHODS:
            problems.add(b.get("method"), f"{bw}.method", f"must be one of {', '.join(BASELINE_METHODS)}")
        kw["method"] = method
        for key, expected in (("tolerance", ("relative",)), ("z", ("zscore", "robust")),
                              ("quantiles", ("quantile_band",))):
            if b.get(key) is not None and method not in expected:
                problems.add(b.get(key), f"{bw}.{key}", f"applies to method {' or '.join(expected)}, not {method}")
        exclude = read_str(b.get("exclude"), f"{bw}.exclude", problems)
        if exclude is not None and exclude not in ("violations", "none"):
            problems.add(b.get("exclude"), f"{bw}.exclude",
                         "must be violations (violating runs never enter the baseline) or none")
        elif exclude is not None:
            kw["exclude"] = exclude
        tol = read_float(b.get("tolerance"), f"{bw}.tolerance", problems)
        if tol is not None and tol <= 0:
            problems.add(b.get("tolerance"), f"{bw}.tolerance", "must be above 0 (0.05 means ±5%)")
        elif tol is not None:
            kw["tolerance"] = tol
        z = read_float(b.get("z"), f"{bw}.z", problems)
        if z is not None and z <= 0:
            problems.add(b.get("z"), f"{bw}.z", "must be above 0")
        elif z is not None:
            kw["z"] = z
        q = b.get("quantiles")
        if q is not None:
            pair = _read_threshold(q, "inside", f"{bw}.quantiles", problems)
            if pair is not None and not (0 <= pair[0] < pair[1] <= 1):
                problems.add(q, f"{bw}.quantiles", "must be [low, high] with 0 <= low < high <= 1")
            elif pair is not None:
                kw["quantiles"] = pair
        mh = read_int(b.get("min_history"), f"{bw}.min_history", problems, minimum=1)
        if mh is not None:
            kw["min_history"] = mh
        if runs is not None and (mh if mh is not None else BaselineSpec.min_history) > runs:
            problems.add(b.get("min_history") or b, f"{bw}.min_history",
                         f"is more than runs ({runs}): the baseline could never have enough runs")
        season = read_str(b.get("seasonality"), f"{bw}.seasonality", problems)
        if season is not None and season != "weekday":
            problems.add(b.get("seasonality"), f"{bw}.seasonality", "the only seasonality is weekday")
        kw["seasonality"] = season
        res_node = node.get("resolve_threshold")
        if res_node is not None:
            if method == "quantile_band":
                problems.add(res_node, f"{where}.resolve_threshold", "not supported with method quantile_band")
            else:
                r = read_float(res_node, f"{where}.resolve_threshold", problems)
                if r is not None and r <= 0:
                    problems.add(res_node, f"{where}.resolve_threshold", "must be above 0")
                elif r is not None:
                    resolve = Condition("outside", (-r, r))
    spec = BaselineSpec(value or "", **{k: v for k, v in kw.items() if v is not None},
                        lookback=_lookback(node, where, problems, BaselineSpec.lookback))
    return spec, None, resolve


def _parse_absence(node: Node, where: str, problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    check_keys(node, COMMON_KEYS | {"expected_every", "grace", "lag_attribute", "max_lag", "resolve_threshold",
                                    "lookback"}, problems, where)
    every = read_duration(node.get("expected_every"), f"{where}.expected_every", problems)
    grace = read_duration(node.get("grace"), f"{where}.grace", problems)
    lag_attr = read_str(node.get("lag_attribute"), f"{where}.lag_attribute", problems)
    max_lag = read_duration(node.get("max_lag"), f"{where}.max_lag", problems)
    by_interval = node.get("expected_every") is not None
    by_lag = node.get("lag_attribute") is not None or node.get("max_lag") is not None
    if by_interval == by_lag:
        problems.add(node, where, "give either expected_every (+ grace) or lag_attribute + max_lag")
    elif by_lag and (node.get("lag_attribute") is None or node.get("max_lag") is None):
        problems.add(node, where, "lag_attribute and max_lag go together")
    if grace is not None and by_lag:
        problems.add(node.get("grace"), f"{where}.grace", "applies to expected_every")
    resolve = None
    res_node = node.get("resolve_threshold")
    if res_node is not None:
        r = read_duration(res_node, f"{where}.resolve_threshold", problems)
        if r is not None:
            resolve = Condition(">", r)
    spec = AbsenceSpec(expected_every=every, grace=grace or 0.0, lag_attribute=lag_attr, max_lag=max_lag,
                       lookback=_lookback(node, where, problems, AbsenceSpec.lookback))
    limit = (spec.expected_every or 0.0) + spec.grace if by_interval else (spec.max_lag or 0.0)
    if limit and spec.lookback <= limit:
        problems.add(node.get("lookback") or node, f"{where}.lookback",
                     f"must be longer than the absence it watches for ({limit:g} s), or a silent series is "
                     "forgotten before it can fire")
    return spec, None, resolve


def _parse_sql(node: Node, where: str, problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    check_keys(node, COMMON_KEYS | {"query", "op", "threshold", "resolve_threshold"}, problems, where)
    query = _require_str(node, "query", where, problems)
    if node.get("select") is not None:
        problems.add(node.get("select"), f"{where}.select", "a sql rule selects in its query")
    if node.get("group_by") is not None:
        problems.add(node.get("group_by"), f"{where}.group_by", "a sql rule's series are its non-value columns")
    condition, resolve = _read_condition(node, where, problems)
    return SqlSpec(query or ""), condition, resolve


def _parse_distribution(node: Node, where: str,
                        problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    from evaluator.rules.kinds.distribution import parse_distribution  # kinds import numpy/duckdb

    return parse_distribution(node, where, problems)


def _parse_prediction_quality(node: Node, where: str,
                              problems: Problems) -> tuple[Any, Condition | None, Condition | None]:
    from evaluator.rules.kinds.prediction_quality import parse_prediction_quality  # kinds import numpy/duckdb

    return parse_prediction_quality(node, where, problems)


PARSERS: dict[str, Callable[[Node, str, Problems], tuple[Any, Condition | None, Condition | None]]] = {
    "threshold": _parse_threshold,
    "baseline": _parse_baseline,
    "absence": _parse_absence,
    "sql": _parse_sql,
    "distribution": _parse_distribution,
    "prediction_quality": _parse_prediction_quality,
}


def register_parser(kind: str,
                    parser: Callable[[Node, str, Problems], tuple[Any, Condition | None, Condition | None]]) -> None:
    PARSERS[kind] = parser


# -- common fields -----------------------------------------------------------------------------------------------

def _parse_selector(node: Node | None, where: str, problems: Problems) -> Selector:
    sel = read_map(node, where, problems)
    if sel is None:
        return Selector()
    check_keys(sel, {"span", "service", "where"}, problems, where)
    conditions: list[tuple[str, str | float]] = []
    w = read_map(sel.get("where"), f"{where}.where", problems)
    if w is not None:
        for key, child in w.value.items():
            v = child.value
            if isinstance(v, bool) or v is None or isinstance(v, dict | list):
                problems.add(child, f"{where}.where.{key}", "must be a string or a number")
            elif isinstance(v, int | float):
                conditions.append((key, float(v)))
            else:
                conditions.append((key, str(v)))
    return Selector(span=read_str(sel.get("span"), f"{where}.span", problems),
                    service=read_str(sel.get("service"), f"{where}.service", problems),
                    where=tuple(sorted(conditions, key=lambda kv: kv[0])))


def _check_templates(annotations: dict[str, str], node: Node | None, where: str, group_by: tuple[str, ...],
                     problems: Problems) -> None:
    for key, text in annotations.items():
        for name in TEMPLATE_RE.findall(text):
            head, _, rest = name.partition(".")
            if name in TEMPLATE_NAMES or (head == "labels" and rest):
                continue
            if head == "series" and rest:
                continue
            child = node.get(key) if node is not None else None
            problems.add(child, f"{where}.annotations.{key}",
                         f"unknown template name {{{{ {name} }}}} (use value, threshold, detail, owner, rung, "
                         "severity, alert, state, series.<attribute> or labels.<name>)")


def _parse_rule(node: Node, group: str, index: int, file: str, problems: Problems) -> Rule | None:
    where = f"groups.{group}.rules[{index}]"
    if not node.is_map():
        problems.add(node, where, "a rule must be a mapping")
        return None
    name = _require_str(node, "alert", where, problems)
    if name:
        where = f"groups.{group}.{name}"
    kind = _require_str(node, "kind", where, problems)
    parser = PARSERS.get(kind or "")
    if kind and parser is None:
        problems.add(node.get("kind"), f"{where}.kind", f"unknown kind {kind!r} (use one of {', '.join(PARSERS)})")
    rung = _require_str(node, "rung", where, problems)
    if rung and rung not in RUNGS:
        problems.add(node.get("rung"), f"{where}.rung", f"unknown rung {rung!r} (use one of {', '.join(RUNGS)})")
    owner = _require_str(node, "owner", where, problems)
    severity = read_str(node.get("severity"), f"{where}.severity", problems) or "warning"
    labels = read_str_map(node.get("labels"), f"{where}.labels", problems) or {}
    annotations = read_str_map(node.get("annotations"), f"{where}.annotations", problems) or {}
    group_by = tuple(read_str_list(node.get("group_by"), f"{where}.group_by", problems) or ())
    _check_templates(annotations, node.get("annotations"), where, group_by, problems)
    for_runs = read_int(node.get("for_runs"), f"{where}.for_runs", problems, minimum=1) or 1
    for_seconds = read_duration(node.get("for"), f"{where}.for", problems) or 0.0
    keep = read_duration(node.get("keep_firing_for"), f"{where}.keep_firing_for", problems) or 0.0
    budget = _budget(node.get("budget"), f"{where}.budget", problems)
    selector = _parse_selector(node.get("select"), f"{where}.select", problems)
    if parser is None:
        return None
    spec, condition, resolve = parser(node, where, problems)
    if not (name and kind and rung in RUNGS and owner):
        return None
    return Rule(
        name=name, group=group, kind=kind, rung=rung, owner=owner, severity=severity, spec=spec,
        condition=condition, resolve=resolve, selector=selector, group_by=group_by,
        labels=tuple(sorted(labels.items())), annotations=tuple(sorted(annotations.items())),
        for_runs=for_runs, for_seconds=for_seconds, keep_firing_for=keep, source=f"{file}:{node.line}",
        budget=budget,
    )


def _budget(node: Node | None, key: str, problems: Problems) -> float | None:
    value = read_duration(node, key, problems)
    if value is not None and value <= 0:
        problems.add(node, key, "must be above 0 (how long one evaluation of the rule may take, e.g. 30s)")
        return None
    return value


def _ladder(node: Node | None, group: str, problems: Problems) -> tuple[str, ...]:
    """`ladder_inhibition: true` (the dataset label data.dataset) or `{labels: [data.dataset, dataset]}`."""
    key = f"groups.{group}.ladder_inhibition"
    if node is None or node.value is False:
        return ()
    if node.value is True:
        return ("data.dataset",)
    m = read_map(node, key, problems)
    if m is None:
        return ()
    check_keys(m, {"labels"}, problems, key)
    labels = read_str_list(m.get("labels"), f"{key}.labels", problems)
    if not labels:
        problems.add(m, f"{key}.labels", "name the series label(s) that identify a dataset, e.g. [data.dataset]")
        return ()
    return tuple(labels)


def parse_rule_file(root: Node, problems: Problems) -> list[RuleGroup]:
    if not root.is_map():
        problems.add(root, "", "a rule file must be a mapping with a groups list")
        return []
    check_keys(root, {"groups"}, problems, "")
    groups_node = root.get("groups")
    if groups_node is None or not groups_node.is_list():
        problems.add(groups_node or root, "groups", "must be a list of rule groups")
        return []
    groups: list[RuleGroup] = []
    for gi, g in enumerate(groups_node.value):
        gw = f"groups[{gi}]"
        if not g.is_map():
            problems.add(g, gw, "a group must be a mapping")
            continue
        check_keys(g, {"name", "interval", "rules", "ladder_inhibition", "budget"}, problems, gw)
        gname = _require_str(g, "name", gw, problems) or f"#{gi}"
        interval = read_duration(g.get("interval"), f"groups.{gname}.interval", problems)
        if g.get("interval") is None:
            interval = 60.0
        elif interval is not None and interval <= 0:
            problems.add(g.get("interval"), f"groups.{gname}.interval", "must be above 0")
            interval = None
        rules_node = g.get("rules")
        if rules_node is None or not rules_node.is_list():
            problems.add(rules_node or g, f"groups.{gname}.rules", "must be a list of rules")
            continue
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for ri, r in enumerate(rules_node.value):
            rule = _parse_rule(r, gname, ri, root.file, problems)
            if rule is None:
                continue
            if rule.name in seen:
                problems.add(r.get("alert"), f"groups.{gname}.{rule.name}",
                             f"duplicate alert name in the group (first at line {seen[rule.name]})")
                continue
            seen[rule.name] = r.line
            rules.append(rule)
        group_budget = _budget(g.get("budget"), f"groups.{gname}.budget", problems)
        if group_budget is not None:
            rules = [r if r.budget is not None else replace(r, budget=group_budget) for r in rules]
        if interval is not None:
            groups.append(RuleGroup(gname, interval, tuple(rules), source=f"{root.file}:{g.line}",
                                    inhibit_labels=_ladder(g.get("ladder_inhibition"), gname, problems),
                                    budget=group_budget))
    return groups


def rule_file_paths(paths: list[str]) -> list[str]:
    """Files as given; folders expand to their *.yaml / *.yml files (not *.test.yaml), sorted."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(str(f) for f in sorted(Path(p).iterdir())
                       if f.suffix in RULE_FILE_SUFFIXES and not f.name.endswith((".test.yaml", ".test.yml")))
        else:
            out.append(p)
    return out


def load_rules(paths: list[str]) -> RuleSet:
    """Load rule files and folders; raises InvalidConfig with every problem in every file."""
    ruleset, problems = read_rules(paths)
    if problems:
        raise InvalidConfig(problems)
    return ruleset


def read_rules(paths: list[str]) -> tuple[RuleSet, list[Problem]]:
    """The rules these files and folders define, as far as they could be built, and every problem found (sorted
    by file and line). `check` checks the rules further (their SQL) even when there are problems, so one run
    reports everything; anything else uses load_rules."""
    problems = Problems()
    groups: list[RuleGroup] = []
    group_sources: dict[str, str] = {}
    files = rule_file_paths(paths)
    if not files:
        problems.add(None, "", "no rule files found", file=", ".join(paths))
    for path in files:
        try:
            root = load_yaml_file(path)
        except InvalidConfig as exc:
            problems.items.extend(exc.problems)
            continue
        for group in parse_rule_file(root, problems):
            if group.name in group_sources:
                problems.add(None, f"groups.{group.name}",
                             f"duplicate group name (also in {group_sources[group.name]})", file=group.source)
                continue
            group_sources[group.name] = group.source
            groups.append(group)
    return RuleSet(tuple(groups)), sorted(problems, key=lambda p: (p.file, p.line))
