"""The postmortem tools: the ladder (freshness is where to start on the payments broken day, from the daemon and
from its file; by service), admin POST /evaluate and its ordering with the scheduler, replay's progress line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from test_rules_e2e import DAY, RULES, T0, send_days

from evaluator.daemon import Daemon
from evaluator.rules.commands import PROGRESS_ENV, progress_stream, replay
from evaluator.rules.engine import MemoryState, RuleEngine
from evaluator.rules.kinds import KINDS
from evaluator.rules.model import RuleGroup
from evaluator.rules.scheduler import GroupScheduler
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock, loopback_config

DATASET = "payments/transactions_yesterday"


def test_ladder_names_freshness_first_from_the_daemon_and_from_the_file_and_by_service(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    db = tmp_path / "ev.duckdb"
    daemon = Daemon(loopback_config(db, rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            (ladder,) = json.loads(resp.read())
        assert ladder["dataset"] == DATASET and ladder["start_here"] == "freshness"
        status = {r["rung"]: (r["status"], r["owner"]) for r in ladder["rungs"]}
        assert status == {"freshness": ("firing", "data-platform"), "completeness": ("firing", "producer-team"),
                          "distribution": ("firing", "partner-integration"), "prediction_quality": ("unchecked", None)}
        with urllib.request.urlopen(admin + "/alerts", timeout=5) as resp:
            alerts = json.loads(resp.read())
        assert sorted(a["alert"] for a in alerts) == ["PaymentsAmountMedian", "PaymentsAmountPSI",
                                                      "PaymentsFreshnessLag", "PaymentsRowCount"]
        live = subprocess.run([sys.executable, "-m", "evaluator", "ladder", "--admin", admin],
                              capture_output=True, text=True, timeout=60)
        assert live.returncode == 0, live.stderr
        # by service: the datasets that the service's spans name
        for service, expected in (("risk-feature-pipeline", [DATASET]), ("payments-api", [])):
            with urllib.request.urlopen(admin + "/ladder?service=" + service, timeout=5) as resp:
                assert [lad["dataset"] for lad in json.loads(resp.read())] == expected
    finally:
        daemon.shutdown()
    base = [sys.executable, "-m", "evaluator", "ladder", "--admin", "http://127.0.0.1:9", "--db", str(db)]
    mine = subprocess.run([*base, "--service", "risk-feature-pipeline"], capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0 and mine.stdout.splitlines()[0] == DATASET, mine.stdout + mine.stderr
    other = subprocess.run([*base, "--service", "fraud-model"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and other.stdout == "no dataset of service fraud-model has alert state yet\n"
    for out in (live.stdout, subprocess.run(
            [sys.executable, "-m", "evaluator", "ladder", "--admin", "http://127.0.0.1:9", "--db", str(db),
             "--dataset", DATASET], capture_output=True, text=True, timeout=60).stdout):
        lines = out.splitlines()
        assert lines[0] == DATASET
        start = [ln for ln in lines if "<- start here" in ln]
        assert len(start) == 1 and "1. freshness" in start[0] and "firing" in start[0], out
        assert "(data-platform)" in start[0]


def _post(url: str) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_admin_evaluate_runs_every_group_now_and_answers_the_transitions(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        clock.advance(30)  # not on a slot: POST /evaluate evaluates at the clock's time, not the slot's
        status, answer = _post(admin + "/evaluate")
        assert status == 200, answer
        assert answer["groups"] == [{"name": "payments-contract", "evaluated_at": "2026-11-15T07:00:30.000Z",
                                     "rules": 5}]
        fired = {t["alert"]: t for t in answer["transitions"] if t["to"] == "firing"}
        assert set(fired) == {"PaymentsFreshnessLag", "PaymentsRowCount", "PaymentsAmountMedian", "PaymentsAmountPSI"}
        fresh = fired["PaymentsFreshnessLag"]
        assert (fresh["rule"], fresh["series"], fresh["from"], fresh["value"], fresh["threshold"], fresh["owner"],
                fresh["rung"]) == ("payments-contract/PaymentsFreshnessLag", {"data.dataset": DATASET}, "inactive",
                                   6.0, 0.5, "data-platform", "freshness")
        assert answer["unhealthy"] == {}
        # The same instant again: nothing new. The scheduler's own slot (07:00:00) is earlier than the on-demand
        # evaluation: it is skipped, so evaluation time never goes backwards for the group.
        status, again = _post(admin + "/evaluate")
        assert status == 200 and again["transitions"] == [], again
        assert daemon.scheduler.run_slot("payments-contract") is None
        cur = daemon.store.cursor()
        try:
            (n,) = cur.execute("SELECT count(*) FROM alerts WHERE state = 'firing'").fetchone() or (0,)
        finally:
            cur.close()
        assert n == 4
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            assert json.loads(resp.read())[0]["start_here"] == "freshness"
        try:
            urllib.request.urlopen(admin + "/evaluate", timeout=5)
            raise AssertionError("GET /evaluate must be refused")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405
    finally:
        daemon.shutdown()


def test_scheduler_and_on_demand_evaluations_never_go_back_in_time() -> None:
    seen: list[float] = []

    class Recorder(RuleEngine):
        def evaluate_group(self, group: RuleGroup, ts: float) -> list[Any]:
            seen.append(ts)
            return []

    clock = FakeClock(60_030.0)
    tel = Telemetry()
    sched = GroupScheduler(Recorder(lambda: None, KINDS, MemoryState(), tel), clock, tel)
    sched.reschedule((RuleGroup("g", 60.0, ()),))
    assert sched.evaluate_now("g") == (60_030.0, [])
    assert sched.run_slot("g") is None  # slot 60_000 is before the on-demand evaluation: skipped
    clock.set(60_010.0)  # a clock that stepped back
    assert sched.evaluate_now("g") == (60_030.0, [])
    clock.set(60_060.0)
    assert sched.run_slot("g") == 60_060.0
    assert sched.evaluate_now("missing") is None
    assert seen == [60_030.0, 60_030.0, 60_060.0]
    assert tel.get("rule_group_missed_slots_total").value(group="g") == 0
    assert sched.evaluate_all_now()["groups"] == [{"name": "g", "evaluated_at": "1970-01-01T16:41:00.000Z",
                                                   "rules": 0}]


def test_replay_draws_one_progress_line_only_when_asked(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    db = tmp_path / "ev.duckdb"
    daemon = Daemon(loopback_config(db), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
    finally:
        daemon.shutdown()
    args = (str(db), [str(RULES)], T0 + 13 * DAY, T0 + 15 * DAY, "1h", "table")
    out, err, bar = io.StringIO(), io.StringIO(), io.StringIO()
    assert replay(*args, out, err, progress=bar) == 0
    drawn = bar.getvalue()
    assert drawn.startswith("\r\x1b[Kreplay ") and drawn.endswith("\r\x1b[K")
    assert "replay 49/49 at 2026-11-16T00:00:00Z" in drawn and "transition(s)" in drawn and "ETA 0s" in drawn
    assert "\n" not in drawn and err.getvalue() == ""
    assert out.getvalue().startswith("49 evaluations")
    assert progress_stream(io.StringIO(), env={}) is None  # not a terminal
    assert progress_stream(bar, env={PROGRESS_ENV: "1"}) is bar
    assert progress_stream(bar, env={PROGRESS_ENV: "0"}) is None
    # The CLI: nothing on a pipe, the line when forced.
    cmd = [sys.executable, "-m", "evaluator", "replay", "--db", str(db), "--rules", str(RULES), "--from",
           "2026-11-14T00:00:00Z", "--to", "2026-11-16T00:00:00Z", "--step", "1h"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    forced = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, PROGRESS_ENV: "1"})
    assert forced.returncode == 0 and "replay 49/49" in forced.stderr and forced.stdout == quiet.stdout
