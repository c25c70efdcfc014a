"""Alerts and figures -> OTLP requests, as pure functions (no I/O, no clock: every time is an argument).

The exporter's transport only moves the bytes these functions build (translation is pure and separate from
transport), so what an alert looks like on the wire is pinned by golden tests on fixed inputs
(tests/test_exporter_encode.py).

Alert spans (`alert_spans_request`): one span per transition, because a trace backend is where people already
look, and span links let it jump from the alert to the pipeline runs that violated.

- resource: service.name (default "otel-evaluator"), service.version; scope "otel-evaluator.alerts".
- name "alert <to_state>" ("alert firing", "alert resolved", ...): low cardinality, as span names should be;
  the rule and series are attributes.
- start = end = when the transition happened (its `changed_at`: the run, slot or due time it belongs to, the same
  however the evaluations were stepped; `alert.evaluated_at` says when it was decided): a transition is an
  instant, not an operation. Times are rounded to whole microseconds (the store's precision) so float noise
  cannot change the bytes.
- kind INTERNAL; status ERROR for firing (with the summary as message), OK for resolved, UNSET otherwise.
- ids: trace_id and span_id are the first 16 and the next 8 bytes of SHA-256 over (rule_id, series, at,
  to_state). A retried send therefore carries the same ids and the receiving side (our own store included,
  which keys on (trace_id, span_id)) dedupes it. Each transition is its own trace; episode-level traces would
  need the episode start, which a Transition does not carry.
- attributes, in this order, omitted when marked "if set":
  alert.name, alert.rule_id, alert.group, alert.kind, alert.state, alert.previous_state, alert.rung,
  alert.owner, alert.severity, alert.value (double, if set and finite), alert.threshold (double, or a double
  array [low, high] for bands; if set and finite), alert.consecutive_violations (int), alert.summary,
  alert.detail (if set), alert.run_time (ISO 8601 UTC of the run that caused it, if set), alert.evaluated_at
  (ISO 8601 UTC of the evaluation that decided it), alert.started_at (ISO 8601 UTC of the episode's first
  violation, on firing and resolved),
  alert.label.<name> per rule label, alert.annotation.<name> per rendered annotation other than summary,
  alert.series.<attribute> per series label (attribute names keep their dots), alert.url (if the caller gives
  the admin server's external URL: see `ladder_url`).
  Non-finite numbers are left out because OTLP receivers (ours included) reject spans that carry them; the
  summary and detail still say what happened.
- links: one per violating run span (trace_id/span_id from hex), attribute alert.link.reason="violating run".

Metrics (`alert_metrics_request`), scope "otel-evaluator.alerts" then "otel-evaluator.telemetry":

- otel_evaluator.alert.value (Gauge, double): each rule's latest value per series; series without a value
  (no data yet) have no point.
- otel_evaluator.alert.state (Gauge, int): STATE_NUMBERS, inactive 0, pending 1, firing 2, resolved 3,
  nodata 4 (-1 for a state this module does not know).
  Both carry alert.rule_id, alert.name, alert.group, alert.rung, alert.owner, alert.severity and
  alert.series.<attribute> per series label.
- otel_evaluator.alert.transitions (Sum, monotonic, cumulative, int): per (alert.rule_id, alert.state = the
  state entered), counted since start_ns.
- every Telemetry metric under its Prometheus name unchanged (e.g. otel_evaluator_spans_received_total), so
  the OTLP figures and admin /metrics match one to one: counters become monotonic cumulative Sums starting at
  start_ns (the daemon start), gauges become Gauges; the help text is the description, label names are the
  attribute keys. A label-less metric with no samples reports 0, as /metrics does.
  The Telemetry collectors are not run here (they have side effects); the caller refreshes gauges first.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

import evaluator
from evaluator.rules.engine import AlertEvent
from evaluator.rules.model import FIRING, INACTIVE, NODATA, PENDING, RESOLVED, Rule, SeriesKey
from evaluator.rules.state import SeriesState, Transition
from evaluator.telemetry import Metric as TelemetryMetric
from evaluator.telemetry import Telemetry

__all__ = [
    "ALERTS_SCOPE",
    "LINK_REASON",
    "SERVICE_NAME",
    "STATE_NUMBERS",
    "TELEMETRY_SCOPE",
    "AttributeValue",
    "SeriesStates",
    "TransitionCounts",
    "alert_attributes",
    "alert_ids",
    "alert_metrics_request",
    "alert_span",
    "alert_spans_request",
    "alert_time",
    "any_value",
    "id_bytes",
    "iso_time",
    "key_value",
    "ladder_url",
    "resource",
    "to_unix_nano",
]

SERVICE_NAME = "otel-evaluator"
ALERTS_SCOPE = "otel-evaluator.alerts"
TELEMETRY_SCOPE = "otel-evaluator.telemetry"
LINK_REASON = "violating run"
STATE_NUMBERS: Mapping[str, int] = {INACTIVE: 0, PENDING: 1, FIRING: 2, RESOLVED: 3, NODATA: 4}

METRIC_VALUE = "otel_evaluator.alert.value"
METRIC_STATE = "otel_evaluator.alert.state"
METRIC_TRANSITIONS = "otel_evaluator.alert.transitions"

AttributeValue = str | bool | int | float | Sequence[str] | Sequence[float]
SeriesStates = Iterable[tuple[Rule, SeriesState]]
"""What the engine has at hand after an evaluation: for each RuleStatus, (status.rule, state) per series."""
TransitionCounts = Mapping[tuple[str, str], int]
"""Transitions entered since start_ns, keyed by (rule_id, to_state)."""


# -- helpers: ids, times, attribute values ------------------------------------------------------------------------

def id_bytes(hex_id: str) -> bytes:
    """A trace or span id as stored (lower-case hex) -> the bytes OTLP carries."""
    return bytes.fromhex(hex_id)


def to_unix_nano(seconds: float) -> int:
    """Unix seconds -> nanoseconds, rounded to whole microseconds so float noise never changes the bytes."""
    return round(seconds * 1_000_000) * 1_000


def iso_time(seconds: float) -> str:
    """Unix seconds -> ISO 8601 UTC with microseconds, e.g. 2026-11-23T18:56:46.123456Z."""
    micros = round(seconds * 1_000_000)
    dt = datetime.fromtimestamp(micros // 1_000_000, tz=UTC).replace(microsecond=micros % 1_000_000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def any_value(value: AttributeValue) -> AnyValue:
    """A Python value -> AnyValue; bool before int (bool is an int), sequences become arrays."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))


def key_value(key: str, value: AttributeValue) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def resource(service_name: str, service_version: str) -> Resource:
    return Resource(attributes=[key_value("service.name", service_name),
                                key_value("service.version", service_version)])


def _finite(x: float) -> bool:
    return math.isfinite(x)


def alert_ids(t: Transition) -> tuple[bytes, bytes]:
    """(trace_id, span_id) of a transition's alert span: a hash of what identifies the transition, so a resend
    has the same ids. Never all zero (an invalid id in OTLP)."""
    key = json.dumps([t.rule_id, [list(p) for p in t.series], to_unix_nano(t.at), t.to_state],
                     separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(key.encode()).digest()
    trace_id, span_id = digest[:16], digest[16:24]
    if not any(trace_id):
        trace_id = trace_id[:-1] + b"\x01"
    if not any(span_id):
        span_id = span_id[:-1] + b"\x01"
    return trace_id, span_id


# -- alert spans --------------------------------------------------------------------------------------------------

def _series_attributes(series: SeriesKey) -> list[KeyValue]:
    return [key_value(f"alert.series.{name}", value) for name, value in series]


def alert_time(t: Transition) -> float:
    """The time an alert is about: when its episode started for a firing alert (a re-send then carries the same
    time), when the transition happened otherwise."""
    if t.to_state == FIRING and t.started_at is not None:
        return t.started_at
    return t.at


def ladder_url(base_url: str, series: SeriesKey, at: float) -> str:
    """Where to start looking at an alert: the admin server's /ladder of the series' dataset (`data.dataset`), or
    of every dataset when the series has none, with the alert's time as `at` (ignored by /ladder today; for a
    console that shows the ladder as it was). The time is written as the store keeps it (UTC, whole
    microseconds), so an alert re-sent from the store carries the same URL as its first send."""
    query = [("dataset", v) for k, v in series if k == "data.dataset" and v]
    query.append(("at", datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
    return f"{base_url.rstrip('/')}/ladder?{urllib.parse.urlencode(query)}"


def alert_attributes(event: AlertEvent, base_url: str | None = None) -> list[KeyValue]:
    """The span attributes of one alert, in a fixed order (see the module docstring); `alert.url` when base_url
    (the admin server's external URL) is given."""
    rule, t = event.rule, event.transition
    attrs = [
        key_value("alert.name", rule.name),
        key_value("alert.rule_id", t.rule_id),
        key_value("alert.group", rule.group),
        key_value("alert.kind", rule.kind),
        key_value("alert.state", t.to_state),
        key_value("alert.previous_state", t.from_state),
        key_value("alert.rung", rule.rung),
        key_value("alert.owner", rule.owner),
        key_value("alert.severity", rule.severity),
    ]
    if t.value is not None and _finite(t.value):
        attrs.append(key_value("alert.value", float(t.value)))
    th = t.threshold
    if isinstance(th, tuple):
        if all(_finite(x) for x in th):
            attrs.append(key_value("alert.threshold", [float(x) for x in th]))
    elif th is not None and _finite(th):
        attrs.append(key_value("alert.threshold", float(th)))
    attrs.append(key_value("alert.consecutive_violations", int(t.consecutive)))
    attrs.append(key_value("alert.summary", event.summary))
    if t.detail:
        attrs.append(key_value("alert.detail", t.detail))
    if t.run_at is not None:
        attrs.append(key_value("alert.run_time", iso_time(t.run_at)))
    if t.evaluated_at is not None:
        attrs.append(key_value("alert.evaluated_at", iso_time(t.evaluated_at)))
    if t.started_at is not None:
        attrs.append(key_value("alert.started_at", iso_time(t.started_at)))
    attrs.extend(key_value(f"alert.label.{k}", v) for k, v in rule.labels)
    attrs.extend(key_value(f"alert.annotation.{k}", v) for k, v in sorted(event.annotations.items())
                 if k != "summary")
    attrs.extend(_series_attributes(t.series))
    if base_url is not None:
        attrs.append(key_value("alert.url", ladder_url(base_url, t.series, alert_time(t))))
    return attrs


def _status(event: AlertEvent) -> Status:
    state = event.transition.to_state
    if state == FIRING:
        return Status(code=Status.STATUS_CODE_ERROR, message=event.summary)
    if state == RESOLVED:
        return Status(code=Status.STATUS_CODE_OK)
    return Status()


def alert_span(event: AlertEvent, base_url: str | None = None) -> Span:
    """One alert transition as a span (see the module docstring for every choice)."""
    t = event.transition
    trace_id, span_id = alert_ids(t)
    at = to_unix_nano(t.at)
    reason = [key_value("alert.link.reason", LINK_REASON)]
    links = [Span.Link(trace_id=id_bytes(tid), span_id=id_bytes(sid), attributes=reason) for tid, sid in t.spans]
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        name=f"alert {t.to_state}",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=at,
        end_time_unix_nano=at,
        attributes=alert_attributes(event, base_url),
        links=links,
        status=_status(event),
    )


def alert_spans_request(
    events: Sequence[AlertEvent],
    *,
    service_name: str = SERVICE_NAME,
    service_version: str = evaluator.__version__,
    base_url: str | None = None,
) -> ExportTraceServiceRequest:
    """One span per alert transition, in the order given, under one resource and scope. base_url: the admin
    server's external URL, for each span's `alert.url`.

    Deterministic: the same events give the same bytes (ids are hashes, times are arguments), so a retried
    export is recognisably the same. An empty sequence gives an empty request.
    """
    if not events:
        return ExportTraceServiceRequest()
    scope = ScopeSpans(scope=InstrumentationScope(name=ALERTS_SCOPE, version=service_version),
                       spans=[alert_span(e, base_url) for e in events])
    return ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=resource(service_name, service_version), scope_spans=[scope]),
    ])


# -- metrics ------------------------------------------------------------------------------------------------------

def _rule_attributes(rule: Rule, series: SeriesKey) -> list[KeyValue]:
    return [
        key_value("alert.rule_id", rule.id),
        key_value("alert.name", rule.name),
        key_value("alert.group", rule.group),
        key_value("alert.rung", rule.rung),
        key_value("alert.owner", rule.owner),
        key_value("alert.severity", rule.severity),
        *_series_attributes(series),
    ]


def _alert_metrics(states: SeriesStates, transitions_total: TransitionCounts, now_ns: int,
                   start_ns: int) -> list[Metric]:
    ordered = sorted(states, key=lambda rs: (rs[0].id, rs[1].series))
    values: list[NumberDataPoint] = []
    numbers: list[NumberDataPoint] = []
    for rule, st in ordered:
        attrs = _rule_attributes(rule, st.series)
        if st.value is not None:
            values.append(NumberDataPoint(attributes=attrs, time_unix_nano=now_ns, as_double=float(st.value)))
        numbers.append(NumberDataPoint(attributes=attrs, time_unix_nano=now_ns,
                                       as_int=STATE_NUMBERS.get(st.state, -1)))
    counts = [
        NumberDataPoint(attributes=[key_value("alert.rule_id", rule_id), key_value("alert.state", state)],
                        start_time_unix_nano=start_ns, time_unix_nano=now_ns, as_int=int(n))
        for (rule_id, state), n in sorted(transitions_total.items())
    ]
    out = []
    if values:
        out.append(Metric(name=METRIC_VALUE, description="Each rule's latest value, per series.",
                          gauge=Gauge(data_points=values)))
    if numbers:
        out.append(Metric(name=METRIC_STATE, description=(
            "Each rule's alert state per series: inactive 0, pending 1, firing 2, resolved 3, nodata 4."),
            gauge=Gauge(data_points=numbers)))
    if counts:
        out.append(Metric(name=METRIC_TRANSITIONS, description="Alert transitions, per rule and state entered.",
                          sum=Sum(data_points=counts, is_monotonic=True,
                                  aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE)))
    return out


def _telemetry_metric(m: TelemetryMetric, now_ns: int, start_ns: int) -> Metric:
    samples = m.samples()
    if not samples and not m.label_names:
        samples = [((), 0.0)]
    counter = m.kind == "counter"
    points = [
        NumberDataPoint(attributes=[key_value(n, v) for n, v in zip(m.label_names, labels, strict=True)],
                        start_time_unix_nano=start_ns if counter else 0, time_unix_nano=now_ns,
                        as_double=float(value))
        for labels, value in samples
    ]
    if counter:
        return Metric(name=m.name, description=m.help, sum=Sum(
            data_points=points, is_monotonic=True, aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE))
    return Metric(name=m.name, description=m.help, gauge=Gauge(data_points=points))


def alert_metrics_request(
    states: SeriesStates,
    transitions_total: TransitionCounts,
    telemetry: Telemetry | None,
    *,
    now_ns: int,
    start_ns: int,
    service_name: str = SERVICE_NAME,
    service_version: str = evaluator.__version__,
) -> ExportMetricsServiceRequest:
    """The alert figures and the daemon's own telemetry as one OTLP metrics request (see the module docstring).

    now_ns: the collection time of every point; start_ns: when the cumulative counts began (the daemon start).
    Sorted by rule id and series, then by metric name, so equal inputs give equal bytes.
    """
    scopes = [ScopeMetrics(scope=InstrumentationScope(name=ALERTS_SCOPE, version=service_version),
                           metrics=_alert_metrics(states, transitions_total, now_ns, start_ns))]
    if telemetry is not None:
        scopes.append(ScopeMetrics(
            scope=InstrumentationScope(name=TELEMETRY_SCOPE, version=service_version),
            metrics=[_telemetry_metric(m, now_ns, start_ns) for m in telemetry.metrics()]))
    return ExportMetricsServiceRequest(resource_metrics=[
        ResourceMetrics(resource=resource(service_name, service_version), scope_metrics=scopes),
    ])
