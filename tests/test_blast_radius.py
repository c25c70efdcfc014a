"""Blast radius: one bad series, rule or group never takes down the others. A series whose data cannot be judged
is "no data" alone, counted per rule and reason; a rule over its time budget is stopped (DuckDB interrupt) and
unhealthy while the group goes on; in the daemon a group's evaluation ends within its interval."""

from __future__ import annotations

from pathlib import Path

from evaluator.rules.backends import MemoryState
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.loader import load_rules
from evaluator.rules.model import Condition, Rule, RuleGroup, RuleSet, SqlSpec
from evaluator.store.store import Store
from evaluator.telemetry import Telemetry

TS = 1_800_000_000.0
SLOW = "SELECT count(*) AS value FROM range(100000000) a, range(100000000) b"


def _sql(name: str, query: str, budget: float | None = None) -> Rule:
    return Rule(name, "g", "sql", "custom", "me", "info", SqlSpec(query), Condition(">", 1.0), budget=budget)


def test_a_rule_over_its_budget_is_stopped_and_the_group_goes_on(store: Store) -> None:
    tel = Telemetry()
    group = RuleGroup("g", 60.0, (_sql("Slow", SLOW, budget=1.0), _sql("Fast", "SELECT 5.0 AS value")))
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState(), tel)
    engine.load(RuleSet((group,)))
    events = engine.evaluate_group(group, [TS])
    assert [(e.rule.name, e.transition.to_state) for e in events] == [("Fast", "firing")]
    error = engine.health["g/Slow"] or ""
    assert error.startswith("over its time budget of 1 s: stopped (DuckDB interrupt)")
    assert engine.health["g/Fast"] is None
    assert tel.get("rule_evaluations_stopped_total").value(reason="rule_budget") == 1
    # the store is usable afterwards: the stopped query left nothing behind
    with store.cursor() as cur:
        assert cur.execute("SELECT 1").fetchone() == (1,)


def test_a_group_evaluation_ends_within_its_interval(store: Store) -> None:
    """In the daemon (group_deadline) the rules left when the group's interval is used up are not evaluated this
    time, each says why, and the rules before them keep their results."""
    tel = Telemetry()
    rules = (_sql("Fast", "SELECT 5.0 AS value"), _sql("Slow1", SLOW, budget=10.0), _sql("Slow2", SLOW, budget=10.0))
    group = RuleGroup("g", 1.5, rules)
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState(), tel, group_deadline=True)
    engine.load(RuleSet((group,)))
    engine.evaluate_group(group, [TS])
    health = engine.health
    assert health["g/Fast"] is None
    assert "over its time budget" in (health["g/Slow1"] or "")
    assert health["g/Slow2"] == "not evaluated: its group's evaluation already took the group's interval"
    assert tel.get("rule_evaluations_stopped_total").value(reason="group_interval") == 1


def test_budgets_come_from_the_rule_then_its_group_then_the_default(tmp_path: Path) -> None:
    path = tmp_path / "r.rules.yaml"
    path.write_text("""
groups:
  - name: g
    budget: 5s
    rules:
      - {alert: A, kind: sql, rung: custom, owner: me, query: "SELECT 1 AS value", op: ">", threshold: 1}
      - {alert: B, kind: sql, rung: custom, owner: me, query: "SELECT 1 AS value", op: ">", threshold: 1,
         budget: 2m}
  - name: h
    rules:
      - {alert: C, kind: sql, rung: custom, owner: me, query: "SELECT 1 AS value", op: ">", threshold: 1}
""")
    rs = load_rules([str(path)])
    a, b, c = rs.rules()
    engine = RuleEngine(lambda: None, new_kinds(), MemoryState())
    assert (engine.budget(a), engine.budget(b), engine.budget(c)) == (5.0, 120.0, 30.0)
    assert a.fingerprint == load_rules([str(path)]).rules()[0].fingerprint
    # how long a rule may take is not what it decides: a new budget keeps the rule's state
    path.write_text(path.read_text().replace("budget: 5s", "budget: 9s"))
    assert load_rules([str(path)]).rules()[0].fingerprint == a.fingerprint


def test_series_that_cannot_be_judged_are_counted_per_rule_and_reason(store: Store) -> None:
    """Each "no data" judgement is counted with its reason; the rule's judged series are unaffected."""
    tel = Telemetry()
    query = "SELECT * FROM (VALUES ('a', 5.0), ('b', NULL)) t(dataset, value)"
    group = RuleGroup("g", 60.0, (_sql("Mixed", query),))
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState(), tel)
    engine.load(RuleSet((group,)))
    engine.evaluate_group(group, [TS, TS + 60])
    memory = engine.state
    assert isinstance(memory, MemoryState)
    states = {dict(s.series)["dataset"]: s.state for s in memory.states(group.rules[0]).values()}
    assert states == {"a": "firing", "b": "nodata"}
    assert tel.get("rule_series_nodata_total").value(rule_id="g/Mixed", reason="null_value") == 2


def test_a_resolve_judged_with_later_slots_in_one_evaluation_is_sent(store: Store) -> None:
    """After a gap, one evaluation judges several slots: the alert resolves and goes inactive within it. The
    resolve of an alert that was sent firing is sent too (not recorded as inhibited)."""
    query = ("SELECT CASE WHEN $ts < make_timestamp(1800000030000000) THEN 5.0 ELSE 0.0 END AS value")
    group = RuleGroup("g", 60.0, (_sql("Flip", query),))
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState())
    engine.load(RuleSet((group,)))
    (fired,) = engine.evaluate_group(group, [TS])
    assert (fired.transition.to_state, fired.inhibited) == ("firing", False)
    (resolved,) = engine.evaluate_group(group, [TS + 180])  # slots TS+60 (resolved), +120, +180 (inactive)
    assert (resolved.transition.to_state, resolved.transition.at, resolved.inhibited) == ("resolved", TS + 60, False)


def test_a_rule_whose_result_would_not_fit_is_refused_not_held(store: Store) -> None:
    """The memory side of a rule's budget: a query returning more series than a rule may hold is unhealthy with
    the reason, and the group goes on."""
    from evaluator.rules.kinds import sql

    wide = f"SELECT i::VARCHAR AS k, 1.0 AS value FROM range({sql.MAX_SERIES + 1}) t(i)"
    group = RuleGroup("g", 60.0, (_sql("Wide", wide), _sql("Fast", "SELECT 5.0 AS value")))
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState())
    engine.load(RuleSet((group,)))
    engine.evaluate_group(group, [TS])
    assert "returns more than 100000 rows (series)" in (engine.health["g/Wide"] or "")
    assert engine.health["g/Fast"] is None
