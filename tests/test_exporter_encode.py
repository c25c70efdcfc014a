"""Golden and property tests of the OTLP encoder (evaluator/exporter/encode.py): alerts -> spans, figures -> metrics.

The expected requests live in tests/testdata/exporter/*.json, written by google.protobuf.json_format (protobuf's
JSON mapping: ids are base64 there, unlike OTLP/JSON's hex; the hex ids are checked by the tests below). After an
intended change to the encoding, regenerate them and review the diff:

    EVALUATOR_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_exporter_encode.py
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE, Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from evaluator.exporter.encode import (
    STATE_NUMBERS,
    alert_ids,
    alert_metrics_request,
    alert_spans_request,
    iso_time,
    to_unix_nano,
)
from evaluator.receiver.fastdecode import Decoded, decode_bytes, decode_bytes_python
from evaluator.rules.engine import AlertEvent
from evaluator.rules.model import AbsenceSpec, Condition, Rule, ThresholdSpec
from evaluator.rules.state import SeriesState, Transition
from evaluator.telemetry import Telemetry

GOLDEN = Path(__file__).parent / "testdata" / "exporter"
UPDATE = os.environ.get("EVALUATOR_UPDATE_GOLDEN") == "1"

T0 = 1_763_900_000.0  # 2025-11-23T12:13:20Z
RUN_A = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
RUN_B = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")

FRESHNESS = Rule(
    name="orders_fresh", group="orders", kind="threshold", rung="freshness", owner="data-platform",
    severity="page", spec=ThresholdSpec(value="data.freshness_lag_hours"),
    condition=Condition("outside", (0.0, 6.0)), labels=(("team", "orders"), ("tier", "1")),
    annotations=(("summary", "{{ name }} is stale"),),
)
ABSENCE = Rule(
    name="nightly_ran", group="batch", kind="absence", rung="completeness", owner="batch-team",
    severity="ticket", spec=AbsenceSpec(expected_every=86400.0), condition=Condition(">", 3600.0),
)


def _firing() -> AlertEvent:
    t = Transition(
        rule_id=FRESHNESS.id, series=(("pipeline.name", "orders"), ("service.name", "etl")), at=T0 + 60.25,
        from_state="pending", to_state="firing", value=7.5, threshold=(0.0, 6.0), consecutive=2,
        run_at=T0 + 30.5, spans=(RUN_A, RUN_B), detail="lag of the newest run",
    )
    return AlertEvent(FRESHNESS, t, "orders_fresh is stale", {"summary": "orders_fresh is stale",
                                                              "runbook": "https://runbooks/orders"})


def _resolved() -> AlertEvent:
    t = Transition(
        rule_id=FRESHNESS.id, series=(("pipeline.name", "orders"), ("service.name", "etl")), at=T0 + 3600.0,
        from_state="firing", to_state="resolved", value=1.0, threshold=(0.0, 6.0), consecutive=0,
        run_at=T0 + 3590.0, spans=(),
    )
    return AlertEvent(FRESHNESS, t, "orders_fresh resolved", {"summary": "orders_fresh resolved"})


def _nodata() -> AlertEvent:
    t = Transition(
        rule_id=ABSENCE.id, series=(("pipeline.name", "nightly"),), at=T0 + 120.0, from_state="inactive",
        to_state="nodata", value=None, threshold=None, consecutive=0, run_at=None,
    )
    return AlertEvent(ABSENCE, t, "nightly_ran nodata for pipeline.name=nightly: value no data", {})


def _pending() -> AlertEvent:
    t = Transition(
        rule_id=ABSENCE.id, series=(("pipeline.name", "weekly"),), at=T0 + 180.0, from_state="inactive",
        to_state="pending", value=7200.0, threshold=3600.0, consecutive=1, run_at=None,
    )
    return AlertEvent(ABSENCE, t, "nightly_ran pending", {})


EVENTS = [_firing(), _resolved(), _nodata(), _pending()]


def _states() -> list[tuple[Rule, SeriesState]]:
    return [
        (FRESHNESS, SeriesState(series=(("pipeline.name", "orders"), ("service.name", "etl")), state="firing",
                                value=7.5, threshold=(0.0, 6.0), consecutive=2)),
        (ABSENCE, SeriesState(series=(("pipeline.name", "weekly"),), state="pending", value=7200.0,
                              threshold=3600.0)),
        (ABSENCE, SeriesState(series=(("pipeline.name", "nightly"),), state="nodata")),
    ]


def _telemetry() -> Telemetry:
    tel = Telemetry()
    tel.counter("spans_received_total", "Spans in accepted requests.", ("transport",)).inc(12, transport="grpc")
    tel.counter("spans_received_total", "Spans in accepted requests.", ("transport",)).inc(3, transport="http")
    tel.counter("store_commits_total", "Group commits of received spans.")  # no samples: reports 0
    tel.gauge("rule_group_last_duration_seconds", "Duration of each group's last evaluation.",
              ("group",)).set(0.25, group="orders")
    tel.gauge("inflight_bytes", "Request bytes admitted and not yet committed.").set(4096)
    return tel


def _metrics_request() -> ExportMetricsServiceRequest:
    transitions = {(FRESHNESS.id, "firing"): 1, (FRESHNESS.id, "pending"): 1, (ABSENCE.id, "nodata"): 2}
    return alert_metrics_request(_states(), transitions, _telemetry(), now_ns=to_unix_nano(T0 + 300),
                                 start_ns=to_unix_nano(T0))


def _attrs(kvs: Iterable[KeyValue]) -> dict[str, AnyValue]:
    return {kv.key: kv.value for kv in kvs}


def _check_golden(name: str, message: Message) -> None:
    path = GOLDEN / name
    text = json_format.MessageToJson(message, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with EVALUATOR_UPDATE_GOLDEN=1"
    expected = type(message)()
    json_format.Parse(path.read_text(), expected)
    assert json.loads(text) == json.loads(path.read_text()), f"{name} differs from the golden file"
    assert expected == message


# -- alert spans --------------------------------------------------------------------------------------------------

def test_alert_spans_match_golden() -> None:
    """Four transitions (firing with a band and links, resolved, nodata, pending) encode as the stored request."""
    _check_golden("alert_spans.json", alert_spans_request(EVENTS))


def test_alert_spans_deterministic() -> None:
    """The same events give the same bytes, so a retried export carries the same trace and span ids."""
    a = alert_spans_request(EVENTS).SerializeToString(deterministic=True)
    b = alert_spans_request([_firing(), _resolved(), _nodata(), _pending()]).SerializeToString(deterministic=True)
    assert a == b


def test_alert_ids_hash_the_transition_identity() -> None:
    """Ids depend on (rule, series, time, new state) only: other fields do not change them, those do."""
    t = _firing().transition
    tid, sid = alert_ids(t)
    assert len(tid) == 16 and len(sid) == 8 and any(tid) and any(sid)
    assert alert_ids(replace(t, value=1.0, detail="other", spans=())) == (tid, sid)
    for changed in (replace(t, at=t.at + 1), replace(t, to_state="resolved"), replace(t, rule_id="x/y"),
                    replace(t, series=(("pipeline.name", "other"),))):
        ids = alert_ids(changed)
        assert ids[0] != tid and ids[1] != sid
    assert len({alert_ids(e.transition) for e in EVENTS}) == len(EVENTS)


def test_alert_span_shape() -> None:
    """Name 'alert <state>', resource service.name, scope, INTERNAL, start = end = transition time."""
    req = alert_spans_request(EVENTS, service_name="eval-test", service_version="9.9")
    (rs,) = req.resource_spans
    res = _attrs(rs.resource.attributes)
    assert res["service.name"].string_value == "eval-test"
    assert res["service.version"].string_value == "9.9"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "otel-evaluator.alerts"
    names = [s.name for s in ss.spans]
    assert names == ["alert firing", "alert resolved", "alert nodata", "alert pending"]
    for span, event in zip(ss.spans, EVENTS, strict=True):
        assert span.kind == Span.SPAN_KIND_INTERNAL
        assert span.start_time_unix_nano == span.end_time_unix_nano == to_unix_nano(event.transition.at)
        assert not span.parent_span_id
    assert ss.spans[0].start_time_unix_nano == 1_763_900_060_250_000_000
    assert [s.status.code for s in ss.spans] == [Status.STATUS_CODE_ERROR, Status.STATUS_CODE_OK,
                                                 Status.STATUS_CODE_UNSET, Status.STATUS_CODE_UNSET]
    assert ss.spans[0].status.message == "orders_fresh is stale"


def test_alert_span_attributes() -> None:
    """The firing span carries the rule, state, numbers, summary, run time, labels and series labels."""
    span = alert_spans_request([_firing()]).resource_spans[0].scope_spans[0].spans[0]
    a = _attrs(span.attributes)
    strings = {k: v.string_value for k, v in a.items() if v.WhichOneof("value") == "string_value"}
    assert strings == {
        "alert.name": "orders_fresh", "alert.rule_id": "orders/orders_fresh", "alert.group": "orders",
        "alert.kind": "threshold", "alert.state": "firing", "alert.previous_state": "pending",
        "alert.rung": "freshness", "alert.owner": "data-platform", "alert.severity": "page",
        "alert.summary": "orders_fresh is stale", "alert.detail": "lag of the newest run",
        "alert.run_time": "2025-11-23T12:13:50.500000Z", "alert.label.team": "orders", "alert.label.tier": "1",
        "alert.annotation.runbook": "https://runbooks/orders",
        "alert.series.pipeline.name": "orders", "alert.series.service.name": "etl",
    }
    assert a["alert.value"].double_value == 7.5
    assert a["alert.consecutive_violations"].int_value == 2
    assert a["alert.consecutive_violations"].WhichOneof("value") == "int_value"


def test_band_threshold_is_a_double_array_and_scalar_a_double() -> None:
    """outside/inside bands encode as [low, high]; a single threshold as a double."""
    band = _attrs(alert_spans_request([_firing()]).resource_spans[0].scope_spans[0].spans[0].attributes)
    assert [v.double_value for v in band["alert.threshold"].array_value.values] == [0.0, 6.0]
    assert all(v.WhichOneof("value") == "double_value" for v in band["alert.threshold"].array_value.values)
    scalar = _attrs(alert_spans_request([_pending()]).resource_spans[0].scope_spans[0].spans[0].attributes)
    assert scalar["alert.threshold"].WhichOneof("value") == "double_value"
    assert scalar["alert.threshold"].double_value == 3600.0


def test_missing_value_threshold_and_run_time_are_omitted() -> None:
    """A nodata transition has no alert.value, alert.threshold, alert.detail or alert.run_time, and no links."""
    span = alert_spans_request([_nodata()]).resource_spans[0].scope_spans[0].spans[0]
    keys = set(_attrs(span.attributes))
    assert not keys & {"alert.value", "alert.threshold", "alert.detail", "alert.run_time"}
    assert {"alert.name", "alert.state", "alert.consecutive_violations", "alert.summary"} <= keys
    assert not span.links


def test_non_finite_numbers_are_omitted() -> None:
    """NaN / inf values and thresholds are left out (receivers reject spans carrying them)."""
    e = _firing()
    t = replace(e.transition, value=math.nan, threshold=(0.0, math.inf))
    span = alert_spans_request([AlertEvent(e.rule, t, e.summary, e.annotations)]).resource_spans[0] \
        .scope_spans[0].spans[0]
    keys = set(_attrs(span.attributes))
    assert "alert.value" not in keys and "alert.threshold" not in keys
    t = replace(e.transition, value=math.inf, threshold=math.nan)
    span = alert_spans_request([AlertEvent(e.rule, t, e.summary, e.annotations)]).resource_spans[0] \
        .scope_spans[0].spans[0]
    assert not set(_attrs(span.attributes)) & {"alert.value", "alert.threshold"}


def test_links_decode_back_to_the_violating_run_ids() -> None:
    """Each violating (trace_id, span_id) becomes a link whose bytes hex back to the stored ids, with a reason."""
    span = alert_spans_request([_firing()]).resource_spans[0].scope_spans[0].spans[0]
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in span.links] == [RUN_A, RUN_B]
    for link in span.links:
        assert _attrs(link.attributes)["alert.link.reason"].string_value == "violating run"


def test_empty_events_give_an_empty_request() -> None:
    assert alert_spans_request([]) == ExportTraceServiceRequest()


def test_helpers() -> None:
    """Times round to whole microseconds; ISO times are UTC with a Z."""
    assert to_unix_nano(1.5) == 1_500_000_000
    assert to_unix_nano(T0 + 0.1) == 1_763_900_000_100_000_000
    assert iso_time(T0) == "2025-11-23T12:13:20.000000Z"
    assert iso_time(0.000001) == "1970-01-01T00:00:00.000001Z"


@pytest.mark.parametrize("decode", [decode_bytes, decode_bytes_python], ids=["fast", "python"])
def test_round_trip_through_our_own_decoder(decode: Callable[[bytes, tuple[str, ...] | None], Decoded]) -> None:
    """The evaluator ingests its own alert spans: none rejected, ids, times, service and attributes stored."""
    req = alert_spans_request(EVENTS)
    decoded = decode(req.SerializeToString(), None)
    assert (decoded.received, decoded.dropped, decoded.rejected) == (4, 0, 0)
    spans = decoded.columns.spans.to_pylist()
    assert [(s["trace_id"], s["span_id"]) for s in spans] == \
        [(alert_ids(e.transition)[0].hex(), alert_ids(e.transition)[1].hex()) for e in EVENTS]
    assert [s["name"] for s in spans] == ["alert firing", "alert resolved", "alert nodata", "alert pending"]
    assert {s["service_name"] for s in spans} == {"otel-evaluator"}
    assert {s["scope_name"] for s in spans} == {"otel-evaluator.alerts"}
    assert [s["status_code"] for s in spans] == [2, 1, 0, 0]
    first = spans[0]
    assert first["start_time"] == first["end_time"]
    assert first["start_time"].timestamp() == pytest.approx(T0 + 60.25)

    strings = {(r["span_idx"], r["key"]): r["value"] for r in decoded.columns.strings.to_pylist()}
    numbers = {(r["span_idx"], r["key"]): r["value"] for r in decoded.columns.numbers.to_pylist()}
    arrays = {(r["span_idx"], r["key"]): r["numbers"] for r in decoded.columns.arrays.to_pylist()}
    assert strings[(0, "alert.name")] == "orders_fresh"
    assert strings[(0, "alert.state")] == "firing"
    assert strings[(0, "alert.series.pipeline.name")] == "orders"
    assert numbers[(0, "alert.value")] == 7.5
    assert numbers[(0, "alert.consecutive_violations")] == 2.0
    assert arrays[(0, "alert.threshold")] == [0.0, 6.0]
    assert numbers[(3, "alert.threshold")] == 3600.0
    assert (2, "alert.value") not in numbers and (2, "alert.threshold") not in numbers

    # the alert prefix keeps them all when the receiver filters by signal prefix
    assert decode(req.SerializeToString(), ("alert.",)).dropped == 0


# -- metrics ------------------------------------------------------------------------------------------------------

def test_alert_metrics_match_golden() -> None:
    """Alert gauges, the transitions Sum and the daemon's telemetry encode as the stored request."""
    _check_golden("alert_metrics.json", _metrics_request())


def test_alert_metrics_deterministic_and_order_independent() -> None:
    """Equal inputs give equal bytes, whatever order the states and counts come in."""
    a = _metrics_request().SerializeToString(deterministic=True)
    transitions = {(ABSENCE.id, "nodata"): 2, (FRESHNESS.id, "pending"): 1, (FRESHNESS.id, "firing"): 1}
    b = alert_metrics_request(list(reversed(_states())), transitions, _telemetry(),
                              now_ns=to_unix_nano(T0 + 300), start_ns=to_unix_nano(T0))
    assert a == b.SerializeToString(deterministic=True)


def _metrics_by_name(req: ExportMetricsServiceRequest) -> dict[str, Metric]:
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def test_alert_gauges_per_rule_and_series() -> None:
    """value and state are Gauges per rule and series, with the rule's attributes and the series labels;
    a series without a value has a state point only."""
    now = to_unix_nano(T0 + 300)
    metrics = _metrics_by_name(_metrics_request())
    value = metrics["otel_evaluator.alert.value"]
    state = metrics["otel_evaluator.alert.state"]
    assert value.WhichOneof("data") == "gauge" and state.WhichOneof("data") == "gauge"
    vpoints = value.gauge.data_points
    spoints = state.gauge.data_points
    assert len(vpoints) == 2 and len(spoints) == 3
    by_series = {(_attrs(p.attributes)["alert.rule_id"].string_value,
                  _attrs(p.attributes)["alert.series.pipeline.name"].string_value): p.as_int for p in spoints}
    assert by_series == {("batch/nightly_ran", "nightly"): 4, ("batch/nightly_ran", "weekly"): 1,
                         ("orders/orders_fresh", "orders"): 2}
    first = _attrs(vpoints[0].attributes)
    assert {k: v.string_value for k, v in first.items()} == {
        "alert.rule_id": "batch/nightly_ran", "alert.name": "nightly_ran", "alert.group": "batch",
        "alert.rung": "completeness", "alert.owner": "batch-team", "alert.severity": "ticket",
        "alert.series.pipeline.name": "weekly",
    }
    assert vpoints[0].as_double == 7200.0
    for p in (*vpoints, *spoints):
        assert p.time_unix_nano == now and p.start_time_unix_nano == 0
    assert STATE_NUMBERS == {"inactive": 0, "pending": 1, "firing": 2, "resolved": 3, "nodata": 4}


def test_transitions_sum_is_monotonic_cumulative() -> None:
    """Transition counts are a cumulative monotonic Sum per rule and state entered, from start_ns to now_ns."""
    m = _metrics_by_name(_metrics_request())["otel_evaluator.alert.transitions"]
    assert m.WhichOneof("data") == "sum"
    s = m.sum
    assert s.is_monotonic and s.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    got = {(_attrs(p.attributes)["alert.rule_id"].string_value, _attrs(p.attributes)["alert.state"].string_value):
           (p.as_int, p.start_time_unix_nano, p.time_unix_nano) for p in s.data_points}
    start, now = to_unix_nano(T0), to_unix_nano(T0 + 300)
    assert got == {("batch/nightly_ran", "nodata"): (2, start, now), ("orders/orders_fresh", "firing"): (1, start, now),
                   ("orders/orders_fresh", "pending"): (1, start, now)}


def test_telemetry_matches_prometheus_text() -> None:
    """Every Telemetry metric keeps its Prometheus name and figures: counters as monotonic cumulative Sums from
    the daemon start, gauges as Gauges, labels as attributes."""
    tel = _telemetry()
    req = alert_metrics_request([], {}, tel, now_ns=200, start_ns=100)
    scopes = {sm.scope.name: sm for sm in req.resource_metrics[0].scope_metrics}
    assert not scopes["otel-evaluator.alerts"].metrics
    otlp: dict[str, float] = {}
    for m in scopes["otel-evaluator.telemetry"].metrics:
        kind = m.WhichOneof("data")
        if m.name.endswith("_total"):
            assert kind == "sum" and m.sum.is_monotonic
            assert m.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
            points = list(m.sum.data_points)
            assert all(p.start_time_unix_nano == 100 for p in points)
        else:
            assert kind == "gauge"
            points = list(m.gauge.data_points)
        for p in points:
            assert p.time_unix_nano == 200
            labels = ",".join(f'{kv.key}="{kv.value.string_value}"' for kv in p.attributes)
            otlp[m.name + ("{" + labels + "}" if labels else "")] = p.as_double
    prom = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in tel.render_prometheus().splitlines() if line and not line.startswith("#")}
    assert otlp == prom
    assert otlp["otel_evaluator_store_commits_total"] == 0.0


def test_no_telemetry_and_no_states() -> None:
    """Without telemetry only the alert scope is sent; with nothing to report it holds no metrics."""
    req = alert_metrics_request([], {}, None, now_ns=2, start_ns=1, service_name="x")
    (rm,) = req.resource_metrics
    assert _attrs(rm.resource.attributes)["service.name"].string_value == "x"
    assert [sm.scope.name for sm in rm.scope_metrics] == ["otel-evaluator.alerts"]
    assert not rm.scope_metrics[0].metrics
