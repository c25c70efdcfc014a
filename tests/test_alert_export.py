"""Alert spans over OTLP to a real receiver: a second otel-evaluator daemon on loopback keeps the `alert.*` spans.

Configured through the standard OTEL_EXPORTER_OTLP_* variables; a downstream outage with a restart of the sending
daemon in between loses nothing, and the alerts arrive in order."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_rules_e2e import DAY, RULES, T0, send_days

from evaluator.daemon import Daemon
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
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
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
    group = daemon.engine.ruleset.groups[0]
    assert daemon.grpc is not None
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
    daemon.engine.evaluate_group(group, clock.now())  # four alerts fire: queued
    send_days(f"127.0.0.1:{daemon.grpc.port}", range(15, 16), broken=set())
    clock.advance(DAY)
    daemon.engine.evaluate_group(group, clock.now())  # the next day: three resolve
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
        assert arrived == sorted(recorded[:4]) + sorted(recorded[4:])  # every transition, day by day
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
        events = daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
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
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
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
        events = daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
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
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
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
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
        wait_for(lambda: any(any(a["labels"]["alertname"] == "PaymentsFreshnessLag" and
                                 datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00")).timestamp()
                                 == clock.now() for a in p) for p in posts[count:]))
    finally:
        daemon.shutdown()
        server.shutdown()
