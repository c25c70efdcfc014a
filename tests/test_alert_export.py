"""Alert spans over OTLP to a real receiver: a second otel-evaluator daemon on loopback keeps the `alert.*` spans.

Configured through the standard OTEL_EXPORTER_OTLP_* variables; a downstream outage with a restart of the sending
daemon in between loses nothing, and the alerts arrive in order."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_rules_e2e import DAY, RULES, T0, send_days

from evaluator.daemon import Daemon
from evaluator.exporter.alertmanager import AlertmanagerSettings
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.ingest import IngestSettings
from evaluator.testing import FakeClock, loopback_config, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _downstream(tmp_path: Path, port: int, name: str) -> Daemon:
    cfg = loopback_config(tmp_path / f"{name}.duckdb", grpc=GrpcSettings(listen=f"127.0.0.1:{port}"),
                          ingest=replace(IngestSettings(), keep_prefixes=("alert.",)))
    d = Daemon(cfg)
    d.start()
    return d


def _stored_alerts(d: Daemon) -> list[tuple[Any, ...]]:
    cur = d.store.cursor()
    try:
        return cur.execute("""
            SELECT s.name, n.value AS value,
                   (SELECT value FROM span_strings x WHERE x.span_key = s.span_key AND x.key = 'alert.name') AS alert,
                   (SELECT value FROM span_strings x WHERE x.span_key = s.span_key AND x.key = 'alert.owner') AS owner,
                   s.service_name, s.end_time
            FROM spans s LEFT JOIN span_numbers n ON n.span_key = s.span_key AND n.key = 'alert.value'
            ORDER BY s.end_time, alert""").fetchall()
    finally:
        cur.close()


def test_alert_spans_reach_a_real_receiver_configured_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    downstream = _downstream(tmp_path, port, "downstream")
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None and daemon.outbox is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        outbox = daemon.outbox

        def delivered() -> bool:
            clock.advance(1)  # should a first send fail while the channel connects, its retry comes due
            outbox.wake()
            return len(_stored_alerts(downstream)) == 4

        wait_for(delivered, timeout=30, interval=0.1)
        rows = _stored_alerts(downstream)
        assert {(r[0], r[2], r[3], r[4]) for r in rows} == {
            ("alert firing", "PaymentsFreshnessLag", "data-platform", "otel-evaluator"),
            ("alert firing", "PaymentsRowCount", "producer-team", "otel-evaluator"),
            ("alert firing", "PaymentsAmountMedian", "partner-integration", "otel-evaluator"),
            ("alert firing", "PaymentsAmountPSI", "partner-integration", "otel-evaluator"),
        }
        lag = next(r for r in rows if r[2] == "PaymentsFreshnessLag")
        assert lag[1] == 6.0
        cur = daemon.store.cursor()
        assert cur.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        cur.close()
    finally:
        daemon.shutdown()
        downstream.shutdown()


def test_downstream_outage_and_restart_lose_nothing_and_keep_order(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2000")
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    cfg = loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),))
    daemon = Daemon(cfg, clock=clock)
    daemon.start()  # the downstream is down
    assert daemon.grpc is not None
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
    daemon.engine.evaluate_all([clock.now()])  # four alerts fire: queued
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(15, 16), broken=set())
    clock.advance(DAY)
    daemon.engine.evaluate_all([clock.now()])  # the next day: three resolve
    wait_for(lambda: daemon.telemetry.get("export_failures_total").total() >= 1, timeout=20)
    daemon.shutdown()  # restart while the downstream is still down
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    downstream = _downstream(tmp_path, port, "downstream")
    try:
        cur = daemon.store.cursor()
        recorded = cur.execute("SELECT 'alert ' || state, alert_name FROM alerts ORDER BY seq").fetchall()
        cur.close()
        assert len(recorded) > 4  # four fire on the broken day; then the next day's changes
        outbox = daemon.outbox
        assert outbox is not None

        def delivered() -> bool:
            # Time passes for the sender's backoff (the clock is fake) while gRPC's own reconnect backoff, in
            # real time, lets the channel find the receiver that just came up.
            clock.advance(60)
            outbox.wake()
            return len(_stored_alerts(downstream)) == len(recorded)

        wait_for(delivered, timeout=60, interval=0.2)
        arrived = [(r[0], r[2]) for r in _stored_alerts(downstream)]
        # every transition, day by day (within a day in the order of when each happened)
        assert sorted(arrived[:4]) == sorted(recorded[:4]) and sorted(arrived[4:]) == sorted(recorded[4:])
        cur = daemon.store.cursor()
        assert cur.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        cur.close()
    finally:
        daemon.shutdown()
        downstream.shutdown()


def test_without_an_endpoint_alerts_are_stored_and_nothing_is_queued(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.outbox is None and daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        events = daemon.engine.evaluate_all([clock.now()])
        assert len(events) == 4
        cur = daemon.store.cursor()
        assert cur.execute("SELECT count(*) FROM alerts").fetchone() == (4,)
        assert cur.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        cur.close()
    finally:
        daemon.shutdown()


def test_metrics_reach_a_real_metrics_receiver_and_match_admin_metrics(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rule's state per series, and the daemon's own counters, arrive over OTLP/gRPC every
    OTEL_METRIC_EXPORT_INTERVAL and read the same as admin /metrics."""
    import threading
    import urllib.request
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
    )

    received: list[ExportMetricsServiceRequest] = []
    lock = threading.Lock()

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            received.append(ExportMetricsServiceRequest.FromString(request))
        return ExportMetricsServiceResponse().SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None and daemon.metrics is not None and daemon.outbox is None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        series = '{"data.dataset":"payments/transactions_yesterday"}'

        def firing_state_arrived() -> bool:
            with lock:
                last = received[-1] if received else None
            if last is None:
                return False
            for rm in last.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != "otel_evaluator_alert_state":
                            continue
                        for p in m.gauge.data_points:
                            attrs = {a.key: a.value.string_value for a in p.attributes}
                            if attrs == {"rule_id": "payments-contract/PaymentsFreshnessLag", "series": series}:
                                return p.as_double == 2.0 or p.as_int == 2
            return False

        wait_for(firing_state_arrived, timeout=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert ('otel_evaluator_alert_state{rule_id="payments-contract/PaymentsFreshnessLag",'
                'series="{\\"data.dataset\\":\\"payments/transactions_yesterday\\"}"} 2') in text
        assert 'otel_evaluator_alert_rule_transitions_total{rule_id="payments-contract/PaymentsFreshnessLag",' \
               'state="firing"} 1' in text
        resource = received[-1].resource_metrics[0].resource
        assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "otel-evaluator"
    finally:
        daemon.shutdown()
        server.stop(0)


def test_ladder_inhibition_pages_only_the_rung_that_broke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While freshness fires for the dataset, the completeness and distribution alerts for it are recorded as
    inhibited and not sent: the page goes to the data platform team, whose rung broke first."""
    rules = tmp_path / "payments.rules.yaml"
    rules.write_text(RULES.read_text().replace(
        "    interval: 1m\n", "    interval: 1m\n    ladder_inhibition: {labels: [data.dataset, dataset]}\n", 1))
    port = _free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    downstream = _downstream(tmp_path, port, "downstream")
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(rules),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None and daemon.outbox is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        events = daemon.engine.evaluate_all([clock.now()])
        assert {(e.rule.name, e.inhibited) for e in events} == {
            ("PaymentsFreshnessLag", False), ("PaymentsRowCount", True), ("PaymentsAmountMedian", True),
            ("PaymentsAmountPSI", True)}
        outbox = daemon.outbox

        def delivered() -> bool:
            clock.advance(1)
            outbox.wake()
            return len(_stored_alerts(downstream)) >= 1

        wait_for(delivered, timeout=30, interval=0.1)
        daemon.outbox.shutdown()  # nothing else is on its way
        assert [r[2] for r in _stored_alerts(downstream)] == ["PaymentsFreshnessLag"]
        cur = daemon.store.cursor()
        assert sorted(cur.execute("SELECT alert_name, inhibited FROM alerts").fetchall()) == [
            ("PaymentsAmountMedian", True), ("PaymentsAmountPSI", True), ("PaymentsFreshnessLag", False),
            ("PaymentsRowCount", True)]
        cur.close()
    finally:
        daemon.shutdown()
        downstream.shutdown()


def test_alertmanager_gets_firing_then_resolved_and_periodic_resends(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Alertmanager v2 API: firing alerts with labels from the rule and series, re-sent while firing; resolved
    alerts sent as resolved (endsAt = when they resolved). An in-process HTTP server plays Alertmanager."""
    import json as _json
    import threading
    from datetime import datetime
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from evaluator.exporter.alertmanager import AlertmanagerSettings

    posts: list[list[dict[str, Any]]] = []

    class AM(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            assert self.path == "/api/v2/alerts"
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(_json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), AM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    cfg = replace(loopback_config(tmp_path / "ev.duckdb", rules=(str(RULES),)),
                  alertmanager=AlertmanagerSettings(url=f"http://127.0.0.1:{server.server_port}", resend_interval=0.2))
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None and daemon.outbox is not None and daemon.alertmanager is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        wait_for(lambda: len(posts) >= 3)  # the transitions, then at least one re-send
        first = posts[0]
        lag = next(a for a in first if a["labels"]["alertname"] == "PaymentsFreshnessLag")
        assert lag["labels"] == {
            "alertname": "PaymentsFreshnessLag", "rule_id": "payments-contract/PaymentsFreshnessLag",
            "group": "payments-contract", "rung": "freshness", "owner": "data-platform", "severity": "page",
            "data_dataset": "payments/transactions_yesterday"}
        assert lag["annotations"]["summary"].startswith("payments/transactions_yesterday: newest event 6 h")
        assert {a["labels"]["alertname"] for a in first} == {"PaymentsFreshnessLag", "PaymentsRowCount",
                                                             "PaymentsAmountMedian", "PaymentsAmountPSI"}
        resent = {a["labels"]["alertname"] for a in posts[-1]}
        assert "PaymentsFreshnessLag" in resent
        count = len(posts)
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(15, 16), broken=set())
        clock.advance(DAY)
        daemon.engine.evaluate_all([clock.now()])
        resolved_at = T0 + 15 * DAY + 6 * 3600  # the healthy run that resolved it, not the evaluation after it
        wait_for(lambda: any(any(a["labels"]["alertname"] == "PaymentsFreshnessLag" and
                                 datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00")).timestamp()
                                 == resolved_at for a in p) for p in posts[count:]))
    finally:
        daemon.shutdown()
        server.shutdown()


# -- Alertmanager: what arrives is what the first send said, stamped when sent ------------------------------------

DATASET = "payments/transactions_yesterday"


class FakeAlertmanager(ThreadingHTTPServer):
    """Plays Alertmanager's POST /api/v2/alerts (the real one: tests/test_alertmanager_real.py). Records each
    accepted post with the daemon's clock time at its arrival; answers 503 while `down`."""

    daemon_threads = True

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(("127.0.0.1", 0), _AlertmanagerHandler)
        self.clock = clock
        self.down = False
        self.refused = 0
        self.posts: list[tuple[float, list[dict[str, Any]]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def alerts(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        """Every accepted post of alert `name`, with the clock time it arrived at."""
        with self.lock:
            return [(at, a) for at, post in self.posts for a in post if a["labels"]["alertname"] == name]


class _AlertmanagerHandler(BaseHTTPRequestHandler):
    server: FakeAlertmanager

    def do_POST(self) -> None:
        assert self.path == "/api/v2/alerts"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            down = self.server.down
            if down:
                self.server.refused += 1
            else:
                self.server.posts.append((self.server.clock.now(), body))
        self.send_response(503 if down else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0 + 14 * DAY + 7 * 3600)


@pytest.fixture
def alertmanager(clock: FakeClock) -> Iterator[FakeAlertmanager]:
    server = FakeAlertmanager(clock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _without_ends(alert: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in alert.items() if k != "endsAt"}


def _runbook_rules(tmp_path: Path) -> Path:
    """The payments rules with a templated annotation besides the summary."""
    rules = tmp_path / "payments.rules.yaml"
    text = RULES.read_text()
    anchor = "        annotations:\n          summary: \"{{ series.data.dataset }}: newest event"
    assert anchor in text
    rules.write_text(text.replace(anchor, "        annotations:\n          runbook: \"see {{ owner }}\"\n"
                                          "          summary: \"{{ series.data.dataset }}: newest event", 1))
    return rules


def _am_daemon(tmp_path: Path, clock: FakeClock, am: FakeAlertmanager, monkeypatch: pytest.MonkeyPatch,
               resend: float, **changes: Any) -> Daemon:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    cfg = replace(loopback_config(tmp_path / "ev.duckdb", rules=(str(_runbook_rules(tmp_path)),)),
                  alertmanager=AlertmanagerSettings(url=am.url, resend_interval=resend), **changes)
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    return daemon


def _fire_then_resolve(daemon: Daemon, clock: FakeClock,
                       am: FakeAlertmanager) -> list[tuple[float, dict[str, Any]]]:
    """The broken day fires PaymentsFreshnessLag, re-sent a few times; the next day resolves it. Returns its
    posts with the clock time each arrived at: the first, the re-sends, and last the resolved one (it ends no
    later than it arrived, while a firing alert ends 4 intervals after)."""
    assert daemon.grpc is not None
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
    daemon.engine.evaluate_all([clock.now()])
    wait_for(lambda: len(am.alerts("PaymentsFreshnessLag")) >= 4, timeout=20)
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(15, 16), broken=set())
    clock.advance(DAY)
    daemon.engine.evaluate_all([clock.now()])

    def resolved_at() -> int | None:
        posts = am.alerts("PaymentsFreshnessLag")
        return next((i for i, (at, a) in enumerate(posts) if _seconds(a["endsAt"]) <= at), None)

    end = wait_for(lambda: resolved_at() is not None, timeout=20) and resolved_at()
    assert end is not None
    return am.alerts("PaymentsFreshnessLag")[:end + 1]


def test_alertmanager_resends_repeat_the_first_send(tmp_path: Path, clock: FakeClock,
                                                    alertmanager: FakeAlertmanager,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Alertmanager keeps the newest annotations it was sent: every re-send must carry the rendered ones of the
    first send (not the rule's raw templates), the same startsAt and generatorURL; only endsAt moves. The
    generatorURL links the admin server's ladder of the dataset at the alert's time."""
    daemon = _am_daemon(tmp_path, clock, alertmanager, monkeypatch, resend=0.2)
    try:
        *posts, (_, last) = _fire_then_resolve(daemon, clock, alertmanager)
        firing = [a for _, a in posts]
        first = firing[0]
        assert len(firing) >= 4
        assert first["annotations"]["runbook"] == "see data-platform"
        assert first["annotations"]["summary"].startswith(f"{DATASET}: newest event 6 h")
        assert [p["annotations"] for p in firing[1:]] == [first["annotations"]] * (len(firing) - 1)
        assert first["generatorURL"] == (f"http://127.0.0.1:{daemon.admin.port}/ladder?"
                                         + urllib.parse.urlencode({"dataset": DATASET, "at": first["startsAt"]}))
        assert all(_without_ends(p) == _without_ends(first) for p in firing[1:]), firing
        assert all(_seconds(p["endsAt"]) == at + 4 * 0.2 for at, p in posts)  # stamped when sent
        assert last["labels"] == first["labels"]
        assert last["generatorURL"].endswith("&at=" + urllib.parse.quote(last["endsAt"]))  # when it resolved
    finally:
        daemon.shutdown()


def test_alertmanager_resend_without_the_recorded_transition_renders_from_the_state(
        tmp_path: Path, clock: FakeClock, alertmanager: FakeAlertmanager, monkeypatch: pytest.MonkeyPatch) -> None:
    """An alert firing longer than `alerts` is kept (store.retention.alerts) has lost its firing transition: the
    re-send renders the annotations from the current state rather than sending raw templates."""
    daemon = _am_daemon(tmp_path, clock, alertmanager, monkeypatch, resend=3600)
    try:
        assert daemon.grpc is not None and daemon.alertmanager is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        recorded = {a["labels"]["alertname"]: a for a in daemon.alertmanager.firing()}
        cur = daemon.store.cursor()
        cur.execute("DELETE FROM alerts")
        cur.close()
        rendered = {a["labels"]["alertname"]: a for a in daemon.alertmanager.firing()}
        assert rendered.keys() == recorded.keys() and "PaymentsFreshnessLag" in rendered
        lag = rendered["PaymentsFreshnessLag"]
        assert lag["annotations"] == recorded["PaymentsFreshnessLag"]["annotations"]
        assert lag["annotations"]["runbook"] == "see data-platform"
        assert all("{{" not in v for a in rendered.values() for v in a["annotations"].values())
    finally:
        daemon.shutdown()


def test_alertmanager_resolved_post_keeps_the_episode_start(tmp_path: Path, clock: FakeClock,
                                                            alertmanager: FakeAlertmanager,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolved post's startsAt is the episode's start (as in its firing posts), not the time it resolved."""
    daemon = _am_daemon(tmp_path, clock, alertmanager, monkeypatch, resend=0.2)
    try:
        (_, first), *_, (_, last) = _fire_then_resolve(daemon, clock, alertmanager)
        assert last["startsAt"] == first["startsAt"]
    finally:
        daemon.shutdown()


def test_alertmanager_payload_starts_at_the_episode_start() -> None:
    """What the outbox stores per transition: a resolved alert starts when its episode started (the transition's
    started_at) and ends when it resolved; a firing one has no endsAt yet (stamped when posted)."""
    from evaluator.exporter.alertmanager import transitions_payload
    from evaluator.rules.engine import AlertEvent
    from evaluator.rules.loader import load_rules
    from evaluator.rules.state import Transition

    rule = next(r for r in load_rules([str(RULES)]).rules() if r.name == "PaymentsFreshnessLag")
    series = (("data.dataset", DATASET),)
    start, end = T0 + 3600.0, T0 + 7200.0
    events = [AlertEvent(rule, Transition(rule.id, series, end, "firing", "resolved", 0.1, 0.5, 0, None,
                                          started_at=start), "back in time", {}),
              AlertEvent(rule, Transition(rule.id, series, start, "pending", "firing", 6.0, 0.5, 1, None,
                                          started_at=start), "late", {})]
    payload = transitions_payload(events, "http://ev:13133")
    assert payload is not None
    resolved, firing = json.loads(payload)
    assert (resolved["startsAt"], resolved["endsAt"]) == (_iso(start), _iso(end))
    assert resolved["generatorURL"] == "http://ev:13133/ladder?" + urllib.parse.urlencode(
        {"dataset": DATASET, "at": _iso(end)})
    assert firing["startsAt"] == _iso(start) and "endsAt" not in firing


def test_alertmanager_post_delivered_after_an_outage_is_not_already_expired(
        tmp_path: Path, clock: FakeClock, alertmanager: FakeAlertmanager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alertmanager is down when the alerts fire and comes back 10 s later (more than the 4 resend intervals of
    8 s): the posts that then arrive end 4 intervals after they were sent, so the alerts are active, not
    resolved until the next re-send."""
    alertmanager.down = True
    daemon = _am_daemon(tmp_path, clock, alertmanager, monkeypatch, resend=2.0)
    try:
        assert daemon.grpc is not None and daemon.outbox is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        wait_for(lambda: alertmanager.refused >= 1, timeout=20)
        clock.advance(10)
        alertmanager.down = False
        daemon.outbox.wake()
        arrived = wait_for(lambda: alertmanager.alerts("PaymentsFreshnessLag"), timeout=20)
        for at, alert in arrived:
            assert _seconds(alert["endsAt"]) == at + 4 * 2.0 > clock.now(), alert
    finally:
        daemon.shutdown()


def test_alert_links_use_the_configured_external_url_on_both_outputs(
        tmp_path: Path, clock: FakeClock, alertmanager: FakeAlertmanager, monkeypatch: pytest.MonkeyPatch) -> None:
    """admin.external_url: Alertmanager's generatorURL and the alert span's alert.url are the same link to the
    alert's ladder."""
    port = _free_port()
    downstream = _downstream(tmp_path, port, "downstream")
    daemon = None
    try:
        cfg = loopback_config(tmp_path / "ev.duckdb")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        daemon = Daemon(replace(cfg, rules=(str(_runbook_rules(tmp_path)),),
                                admin=replace(cfg.admin, external_url="https://evaluator.example.com/dq"),
                                alertmanager=AlertmanagerSettings(url=alertmanager.url, resend_interval=3600)),
                        clock=clock)
        daemon.start()
        assert daemon.grpc is not None and daemon.outbox is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_all([clock.now()])
        outbox = daemon.outbox

        def urls() -> list[tuple[Any, ...]]:
            cur = downstream.store.cursor()
            try:
                return cur.execute("""SELECT u.value FROM span_strings u JOIN span_strings n USING (span_key)
                                      WHERE u.key = 'alert.url' AND n.key = 'alert.name'
                                        AND n.value = 'PaymentsFreshnessLag'""").fetchall()
            finally:
                cur.close()

        def delivered() -> bool:
            clock.advance(10)  # past the backoff of a first send that failed while the gRPC channel connected
            outbox.wake()
            return bool(urls()) and bool(alertmanager.alerts("PaymentsFreshnessLag"))

        wait_for(delivered, timeout=30, interval=0.1)
        alert = alertmanager.alerts("PaymentsFreshnessLag")[0][1]
        expected = "https://evaluator.example.com/dq/ladder?" + urllib.parse.urlencode(
            {"dataset": DATASET, "at": alert["startsAt"]})
        assert alert["generatorURL"] == expected
        assert urls() == [(expected,)]
    finally:
        if daemon is not None:
            daemon.shutdown()
        downstream.shutdown()
