"""Bad input, duplicates, oversize and overload: the precise answers on both transports, counted, nothing lost."""

from __future__ import annotations

import gzip
import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

import grpc
import pytest
from conftest import RunningDaemon
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from spans import T0, request, span

from evaluator.receiver.ingest import IngestSettings


def _post(url: str, body: bytes, content_type: str = "application/x-protobuf",
          headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def _refused(d: RunningDaemon, transport: str, reason: str) -> float:
    return d.daemon.telemetry.get("requests_refused_total").value(transport=transport, reason=reason)


# -- undecodable -------------------------------------------------------------------------------------------------

def test_grpc_undecodable_body_is_invalid_argument(daemon: RunningDaemon) -> None:
    """Bytes that are not an ExportTraceServiceRequest get INVALID_ARGUMENT and are counted."""
    with pytest.raises(grpc.RpcError) as err:
        daemon.export(b"\x0a\xff\xff\xff\xff\x0f garbage")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in err.value.details()
    assert _refused(daemon, "grpc", "undecodable") == 1


@pytest.mark.parametrize("body,content_type,headers,status", [
    (b"\x0a\xff\xff\xff\xff\x0f", "application/x-protobuf", {}, 400),
    (b"{not json", "application/json", {}, 400),
    (b"[1, 2]", "application/json", {}, 400),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": [1]}]}]}]}', "application/json", {}, 400),
    (b"\x1f\x8b garbage", "application/x-protobuf", {"Content-Encoding": "gzip"}, 400),
    (b"abc", "text/plain", {}, 415),
    (b"abc", "application/x-protobuf", {"Content-Encoding": "br"}, 415),
])
def test_http_bad_bodies(daemon: RunningDaemon, body: bytes, content_type: str, headers: dict[str, str],
                         status: int) -> None:
    """Undecodable bodies get 400, unknown media types or encodings 415, with a google.rpc.Status body."""
    code, payload, _ = _post(daemon.http_url + "/v1/traces", body, content_type, headers)
    assert code == status
    if content_type == "application/json":
        assert json.loads(payload)["message"]
    else:
        assert status_pb2.Status.FromString(payload).message
    reason = "undecodable" if status == 400 else "unsupported_media_type"
    assert _refused(daemon, "http", reason) == 1
    # the daemon is still up and takes good data afterwards
    good = request(span(attrs={"data.row_count": 1}))
    assert _post(daemon.http_url + "/v1/traces", good.SerializeToString())[0] == 200


def test_http_wrong_method_and_path(daemon: RunningDaemon) -> None:
    """GET on /v1/traces is 405 with Allow: POST; other paths are 404."""
    code, _, headers = _get(daemon.http_url + "/v1/traces")
    assert code == 405 and headers.get("Allow") == "POST"
    assert _get(daemon.http_url + "/v1/metrics")[0] == 404


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


# -- individual bad spans: partial_success ----------------------------------------------------------------------

def _mixed_request() -> Any:
    return request(
        span(attrs={"data.row_count": 100}),
        span(attrs={"data.row_count": 1}, trace_id=b"\x00" * 16),
        span(attrs={"data.row_count": 2}, span_id=b"\x01\x02"),
        span(attrs={"data.row_count": 3}, start=T0, end=T0 - 1),
        span(attrs={"data.freshness_lag_hours": float("nan")}),
        span(attrs={"data.rows": 1, "amount.histogram.bounds": [1.0, float("inf")]}),
        span(attrs={"ml.score": 0.7}),
    )


def test_grpc_bad_spans_rejected_individually(daemon: RunningDaemon) -> None:
    """Invalid ids, end before start and non-finite numbers are rejected through partial_success; the rest land."""
    response = daemon.export(_mixed_request())
    assert response.HasField("partial_success")
    assert response.partial_success.rejected_spans == 5
    message = response.partial_success.error_message
    for reason in ("trace_id must be 16 bytes", "span_id must be 8 bytes", "end_time_unix_nano is before",
                   "not a finite number", "non-finite number"):
        assert reason in message, message
    assert daemon.sql("SELECT count(*) FROM spans") == [(2,)]
    assert sorted(daemon.sql("SELECT key, value FROM span_numbers")) == [("data.row_count", 100.0),
                                                                          ("ml.score", 0.7)]
    assert daemon.daemon.telemetry.get("spans_rejected_total").value(transport="grpc") == 5


def test_full_success_leaves_partial_success_unset(daemon: RunningDaemon) -> None:
    response = daemon.export(request(span(attrs={"data.row_count": 1})))
    assert not response.HasField("partial_success")


def test_http_bad_spans_rejected_individually_protobuf_and_json(daemon: RunningDaemon) -> None:
    code, payload, _ = _post(daemon.http_url + "/v1/traces", _mixed_request().SerializeToString())
    assert code == 200
    response = ExportTraceServiceResponse.FromString(payload)
    assert response.partial_success.rejected_spans == 5
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "zz" * 16, "spanId": "0102030405060708", "name": "r", "startTimeUnixNano": str(T0),
         "endTimeUnixNano": str(T0 + 1), "attributes": [{"key": "data.row_count", "value": {"intValue": "5"}}]},
        {"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708", "name": "r",
         "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 1),
         "attributes": [{"key": "data.row_count", "value": {"intValue": "6"}}]},
    ]}]}]}
    code, payload, _ = _post(daemon.http_url + "/v1/traces", json.dumps(body).encode(), "application/json")
    assert code == 200
    answer = json.loads(payload)
    assert answer["partialSuccess"]["rejectedSpans"] in ("1", 1)
    assert "trace_id must be 16 bytes" in answer["partialSuccess"]["errorMessage"]
    code, payload, _ = _post(daemon.http_url + "/v1/traces", json.dumps({"resourceSpans": []}).encode(),
                             "application/json")
    assert code == 200 and json.loads(payload) == {}


# -- duplicates ------------------------------------------------------------------------------------------------

def test_duplicates_collapse(daemon: RunningDaemon) -> None:
    """The same (trace_id, span_id) sent again, or twice in one request, is stored once with its attributes once."""
    a = span(attrs={"data.row_count": 1, "data.dataset": "x", "bounds.histogram.bounds": [1.0]})
    b = span(attrs={"data.row_count": 2})
    daemon.export(request(a, b))
    daemon.export(request(a, b))  # a collector retry
    daemon.export(request(b, b))  # duplicated inside one request
    c = span(attrs={"data.row_count": 3})
    daemon.export(request(c, a))  # one new, one old
    assert daemon.sql("SELECT count(*) FROM spans") == [(3,)]
    assert sorted(daemon.sql("SELECT value FROM span_numbers")) == [(1.0,), (2.0,), (3.0,)]
    assert daemon.sql("SELECT count(*) FROM span_strings") == [(1,)]
    assert daemon.sql("SELECT count(*) FROM span_arrays") == [(1,)]
    tel = daemon.daemon.telemetry
    assert tel.get("spans_stored_total").total() == 3
    assert tel.get("spans_duplicate_total").total() == 5  # 2 + 2 + 1


# -- oversize --------------------------------------------------------------------------------------------------

def test_oversize_requests(make_daemon: Any) -> None:
    """Over the size limit: RESOURCE_EXHAUSTED without RetryInfo on gRPC, 413 on HTTP (also after gunzip)."""
    d = make_daemon(ingest=replace(IngestSettings(), max_request_bytes=64 * 1024))
    big = request(*[span(attrs={"data.row_count": i, "data.pad": "x" * 200}) for i in range(400)])
    data = big.SerializeToString()
    assert len(data) > 64 * 1024
    with pytest.raises(grpc.RpcError) as err:
        d.export(data)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not any(k == "google.rpc.retryinfo-bin" for k, _ in (err.value.trailing_metadata() or ()))
    assert _refused(d, "grpc", "too_large") == 1
    code, _, _ = _post(d.http_url + "/v1/traces", data)
    assert code == 413
    code, _, _ = _post(d.http_url + "/v1/traces", gzip.compress(data), headers={"Content-Encoding": "gzip"})
    assert code == 413
    bomb = gzip.compress(b"\x00" * (50 * 1024 * 1024))
    code, _, _ = _post(d.http_url + "/v1/traces", bomb, headers={"Content-Encoding": "gzip"})
    assert code == 413
    assert d.sql("SELECT count(*) FROM spans") == [(0,)]
    assert _refused(d, "http", "too_large") == 3
    # just under the limit is fine
    ok = request(*[span(attrs={"data.row_count": i}) for i in range(100)])
    assert len(ok.SerializeToString()) < 64 * 1024
    d.export(ok)
    assert d.sql("SELECT count(*) FROM spans") == [(100,)]


# -- overload --------------------------------------------------------------------------------------------------

def test_overload_answers_unavailable_with_retry_info(make_daemon: Any) -> None:
    """With the in-flight byte budget full: UNAVAILABLE with RetryInfo in the status details and in the
    google.rpc.retryinfo-bin trailer; HTTP 503 with Retry-After. Nothing of those requests is stored."""
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=1024, retry_after_seconds=2.0))
    budget = d.daemon.ingestor.budget
    assert budget.try_acquire(1024)  # another request is in flight and holds the whole budget
    try:
        with pytest.raises(grpc.RpcError) as err:
            d.export(request(span(attrs={"data.row_count": 1})))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        trailers = dict(err.value.trailing_metadata())
        retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
        assert retry.retry_delay.seconds == 2
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        unpacked = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(unpacked) and unpacked.retry_delay.seconds == 2
        code, _, headers = _post(d.http_url + "/v1/traces", request(span(attrs={"data.x": 1})).SerializeToString())
        assert code == 503 and headers["Retry-After"] == "2"
    finally:
        budget.release(1024)
    assert d.sql("SELECT count(*) FROM spans") == [(0,)]
    assert _refused(d, "grpc", "overloaded") == 1 and _refused(d, "http", "overloaded") == 1


def test_sdk_retries_deliver_everything_after_overload(make_daemon: Any) -> None:
    """The SDK's gRPC exporter retries UNAVAILABLE, so spans refused under overload arrive once it clears."""
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=1024, retry_after_seconds=1.0))
    budget = d.daemon.ingestor.budget
    assert budget.try_acquire(1024)
    threading.Timer(1.5, budget.release, args=(1024,)).start()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    provider.add_span_processor(BatchSpanProcessor(GrpcExporter(endpoint=d.grpc_endpoint, insecure=True,
                                                                timeout=20)))
    tracer = provider.get_tracer("t")
    for i in range(50):
        with tracer.start_as_current_span("model.predict") as s:
            s.set_attribute("ml.prediction_id", f"p{i}")
            s.set_attribute("ml.score", i / 50)
    assert provider.force_flush(30_000)
    provider.shutdown()
    assert _refused(d, "grpc", "overloaded") >= 1
    assert d.sql("SELECT count(*) FROM spans") == [(50,)]


def test_concurrent_load_with_small_budget_stays_bounded_and_loses_nothing(make_daemon: Any) -> None:
    """Many concurrent clients against a small budget: some are refused and retry; every span lands once."""
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=256 * 1024, retry_after_seconds=0.05))
    errors: list[BaseException] = []
    seeds = list(range(24))

    def client(seed: int) -> None:
        req = request(*[span(attrs={"ml.score": 0.5, "ml.prediction_id": f"{seed}-{i}", "data.pad": "y" * 100},
                             span_id=(seed * 1000 + i + 1).to_bytes(8, "big"), trace_id=os.urandom(16))
                        for i in range(500)])
        for _ in range(200):
            try:
                d.export(req)
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    errors.append(err)
                    return
                threading.Event().wait(0.05)
        errors.append(RuntimeError("gave up"))

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert d.sql("SELECT count(*) FROM spans") == [(500 * len(seeds),)]
    assert d.daemon.ingestor.budget.used == 0


def test_out_of_range_enums_are_stored_not_fatal(daemon: RunningDaemon) -> None:
    """Span kind and status code are open enums on the wire: unknown values are stored as they came."""
    s = span(attrs={"data.row_count": 1})
    s.kind = 99  # type: ignore[assignment]
    s.status.code = 7  # type: ignore[assignment]
    response = daemon.export(request(s))
    assert not response.HasField("partial_success")
    assert daemon.sql("SELECT kind, status_code FROM spans") == [(99, 7)]
