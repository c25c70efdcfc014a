"""Fairness across clients: a client flooding the receiver is refused first (over its share of the in-flight
budget) while a light client is admitted; batches are taken into group commits round-robin across clients and a
light client's batch is committed before the flood's. Real daemons on loopback, real gRPC and HTTP clients."""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import TRACE_EXPORT, RunningDaemon
from google.rpc import error_details_pb2
from spans import request, span

from evaluator.receiver.errors import Refusal
from evaluator.receiver.fairness import (
    Admission,
    Admitted,
    Denied,
    FairnessSettings,
    client_key,
    grpc_peer_host,
)
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.ingest import IngestSettings
from evaluator.security.auth import AuthSettings
from evaluator.store.writer import _FairQueue, _Item, light_first

FLOOD_SPANS = 300
MiB = 1024 * 1024


def _refused(d: RunningDaemon, transport: str, reason: str) -> float:
    return d.daemon.telemetry.get("requests_refused_total").value(transport=transport, reason=reason)


def _unique_request(counter: Any, spans: int, pad: int) -> bytes:
    """A request whose serialized size depends only on (spans, pad): ids are fixed-width, values fixed-length."""
    trace = (next(counter) + 1).to_bytes(16, "big")
    return request(*[span(attrs={"data.pad": "x" * pad, "ml.score": 0.5}, trace_id=trace,
                          span_id=(next(counter) + 1).to_bytes(8, "big")) for _ in range(spans)]).SerializeToString()


def _retry_delay(err: grpc.RpcError) -> float:
    for key, value in err.trailing_metadata() or ():
        if key == "google.rpc.retryinfo-bin":
            info = error_details_pb2.RetryInfo.FromString(value)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return 1.0


class Flood:
    """Threads on their own channels sending big requests with distinct ids as fast as they are acknowledged,
    retrying after RetryInfo as the Collector does, named `flood` in the client header."""

    def __init__(self, endpoint: str, counter: Any, threads: int = 4) -> None:
        self.endpoint = endpoint
        self.counter = counter
        self.stop = threading.Event()
        self.accepted = 0
        self.refusals = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Flood:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self) -> None:
        with grpc.insecure_channel(self.endpoint) as channel:
            call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
            while not self.stop.is_set():
                payload = _unique_request(self.counter, FLOOD_SPANS, 300)
                while not self.stop.is_set():
                    try:
                        call(payload, timeout=30, metadata=(("otel-evaluator-client", "flood"),))
                        with self._lock:
                            self.accepted += 1
                        break
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            self.errors.append(f"{err.code()}: {err.details()}")
                            return
                        with self._lock:
                            self.refusals += 1
                        self.stop.wait(_retry_delay(err))


def _flood_request_size() -> int:
    sizes = {len(_unique_request(itertools.count(n * 1000), FLOOD_SPANS, 300)) for n in range(3)}
    assert len(sizes) == 1  # every flood request has the same size: two fill the budget exactly
    return sizes.pop()


def _run_light_client(d: RunningDaemon, counter: Any, sends: int) -> tuple[int, int]:
    """`sends` small (10-span) requests one after the other, each retried after RetryInfo until acknowledged;
    returns (refusals, most attempts one request needed)."""
    refusals = worst = 0
    with grpc.insecure_channel(d.grpc_endpoint) as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
        for _ in range(sends):
            payload = _unique_request(counter, 10, 10)
            for attempt in itertools.count(1):
                try:
                    call(payload, timeout=30, metadata=(("otel-evaluator-client", "light"),))
                    worst = max(worst, attempt)
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    refusals += 1
                    time.sleep(_retry_delay(err))
            time.sleep(0.05)
    return refusals, worst


def _flooded(make_daemon: Any, fairness: FairnessSettings) -> tuple[RunningDaemon, int]:
    size = _flood_request_size()
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=2 * size, retry_after_seconds=0.05,
                                   fairness=fairness))
    return d, size


def _wait_until_saturated(d: RunningDaemon, flood: Flood) -> None:
    deadline = time.monotonic() + 30
    while flood.refusals < 3 or flood.accepted < 2:
        assert time.monotonic() < deadline, "the flood never filled the budget"
        assert not flood.errors, flood.errors
        time.sleep(0.02)


def test_a_flood_is_refused_over_its_share_and_a_light_client_is_admitted(make_daemon: Any) -> None:
    """Two flood requests fill the budget exactly. With fairness the flood holds at most its share (half, with
    two clients sending) and is refused `over_client_share`; the light client's every request is admitted at
    the first attempt, and every acknowledged span is stored once."""
    d, _ = _flooded(make_daemon, FairnessSettings(min_share_bytes=16 * 1024))
    counter = itertools.count()
    with Flood(d.grpc_endpoint, counter) as flood:
        _wait_until_saturated(d, flood)
        refusals, worst = _run_light_client(d, counter, sends=20)
        refused_while_light = _refused(d, "grpc", "over_client_share")
    assert not flood.errors, flood.errors
    assert refusals == 0 and worst == 1
    assert refused_while_light >= 1  # the flood was refused, by reason
    assert d.sql("SELECT count(*) FROM spans") == [(flood.accepted * FLOOD_SPANS + 20 * 10,)]
    assert d.daemon.ingestor.budget.used == 0


def test_without_fairness_the_flood_starves_the_light_client(make_daemon: Any) -> None:
    """The same flood with `enabled: false` (first come, first served): the light client is refused, as
    overloaded, and no request is ever refused over a client's share."""
    d, _ = _flooded(make_daemon, FairnessSettings(enabled=False))
    counter = itertools.count()
    with Flood(d.grpc_endpoint, counter) as flood:
        _wait_until_saturated(d, flood)
        refusals, _ = _run_light_client(d, counter, sends=20)
    assert refusals >= 1
    assert _refused(d, "grpc", "over_client_share") == 0
    assert _refused(d, "grpc", "overloaded") >= refusals


def test_a_flood_with_more_streams_than_workers_is_refused_first(make_daemon: Any) -> None:
    """Eight flood streams against four gRPC workers and a budget they cannot fill: without a share of the
    workers the flood keeps all four busy and the light client's calls queue behind its calls. With it, the
    flood is refused once it holds two (its half) and the light client is never refused."""
    d = make_daemon(grpc=replace(GrpcSettings(listen="127.0.0.1:0"), max_workers=4),
                    ingest=replace(IngestSettings(), retry_after_seconds=0.05))
    counter = itertools.count()
    with Flood(d.grpc_endpoint, counter, threads=8) as flood:
        refusals, _ = _run_light_client(d, counter, sends=10)
        assert not flood.errors, flood.errors
    assert refusals == 0
    assert _refused(d, "grpc", "over_client_share") >= 1 and _refused(d, "grpc", "overloaded") == 0
    assert d.sql("SELECT count(*) FROM spans") == [(flood.accepted * FLOOD_SPANS + 10 * 10,)]


# -- telling clients apart on both transports ----------------------------------------------------------------

def _hold_share(d: RunningDaemon, key: str) -> Admitted:
    """`key` holds half the budget (over its share with two clients sending), as its requests in flight would."""
    budget = d.daemon.ingestor.budget
    held = budget.admit(key, budget.limit // 2, d.daemon.clock.now())
    assert isinstance(held, Admitted)
    return held


def _grpc(d: RunningDaemon, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(d.grpc_endpoint) as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
        try:
            call(request(span(attrs={"data.row_count": 1})).SerializeToString(), timeout=10, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _http(d: RunningDaemon, headers: dict[str, str], source: str = "127.0.0.1") -> int:
    port = d.daemon.http.port if d.daemon.http else 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/v1/traces", request(span(attrs={"data.row_count": 1})).SerializeToString(),
                     {"Content-Type": "application/x-protobuf", **headers})
        return conn.getresponse().status
    finally:
        conn.close()


def _secured(make_daemon: Any, tmp_path: Path) -> RunningDaemon:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-team-a\ntoken-of-team-b\n")
    return make_daemon(auth=AuthSettings(token_file=str(tokens)),
                       ingest=replace(IngestSettings(), inflight_bytes=4 * MiB,
                                      fairness=FairnessSettings(min_share_bytes=64 * 1024)))


def test_grpc_clients_are_told_apart_by_the_header(make_daemon: Any) -> None:
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=4 * MiB,
                                   fairness=FairnessSettings(min_share_bytes=64 * 1024)))
    assert _grpc(d, (("otel-evaluator-client", "light"),)) == grpc.StatusCode.OK  # now sending
    _hold_share(d, client_key("heavy", None, ""))
    assert _grpc(d, (("otel-evaluator-client", "heavy"),)) == grpc.StatusCode.UNAVAILABLE
    assert _grpc(d, (("otel-evaluator-client", "light"),)) == grpc.StatusCode.OK
    assert _refused(d, "grpc", "over_client_share") == 1 and _refused(d, "grpc", "overloaded") == 0


def test_grpc_clients_are_told_apart_by_their_token(make_daemon: Any, tmp_path: Path) -> None:
    d = _secured(make_daemon, tmp_path)
    assert _grpc(d, (("authorization", "Bearer token-of-team-b"),)) == grpc.StatusCode.OK
    _hold_share(d, client_key(None, b"token-of-team-a", ""))
    assert _grpc(d, (("authorization", "Bearer token-of-team-a"),)) == grpc.StatusCode.UNAVAILABLE
    assert _grpc(d, (("authorization", "Bearer token-of-team-b"),)) == grpc.StatusCode.OK
    assert _refused(d, "grpc", "over_client_share") == 1


def test_http_clients_are_told_apart_by_header_token_and_address(make_daemon: Any, tmp_path: Path) -> None:
    d = _secured(make_daemon, tmp_path)
    team_b = {"Authorization": "Bearer token-of-team-b"}
    assert _http(d, team_b) == 200
    held = _hold_share(d, client_key(None, b"token-of-team-a", ""))
    assert _http(d, {"Authorization": "Bearer token-of-team-a"}) == 503
    assert _http(d, team_b) == 200
    d.daemon.ingestor.budget.release_client(held, d.daemon.clock.now())
    # the header names the client whatever its token
    _hold_share(d, client_key("collector-1", None, ""))
    assert _http(d, {**team_b, "otel-evaluator-client": "collector-1"}) == 503
    assert _http(d, {**team_b, "otel-evaluator-client": "collector-2"}) == 200
    assert _refused(d, "http", "over_client_share") == 2


def test_http_clients_without_header_or_token_are_told_apart_by_address(make_daemon: Any) -> None:
    d = make_daemon(ingest=replace(IngestSettings(), inflight_bytes=4 * MiB,
                                   fairness=FairnessSettings(min_share_bytes=64 * 1024)))
    assert _http(d, {}, source="127.0.0.2") == 200
    _hold_share(d, client_key(None, None, "127.0.0.1"))
    assert _http(d, {}, source="127.0.0.1") == 503
    assert _http(d, {}, source="127.0.0.2") == 200
    assert _refused(d, "http", "over_client_share") == 1


# -- the admission rules, with time passed in ----------------------------------------------------------------

def _budget(**fairness: Any) -> Admission:
    return Admission(100, FairnessSettings(**{"min_share_bytes": 10, "idle_seconds": 10.0, **fairness}))


def test_alone_a_client_may_use_the_budget_but_the_newcomer_reserve() -> None:
    b = _budget()
    assert isinstance(b.admit("a", 60, now=0), Admitted)
    assert isinstance(b.admit("a", 30, now=0), Admitted)  # 90 = budget - reserve (min_share 10)
    denied = b.admit("a", 1, now=0)
    assert isinstance(denied, Denied) and denied.kind is Refusal.OVERLOADED
    assert isinstance(b.admit("b", 10, now=0), Admitted)  # a newcomer gets the reserve at once


def test_a_second_client_caps_the_first_at_its_share() -> None:
    b = _budget()
    assert isinstance(b.admit("a", 40, now=0), Admitted)
    assert isinstance(b.admit("b", 5, now=0), Admitted)
    assert isinstance(b.admit("a", 5, now=0), Admitted)  # 45 = (100 - reserve 10) / 2
    denied = b.admit("a", 1, now=0)
    assert isinstance(denied, Denied) and denied.kind is Refusal.OVER_CLIENT_SHARE
    assert isinstance(b.admit("b", 40, now=0), Admitted)  # b has 45 too: all but the reserve is in use
    assert isinstance(b.admit("c", 10, now=0), Admitted)  # the reserve: a newcomer is admitted at once


def test_a_client_holding_nothing_is_admitted_even_over_its_share() -> None:
    b = _budget()
    assert isinstance(b.admit("b", 1, now=0), Admitted)
    assert isinstance(b.admit("a", 80, now=0), Admitted)  # over a's share of 50, but it held nothing
    assert isinstance(b.admit("a", 1, now=0), Denied)


def test_shares_shrink_with_more_clients_down_to_the_floor() -> None:
    b = _budget(min_share_bytes=20)
    for c in "bcdef":
        assert isinstance(b.admit(c, 1, now=0), Admitted)
    assert isinstance(b.admit("a", 20, now=0), Admitted)
    assert b.active_clients(now=0) == 6
    assert isinstance(b.admit("a", 1, now=0), Denied)  # share max(100 / 6, 20) = 20


def test_idle_clients_stop_counting() -> None:
    b = _budget()
    done = b.admit("b", 1, now=0)
    assert isinstance(done, Admitted)
    b.release_client(done, now=0)
    assert isinstance(b.admit("a", 45, now=1), Admitted)
    assert isinstance(b.admit("a", 1, now=2), Denied)  # b sent 2 s ago: two clients
    assert b.active_clients(now=10.5) == 1  # b idle for 10.5 s, holding nothing: forgotten
    assert isinstance(b.admit("a", 1, now=10.5), Admitted)


def test_a_client_holding_bytes_stays_active_however_long() -> None:
    b = _budget()
    assert isinstance(b.admit("b", 1, now=0), Admitted)  # never released: its request is still in flight
    assert isinstance(b.admit("a", 45, now=100), Admitted)
    assert isinstance(b.admit("a", 1, now=100), Denied)


def test_a_client_takes_only_its_share_of_the_grpc_handlers() -> None:
    """Each Export holds a gRPC worker thread until its commit: with two clients sending, one may take half."""
    b = Admission(10**9, FairnessSettings())
    b.set_handlers("grpc", 4)
    held = [b.admit("a", 1, now=0, transport="grpc") for _ in range(4)]
    assert all(isinstance(h, Admitted) for h in held)  # alone: all four
    assert isinstance(b.admit("b", 1, now=0, transport="grpc"), Admitted)
    denied = b.admit("a", 1, now=0, transport="grpc")
    assert isinstance(denied, Denied) and denied.kind is Refusal.OVER_CLIENT_SHARE
    assert "4 requests being handled, its share is 2 of the 4 the grpc receiver handles at once" in denied.message
    for h in held[:3]:
        assert isinstance(h, Admitted)
        b.release_client(h, now=0)
    assert isinstance(b.admit("a", 1, now=0, transport="grpc"), Admitted)  # 2 of 2
    assert isinstance(b.admit("a", 1, now=0, transport="http"), Admitted)  # another transport: no handler share
    assert isinstance(b.admit("b", 1, now=0, transport="grpc"), Admitted)  # b: 2 of 2


def test_disabled_is_first_come_first_served() -> None:
    b = _budget(enabled=False)
    assert isinstance(b.admit("a", 100, now=0), Admitted)
    denied = b.admit("b", 1, now=0)
    assert isinstance(denied, Denied) and denied.kind is Refusal.OVERLOADED


def test_client_keys() -> None:
    assert client_key("collector-eu ", b"tok", "10.0.0.1") == "header:collector-eu"
    token_key = client_key(None, b"tok", "10.0.0.1")
    assert token_key.startswith("token:") and "tok" not in token_key.removeprefix("token:")
    assert client_key("", None, "10.0.0.1") == client_key("  ", None, "10.0.0.1") == "peer:10.0.0.1"
    assert client_key("x" * 500, None, "h") == "header:" + "x" * 128
    assert grpc_peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert grpc_peer_host("ipv6:[::1]:51234") == "::1"
    assert grpc_peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


@pytest.mark.parametrize("key,named", [
    (client_key("collector-eu", None, ""), "client 'collector-eu' has 60 request bytes in flight"),
    (client_key(None, None, "10.0.0.1"), "client at 10.0.0.1 has 60"),
    (client_key(None, b"s3cret", ""), "this token's client has 60"),
])
def test_the_refusal_names_the_client_but_never_its_token(key: str, named: str) -> None:
    b = _budget()
    assert isinstance(b.admit("other", 1, now=0), Admitted)
    assert isinstance(b.admit(key, 60, now=0), Admitted)
    denied = b.admit(key, 1, now=0)
    assert isinstance(denied, Denied)
    assert named in denied.message and "its share is 45 (2 clients sending, budget 100)" in denied.message
    assert key.split(":", 1)[1] not in denied.message or not key.startswith("token:")  # no token fingerprint


# -- fair queueing into the writer ---------------------------------------------------------------------------

class _Batch:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _item(client: str, spans: int) -> _Item:
    return _Item(_Batch(spans), 0, client)  # type: ignore[arg-type]


def test_a_small_batch_is_in_the_next_group_however_long_the_queue() -> None:
    """Ten big batches of one client queued before one small batch of another: FIFO would put the small one
    behind five groups of max_spans; round-robin puts it in the first."""
    q = _FairQueue()
    for _ in range(10):
        q.put(_item("flood", 100))
    q.put(_item("light", 1))
    first = q.take(200)
    assert first is not None and [i.client for i in first] == ["flood", "light", "flood"]
    q.put(None)
    rest = list(iter(lambda: q.take(200), None))
    assert [len(g) for g in rest] == [2, 2, 2, 2]
    assert all(i.client == "flood" for g in rest for i in g)


def test_the_queue_is_drained_after_close() -> None:
    q = _FairQueue()
    q.put(_item("a", 1))
    q.put(None)
    group = q.take(100)
    assert group is not None and len(group) == 1
    assert q.take(100) is None


def test_light_clients_commit_first_and_alone() -> None:
    flood = [_item("flood", 2000) for _ in range(8)]
    light = [_item("light", 10), _item("other", 1)]
    assert light_first(flood + light) == [light, flood]
    assert light_first(flood) == [flood]
    even = [_item("a", 1000), _item("b", 900)]
    assert light_first(even) == [even]  # no client is light: one commit


# -- configuration -------------------------------------------------------------------------------------------

def test_the_fairness_section_is_read(tmp_path: Path) -> None:
    from evaluator.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("receivers:\n  inflight_bytes: 64MiB\n  fairness:\n    enabled: false\n"
                    "    client_header: X-Tenant\n    min_client_share: 2MiB\n    client_idle: 30s\n")
    assert load_config(str(path)).ingest.fairness == FairnessSettings(
        enabled=False, client_header="x-tenant", min_share_bytes=2 * MiB, idle_seconds=30.0)
    path.write_text("receivers:\n  fairness:\n    client_header: null\n")
    assert load_config(str(path)).ingest.fairness.client_header is None
    assert load_config(None).ingest.fairness == FairnessSettings()


def test_bad_fairness_values_are_all_reported(tmp_path: Path) -> None:
    from evaluator.config import load_config
    from evaluator.yamlsrc import InvalidConfig

    path = tmp_path / "c.yaml"
    path.write_text("receivers:\n  inflight_bytes: 1MiB\n  fairness:\n    enabled: sometimes\n"
                    "    client_header: grpc-timeout\n    min_client_share: 2MiB\n    client_idle: 0s\n"
                    "    share: 1\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key in ((4, "receivers.fairness.enabled"), (5, "receivers.fairness.client_header"),
                      (6, "receivers.fairness.min_client_share"), (7, "receivers.fairness.client_idle"),
                      (8, "receivers.fairness.share")):
        assert f"{path}:{line}: {key}:" in text, text
    assert "must not exceed receivers.inflight_bytes (1048576 bytes)" in text
    for header in ("authorization", "x-id-bin", "a b", "content-type"):
        path.write_text(f"receivers:\n  fairness:\n    client_header: {header!r}\n")
        with pytest.raises(InvalidConfig):
            load_config(str(path))
