"""Rules end to end: the daemon with the payments rules, real OTel SDK spans for healthy and broken daily runs,
the expected alerts in the alerts table at the right runs; the scheduler's slots; SIGHUP reload; the CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from evaluator.daemon import Daemon
from evaluator.rules.engine import MemoryState, RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.model import Condition, Rule, RuleGroup, RuleSet, SqlSpec, ThresholdSpec
from evaluator.rules.scheduler import GroupScheduler
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock, daemon_process, loopback_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules" / "payments.rules.yaml"
DAY = 86400
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
T0 = 1_793_491_200  # 2026-11-01T00:00:00Z
HEALTHY_HIST = [0, 1, 142, 3824, 25962, 45925, 21464, 2603, 79, 1]
BROKEN_HIST = [1547, 36059, 56047, 6310, 38, 0, 0, 0, 0, 0]
MEDIANS = [20000, 24500, 21000, 23800, 22000, 22500, 21800, 23000, 22200, 21500, 23300, 22800, 21900, 22600]


def send_days(endpoint: str, days: range, broken: set[int]) -> None:
    """One features.daily.run span per day at 06:00 UTC, sent with the real SDK gRPC exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": "risk-feature-pipeline"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("payments")
    for day in days:
        end = (T0 + day * DAY + 6 * 3600) * 10**9
        bad = day in broken
        span = tracer.start_span("features.daily.run", start_time=end - 600 * 10**9)
        span.set_attribute("data.dataset", "payments/transactions_yesterday")
        span.set_attribute("data.freshness_lag_hours", 6.0 if bad else 0.02)
        span.set_attribute("data.row_count", 8_412_406 if bad else 10_000_000 + (day % 3) * 50_000)
        span.set_attribute("data.amount_paise.median", 55.0 if bad else float(MEDIANS[day % len(MEDIANS)]))
        span.set_attribute("data.amount_paise.histogram.counts", BROKEN_HIST if bad else HEALTHY_HIST)
        span.end(end_time=end)
    provider.shutdown()


def _alerts(cur: Any) -> list[tuple[str, str, str, str]]:
    return cur.execute("SELECT alert_name, from_state, state, strftime(run_at, '%Y-%m-%d') FROM alerts "
                       "ORDER BY seq").fetchall()


def test_daemon_with_payments_rules_fires_at_the_broken_run(tmp_path: Path) -> None:
    """Healthy days then a broken one, through the SDK: freshness, completeness and distribution fire at the
    broken run, and the firing state survives a restart."""
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)  # an hour after the broken run of day 14
    cfg = loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),))
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])  # the slot after the spans arrived
        cur = daemon.store.cursor()
        fired = {(a, s, r) for a, _, s, r in _alerts(cur) if s == "firing"}
        assert fired == {("PaymentsFreshnessLag", "firing", "2026-11-15"), ("PaymentsRowCount", "firing", "2026-11-15"),
                         ("PaymentsAmountMedian", "firing", "2026-11-15"),
                         ("PaymentsAmountPSI", "firing", None)}, _alerts(cur)
        row = cur.execute("SELECT summary, len(violating_spans), owner, rung, value FROM alerts "
                          "WHERE alert_name = 'PaymentsFreshnessLag' AND state = 'firing'").fetchone()
        assert row is not None
        summary, links, owner, rung, value = row
        assert summary.startswith("payments/transactions_yesterday: newest event 6 h before midnight")
        assert (links, owner, rung, value) == (1, "data-platform", "freshness", 6.0)
        assert cur.execute("SELECT count(*) FROM rule_health WHERE health = 'ok'").fetchone() == (5,)
        # the fortnight arrived at once (a backfill): what happened before the rules' lookback is folded into the
        # state, not reported; only the broken day's transitions are
        assert {r for _, _, _, r in _alerts(cur)} == {"2026-11-15", None}
        cur.close()
    finally:
        daemon.shutdown()
    # restart: the state is still firing and nothing new is recorded for the same runs
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    try:
        assert daemon.engine.evaluate_all([clock.now()]) == []
        cur = daemon.store.cursor()
        states = dict(cur.execute("SELECT rule_id, state FROM alert_state").fetchall())
        cur.close()
        assert states["payments-contract/PaymentsFreshnessLag"] == "firing"
    finally:
        daemon.shutdown()


def test_scheduler_slots_evaluation_times_and_counts_missed_slots() -> None:
    """The job evaluates at the start of the clock's slot, once per slot; skipped slots are counted."""
    seen: list[float] = []

    class Recorder(RuleEngine):
        def evaluate_group(self, group: RuleGroup, steps: Any) -> list[Any]:
            seen.extend(steps)
            return []

    clock = FakeClock(1000.0 * 60 + 17)
    tel = Telemetry()
    engine = Recorder(lambda: None, new_kinds(), MemoryState(), tel)
    sched = GroupScheduler(engine, clock, tel, evaluation_delay=0)
    group = RuleGroup("g", 60.0, ())
    sched.reschedule((group,))  # not started: the job body is driven by hand
    assert sched.run_slot("g") == 60_000.0
    assert sched.run_slot("g") is None  # same slot: not evaluated twice
    clock.advance(60)
    assert sched.run_slot("g") == 60_060.0
    clock.advance(60 * 4)  # three slots missed while an evaluation overran
    assert sched.run_slot("g") == 60_300.0
    assert seen == [60_000.0, 60_060.0, 60_300.0]
    assert tel.get("rule_group_missed_slots_total").value(group="g") == 3


def test_a_slot_is_evaluated_after_the_evaluation_delay() -> None:
    """With a delay of 30 s, at 17 s into a minute the slot evaluated is the previous minute's; at 30 s this
    minute's (spans that ended before the slot have had 30 s to arrive)."""
    seen: list[float] = []

    class Recorder(RuleEngine):
        def evaluate_group(self, group: RuleGroup, steps: Any) -> list[Any]:
            seen.extend(steps)
            return []

    clock = FakeClock(1000.0 * 60 + 17)
    tel = Telemetry()
    sched = GroupScheduler(Recorder(lambda: None, new_kinds(), MemoryState(), tel), clock, tel, evaluation_delay=30)
    sched.reschedule((RuleGroup("g", 60.0, ()),))
    assert sched.run_slot("g") == 59_940.0
    clock.advance(13)
    assert sched.run_slot("g") == 60_000.0
    assert seen == [59_940.0, 60_000.0]


def test_scheduler_runs_groups_and_stops_without_leaking_threads(tmp_path: Path, thread_guard: None) -> None:
    clock = FakeClock(T0)
    tel = Telemetry()
    calls: list[float] = []

    class Recorder(RuleEngine):
        def evaluate_group(self, group: RuleGroup, steps: Any) -> list[Any]:
            calls.extend(steps)
            return []

    sched = GroupScheduler(Recorder(lambda: None, new_kinds(), MemoryState(), tel), clock, tel, evaluation_delay=0)
    sched.shutdown()  # safe before start
    sched.start((RuleGroup("fast", 0.25, ()),))
    wait_for(lambda: len(calls) >= 1)  # the first evaluation happens at start
    clock.advance(0.25)
    wait_for(lambda: len(calls) >= 2)
    sched.shutdown()
    sched.shutdown()
    assert calls == [T0, T0 + 0.25]  # the clock did not move again: no third evaluation


def test_an_unhealthy_rule_does_not_stop_the_others(tmp_path: Path) -> None:
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb"))
    daemon.start()
    try:
        good = Rule(name="Good", group="g", kind="threshold", rung="custom", owner="me", severity="info",
                    spec=ThresholdSpec("data.x"), condition=Condition(">", 1.0))
        bad = Rule(name="Bad", group="g", kind="sql", rung="custom", owner="me", severity="info",
                   spec=SqlSpec("SELECT nope AS value"),
                   condition=Condition(">", 1.0))
        group = RuleGroup("g", 60.0, (good, bad))
        daemon.engine.load(RuleSet((group,)))
        daemon.engine.evaluate_group(group, float(T0))
        assert daemon.engine.health["g/Good"] is None
        assert "nope" in (daemon.engine.health["g/Bad"] or "")
        cur = daemon.store.cursor()
        assert dict(cur.execute("SELECT rule_id, health FROM rule_health").fetchall()) == {
            "g/Good": "ok", "g/Bad": "error"}
        cur.close()
        assert "otel_evaluator_rules_unhealthy 1" in daemon.telemetry.render_prometheus().splitlines()
    finally:
        daemon.shutdown()


def test_sighup_reloads_rules_and_keeps_state_of_unchanged_ones(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(RULES, rules)
    with daemon_process(["--db", str(tmp_path / "ev.duckdb"), "--rules", str(rules), *PORTS]) as proc:
        assert proc.proc is not None
        rules.write_text(RULES.read_text().replace("threshold: 0.5", "threshold: 0.75"))
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any('"rules reloaded"' in ln for ln in proc.lines))
        rules.write_text("groups: [oops")
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("rule reload refused" in ln for ln in proc.lines))
        assert proc.proc.poll() is None  # still running on the previous rules
        assert proc.stop() == 0


def test_invalid_rules_fail_start_up_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        kind: threshold\n")
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", "--db", str(tmp_path / "ev.duckdb"),
                             "--rules", str(bad), *PORTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:4: groups.g.A.rung: missing" in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], capture_output=True, text=True, timeout=120)


def test_check_eval_replay_and_test_commands(tmp_path: Path) -> None:
    db = tmp_path / "ev.duckdb"
    with daemon_process(["--db", str(db), *PORTS]) as proc:
        send_days(proc.grpc_endpoint, range(0, 15), broken={14})
        assert proc.stop() == 0
    assert _cli("check", str(RULES)).returncode == 0
    at = "2026-11-15T07:00:00Z"
    result = _cli("eval", "--db", str(db), "--rules", str(RULES), "--at", at, "--format", "json")
    assert result.returncode == 0, result.stderr
    (evaluation,) = json.loads(result.stdout)["evaluations"]
    assert evaluation["evaluated_at"] == "2026-11-15T07:00:00.000Z"
    states = {(r["rule_id"], r["state"]) for r in evaluation["results"]}
    assert ("payments-contract/PaymentsFreshnessLag", "firing") in states
    assert ("payments-contract/PaymentsRunMissing", "inactive") in states
    table = _cli("eval", "--db", str(db), "--rules", str(RULES), "--at", at)
    assert table.returncode == 0 and "RULE_ID" in table.stdout and "PaymentsRowCount" in table.stdout
    several = _cli("eval", "--db", str(db), "--rules", str(RULES), "--at", "2026-11-14T07:00:00Z", at)
    assert several.returncode == 0, several.stderr
    lines = [ln for ln in several.stdout.splitlines() if "PaymentsFreshnessLag" in ln]
    assert [ln.split()[0] for ln in lines] == ["2026-11-14T07:00:00Z", "2026-11-15T07:00:00Z"]
    assert ["firing" in ln for ln in lines] == [False, True]
    result = _cli("replay", "--db", str(db), "--rules", str(RULES), "--from", "2026-11-10T00:00:00Z",
                  "--to", "2026-11-16T00:00:00Z", "--step", "1h", "--format", "json")
    assert result.returncode == 0, result.stderr
    transitions = json.loads(result.stdout)["transitions"]
    firing = [(t["alert_name"], t["changed_at"], t["evaluated_at"]) for t in transitions if t["state"] == "firing"]
    # at the run's time, decided by the first hourly evaluation after it
    assert ("PaymentsFreshnessLag", "2026-11-15T06:00:00.000Z", "2026-11-15T06:00:00.000Z") in firing
    assert all(isinstance(t["series"], dict) for t in transitions)
    # the daemon's file is untouched by eval/replay (read-only)
    con = duckdb.connect(str(db), read_only=True)
    # (the daemon's own Watchdog, of its self-monitoring group, is the only alert the daemon recorded itself)
    assert con.execute("SELECT count(*) FROM alerts WHERE group_name <> 'otel-evaluator'").fetchone() == (0,)
    con.close()


def test_eval_on_a_running_daemons_file_says_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "ev.duckdb"
    with daemon_process(["--db", str(db), *PORTS]):
        result = _cli("eval", "--db", str(db), "--rules", str(RULES), "--at", "2026-11-15T07:00:00Z")
    assert result.returncode == 2
    assert "stop the daemon, or copy the file" in result.stderr


def test_rule_test_files_pass_and_a_wrong_expectation_fails(tmp_path: Path) -> None:
    result = _cli("test", str(ROOT / "rules" / "payments.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("2 passed, 0 failed")
    wrong = tmp_path / "wrong.test.yaml"
    shutil.copy(RULES, tmp_path / "payments.rules.yaml")
    first_test_only = (ROOT / "rules" / "payments.test.yaml").read_text().split("\n  - name: a pipeline that stops")[0]
    wrong.write_text(first_test_only.replace(
        "{eval_time: 13d20h, alertname: PaymentsFreshnessLag, exp_alerts: []}",
        "{eval_time: 13d20h, alertname: PaymentsFreshnessLag, exp_alerts: [{labels: {}, state: firing}]}"))
    result = _cli("test", str(wrong))
    assert result.returncode == 1
    assert "expected [firing {}], got none" in result.stdout



def test_reload_keeps_the_state_of_unchanged_rules_and_resets_changed_ones(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    cfg = loopback_config(tmp_path / "ev.duckdb", rules=(str(tmp_path / "rules.yaml"),))
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
        (tmp_path / "rules.yaml").write_text(RULES.read_text().replace("tolerance: 0.05", "tolerance: 0.5"))
        assert daemon.reload_rules()
        cur = daemon.store.cursor()
        states = dict(cur.execute("SELECT rule_id, state FROM alert_state").fetchall())
        cur.close()
        assert states["payments-contract/PaymentsFreshnessLag"] == "firing"
        loaded = daemon.engine.state.load(list(daemon.engine.ruleset.groups[0].rules))
        changed = loaded["payments-contract/PaymentsRowCount"]
        assert changed.states == {} and changed.judged_to is None  # changed rule: old state no longer applies
        assert len(loaded["payments-contract/PaymentsFreshnessLag"].states) == 1
        clock.advance(60)
        events = daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
        assert {e.rule.name for e in events} <= {"PaymentsRowCount"}  # only the changed rule re-judges its runs
    finally:
        daemon.shutdown()
