"""`check` for sql rules: each query is parsed, planned and described against the real schema, without a store.

A sql rule's query is judged by DuckDB when the rule runs; without this, `check` passed a DELETE, a typo, a
missing table or a result without a `value` column, and the rule failed only once deployed. Here each query meets
the same checks as at run time (evaluator.rules.kinds.sql: checked_query, writing_operator, result_columns) on an
empty in-memory store built by the Store itself (the schema's DDL, and file access disabled as in the daemon), and
its result is described (bound and planned, never run). The reasons are the run time's, without the rule id: the
problem's key names the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import duckdb
import structlog

from evaluator.rules.kinds.sql import checked_query, result_columns, ts_param
from evaluator.rules.loader import read_rules
from evaluator.rules.model import Rule, RuleError, RuleSet, SqlSpec
from evaluator.rules.select import rule_error
from evaluator.store.store import Store, StoreSettings
from evaluator.yamlsrc import InvalidConfig, Node, Problem, load_yaml_file


def check_rules(paths: list[str]) -> RuleSet:
    """load_rules, then sql_problems over the rules that loaded; InvalidConfig with every problem of both."""
    ruleset, problems = read_rules(paths)
    problems = problems + sql_problems(ruleset)
    if problems:
        raise InvalidConfig(sorted(problems, key=lambda p: (p.file, p.line)))
    return ruleset


def sql_problems(ruleset: RuleSet) -> list[Problem]:
    """One problem per sql rule whose query would fail at every evaluation, at the line of its `query`."""
    rules = [r for r in ruleset.rules() if isinstance(r.spec, SqlSpec) and r.spec.query.strip()]
    if not rules:
        return []
    lines = _query_lines({Problem.at(r.source, "", "").file for r in rules})
    problems: list[Problem] = []
    with _schema_cursor() as cur:
        for rule in rules:
            why = query_problem(cur, rule)
            if why is not None:
                p = Problem.at(rule.source, f"groups.{rule.group}.{rule.name}.query", why)
                problems.append(replace(p, line=lines.get((p.file, p.line), p.line)))
    return problems


def query_problem(cur: duckdb.DuckDBPyConnection, rule: Rule) -> str | None:
    """Why the query of sql rule `rule` cannot run on the schema of `cur` (the run time's reason, without the
    rule id), or None when it can."""
    params = {"ts": ts_param(0.0)}
    try:
        query, uses_ts = checked_query(cur, rule.id, rule.spec.query, params)
        try:
            description = cur.sql(query, params=params if uses_ts else None).description or []
        except duckdb.Error as exc:
            raise RuleError(f"{rule.id}: the query failed: {exc}") from None
        result_columns(rule.id, description)
    except Exception as exc:  # what the kind's caller (evaluate_each) turns into the rule's error at run time
        return str(rule_error(rule, exc)).removeprefix(f"{rule.id}: ")
    return None


@contextmanager
def _schema_cursor() -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on an empty in-memory store: the store's schema and its DuckDB settings, nothing logged."""
    quiet = structlog.wrap_logger(structlog.ReturnLogger(),
                                  wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    store = Store(StoreSettings(path=":memory:", threads=1), log=quiet)
    store.start()
    try:
        cur = store.cursor()
        try:
            yield cur
        finally:
            cur.close()
    finally:
        store.shutdown()


def _query_lines(files: set[str]) -> dict[tuple[str, int], int]:
    """(file, line of a rule) -> line of its `query` (a rule's position is where it starts; the query may be
    lines below it, or in a merged anchor). Files that no longer read are left out: the rule's line is used."""
    out: dict[tuple[str, int], int] = {}
    for file in files:
        try:
            root = load_yaml_file(file)
        except InvalidConfig:
            continue
        groups = root.get("groups")
        for group in groups.value if groups is not None and groups.is_list() else []:
            rules = group.get("rules")
            for node in rules.value if rules is not None and rules.is_list() else []:
                query = node.get("query")
                if isinstance(query, Node):
                    out[(file, node.line)] = query.line
    return out
