"""`check`, `eval`, `replay` and `test`: the rules over a file, with the daemon's own evaluation code.

`eval` and `replay` open a stopped daemon's file read-only and keep alert state in memory; `test` builds a fresh
store per test. All three evaluate with evaluator.rules.engine exactly as the daemon does, so the same rules over
the same data at the same times give the same states and transitions.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, TextIO

from evaluator.commands.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Progress,
    iso,
    print_table,
    write_problems,
)
from evaluator.rules.backends import MemoryState
from evaluator.rules.engine import AlertEvent, RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.loader import load_rules
from evaluator.rules.model import Rule, RuleGroup, RuleSet
from evaluator.rules.shape import error_record, state_record, transition_record
from evaluator.rules.shape import iso as iso_ms
from evaluator.store.store import Store, StoreError, StoreSettings
from evaluator.yamlsrc import InvalidConfig, parse_duration

STATE_COLUMNS = ["rule_id", "series", "state", "value", "threshold", "consecutive_violations", "active_at", "detail"]
TRANSITION_COLUMNS = ["evaluated_at", "changed_at", "rule_id", "series", "from_state", "state", "value", "threshold",
                      "summary"]


def check(paths: list[str], out: TextIO, err: TextIO) -> int:
    from evaluator.rules.sqlcheck import check_rules

    try:
        rs = check_rules(paths)
    except InvalidConfig as exc:
        err.write(f"{len(exc.problems)} problem(s):\n")
        write_problems(exc, err)
        return EXIT_PROBLEMS
    out.write(f"ok: {len(rs.groups)} group(s), {len(rs.rules())} rule(s)\n")
    return EXIT_OK


class _Opened:
    def __init__(self, store: Store, engine: RuleEngine, state: MemoryState, ruleset: RuleSet) -> None:
        self.store, self.engine, self.state, self.ruleset = store, engine, state, ruleset


def _open(db: str, rules: list[str], err: TextIO) -> _Opened | int:
    try:
        rs = load_rules(rules)
    except InvalidConfig as exc:
        err.write("invalid rules:\n")
        write_problems(exc, err)
        return EXIT_USAGE
    store = Store(StoreSettings(path=db, read_only=True))
    try:
        store.start()
    except StoreError as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_USAGE
    state = MemoryState()
    engine = RuleEngine(store.cursor, new_kinds(), state)
    engine.load(rs)
    return _Opened(store, engine, state, rs)


def _no_series(rule: Rule) -> str:
    if rule.kind == "sql":
        return "no series: the query returned no rows"
    return "no series: nothing the rule selects has been seen"


def state_rows(opened: _Opened) -> list[dict[str, Any]]:
    """Every rule's series now, in the state shape; a rule that failed or has no series says so."""
    rows: list[dict[str, Any]] = []
    health = opened.engine.health
    for rule in opened.ruleset.rules():
        error = health.get(rule.id)
        if error:
            rows.append(error_record(rule, error))
            continue
        series = opened.state.states(rule)
        if not series:
            rows.append({**error_record(rule, _no_series(rule)),
                         "state": "inactive" if rule.kind == "sql" else "nodata"})
        for _, s in sorted(series.items()):
            rows.append(state_record(rule, s))
    return rows


def evaluate_at(db: str, rules: list[str], times: list[float], fmt: str, out: TextIO, err: TextIO) -> int:
    """Evaluate every rule at each time in order (one engine: the first time is its first evaluation) and print
    every rule's series after each: the per-time values table a model owner asks for."""
    opened = _open(db, rules, err)
    if isinstance(opened, int):
        return opened
    evaluations: list[dict[str, Any]] = []
    failed = False
    try:
        for at in sorted(times):
            opened.engine.evaluate_all([at])
            rows = state_rows(opened)
            failed = failed or any(r["state"] == "error" for r in rows)
            evaluations.append({"evaluated_at": iso_ms(at), "results": rows})
    finally:
        opened.store.shutdown()
    if fmt == "json":
        out.write(json.dumps({"evaluations": evaluations}, indent=2) + "\n")
    elif len(evaluations) == 1:
        out.write(f"evaluated at {iso(sorted(times)[0])}\n")
        print_table(evaluations[0]["results"], STATE_COLUMNS, out)
    else:
        table = [{"evaluated_at": e["evaluated_at"], **r} for e in evaluations for r in e["results"]]
        print_table(table, ["evaluated_at", *STATE_COLUMNS], out)
    return EXIT_PROBLEMS if failed else EXIT_OK


def replay_steps(group: RuleGroup, start: float, end: float, step: float | None) -> list[float]:
    """The evaluation times of a group in [start, end]: every `step` from start, or, without one, the group's own
    slots (multiples of its interval), as the daemon evaluates it. A range with no slot is evaluated at its end."""
    if step is not None:
        n = math.floor((end - start) / step + 1e-9) + 1
        return [start + i * step for i in range(n)]
    first = math.ceil(start / group.interval - 1e-9)
    last = math.floor(end / group.interval + 1e-9)
    slots = [k * group.interval for k in range(first, last + 1)]
    return slots or [end]


CHUNK = 256  # evaluation times per call: big enough to batch, small enough for a lively progress line


def replay(db: str, rules: list[str], start: float, end: float, step: str | None, fmt: str, out: TextIO,
           err: TextIO, progress: TextIO | None = None) -> int:
    """progress: where to draw the progress line (see common.progress_stream), or None for none."""
    step_s: float | None = None
    if step is not None:
        try:
            step_s = parse_duration(step)
        except ValueError as exc:
            err.write(f"otel-evaluator: --step: {exc}\n")
            return EXIT_USAGE
        if step_s <= 0:
            err.write("otel-evaluator: --step must be positive\n")
            return EXIT_USAGE
    if end < start:
        err.write("otel-evaluator: need --from <= --to\n")
        return EXIT_USAGE
    opened = _open(db, rules, err)
    if isinstance(opened, int):
        return opened
    plan = [(g, replay_steps(g, start, end, step_s)) for g in opened.ruleset.groups]
    total = sum(len(times) for _, times in plan)
    events: list[AlertEvent] = []
    bar = Progress(progress, total)
    done = 0
    try:
        for group, times in plan:
            for i in range(0, len(times), CHUNK):
                chunk = times[i:i + CHUNK]
                events.extend(opened.engine.evaluate_group(group, chunk, step_s))
                done += len(chunk)
                bar.update(done, chunk[-1], len(events))
    finally:
        bar.close()
        opened.store.shutdown()
    events.sort(key=lambda ev: (ev.transition.evaluated_at or 0.0, ev.transition.at, ev.rule.id))
    rows = [transition_record(ev) for ev in events]
    if fmt == "json":
        out.write(json.dumps({"from": iso_ms(start), "to": iso_ms(end), "evaluations": total,
                              "transitions": rows}, indent=2) + "\n")
    else:
        out.write(f"{total} evaluations from {iso(start)} to {iso(end)}: {len(rows)} transition(s)\n")
        if rows:
            print_table(rows, TRANSITION_COLUMNS, out)
    errors = {k: v for k, v in opened.engine.health.items() if v}
    for rule_id, error in errors.items():
        err.write(f"rule {rule_id} failed: {error}\n")
    return EXIT_PROBLEMS if errors else EXIT_OK


def run_tests(paths: list[str], out: TextIO, err: TextIO) -> int:
    """`otel-evaluator test`: exit 0 all passed, 1 a test failed or a file is invalid.

    Each test has its own store and engine, so the tests of a file run on threads, one per core (DuckDB releases
    the GIL while it works); results are printed in the file's order."""
    from concurrent.futures import ThreadPoolExecutor

    from evaluator.commands.ruletest import parse_test_file, run_test

    def one(test: Any, ruleset: RuleSet, interval: float) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="otel-evaluator-test-") as workdir:
            return run_test(test, ruleset, interval, workdir)

    failed = passed = 0
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for path in paths:
            try:
                tf = parse_test_file(path)
                ruleset = load_rules(tf.rule_files)
            except InvalidConfig as exc:
                err.write(f"{path}: invalid:\n" + "".join(f"  {p}\n" for p in exc.problems))
                failed += 1
                continue
            runs = [(test, pool.submit(one, test, ruleset, tf.interval)) for test in tf.tests]
            for test, future in runs:
                failures = future.result()
                if failures:
                    failed += 1
                    out.write(f"FAIL {path}: {test.name}\n" + "".join(f"  {f}\n" for f in failures))
                else:
                    passed += 1
                    out.write(f"ok   {path}: {test.name}\n")
    out.write(f"{passed} passed, {failed} failed\n")
    return EXIT_PROBLEMS if failed else EXIT_OK
