"""The evaluator watches itself: its own failures are alerts through the same outputs as the user's rules.

A real daemon with a fake clock (or the CLI daemon as a subprocess, for SIGHUP): the Watchdog fires from the first
evaluation and reaches a real OTLP receiver and an Alertmanager stand-in; a rule with bad SQL, an outbox that cannot
deliver, a failing retention run, a worker whose rounds raise and refused ingest requests each fire their alert,
which resolves once the cause is gone. Background workers and the span writer survive their own exceptions, and the
scheduler's per-group locks are safe to take from many threads."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from spans import request, span
from test_alert_export import FakeAlertmanager, _downstream, _free_port

from evaluator.config import load_config
from evaluator.daemon import Daemon
from evaluator.exporter.alertmanager import AlertmanagerSettings
from evaluator.receiver.columns import ARRAY_SCHEMA, NUMBER_SCHEMA, STRING_SCHEMA, SpanColumns
from evaluator.receiver.ingest import IngestSettings
from evaluator.rules.engine import MemoryState, RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.kinds.selfcheck import Probes, RetentionView, SelfCheckKind, SelfCheckSpec
from evaluator.rules.model import Condition, Rule, RuleGroup, RulePrior, ThresholdSpec
from evaluator.rules.scheduler import GroupScheduler
from evaluator.selfmon import GROUP, SelfMonitoringSettings, self_group
from evaluator.store.schema import DDL
from evaluator.store.store import Store
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock, daemon_process, loopback_config, wait_for
from evaluator.worker import FAILING_AFTER, PeriodicWorker
from evaluator.yamlsrc import InvalidConfig

T0 = 1_793_491_200  # 2026-11-01T00:00:00Z
DAY = 86400.0
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


# -- helpers --------------------------------------------------------------------------------------------------------

def _sql(daemon: Daemon, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    cur = daemon.store.cursor()
    try:
        return cur.execute(query, params or []).fetchall()
    finally:
        cur.close()


def _states(daemon: Daemon, alert: str) -> dict[str, tuple[str, str]]:
    """The alert's series (as JSON text) -> (state, detail), from alert_state."""
    rows = _sql(daemon, "SELECT series::VARCHAR, state, detail FROM alert_state WHERE rule_id = ?",
                [f"{GROUP}/{alert}"])
    return {series: (state, detail) for series, state, detail in rows}


def _one(daemon: Daemon, alert: str, **labels: str) -> tuple[str, str] | None:
    """(state, detail) of the alert's series with these labels (besides dataset), or None."""
    wanted = {"dataset": "otel-evaluator", **labels}
    for series, value in _states(daemon, alert).items():
        if json.loads(series) == wanted:
            return value
    return None


def _resolved(daemon: Daemon, alert: str, **labels: str) -> str | None:
    """The detail of the series' latest transition if it is to resolved (else None), and its state now is
    resolved or inactive (the next judgement after a resolve makes it inactive, unreported)."""
    state = _one(daemon, alert, **labels)
    wanted = {"dataset": "otel-evaluator", **labels}
    rows = _sql(daemon, "SELECT series::VARCHAR, state, detail FROM alerts WHERE rule_id = ? ORDER BY seq",
                [f"{GROUP}/{alert}"])
    last = [(st, detail) for series, st, detail in rows if json.loads(series) == wanted][-1:]
    if state is None or state[0] not in ("resolved", "inactive") or not last or last[0][0] != "resolved":
        return None
    return str(last[0][1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()


def _post_json(url: str, doc: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _first_evaluation(daemon: Daemon) -> None:
    """Wait for the scheduler's first run of the self group (at start, at the slot before the clock's minute):
    what follows happens after it, whichever thread is faster."""
    wait_for(lambda: _sql(daemon, "SELECT judged_to FROM rule_progress WHERE rule_id = ?",
                          [f"{GROUP}/Watchdog"]), timeout=30)


def _self_daemon(tmp_path: Path, clock: FakeClock, **changes: Any) -> Daemon:
    settings = changes.pop("self_monitoring", SelfMonitoringSettings(owner="sre", severity="page"))
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", self_monitoring=settings, **changes), clock=clock)
    daemon.start()
    return daemon


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0 + 7 * 3600)


@pytest.fixture
def alertmanager(clock: FakeClock) -> Iterator[FakeAlertmanager]:
    server = FakeAlertmanager(clock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def no_otlp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


# -- the Watchdog ---------------------------------------------------------------------------------------------------

def test_watchdog_fires_from_the_first_evaluation_and_reaches_otlp_and_alertmanager(
        tmp_path: Path, clock: FakeClock, alertmanager: FakeAlertmanager, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no rule file at all, the daemon's own group runs at start: the Watchdog fires, is recorded in
    `alerts`, goes out as an alert span to a real OTLP receiver and as an Alertmanager alert with the configured
    owner and its own severity; the ladder shows the other checks under the subject otel-evaluator, not the
    Watchdog."""
    port = _free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    downstream = _downstream(tmp_path, port, "downstream")
    daemon = _self_daemon(tmp_path, clock, alertmanager=AlertmanagerSettings(url=alertmanager.url,
                                                                            resend_interval=3600))
    try:
        assert daemon.outbox is not None
        # nobody asked for an evaluation: the scheduler's first run of the group fires it
        wait_for(lambda: _sql(daemon, "SELECT state, owner, severity FROM alerts WHERE alert_name = 'Watchdog'"),
                 timeout=30)
        assert _sql(daemon, "SELECT state, owner, severity, rung FROM alerts WHERE alert_name = 'Watchdog'") == [
            ("firing", "sre", "none", "custom")]
        outbox = daemon.outbox

        def spans_arrived() -> list[tuple[Any, ...]]:
            clock.advance(1)  # the sender's retries, should the first send race the channel's connect
            outbox.wake()
            return _sql(downstream, """
                SELECT s.name, o.value FROM spans s
                JOIN span_strings n ON n.span_key = s.span_key AND n.key = 'alert.name' AND n.value = 'Watchdog'
                JOIN span_strings o ON o.span_key = s.span_key AND o.key = 'alert.owner'""")

        assert wait_for(spans_arrived, timeout=30, interval=0.1) == [("alert firing", "sre")]
        wait_for(lambda: alertmanager.alerts("Watchdog"), timeout=30)
        _, first = alertmanager.alerts("Watchdog")[0]
        assert first["labels"] == {"alertname": "Watchdog", "rule_id": "otel-evaluator/Watchdog",
                                   "group": "otel-evaluator", "rung": "custom", "owner": "sre",
                                   "severity": "none", "dataset": "otel-evaluator"}
        assert first["annotations"]["summary"].startswith("otel-evaluator is running")
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        status, body = _get(admin + "/ladder?subject=otel-evaluator")
        assert status == 200, body
        (subject,) = json.loads(body)
        entries = {e["alert"] for r in subject["rungs"] for e in r["rules"]}
        assert "Watchdog" not in entries and "EvaluatorIngestRefused" in entries
        assert subject["start_here"] is None  # nothing of the daemon is wrong
        status, body = _get(admin + "/alerts")
        assert [a["alert_name"] for a in json.loads(body)] == ["Watchdog"]
    finally:
        daemon.shutdown()
        downstream.shutdown()


# -- (a) a rule that cannot be evaluated ----------------------------------------------------------------------------

BAD_RULE = """groups:
  - name: orders
    interval: 1m
    rules:
      - alert: OrdersLate
        kind: sql
        rung: custom
        owner: orders-team
        query: SELECT max(lag_hours)::DOUBLE AS value FROM {table}
        op: ">"
        threshold: 1
"""


def test_a_rule_with_bad_sql_fires_until_it_is_fixed_by_a_sighup_reload(tmp_path: Path) -> None:
    """The CLI daemon on its embedded defaults (self-monitoring on): a rule reading a table that does not exist is
    unhealthy, and EvaluatorRuleUnhealthy fires for it, naming the rule and the error, on the ladder too; after the
    rule file is fixed and the daemon reloaded with SIGHUP, the alert resolves."""
    rules = tmp_path / "orders.rules.yaml"
    rules.write_text(BAD_RULE.format(table="orders_lag"))
    with daemon_process(["--db", str(tmp_path / "ev.duckdb"), "--rules", str(rules), *PORTS],
                        cwd=str(tmp_path)) as proc:
        assert proc.proc is not None
        answer = _post_json(proc.admin_url + "/evaluate", {})
        assert [g["name"] for g in answer["groups"]] == ["orders", "otel-evaluator"]
        assert "orders/OrdersLate" in answer["unhealthy"]
        (firing,) = [a for a in json.loads(_get(proc.admin_url + "/alerts")[1])
                     if a["alert_name"] == "EvaluatorRuleUnhealthy"]
        assert firing["series"] == {"dataset": "otel-evaluator", "rule": "orders/OrdersLate"}
        assert firing["detail"] == ("rule orders/OrdersLate: CatalogException: Catalog Error: Table with name "
                                    "orders_lag does not exist!")
        assert firing["owner"] == "otel-evaluator-operators"
        assert firing["summary"].startswith("EvaluatorRuleUnhealthy firing: rule orders/OrdersLate: ")
        _, body = _get(proc.admin_url + "/ladder?subject=otel-evaluator")
        (subject,) = json.loads(body)
        custom = next(r for r in subject["rungs"] if r["rung"] == "custom")
        assert custom["status"] == "firing" and custom["alert"] == "EvaluatorRuleUnhealthy"
        assert subject["start_here"] == "custom"

        rules.write_text(BAD_RULE.format(table="(SELECT 0.5 AS lag_hours)"))
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any('"rules reloaded"' in ln for ln in proc.lines), timeout=30)
        answer = _post_json(proc.admin_url + "/evaluate", {})
        assert answer["unhealthy"] == {}
        query = {"sql": "SELECT state, detail FROM alert_state WHERE rule_id = "
                        "'otel-evaluator/EvaluatorRuleUnhealthy'", "format": "json"}
        assert _post_json(proc.admin_url + "/query", query)["rows"] == [
            ["resolved", "rule orders/OrdersLate evaluates again"]]
        resolved = _post_json(proc.admin_url + "/query", {"sql": (
            "SELECT summary FROM alerts WHERE alert_name = 'EvaluatorRuleUnhealthy' AND state = 'resolved'"),
            "format": "json"})["rows"]
        assert resolved == [["EvaluatorRuleUnhealthy resolved: rule orders/OrdersLate evaluates again"]]
        assert proc.stop() == 0


def test_a_rule_file_cannot_take_the_daemons_group_name(tmp_path: Path, clock: FakeClock) -> None:
    rules = tmp_path / "mine.rules.yaml"
    rules.write_text(BAD_RULE.replace("name: orders", "name: otel-evaluator").format(table="t"))
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(rules),),
                                    self_monitoring=SelfMonitoringSettings()), clock=clock)
    with pytest.raises(InvalidConfig) as err:
        daemon.start()
    daemon.shutdown()
    assert [str(p) for p in err.value.problems] == [
        f"{rules}:2: groups.otel-evaluator: the group name otel-evaluator is the daemon's own (self_monitoring); "
        "rename the group"]


# -- (b) alerts that are not delivered ------------------------------------------------------------------------------

def test_the_outbox_check_fires_while_the_downstream_is_down_and_resolves_after_delivery(
        tmp_path: Path, clock: FakeClock, alertmanager: FakeAlertmanager, no_otlp_env: None) -> None:
    alertmanager.down = True
    daemon = _self_daemon(tmp_path, clock, alertmanager=AlertmanagerSettings(url=alertmanager.url,
                                                                            resend_interval=3600))
    try:
        assert daemon.outbox is not None
        _first_evaluation(daemon)  # the Watchdog fired: one post waits
        wait_for(lambda: alertmanager.refused >= 1, timeout=30)
        clock.advance(1)
        daemon.evaluate_now()
        assert _one(daemon, "EvaluatorAlertsUndelivered", destination="alertmanager") == (
            "inactive", "1 alert request(s) waiting for alertmanager, none for long")
        clock.advance(11 * 60)
        daemon.evaluate_now()
        state, detail = _one(daemon, "EvaluatorAlertsUndelivered", destination="alertmanager") or ("", "")
        assert state == "firing", detail
        assert "waiting for alertmanager was recorded 12.02 min ago, longer than 10 min" in detail
        assert "last error: http 503" in detail

        alertmanager.down = False
        outbox = daemon.outbox

        def delivered() -> bool:
            clock.advance(31)  # past the sender's backoff (at most alertmanager.max_backoff, 30 s)
            outbox.wake()
            return not _sql(daemon, "SELECT seq FROM outbox")

        wait_for(delivered, timeout=30, interval=0.1)
        daemon.evaluate_now()
        assert _resolved(daemon, "EvaluatorAlertsUndelivered", destination="alertmanager") == (
            "nothing waiting for alertmanager")
        wait_for(delivered, timeout=30, interval=0.1)
        posted = [a for _, a in alertmanager.alerts("EvaluatorAlertsUndelivered")]
        assert [a["labels"]["owner"] for a in posted] == ["sre", "sre"]
        assert posted[0]["annotations"]["summary"].startswith("EvaluatorAlertsUndelivered firing: the oldest")
        assert posted[1]["annotations"]["summary"] == (
            "EvaluatorAlertsUndelivered resolved: nothing waiting for alertmanager")
    finally:
        alertmanager.down = False
        daemon.shutdown()


# -- (c) retention -------------------------------------------------------------------------------------------------

def test_a_failing_retention_run_fires_the_retention_check(tmp_path: Path, clock: FakeClock) -> None:
    """A retention run that fails (a table it cleans is missing) fires EvaluatorRetentionConflict for the
    component retention; the next run that completes resolves it."""
    daemon = _self_daemon(tmp_path, clock)
    try:
        runs, failures = (daemon.telemetry.get(n) for n in ("retention_runs_total", "retention_failures_total"))
        wait_for(lambda: runs.total() >= 1)  # the run at start
        _first_evaluation(daemon)
        clock.advance(1)
        daemon.evaluate_now()  # after the run at start, whichever came first
        assert _one(daemon, "EvaluatorRetentionConflict", component="retention") == ("inactive", "retention runs")
        _sql(daemon, "DROP TABLE quality_values")
        daemon.retention.wake()
        wait_for(lambda: failures.total() >= 1)
        clock.advance(60)
        daemon.evaluate_now()
        state, detail = _one(daemon, "EvaluatorRetentionConflict", component="retention") or ("", "")
        assert (state, detail.split(" (")[0]) == ("firing", "the last retention run failed")

        create = next(d for d in DDL if "TABLE IF NOT EXISTS quality_values" in d)
        _sql(daemon, create)
        done = runs.total()
        daemon.retention.wake()
        wait_for(lambda: runs.total() > done)
        clock.advance(60)
        daemon.evaluate_now()
        assert _resolved(daemon, "EvaluatorRetentionConflict", component="retention") == "retention runs"
    finally:
        daemon.shutdown()


def _threshold_rule(name: str, lookback_days: float) -> Rule:
    return Rule(name=name, group="g", kind="threshold", rung="freshness", owner="me", severity="page",
                spec=ThresholdSpec("data.x", lookback=lookback_days * DAY), condition=Condition(">", 1.0))


def test_a_rule_reading_what_retention_deletes_is_in_conflict(store: Store) -> None:
    """Retention as it runs (what the daemon set, e.g. had lengthening been refused) against the loaded rules:
    a rule whose window is longer than the spans kept is named; with the spans kept long enough it resolves."""
    clock = FakeClock(T0)
    view = RetentionView(True, 35 * DAY)
    loaded = [_threshold_rule("Short", 7), _threshold_rule("Long", 40)]
    tel = Telemetry()
    probes = Probes(clock, tel, health=dict, rules=lambda: loaded, workers=list, retention=lambda: view)
    kind = SelfCheckKind(probes, window=60, outbox_max_age=600, present=150)
    rule = Rule(name="EvaluatorRetentionConflict", group=GROUP, kind="self", rung="custom", owner="o",
                severity="s", spec=SelfCheckSpec("retention"))
    cur = store.cursor()
    try:
        result = kind.evaluate([rule], T0, cur, {})[rule.id]
        assert not isinstance(result, Exception) and not isinstance(result, list)
        conflicts = {dict(s.series).get("rule"): (s.violated, s.detail) for s in result.samples}
        assert conflicts == {
            "g/Long": (True, "rule g/Long reads spans 40 d back, but raw spans are kept 35 d (store.retention.spans)"),
            None: (False, "retention runs")}
        view = RetentionView(True, 41 * DAY)
        prior = {rule.id: RulePrior(T0, {s.series: _cursor(result.memory[s.series]) for s in result.samples})}
        again = kind.evaluate([rule], T0 + 60, cur, prior)[rule.id]
        assert not isinstance(again, Exception) and not isinstance(again, list)
        # only what changed is judged again: the retention runs said the same
        assert {dict(s.series).get("rule"): s.violated for s in again.samples} == {"g/Long": False}
        # a past slot (the daemon was down then) is not judged: the process' state then is not known
        clock.advance(3600)
        assert kind.evaluate([rule], T0 + 60, cur, prior) == {rule.id: []}
    finally:
        cur.close()


def _cursor(memory: Any) -> Any:
    from evaluator.rules.model import SeriesCursor
    return SeriesCursor(None, None, memory)


# -- (d) ingest refusals -------------------------------------------------------------------------------------------

def test_refused_ingest_fires_the_refusal_check_for_one_interval(tmp_path: Path, clock: FakeClock) -> None:
    daemon = _self_daemon(tmp_path, clock, ingest=replace(IngestSettings(), max_request_bytes=4096))
    try:
        assert daemon.http is not None
        _first_evaluation(daemon)
        assert _one(daemon, "EvaluatorIngestRefused") == ("inactive", "no data refused")
        big = request(*[span(attrs={"data.row_count": i, "data.pad": "x" * 200}) for i in range(40)])
        req = urllib.request.Request(f"http://127.0.0.1:{daemon.http.port}/v1/traces",
                                     data=big.SerializeToString(), method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 413
        clock.advance(20)
        daemon.evaluate_now()
        state, detail = _one(daemon, "EvaluatorIngestRefused") or ("", "")
        assert state == "firing"
        assert detail == ('1 refusal(s) in the last 1 min: otel_evaluator_requests_refused_total'
                          '{transport="http",reason="too_large"} +1')
        clock.advance(30)
        daemon.evaluate_now()  # still within the interval after it was seen
        assert _one(daemon, "EvaluatorIngestRefused") == ("firing", detail)
        clock.advance(60)
        daemon.evaluate_now()
        assert _resolved(daemon, "EvaluatorIngestRefused") == "no data refused"
    finally:
        daemon.shutdown()


# -- (e) background workers ------------------------------------------------------------------------------------------

def test_a_worker_whose_rounds_raise_goes_on_is_counted_named_on_readyz_and_alerted(
        tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics reporter's rounds fail (a gauge's collector raises): the thread goes on, each failure is
    counted in worker_errors_total{worker}, /readyz names it once it keeps failing, and EvaluatorWorkerFailing
    fires; when the collector works again, the reporter does too, /readyz is ready, and the alert resolves."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
    broken = threading.Event()

    def collector() -> None:
        if broken.is_set():
            raise RuntimeError("the gauge's source is gone")

    daemon = _self_daemon(tmp_path, clock)
    try:
        assert daemon.metrics is not None
        reporter = daemon.metrics
        daemon.telemetry.add_collector(collector)
        errors = daemon.telemetry.get("worker_errors_total")
        broken.set()

        def failing() -> bool:
            reporter.wake()  # the next round now, whatever its backoff
            return errors.value(worker="metrics-reporter") >= FAILING_AFTER + 1

        wait_for(failing, timeout=30)
        assert reporter.status().alive
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        status, body = _get(admin + "/readyz")
        assert status == 503 and body.startswith("not ready: metrics-reporter failing: the last "), body
        assert "(RuntimeError: the gauge's source is gone)" in body
        daemon.evaluate_now()
        state, detail = _one(daemon, "EvaluatorWorkerFailing", worker="metrics-reporter") or ("", "")
        assert state == "firing" and detail.startswith("metrics-reporter failing: the last "), detail

        broken.clear()
        wait_for(lambda: reporter.wake() or _get(admin + "/readyz") == (200, "ready"), timeout=30)
        for _ in range(2):  # the first may still notice failures from before the collector was fixed
            clock.advance(61)  # an interval without a failure
            daemon.evaluate_now()
        assert _resolved(daemon, "EvaluatorWorkerFailing", worker="metrics-reporter") == "metrics-reporter works"
    finally:
        broken.clear()
        daemon.shutdown()


class _Flaky(PeriodicWorker):
    """Raises in its first `fail` rounds, then works; `fatal` ends the thread as a BaseException would."""

    def __init__(self, fail: int, fatal: bool = False) -> None:
        super().__init__("flaky", 0.001, max_backoff=0.01)
        self.fail = fail
        self.fatal = fatal
        self.rounds = 0

    def tick(self) -> float | None:
        self.rounds += 1
        if self.fatal:
            raise SystemExit("gone")
        if self.rounds <= self.fail:
            raise ValueError(f"round {self.rounds} broke")
        return None


def test_a_periodic_worker_survives_its_rounds_failing_and_says_so(thread_guard: None) -> None:
    tel = Telemetry()
    worker = _Flaky(fail=FAILING_AFTER + 2)
    worker.report_to(tel)
    worker.start()
    try:
        wait_for(lambda: worker.rounds > FAILING_AFTER + 3)  # it went on after every failure
        status = worker.status()
        assert status.alive and status.failures == FAILING_AFTER + 2 and status.consecutive_failures == 0
        assert status.problem is None and status.last_error == f"ValueError: round {FAILING_AFTER + 2} broke"
        assert tel.get("worker_errors_total").value(worker="flaky") == FAILING_AFTER + 2
    finally:
        worker.shutdown()
    assert not worker.status().running


def test_a_worker_that_keeps_failing_or_whose_thread_ended_has_a_problem() -> None:
    failing = _Flaky(fail=10**9)
    failing.start()
    try:
        wait_for(lambda: failing.status().consecutive_failures >= FAILING_AFTER)
        assert (failing.status().problem or "").startswith("failing: the last ")
    finally:
        failing.shutdown()
    ended = _Flaky(fail=0, fatal=True)
    ended.start()
    try:
        wait_for(lambda: not ended.status().alive)
        assert ended.status().problem == "stopped: its thread ended (SystemExit: gone)"
    finally:
        ended.shutdown()


def test_the_span_writer_survives_a_batch_it_cannot_prepare(tmp_path: Path, clock: FakeClock) -> None:
    """A batch that fails before its commit (here: a table without the span columns) fails its own request only;
    the writer thread goes on, commits the next export, and counts the failed round."""
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb"), clock=clock)
    daemon.start()
    try:
        bad = SpanColumns(pa.table({"x": [1]}), NUMBER_SCHEMA.empty_table(), STRING_SCHEMA.empty_table(),
                          ARRAY_SCHEMA.empty_table())
        with pytest.raises(Exception) as err:  # whatever Arrow raises for the missing column
            daemon.writer.submit(bad, int(T0 * 1e6)).result(timeout=30)
        assert not isinstance(err.value, TimeoutError)  # answered, not left waiting
        assert daemon.grpc is not None
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc.port}") as channel:
            call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                       response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
            call(request(span(attrs={"data.row_count": 1})).SerializeToString(), timeout=30)
        assert _sql(daemon, "SELECT count(*) FROM spans") == [(1,)]
        status = daemon.writer.status()
        assert status.alive and status.failures == 1 and status.consecutive_failures == 0
        assert daemon.telemetry.get("worker_errors_total").value(worker="span-writer") == 1
    finally:
        daemon.shutdown()


# -- the scheduler's locks ---------------------------------------------------------------------------------------------

def test_the_schedulers_group_locks_are_made_once_per_scheduled_group_from_any_thread() -> None:
    """Many threads ask for evaluations at once, of a scheduled group and of names that are not scheduled: the
    group's evaluations never overlap, and no lock is made for a name that is not a group (each request for an
    unknown name used to leave one behind, for good)."""
    clock = FakeClock(T0)
    tel = Telemetry()
    running: set[str] = set()
    overlaps: list[str] = []
    guard = threading.Lock()

    class Recorder(RuleEngine):
        def evaluate_group(self, group: RuleGroup, steps: Any, slot_interval: float | None = None) -> list[Any]:
            with guard:
                if group.name in running:
                    overlaps.append(group.name)
                running.add(group.name)
            time.sleep(0.001)
            with guard:
                running.discard(group.name)
            return []

    sched = GroupScheduler(Recorder(lambda: None, new_kinds(), MemoryState(), tel), clock, tel, evaluation_delay=0)
    sched.reschedule((RuleGroup("g", 60.0, ()),))
    start = threading.Barrier(16)

    def ask(i: int) -> None:
        start.wait()
        for j in range(50):
            sched.evaluate_now("g")
            assert sched.evaluate_now(f"unknown-{i}-{j}") is None

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert set(sched._eval_locks) == {"g"}


# -- configuration --------------------------------------------------------------------------------------------------

def test_the_self_monitoring_section_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("self_monitoring:\n  interval: 30s\n  owner: sre\n  severity: page\n  outbox_max_age: 5m\n"
                    "  watchdog: false\n")
    settings = load_config(str(good)).self_monitoring
    assert settings == SelfMonitoringSettings(interval_seconds=30.0, owner="sre", severity="page",
                                              outbox_max_age_seconds=300.0, watchdog=False,
                                              source=f"{good}:2")
    group = self_group(settings)
    assert group is not None and group.name == "otel-evaluator" and group.interval == 30.0
    assert [r.name for r in group.rules] == ["EvaluatorRuleUnhealthy", "EvaluatorAlertsUndelivered",
                                             "EvaluatorRetentionConflict", "EvaluatorIngestRefused",
                                             "EvaluatorWorkerFailing"]
    assert {(r.owner, r.severity, r.rung, r.kind) for r in group.rules} == {("sre", "page", "custom", "self")}
    assert self_group(replace(settings, enabled=False)) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("self_monitoring:\n  enabled: yes please\n  interval: 0s\n  owner: ''\n  outbox_max_age: soon\n"
                   "  pager: true\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(bad))
    assert sorted(str(p) for p in err.value.problems) == sorted([
        f"{bad}:2: self_monitoring.enabled: must be true or false, got 'yes please'",
        f"{bad}:3: self_monitoring.interval: must be above 0",
        f"{bad}:4: self_monitoring.owner: must not be empty",
        f"{bad}:5: self_monitoring.outbox_max_age: bad duration 'soon': use a number and a unit (ms, s, m, h, d, "
        "w), e.g. 5m or 1h30m",
        f"{bad}:6: self_monitoring.pager: unknown key (allowed: enabled, interval, outbox_max_age, owner, "
        "severity, watchdog, watchdog_severity)",
    ])


def test_the_documented_self_monitoring_defaults_are_the_defaults(tmp_path: Path) -> None:
    import yaml

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"self_monitoring": block["self_monitoring"]}))
    assert replace(load_config(str(path)).self_monitoring, source="") == replace(SelfMonitoringSettings(), source="")
    assert load_config(None).self_monitoring == SelfMonitoringSettings()
