"""Alerts in the real Alertmanager: Debian's prometheus-alertmanager (`make install-test` installs it when run as
root with apt-get) on a free loopback port, a real daemon (`otel-evaluator serve` with a config file) posting to
it, runs sent with the OpenTelemetry SDK, evaluations through admin POST /evaluate, and what Alertmanager holds
read back from its own API (GET /api/v2/alerts). Skipped, saying why, when the binary is not installed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from evaluator.testing import DaemonProcess, daemon_process, wait_for

RESEND = 1.0  # seconds: an alert not re-sent would expire in Alertmanager 4 s after its last post

RULES = """\
groups:
  - name: l-contract
    interval: 1h                      # evaluated through admin POST /evaluate
    ladder_inhibition: {labels: [data.dataset]}
    rules:
      - alert: LoadFreshness
        kind: threshold
        rung: freshness
        owner: dq-oncall
        severity: page
        annotations:
          summary: "{{ series.data.dataset }} is {{ value }} h behind (limit {{ threshold }} h)"
          runbook: "see {{ owner }}"
        select: {span: warehouse.load}
        group_by: [data.dataset]
        value: data.freshness_lag_hours
        op: ">"
        threshold: 1
      - alert: LoadCompleteness
        kind: threshold
        rung: completeness
        owner: producer-team
        annotations:
          summary: "{{ series.data.dataset }} loaded {{ value }} rows (at least {{ threshold }})"
        select: {span: warehouse.load}
        group_by: [data.dataset]
        value: data.row_count
        op: "<"
        threshold: 1000
"""

AM_CONFIG = """\
route:
  receiver: "null"
receivers:
  - name: "null"
"""


def _binary() -> str | None:
    """The Alertmanager binary: `alertmanager` upstream, `prometheus-alertmanager` as Debian installs it."""
    return shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class Alertmanager:
    def __init__(self, url: str) -> None:
        self.url = url

    def alerts(self) -> dict[str, dict[str, Any]]:
        """The alerts Alertmanager holds as active (GET /api/v2/alerts lists no resolved ones), by alertname."""
        status, body = _get(self.url + "/api/v2/alerts?active=true&silenced=true&inhibited=true")
        assert status == 200, body
        return {a["labels"]["alertname"]: a for a in json.loads(body)}


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    binary = _binary()
    if binary is None:
        pytest.skip("the Alertmanager binary is not installed (Debian: apt-get install prometheus-alertmanager; "
                    "`make install-test` does it when run as root)")
    config = tmp_path / "alertmanager.yml"
    config.write_text(AM_CONFIG)
    port = _free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address=", f"--storage.path={tmp_path / 'alertmanager-data'}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            return _get(url + "/-/ready")[0] == 200

        wait_for(ready, timeout=30, interval=0.1)
        yield Alertmanager(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def daemon(tmp_path: Path, alertmanager: Alertmanager) -> Iterator[DaemonProcess]:
    (tmp_path / "l.rules.yaml").write_text(RULES)
    config = tmp_path / "evaluator.yaml"
    config.write_text(f"rules: [l.rules.yaml]\nself_monitoring:\n  enabled: false\n"
                      f"alertmanager:\n  url: {alertmanager.url}\n  resend_interval: {RESEND}s\n  max_backoff: 2s\n")
    with daemon_process(["--config", str(config), "--db", str(tmp_path / "ev.duckdb"), "--grpc-listen",
                         "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]) as proc:
        yield proc
        assert proc.stop() == 0


def _metric(proc: DaemonProcess, line_start: str) -> float:
    for line in proc.metrics().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _query(proc: DaemonProcess, sql: str) -> list[list[Any]]:
    """Rows of one statement through admin POST /query (JSON)."""
    request = urllib.request.Request(proc.admin_url + "/query", data=json.dumps({"sql": sql}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        rows: list[list[Any]] = json.loads(resp.read())["rows"]
    return rows


def _run(proc: DaemonProcess, dataset: str, lag_hours: float, rows: int) -> list[tuple[str, str, bool]]:
    """One warehouse load, sent as the pipeline would (the SDK's OTLP/gRPC exporter), then admin POST /evaluate.
    Returns the transitions to firing and resolved it recorded (the ones for Alertmanager): (alert, state,
    inhibited)."""
    stored = _metric(proc, "otel_evaluator_spans_stored_total")
    (last_seq,), = _query(proc, "SELECT coalesce(max(seq), 0) FROM alerts")
    provider = TracerProvider(resource=Resource.create({"service.name": "warehouse"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=proc.grpc_endpoint, insecure=True)))
    span = provider.get_tracer("warehouse").start_span("warehouse.load")
    span.set_attribute("data.dataset", dataset)
    span.set_attribute("data.freshness_lag_hours", lag_hours)
    span.set_attribute("data.row_count", rows)
    span.end()
    provider.shutdown()
    wait_for(lambda: _metric(proc, "otel_evaluator_spans_stored_total") > stored, timeout=20)
    request = urllib.request.Request(proc.admin_url + "/evaluate", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
    return [(name, state, inhibited) for name, state, inhibited in _query(
        proc, f"SELECT alert_name, state, inhibited FROM alerts WHERE seq > {int(last_seq)} "
        "AND state IN ('firing', 'resolved') ORDER BY seq")]


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _resends(proc: DaemonProcess) -> float:
    return _metric(proc, 'otel_evaluator_alertmanager_resends_total{outcome="sent"}')


def test_alerts_fire_stay_active_while_resent_and_resolve(alertmanager: Alertmanager,
                                                          daemon: DaemonProcess) -> None:
    assert _run(daemon, "L1", lag_hours=6, rows=5000) == [("LoadFreshness", "firing", False)]
    alert = wait_for(lambda: alertmanager.alerts().get("LoadFreshness"), timeout=20)
    assert alert["labels"] == {"alertname": "LoadFreshness", "rule_id": "l-contract/LoadFreshness",
                               "group": "l-contract", "rung": "freshness", "owner": "dq-oncall",
                               "severity": "page", "data_dataset": "L1"}
    assert alert["annotations"]["runbook"] == "see dq-oncall"
    assert alert["annotations"]["summary"] == "L1 is 6 h behind (limit 1 h)"
    assert alert["status"]["state"] == "active"
    assert "LoadCompleteness" not in alertmanager.alerts()

    link = urllib.parse.urlsplit(alert["generatorURL"])
    query = urllib.parse.parse_qs(link.query)
    assert (link.scheme, link.netloc, link.path) == ("http", f"127.0.0.1:{daemon.ports['admin']}", "/ladder")
    assert query["dataset"] == ["L1"]
    assert abs(_seconds(query["at"][0]) - _seconds(alert["startsAt"])) < 0.001  # Alertmanager keeps milliseconds
    status, body = _get(alert["generatorURL"])  # the link works: the daemon's ladder of the dataset
    assert status == 200 and "L1" in body.decode()

    # Re-sent every second: after more than 4 intervals it is still active, with the same rendered annotations
    # (a re-send with raw templates would replace them), and its end keeps moving.
    sent = _resends(daemon)
    wait_for(lambda: _resends(daemon) >= sent + 6, timeout=60, interval=0.2)
    later = alertmanager.alerts()["LoadFreshness"]
    assert later["status"]["state"] == "active"
    assert later["annotations"] == alert["annotations"]
    assert (later["startsAt"], later["generatorURL"]) == (alert["startsAt"], alert["generatorURL"])
    assert _seconds(later["endsAt"]) > _seconds(alert["endsAt"])

    assert _run(daemon, "L1", lag_hours=0.1, rows=5000) == [("LoadFreshness", "resolved", False)]
    wait_for(lambda: "LoadFreshness" not in alertmanager.alerts(), timeout=20)  # resolved: endsAt reached
    sent = _resends(daemon)
    time.sleep(3 * RESEND)  # give a wrong re-send every chance to bring it back
    assert "LoadFreshness" not in alertmanager.alerts()
    assert _resends(daemon) == sent  # nothing is firing: nothing is re-sent


def test_an_inhibited_alert_appears_when_its_inhibitor_resolves(alertmanager: Alertmanager,
                                                                 daemon: DaemonProcess) -> None:
    """Ladder inhibition: completeness breaks while freshness fires, so only freshness pages; once freshness
    resolves, the completeness alert (still firing) must reach Alertmanager."""
    assert _run(daemon, "L2", lag_hours=6, rows=5000) == [("LoadFreshness", "firing", False)]
    wait_for(lambda: "LoadFreshness" in alertmanager.alerts(), timeout=20)
    assert _run(daemon, "L2", lag_hours=6, rows=10) == [("LoadCompleteness", "firing", True)]
    _run(daemon, "L2", lag_hours=0.1, rows=10)
    wait_for(lambda: "LoadFreshness" not in alertmanager.alerts(), timeout=20)
    # the released alert is in the same post as the resolved one (or, at the latest, the next re-send)
    alert = wait_for(lambda: alertmanager.alerts().get("LoadCompleteness"), timeout=5)
    assert alert["status"]["state"] == "active"
    assert alert["labels"]["data_dataset"] == "L2"
    assert alert["annotations"]["summary"] == "L2 loaded 10 rows (at least 1000)"
