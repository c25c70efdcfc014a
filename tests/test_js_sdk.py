"""The real OpenTelemetry JavaScript SDK (npm, pinned in tests/js/package.json) as a second OTLP client.

tests/js/send.mjs drives the SDK's three trace exporters (OTLP/HTTP JSON, OTLP/HTTP protobuf, OTLP/gRPC) against
a daemon on loopback ports; these tests check exactly what was stored. Install with `make install-test` (runs
`npm ci` in tests/js when npm is on PATH); without node or tests/js/node_modules the module is skipped.

What the JS SDK (exporters 0.223.1, sdk 2.12.1) puts on the wire that the Python SDK does not
(test_js_sdk_wire_format pins the HTTP ones):
- JavaScript has one number type: an attribute whose value is integral is sent as intValue, even when it is
  meant as a double ([1.0, 10.0, 100.0] arrives as three intValues; 2.0 would too). Only non-integral numbers
  are doubleValue. The daemon stores both as DOUBLE, so nothing changes in the store.
- OTLP/JSON: ids are hex strings, kind and status code are integers, timestamps are decimal *strings* of
  nanoseconds, but intValue is a JSON *number* (the spec allows both); root spans carry no parentSpanId key;
  empty `events: []`, `links: []`, `droppedAttributesCount: 0` and `status: {"code": 0}` are always present.
  NaN and ±Infinity become `"doubleValue": null` (JSON.stringify): the daemon sees an empty value and the
  attribute is silently not stored, whereas over protobuf the same span is rejected as non-finite.
- Both HTTP exporters send the body with `Transfer-Encoding: chunked` (no Content-Length), with or without gzip.
- `flags` is 0x101 (HAS_IS_REMOTE | the W3C sampled bit); the Python SDK sends 0x100.
- The resource carries telemetry.sdk.language "nodejs" (when the default resource is merged in, as here).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import RunningDaemon

JS_DIR = Path(__file__).parent / "js"
SENDER = JS_DIR / "send.mjs"
NODE = shutil.which("node")
MIN_NODE = (18, 19)  # the engines range of the pinned @opentelemetry packages: ^18.19.0 || >=20.6.0


def _node_version() -> tuple[int, ...]:
    assert NODE is not None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout
    return tuple(int(x) for x in re.findall(r"\d+", out)[:2])


if NODE is None:
    pytest.skip("node is not on PATH: the JavaScript SDK interop tests need node >= 18.19 and npm",
                allow_module_level=True)
if not (JS_DIR / "node_modules").is_dir():
    pytest.skip("tests/js/node_modules is missing: run `make install-test` (npm ci --prefix tests/js)",
                allow_module_level=True)
if _node_version() < MIN_NODE:
    pytest.skip(f"node {'.'.join(map(str, _node_version()))} is older than 18.19, which the pinned "
                "@opentelemetry packages need", allow_module_level=True)

pytestmark = pytest.mark.slow

PROTOCOLS = ["http-json", "http-proto", "grpc"]
EPOCH = datetime(1970, 1, 1)


def _send(d: RunningDaemon | str, protocol: str, *, count: int = 3, prefix: str = "a1", repeat: int = 1,
          compression: str = "none", expect_ok: bool = True) -> dict[str, Any]:
    """Run the sender; returns its JSON report (the spans it sent, one result per export, SDK warnings)."""
    endpoint = d if isinstance(d, str) else d.grpc_endpoint if protocol == "grpc" else d.http_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # no stray exporter settings
    assert NODE is not None
    proc = subprocess.run(
        [NODE, str(SENDER), "--protocol", protocol, "--endpoint", endpoint, "--count", str(count),
         "--trace-prefix", prefix, "--repeat", str(repeat), "--compression", compression],
        capture_output=True, text=True, timeout=120, env=env, cwd=JS_DIR)
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    if expect_ok:
        assert proc.returncode == 0, detail
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if expect_ok:
        assert report["exports"] == [{"code": 0, "error": None}] * repeat, detail
        # a partial_success answer is not an export failure in the JS SDK, only a logged warning
        assert report["warnings"] == [], detail
    return report


def _ts(ns: str) -> datetime:
    """OTLP nanoseconds -> the stored TIMESTAMP (microseconds, truncated)."""
    return EPOCH + timedelta(microseconds=int(ns) // 1000)


def _runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((s for s in report["spans"] if s["name"] == "features.daily.run"), key=lambda s: s["trace_id"])


def _check_stored(d: RunningDaemon, report: dict[str, Any], count: int, repeat: int = 1) -> None:
    runs = _runs(report)
    children = [s for s in report["spans"] if s["name"] == "db.query"]
    assert len(runs) == count and len(children) == 1

    # the spans: ids as the SDK made them, times truncated to the microsecond, the child not stored
    stored = d.sql("SELECT trace_id, span_id, parent_span_id, name, kind, start_time, end_time, status_code, "
                   "status_message, service_name, scope_name FROM spans ORDER BY trace_id")
    assert stored == [
        (s["trace_id"], s["span_id"], None, "features.daily.run", 1, _ts(s["start_ns"]), _ts(s["end_ns"]), 0, None,
         "js-pipeline", "js-sender")
        for s in runs
    ]
    # the sender's times, independently of its report: 02:00:00.123456789 -> .123456, +90.864197532 s
    assert stored[0][5:7] == (datetime(2024, 5, 1, 2, 0, 0, 123456), datetime(2024, 5, 1, 2, 1, 30, 987654))
    assert [r[0] for r in stored] == [f"a1{i + 1:030x}" for i in range(count)]
    assert children[0]["parent_span_id"] == runs[0]["span_id"]
    assert d.sql("SELECT count(*) FROM spans WHERE span_id = ?", [children[0]["span_id"]]) == [(0,)]
    for (resource,) in d.sql("SELECT resource_attributes FROM spans"):
        attrs = json.loads(resource)
        assert attrs["service.name"] == "js-pipeline"
        assert attrs["telemetry.sdk.language"] == "nodejs"

    # every attribute in its typed table, with its value
    by_span = "JOIN spans s USING (span_key) ORDER BY s.trace_id, a.key"
    numbers = d.sql(f"SELECT s.trace_id, a.key, a.value FROM span_numbers a {by_span}")
    assert numbers == [
        row
        for i, s in enumerate(runs)
        for row in sorted([
            (s["trace_id"], "data.row_count", float(i * 1000)),          # intValue
            (s["trace_id"], "data.freshness_lag_hours", 0.25 + i),       # doubleValue
            (s["trace_id"], "data.complete", 1.0 if i % 2 == 0 else 0.0),  # boolValue, false included
        ], key=lambda r: r[1])
    ]
    strings = d.sql(f"SELECT s.trace_id, a.key, a.value FROM span_strings a {by_span}")
    assert strings == [(s["trace_id"], "data.dataset", f"js/ds-{i}") for i, s in enumerate(runs)]
    arrays = d.sql(f"SELECT s.trace_id, a.key, a.numbers, a.strings FROM span_arrays a {by_span}")
    assert arrays == [
        row
        for s in runs
        for row in [
            (s["trace_id"], "data.amount_paise.histogram.bounds", [1.0, 10.0, 100.0], None),  # sent as intValues
            (s["trace_id"], "data.amount_paise.histogram.counts", [1.0, 2.0, 3.0, 4.0], None),
        ]
    ]
    # each attribute row carries its span's end time
    for table in ("span_numbers", "span_strings", "span_arrays"):
        assert d.sql(f"SELECT count(*) FROM {table} a JOIN spans s USING (span_key) WHERE a.time <> s.end_time") \
            == [(0,)]
    assert d.sql("SELECT count(*) FROM span_attributes") == [(6 * count,)]

    # the counters: one child dropped per export, nothing rejected, resends stored once
    tel = d.daemon.telemetry
    assert tel.get("spans_received_total").total() == (count + 1) * repeat
    assert tel.get("spans_dropped_total").total() == repeat
    assert tel.get("spans_rejected_total").total() == 0
    assert tel.get("spans_stored_total").total() == count
    assert tel.get("spans_duplicate_total").total() == count * (repeat - 1)


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_js_sdk_spans_are_stored(daemon: RunningDaemon, protocol: str, compression: str) -> None:
    """Each JS exporter (plain and gzip): every span, time and typed attribute as sent; the child dropped."""
    report = _send(daemon, protocol, count=3, compression=compression)
    assert report["protocol"] == protocol
    _check_stored(daemon, report, count=3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_js_sdk_resend_is_stored_once(daemon: RunningDaemon, protocol: str) -> None:
    """The exporter sends the same ReadableSpans twice (as on a retry): stored once, counted as duplicates."""
    report = _send(daemon, protocol, count=3, repeat=2)
    _check_stored(daemon, report, count=3, repeat=2)


def test_js_sdk_export_failure_exits_non_zero(daemon: RunningDaemon) -> None:
    """The sender's exit code is the export result (so the tests above cannot pass on a failed export)."""
    # the admin port has no /v1/traces: 404, which the exporter does not retry
    report = _send(daemon.admin_url, "http-proto", count=1, expect_ok=False)
    assert [r["code"] for r in report["exports"]] == [1]
    assert report["exports"][0]["error"] == "OTLPExporterError: Not Found", report
    assert daemon.sql("SELECT count(*) FROM spans") == [(0,)]


class _Capture(http.server.BaseHTTPRequestHandler):
    """Records what the HTTP exporters send: headers and the (de-chunked) body. Answers 200 with an empty
    ExportTraceServiceResponse."""

    requests: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        if self.headers["Content-Length"] is not None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        else:
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        self.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
        ctype = self.headers["Content-Type"]
        answer = b"{}" if ctype == "application/json" else b""
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_js_sdk_wire_format() -> None:
    """Pins the JS encodings the module docstring describes, so the store tests above keep covering them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Capture.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        json_report = _send(url, "http-json", count=2)
        _send(url, "http-proto", count=2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    (json_headers, json_body), (proto_headers, proto_body) = _Capture.requests
    for headers in (json_headers, proto_headers):
        assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
        assert headers["user-agent"].startswith("OTel-OTLP-Exporter-JavaScript/")
    assert json_headers["content-type"] == "application/json"
    assert proto_headers["content-type"] == "application/x-protobuf"

    sent = json.loads(json_body)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    first = _runs(json_report)[0]
    run = next(s for s in sent if s["spanId"] == first["span_id"])  # hex
    child = next(s for s in sent if s["name"] == "db.query")
    assert run["traceId"] == first["trace_id"] == child["traceId"]
    assert "parentSpanId" not in run and child["parentSpanId"] == first["span_id"]
    assert (run["kind"], run["status"], run["flags"]) == (1, {"code": 0}, 0x101)  # integers, not enum names
    assert run["startTimeUnixNano"] == "1714528800123456789"  # 64-bit times as strings
    assert (run["events"], run["links"], run["droppedAttributesCount"]) == ([], [], 0)
    values = {a["key"]: a["value"] for a in run["attributes"]}
    assert values["data.row_count"] == {"intValue": 0}  # a JSON number, and present though 0
    assert values["data.complete"] == {"boolValue": True}
    assert values["data.freshness_lag_hours"] == {"doubleValue": 0.25}
    assert values["data.amount_paise.histogram.bounds"] == {
        "arrayValue": {"values": [{"intValue": 1}, {"intValue": 10}, {"intValue": 100}]}}  # doubles as ints

    request = ExportTraceServiceRequest.FromString(proto_body)
    proto_run = next(s for s in request.resource_spans[0].scope_spans[0].spans if s.name == "features.daily.run")
    bounds = next(a.value for a in proto_run.attributes if a.key == "data.amount_paise.histogram.bounds")
    assert [v.WhichOneof("value") for v in bounds.array_value.values] == ["int_value"] * 3
    assert proto_run.flags == 0x101
