"""Per-span limits through the real receivers (attributes per span, value lengths; truncate and reject), plus the
resource limits that already exist: gRPC's concurrent streams per connection and DuckDB's memory and threads."""

from __future__ import annotations

import base64
import json
import socket
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RunningDaemon
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from spans import request, span

from evaluator.config import load_config
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.ingest import IngestSettings
from evaluator.receiver.limits import SpanLimits
from evaluator.store.store import Store, StoreSettings
from evaluator.yamlsrc import InvalidConfig

LONG = "é" * 5000  # 10000 bytes, 5000 characters


def _big_span() -> tuple[Span, dict[str, Any]]:
    """A span with 130 attributes of interleaved types (some over the value length), and what truncate keeps of
    it with the defaults: the first 128 in wire order, long values cut."""
    attrs: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for j in range(130):
        key = f"data.k{j:03d}"
        value: Any
        if j == 1:
            value, cut = LONG, LONG[:4096]
        elif j == 2:
            value = [float(i) for i in range(5000)]
            cut = value[:4096]
        elif j == 5:
            value, cut = ["x" * 5000, "y"], ["x" * 4096, "y"]
        elif j == 8:
            value = ["s"] * 4097
            cut = value[:4096]
        elif j % 3 == 0:
            value = cut = j
        elif j % 3 == 1:
            value = cut = f"v{j}"
        else:
            value = cut = [float(j), j + 0.5]
        attrs[key] = value
        if j < 128:
            kept[key] = cut
    return span(attrs=attrs), kept


def _small_span() -> tuple[Span, dict[str, Any]]:
    """Within every default limit, values exactly at the limit included: stored as sent."""
    attrs: dict[str, Any] = {"data.n": 1, "data.text": "ü" * 4096, "data.list": ["z" * 4096] * 3,
                             "data.nums": [1.5] * 4096, "data.flag": True}
    return span(attrs=attrs), attrs


def _stored(d: RunningDaemon, span_id: bytes) -> dict[str, Any]:
    """Every stored attribute of a span, as key -> value (numbers as floats, arrays as lists)."""
    out: dict[str, Any] = {}
    key = "(SELECT span_key FROM spans WHERE span_id = ?)"
    sid = span_id.hex()
    for k, v in d.sql(f"SELECT key, value FROM span_numbers WHERE span_key = {key}", [sid]):
        out[k] = v
    for k, v in d.sql(f"SELECT key, value FROM span_strings WHERE span_key = {key}", [sid]):
        out[k] = v
    for k, nums, strs in d.sql(f"SELECT key, numbers, strings FROM span_arrays WHERE span_key = {key}", [sid]):
        out[k] = nums if nums is not None else strs
    return out


def _as_stored(attrs: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, bool | int):
            return float(v)
        if isinstance(v, list):
            return [float(x) if isinstance(x, int | float) else x for x in v]
        return v
    return {k: conv(v) for k, v in attrs.items()}


def _counter(d: RunningDaemon, name: str, **labels: str) -> float:
    return d.daemon.telemetry.get(name).value(**labels)


def _otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """The request as OTLP/JSON (hex ids, as the spec and the OTLP/HTTP exporters send them)."""
    doc = MessageToDict(req)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in sp:
                        sp[k] = base64.b64decode(sp[k]).hex()
    return json.dumps(doc).encode()


def _post_json(url: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/traces", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        result: dict[str, Any] = json.loads(resp.read() or b"{}")
        return result


def test_truncate_keeps_the_first_attributes_in_wire_order_and_cuts_long_values(daemon: RunningDaemon) -> None:
    big, big_kept = _big_span()
    small, small_attrs = _small_span()
    response = daemon.export(request(big, small))
    assert not response.HasField("partial_success")
    assert _stored(daemon, big.span_id) == _as_stored(big_kept)
    assert _stored(daemon, small.span_id) == _as_stored(small_attrs)  # in-limit data untouched
    assert _counter(daemon, "attributes_truncated_total", reason="too_many_attributes") == 2
    assert _counter(daemon, "attributes_truncated_total", reason="value_too_long") == 4
    assert daemon.daemon.telemetry.get("spans_rejected_over_limit_total").total() == 0
    assert daemon.daemon.telemetry.get("spans_stored_total").total() == 2


def test_truncate_over_otlp_json_keeps_the_same_attributes(daemon: RunningDaemon) -> None:
    big, big_kept = _big_span()
    body = _post_json(daemon.http_url, _otlp_json(request(big)))
    assert not body.get("partialSuccess")
    assert _stored(daemon, big.span_id) == _as_stored(big_kept)


def test_truncate_cuts_text_values_at_a_character_boundary(make_daemon: Any) -> None:
    d = make_daemon(ingest=IngestSettings(limits=SpanLimits(max_attributes=4, max_value_length=3)))
    sp = span(attrs={"data.emoji": "😀😀😀😀", "data.raw": b"\x01\x02", "data.x": 1, "empty": ""})
    # a key-value list is stored as JSON text, and cut like any text; an attribute without a value is not stored
    # and does not count; duplicate keys count twice
    sp.attributes.append(KeyValue(key="data.meta", value=AnyValue(kvlist_value=KeyValueList(
        values=[KeyValue(key="a", value=AnyValue(string_value="b"))]))))
    sp.attributes.append(KeyValue(key="nothing", value=AnyValue()))
    sp.attributes.append(KeyValue(key="data.x", value=AnyValue(int_value=2)))
    d.export(request(sp))
    rows = d.sql("SELECT key, value FROM span_strings ORDER BY key")
    assert rows == [("data.emoji", "😀😀😀"), ("data.raw", "010"), ("empty", "")]
    assert d.sql("SELECT key, value FROM span_numbers") == [("data.x", 1.0)]
    assert _counter(d, "attributes_truncated_total", reason="too_many_attributes") == 2
    assert _counter(d, "attributes_truncated_total", reason="value_too_long") == 2


def test_reject_refuses_the_span_with_a_precise_message(make_daemon: Any) -> None:
    d = make_daemon(ingest=IngestSettings(limits=SpanLimits(max_attributes=3, max_value_length=10,
                                                            action="reject")))
    ok = span(name="ok", attrs={"data.a": 1, "data.b": "0123456789", "data.c": ["0123456789"] * 10})
    many = span(name="many", attrs={"data.a": 1, "data.b": 2, "data.c": 3, "data.d": 4})
    text = span(name="text", attrs={"data.a": "é" * 11})
    array = span(name="array", attrs={"data.a": [1.0] * 11})
    element = span(name="element", attrs={"data.a": ["x", "y" * 11]})
    invalid = span(name="invalid", attrs={"data.a": 1}, trace_id=bytes(16))
    response = d.export(request(ok, many, text, array, element, invalid))
    assert response.partial_success.rejected_spans == 5
    msg = response.partial_success.error_message
    assert msg.startswith("rejected 5 of 6 spans: ")
    for expected in (
        f"span {invalid.span_id.hex()} ('invalid'): trace_id must be 16 bytes and not all zero",
        f"span {many.span_id.hex()} ('many'): 4 attributes, over the limit of 3",
        f"span {text.span_id.hex()} ('text'): attribute data.a is 11 characters long, over the limit of 10",
        f"span {array.span_id.hex()} ('array'): array attribute data.a has 11 elements, over the limit of 10",
        f"span {element.span_id.hex()} ('element'): array attribute data.a has an element over the limit of 10 "
        "characters",
    ):
        assert expected in msg, msg
    assert d.sql("SELECT name FROM spans") == [("ok",)]
    assert _stored(d, ok.span_id) == _as_stored({"data.a": 1, "data.b": "0123456789", "data.c": ["0123456789"] * 10})
    assert d.sql("SELECT count(*) FROM span_attributes") == [(3,)]  # no attribute row of a rejected span
    assert _counter(d, "spans_rejected_total", transport="grpc") == 5
    assert _counter(d, "spans_rejected_over_limit_total", reason="too_many_attributes") == 1
    assert _counter(d, "spans_rejected_over_limit_total", reason="value_too_long") == 3
    assert d.daemon.telemetry.get("attributes_truncated_total").total() == 0

    # over HTTP/JSON: the same answer in partialSuccess
    body = _post_json(d.http_url, _otlp_json(request(span(name="many", attrs={f"data.{i}": i for i in range(5)}),
                                                     span(name="fine", attrs={"data.x": 1}))))
    assert body["partialSuccess"]["rejectedSpans"] == "1"
    assert "5 attributes, over the limit of 3" in body["partialSuccess"]["errorMessage"]
    assert _counter(d, "spans_rejected_total", transport="http") == 1


def test_limits_off_store_everything(make_daemon: Any) -> None:
    d = make_daemon(ingest=IngestSettings(limits=SpanLimits(max_attributes=None, max_value_length=None)))
    big, _ = _big_span()
    d.export(request(big))
    assert d.sql("SELECT count(*) FROM span_attributes") == [(130,)]
    assert d.sql("SELECT length(value) FROM span_strings WHERE key = 'data.k001'") == [(5000,)]


def test_limits_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    assert load_config(None).ingest.limits == SpanLimits(128, 4096, "truncate")
    path.write_text("receivers:\n  limits:\n    max_attributes_per_span: 64\n    max_attribute_value_length: off\n"
                    "    action: reject\n")
    assert load_config(str(path)).ingest.limits == SpanLimits(64, None, "reject")
    path.write_text("receivers:\n  limits:\n    max_attributes_per_span: 0\n    max_attribute_value_length: big\n"
                    "    action: drop\n    max_keys: 3\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key in ((3, "max_attributes_per_span"), (4, "max_attribute_value_length"), (5, "action"),
                      (6, "max_keys")):
        assert f"{path}:{line}: receivers.limits.{key}:" in text, text


# -- resource limits that already existed --------------------------------------------------------------------------
def _server_settings(port: int) -> dict[int, int]:
    """The HTTP/2 SETTINGS the gRPC server announces on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + b"\x04\x00" + bytes(4))
        buf = b""
        while True:
            while len(buf) < 9:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before SETTINGS"
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            frame_type, flags = buf[3], buf[4]
            while len(buf) < 9 + length:
                buf += sock.recv(65536)
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if frame_type == 0x4 and not flags & 0x1:  # SETTINGS, not an ACK
                return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                        for i in range(0, len(payload), 6)}


def test_max_concurrent_streams_is_announced_to_clients(make_daemon: Any) -> None:
    d = make_daemon(grpc=GrpcSettings(listen="127.0.0.1:0", max_concurrent_streams=7))
    assert d.daemon.grpc is not None and d.daemon.grpc.port
    settings = _server_settings(d.daemon.grpc.port)
    assert settings.get(0x3) == 7  # SETTINGS_MAX_CONCURRENT_STREAMS


def test_store_memory_limit_and_threads_reach_duckdb(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"store:\n  path: {tmp_path / 'ev.duckdb'}\n  memory_limit: 256MiB\n  threads: 2\n")
    store = Store(load_config(str(path)).store)
    store.start()
    try:
        cur = store.cursor()
        assert cur.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone() == (
            "256.0 MiB", 2)
        cur.close()
    finally:
        store.shutdown()
    assert StoreSettings().memory_limit is None and StoreSettings().threads is None


def test_documented_defaults_are_the_defaults(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"receivers": {"limits": block["receivers"]["limits"]}}))
    assert load_config(str(path)).ingest.limits == SpanLimits()
