"""`check` plans every sql rule's query on the real schema: what would fail at every evaluation fails `check`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evaluator.rules.loader import load_rules
from evaluator.rules.sqlcheck import sql_problems
from evaluator.store.store import Store, StoreSettings

# alert name -> (query, what the problem says); each fails at every evaluation
BAD = {
    "Deletes": ("DELETE FROM spans RETURNING 1 AS value", "only a SELECT may run as a rule, not DELETE"),
    "Typo": ("SELEC 1", "the query does not parse: Parser Error: syntax error at or near \"SELEC\""),
    "NoTable": ("SELECT count(*) AS value FROM no_such_table", "Table with name no_such_table does not exist"),
    "NoValue": ("SELECT count(*) AS n FROM spans", "the query must return exactly one column named value, got "
                                                   "columns n"),
    "TwoStatements": ("SELECT 1 AS value; SELECT 2 AS value",
                      "the query must be exactly one SELECT statement, found 2"),
    "ReadsFiles": ("SELECT count(*) AS value FROM read_csv('/etc/passwd')",
                   "file system operations are disabled by configuration"),
    "WritingCte": ("WITH d AS (DELETE FROM spans RETURNING *) SELECT count(*) AS value FROM d",
                   "the query writes"),
    "TextValue": ("SELECT name AS value FROM spans", "the value column is VARCHAR, not a number"),
    "UnknownParam": ("SELECT count(*) AS value FROM spans WHERE end_time > $since",
                     "unknown query parameter(s) $since; only $ts (the evaluation time) exists"),
}
GOOD = {
    "UsesTs": "SELECT d.value AS dataset, count(*) AS value FROM spans s JOIN span_strings d ON d.span_key = "
              "s.span_key AND d.key = 'data.dataset' WHERE s.end_time > $ts - INTERVAL 1 DAY GROUP BY ALL",
    "Plain": "SELECT 0.5::DECIMAL(4, 2) AS value",
}


def _rule(name: str, query: str) -> str:
    return (f"      - alert: {name}\n        kind: sql\n        rung: custom\n        owner: data-platform\n"
            f"        op: \">\"\n        threshold: 1\n        query: {json.dumps(query)}\n")


def _rule_file(path: Path, rules: dict[str, str]) -> dict[str, int]:
    """Writes one group of sql rules; returns the line of each rule's query."""
    text = "groups:\n  - name: g\n    rules:\n" + "".join(_rule(n, q) for n, q in rules.items())
    path.write_text(text)
    lines = text.splitlines()
    return {name: next(i + 1 for i, line in enumerate(lines) if line == f"        query: {json.dumps(query)}")
            for name, query in rules.items()}


def eval_rows(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """(rule id, row) of every result in `eval --format json` output: the rows are the objects with a detail."""
    if isinstance(doc, list):
        return [row for item in doc for row in eval_rows(item)]
    if not isinstance(doc, dict):
        return []
    if "detail" in doc:
        return [(str(doc.get("rule_id", doc.get("rule"))), doc)]
    return [row for value in doc.values() for row in eval_rows(value)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], capture_output=True, text=True, timeout=120)


def _problems(stderr: str) -> dict[str, str]:
    """check's problem lines by key, continuation lines joined with newlines."""
    out: dict[str, str] = {}
    key = ""
    for line in stderr.splitlines():
        if line.startswith("    "):
            out[key] += "\n" + line.strip()
        elif m := re.match(r"  (.+?:\d+): (groups\.\S+): (.*)$", line):
            key = f"{m.group(1)} {m.group(2)}"
            out[key] = m.group(3)
    return out


def test_check_plans_sql_rules_against_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "sql.rules.yaml"
    lines = _rule_file(path, {**{n: q for n, (q, _) in BAD.items()}, **GOOD})
    result = _cli("check", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"{len(BAD)} problem(s):\n"), result.stderr  # all at once
    problems = _problems(result.stderr)
    assert len(problems) == len(BAD), result.stderr
    for name, (_, why) in BAD.items():
        message = problems.get(f"{path}:{lines[name]} groups.g.{name}.query")
        assert message is not None and why in message, (name, result.stderr)
        assert "g/" not in message.split(":")[0], message  # the key names the rule; the reason does not repeat it

    good = tmp_path / "good.rules.yaml"
    _rule_file(good, GOOD)
    result = _cli("check", str(good))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok: 1 group(s), 2 rule(s)\n", "")


def test_check_and_eval_give_the_same_reason(tmp_path: Path) -> None:
    """The reason `check` gives is the error `eval` records for the rule when it runs, without the rule id.
    (A data-modifying CTE is refused either way, but on the read-only file `eval` opens DuckDB refuses to plan
    it before the plan can be read, so that one reason is DuckDB's; the daemon's store is writable like check's.)"""
    rules = tmp_path / "sql.rules.yaml"
    _rule_file(rules, {n: q for n, (q, _) in BAD.items()})
    checked = {k.rsplit(".", 2)[-2]: v for k, v in _problems(_cli("check", str(rules)).stderr).items()}
    db = tmp_path / "ev.duckdb"
    store = Store(StoreSettings(str(db)))
    store.start()
    store.shutdown()
    result = _cli("eval", "--db", str(db), "--rules", str(rules), "--at", "2026-11-20T06:00:00Z", "--format", "json")
    assert result.returncode == 1, result
    details = {rule_id.removeprefix("g/"): row["detail"] for rule_id, row in eval_rows(json.loads(result.stdout))}
    assert set(details) == set(checked) == set(BAD)
    assert "read-only" in details.pop("WritingCte")
    for name, detail in details.items():
        assert [x.strip() for x in detail.removeprefix(f"g/{name}: ").splitlines() if x.strip()] == \
            checked[name].splitlines(), name


def test_sql_problems_sit_with_the_loader_problems_at_the_query_line(tmp_path: Path) -> None:
    """The query's own line, also when it sits below the rule or in a merged anchor; loader problems of other
    rules in the same run."""
    path = tmp_path / "r.yaml"
    path.write_text("""\
groups:
  - name: g
    rules:
      - &sql
        alert: First
        kind: sql
        rung: custom
        owner: x
        op: ">"
        threshold: 1
        query: |
          SELECT count(*) AS value
          FROM nowhere
      - <<: *sql
        alert: Second
      - alert: Third
        kind: sql
        rung: custom
        owner: x
        op: ">"
        threshold: 1
        colour: red
        query: SELECT 1 AS v
""")
    result = _cli("check", str(path))
    assert result.returncode == 1
    text = result.stderr
    assert text.startswith("4 problem(s):\n"), text
    for line, key, why in ((11, "groups.g.First.query", "Table with name nowhere does not exist"),
                           (11, "groups.g.Second.query", "Table with name nowhere does not exist"),
                           (22, "groups.g.Third.colour", "unknown key"),
                           (23, "groups.g.Third.query", "exactly one column named value, got columns v")):
        assert re.search(rf"^  {re.escape(str(path))}:{line}: {re.escape(key)}: .*{re.escape(why)}", text, re.M), \
            (line, key, text)
    assert "    LINE 2: FROM nowhere" in text  # DuckDB's pointer into the query, indented under its problem


def test_sql_problems_is_a_library_function(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    lines = _rule_file(path, {"Typo": "SELEC 1", **GOOD})
    (problem,) = sql_problems(load_rules([str(path)]))
    assert (problem.file, problem.line, problem.key) == (str(path), lines["Typo"], "groups.g.Typo.query")
    assert problem.why.startswith("the query does not parse: ")


@pytest.mark.parametrize("query", ["SELECT 1 AS value", "FROM spans SELECT count(*) AS value WHERE end_time < $ts"])
def test_nothing_is_written_anywhere(tmp_path: Path, query: str) -> None:
    """check needs no store: it plans on an empty in-memory one and leaves no file behind."""
    path = tmp_path / "r.yaml"
    _rule_file(path, {"A": query})
    result = subprocess.run([sys.executable, "-m", "evaluator", "check", str(path)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
