"""The postmortem tools: the ladder (freshness is where to start on the payments broken day, from the daemon and
from its file; by service; every series of every rule, healthy and failing ones included, per dataset, model or
series; unknown names), admin POST /evaluate and its ordering with the scheduler, replay's progress line."""

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

from conftest import RunningDaemon
from spans import request, span
from test_rules_e2e import DAY, RULES, T0, send_days

from evaluator.commands.common import PROGRESS_ENV, progress_stream
from evaluator.commands.rules import replay
from evaluator.daemon import Daemon
from evaluator.rules.engine import MemoryState, RuleEngine
from evaluator.rules.kinds import new_kinds
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
        daemon.engine.evaluate_all([clock.now()])
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            (ladder,) = json.loads(resp.read())
        assert ladder["dataset"] == DATASET and ladder["start_here"] == "freshness"
        status = {r["rung"]: (r["status"], r["owner"]) for r in ladder["rungs"]}
        assert status == {"freshness": ("firing", "data-platform"), "completeness": ("firing", "producer-team"),
                          "distribution": ("firing", "partner-integration"), "prediction_quality": ("unchecked", None)}
        with urllib.request.urlopen(admin + "/alerts", timeout=5) as resp:
            alerts = json.loads(resp.read())
        assert sorted(a["alert_name"] for a in alerts) == ["PaymentsAmountMedian", "PaymentsAmountPSI",
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
    base = [sys.executable, "-m", "evaluator", "ladder", "--db", str(db), "--rules", str(RULES)]
    mine = subprocess.run([*base, "--service", "risk-feature-pipeline"], capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0 and mine.stdout.splitlines()[0] == DATASET, mine.stdout + mine.stderr
    other = subprocess.run([*base, "--service", "fraud-model"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and other.stdout == "nothing on the ladder of service fraud-model\n"
    for out in (live.stdout, subprocess.run([*base, "--dataset", DATASET], capture_output=True, text=True,
                                            timeout=60).stdout):
        lines = out.splitlines()
        assert lines[0] == DATASET
        start = [ln for ln in lines if "<- start here" in ln]
        assert len(start) == 1 and "1. freshness" in start[0] and "firing" in start[0], out
        assert "(data-platform)" in start[0]


CUSTOMERS_AND_FRAUD = """
groups:
  - name: customers
    interval: 1m
    rules:
      - alert: CustomersFreshness
        kind: threshold
        rung: freshness
        owner: data-platform
        select: {span: customers.daily.run}
        group_by: [data.dataset]
        value: data.freshness_lag_hours
        op: ">"
        threshold: 2
      - alert: CustomersRowCount
        kind: threshold
        rung: completeness
        owner: crm-team
        select: {span: customers.daily.run}
        group_by: [data.dataset]
        value: data.row_count
        op: "<"
        threshold: 1000
      - alert: CustomersEmailNullRate
        kind: threshold
        rung: completeness
        owner: crm-data
        annotations:
          summary: "{{ series.data.dataset }}: {{ value }} of emails are null"
        select: {span: customers.daily.run}
        group_by: [data.dataset]
        value: data.null_rate.email
        op: ">"
        threshold: 0.05
      - alert: CustomersDuplicates
        kind: sql
        rung: distribution
        owner: crm-team
        query: |
          SELECT d.value AS "data.dataset", max(CAST(n.value AS DOUBLE)) AS value
          FROM span_strings d JOIN span_strings n ON n.span_key = d.span_key AND n.key = 'data.duplicates'
          WHERE d.key = 'data.dataset'
          GROUP BY ALL
        op: ">"
        threshold: 10
      - alert: CustomersRunCount
        kind: sql
        rung: custom
        owner: crm-team
        query: "SELECT count(*) AS value FROM spans WHERE name = 'customers.daily.run'"
        op: ">"
        threshold: 1000
  - name: fraud
    interval: 1m
    rules:
      - alert: FraudAUCLow
        kind: threshold
        rung: prediction_quality
        owner: ml-platform
        select: {span: model.evaluate}
        group_by: [ml.model.version]
        value: ml.auc
        op: "<"
        threshold: 0.86
"""
SPAN_T0 = 1_760_000_000  # seconds; the spans of the ladder test end in the hour before the evaluation


def _customers_run(dataset: str, at: int, rows: int, null_rate: float, duplicates: str) -> Any:
    return span("customers.daily.run", start=(at - 60) * 10**9, end=at * 10**9, attrs={
        "data.dataset": dataset, "data.freshness_lag_hours": 0.5, "data.row_count": rows,
        "data.null_rate.email": null_rate, "data.duplicates": duplicates})


def _model_evaluation(version: str, at: int, auc: float) -> Any:
    return span("model.evaluate", start=(at - 60) * 10**9, end=at * 10**9,
                attrs={"ml.model.version": version, "ml.auc": auc})


def _ladder_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", "ladder", *args], capture_output=True, text=True,
                          timeout=60)


def _entries(subject: dict[str, Any], rung: str) -> dict[str, tuple[str, str | None]]:
    (found,) = [r for r in subject["rungs"] if r["rung"] == rung]
    return {e["alert"]: (e["status"], e["state"]) for e in found["rules"]}


def test_ladder_shows_every_series_of_every_rule_with_healthy_failing_and_model_subjects(tmp_path: Path) -> None:
    """Two completeness rules on one dataset both show; a passing dataset shows as ok; a rule grouped by
    ml.model.version has a subject per version (firing, ok, resolved); a rule that fails shows as error with its
    error; an ungrouped rule is its own subject; unknown names exit 1 with the known ones; the file read with the
    same rules gives the daemon's answer, and without them says which rules it cannot place."""
    rules = tmp_path / "customers.rules.yaml"
    rules.write_text(CUSTOMERS_AND_FRAUD)
    db = tmp_path / "ev.duckdb"
    clock = FakeClock(SPAN_T0 + 3600)
    daemon = Daemon(loopback_config(db, rules=(str(rules),)), clock=clock)
    daemon.start()
    try:
        running = RunningDaemon(daemon)
        running.export(request(_customers_run("customers/profiles", SPAN_T0, 500, 0.2, "3"),
                               _customers_run("customers/orders", SPAN_T0, 5000, 0.01, "0"),
                               service="customers-pipeline"))
        running.export(request(_model_evaluation("v1", SPAN_T0, 0.91), _model_evaluation("v2", SPAN_T0, 0.70),
                               _model_evaluation("v3", SPAN_T0 - 120, 0.60), _model_evaluation("v3", SPAN_T0, 0.90),
                               service="fraud-model"))
        admin = running.admin_url
        assert _post(admin + "/evaluate")[0] == 200
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            ladder = {s["subject"]: s for s in json.loads(resp.read())}
        assert list(ladder) == ["customers/orders", "customers/profiles", "v1", "v2", "v3", "CustomersRunCount"]
        assert [ladder[s]["subject_kind"] for s in ladder] == ["dataset"] * 2 + ["model"] * 3 + ["rule"]

        profiles, orders = ladder["customers/profiles"], ladder["customers/orders"]
        assert _entries(profiles, "completeness") == {"CustomersEmailNullRate": ("firing", "firing"),
                                                      "CustomersRowCount": ("firing", "firing")}
        completeness = profiles["rungs"][1]
        assert completeness["status"] == "firing" and profiles["start_here"] == "completeness"
        (null_rate,) = [e for e in completeness["rules"] if e["alert"] == "CustomersEmailNullRate"]
        assert (null_rate["owner"], null_rate["value"], null_rate["threshold"], null_rate["series"]) == (
            "crm-data", 0.2, 0.05, {"data.dataset": "customers/profiles"})
        assert null_rate["summary"] == "customers/profiles: 0.2 of emails are null"
        # since: when it fired, as alert_state records it (the engine decides what that time is)
        ((fired_at,),) = running.sql("SELECT strftime(fired_at, '%Y-%m-%dT%H:%M:%SZ') FROM alert_state "
                                     "WHERE rule_id = 'customers/CustomersEmailNullRate' AND state = 'firing'")
        assert null_rate["since"] == fired_at
        assert {r["rung"]: r["status"] for r in orders["rungs"]} == {
            "freshness": "ok", "completeness": "ok", "distribution": "ok", "prediction_quality": "unchecked"}
        assert orders["start_here"] is None and orders["dataset"] == "customers/orders"

        versions = {v: ladder[v]["rungs"][3] for v in ("v1", "v2", "v3")}
        assert {v: r["status"] for v, r in versions.items()} == {"v1": "ok", "v2": "firing", "v3": "ok"}
        assert ladder["v2"]["start_here"] == "prediction_quality" and versions["v2"]["owner"] == "ml-platform"
        assert ladder["v2"]["labels"] == {"ml.model.version": "v2"} and ladder["v2"]["dataset"] is None
        (resolved,) = versions["v3"]["rules"]
        ((resolved_at,),) = running.sql("SELECT strftime(resolved_at, '%Y-%m-%dT%H:%M:%SZ') FROM alert_state "
                                        "WHERE rule_id = 'fraud/FraudAUCLow' AND state = 'resolved'")
        assert resolved["state"] == "resolved" and resolved["detail"].startswith(f"resolved at {resolved_at}")
        custom = ladder["CustomersRunCount"]["rungs"]
        assert [r["rung"] for r in custom] == ["freshness", "completeness", "distribution", "prediction_quality",
                                                "custom"]
        assert custom[4]["status"] == "ok" and ladder["CustomersRunCount"]["start_here"] is None

        # The duplicates rule starts failing: every series of it is an error with the rule's last error.
        running.export(request(_customers_run("customers/profiles", SPAN_T0 + 60, 500, 0.2, "many"),
                               service="customers-pipeline"))
        clock.advance(60)
        assert _post(admin + "/evaluate")[0] == 200
        with urllib.request.urlopen(admin + "/ladder?dataset=customers/orders", timeout=5) as resp:
            (orders,) = json.loads(resp.read())
        (distribution,) = [r for r in orders["rungs"] if r["rung"] == "distribution"]
        (failing,) = distribution["rules"]
        assert distribution["status"] == "error" and orders["start_here"] == "distribution"
        assert failing["status"] == "error" and failing["state"] == "inactive" and "many" in failing["error"]
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            live = json.loads(resp.read())
        try:
            urllib.request.urlopen(admin + "/ladder?model=v9", timeout=5)
            raise AssertionError("an unknown model must be refused")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and json.loads(exc.read())["known"] == ["v1", "v2", "v3"]

        # The CLI, as a user runs it against the daemon.
        table = _ladder_cli("--admin", admin, "--dataset", "customers/profiles")
        assert table.returncode == 0 and table.stderr == "", table.stderr
        lines = table.stdout.splitlines()
        assert lines[0] == "customers/profiles"
        rung = lines.index("  2. completeness       firing   (crm-data, crm-team)  <- start here")
        assert lines[rung + 1:rung + 4] == [
            f"       firing   CustomersEmailNullRate (crm-data) value 0.2 since {fired_at}",
            "                customers/profiles: 0.2 of emails are null",
            f"       firing   CustomersRowCount (crm-team) value 500 since {fired_at}"]  # fired with it
        assert lines[rung + 4].startswith("                CustomersRowCount firing")  # the default summary
        assert "  3. distribution       error    (crm-team)" in lines
        model = _ladder_cli("--admin", admin, "--model", "v2")
        assert model.returncode == 0 and model.stdout.splitlines()[0] == "v2  (model)", model.stdout
        assert "  4. prediction_quality firing   (ml-platform)  <- start here" in model.stdout
        assert "FraudAUCLow (ml-platform) value 0.7" in model.stdout
        typo = _ladder_cli("--admin", admin, "--dataset", "customers/profile")
        assert typo.returncode == 1 and typo.stdout == ""
        assert typo.stderr == ("otel-evaluator: no dataset 'customers/profile' on the ladder; known datasets: "
                               "customers/orders, customers/profiles\n")
        unknown_model = _ladder_cli("--admin", admin, "--model", "v9")
        assert unknown_model.returncode == 1 and "known models: v1, v2, v3" in unknown_model.stderr
        fraud = _ladder_cli("--admin", admin, "--service", "fraud-model", "--format", "json")
        assert [s["subject"] for s in json.loads(fraud.stdout)] == ["v1", "v2", "v3"]
        customers = _ladder_cli("--admin", admin, "--service", "customers-pipeline", "--format", "json")
        assert [s["subject"] for s in json.loads(customers.stdout)] == ["customers/orders", "customers/profiles"]
    finally:
        daemon.shutdown()
    # The stopped daemon's file: with its rules, exactly what the daemon answered; without them, the rules that
    # never changed state cannot be placed, and stderr names them.
    with_rules = _ladder_cli("--db", str(db), "--rules", str(rules), "--format", "json")
    assert with_rules.returncode == 0 and with_rules.stderr == "", with_rules.stderr
    assert json.loads(with_rules.stdout) == live
    bare = _ladder_cli("--db", str(db), "--format", "json")
    assert bare.returncode == 0
    assert bare.stderr == ("otel-evaluator: not shown: 3 rule(s) that never changed state, so the file does not "
                           "record their rung: customers/CustomersDuplicates, customers/CustomersFreshness, "
                           "customers/CustomersRunCount. Pass the rules the daemon ran with --rules PATH to place "
                           "them.\n")
    shown = {s["subject"]: s for s in json.loads(bare.stdout)}
    assert list(shown) == ["customers/orders", "customers/profiles", "v1", "v2", "v3"]
    assert _entries(shown["customers/profiles"], "completeness") == _entries(
        {s["subject"]: s for s in live}["customers/profiles"], "completeness")
    typo = _ladder_cli("--db", str(db), "--model", "fraud")
    assert typo.returncode == 1 and "known models: v1, v2, v3" in typo.stderr


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
        fired = {t["alert_name"]: t for t in answer["transitions"] if t["state"] == "firing"}
        assert set(fired) == {"PaymentsFreshnessLag", "PaymentsRowCount", "PaymentsAmountMedian", "PaymentsAmountPSI"}
        fresh = fired["PaymentsFreshnessLag"]
        assert (fresh["rule_id"], fresh["series"], fresh["from_state"], fresh["value"], fresh["threshold"],
                fresh["owner"], fresh["rung"]) == ("payments-contract/PaymentsFreshnessLag", {"data.dataset": DATASET},
                                                   "inactive", 6.0, 0.5, "data-platform", "freshness")
        # when it happened (the broken run), and when it was decided (this evaluation)
        assert (fresh["changed_at"], fresh["evaluated_at"]) == ("2026-11-15T06:00:00.000Z", "2026-11-15T07:00:30.000Z")
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
        def evaluate_group(self, group: RuleGroup, steps: Any) -> list[Any]:
            seen.extend(steps)
            return []

    clock = FakeClock(60_030.0)
    tel = Telemetry()
    sched = GroupScheduler(Recorder(lambda: None, new_kinds(), MemoryState(), tel), clock, tel, evaluation_delay=0)
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
