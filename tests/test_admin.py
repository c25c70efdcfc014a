"""Admin endpoints: /healthz, /readyz, /metrics in the Prometheus text format."""

from __future__ import annotations

import urllib.error
import urllib.request

from conftest import RunningDaemon
from spans import request, span


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_and_readiness(daemon: RunningDaemon) -> None:
    assert _get(daemon.admin_url + "/healthz") == (200, "ok\n")
    assert _get(daemon.admin_url + "/readyz") == (200, "ready\n")
    daemon.daemon._ready = False  # what shutdown does first
    status, body = _get(daemon.admin_url + "/readyz")
    assert status == 503 and "not ready" in body
    daemon.daemon._ready = True


def test_metrics_count_what_happened(daemon: RunningDaemon) -> None:
    daemon.export(request(span(attrs={"data.row_count": 1}), span(attrs={"other": 1}),
                          span(attrs={"data.row_count": 2}, trace_id=b"\x00" * 16)))
    status, text = _get(daemon.admin_url + "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    for expected in (
        'otel_evaluator_spans_received_total{transport="grpc"} 3',
        'otel_evaluator_spans_dropped_total{reason="no_signal_attribute"} 1',
        'otel_evaluator_spans_rejected_total{transport="grpc"} 1',
        "otel_evaluator_spans_stored_total 1",
        'otel_evaluator_rows_stored_total{table="span_numbers"} 1',
        "# TYPE otel_evaluator_spans_stored_total counter",
        "otel_evaluator_inflight_bytes 0",
    ):
        assert expected in lines, expected
    size = [ln for ln in lines if ln.startswith("otel_evaluator_store_size_bytes ")]
    assert size and int(size[0].split()[1]) > 0
