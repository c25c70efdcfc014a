"""The outbox: stored before sent, sent in order, removed only when acknowledged, retried with backoff, resumed
after a restart. The downstream is scripted here (a boundary we do not own); tests/test_alert_export.py uses
real receivers."""

from __future__ import annotations

import random
import time
from pathlib import Path

import duckdb
import pytest

from evaluator.exporter.outbox import TRACES, OutboxSender, enqueue
from evaluator.exporter.transport import SendResult
from evaluator.store.store import Store, StoreSettings
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock

T0 = 1_800_000_000.0


class Scripted:
    """Answers from a script (then OK); records every payload it was asked to send."""

    def __init__(self, answers: list[SendResult] | None = None) -> None:
        self.answers = list(answers or [])
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> SendResult:
        self.sent.append(payload)
        return self.answers.pop(0) if self.answers else SendResult(True, False, None, "")

    def close(self) -> None:
        pass


OK = SendResult(True, False, None, "")
DOWN = SendResult(False, True, None, "UNAVAILABLE: connection refused")


def _enqueue(store: Store, *payloads: bytes, at: float = T0) -> None:
    cur = store.cursor()
    for p in payloads:
        enqueue(cur, TRACES, p, 1, at)
    cur.close()


def _no_store() -> duckdb.DuckDBPyConnection:
    raise AssertionError("computing a backoff reads no store")


def _rows(store: Store) -> list[tuple[bytes, int, bool]]:
    cur = store.cursor()
    rows = cur.execute("SELECT payload, attempts, dead FROM outbox ORDER BY seq").fetchall()
    cur.close()
    return [(bytes(p), a, d) for p, a, d in rows]


def test_sent_in_order_and_removed_when_acknowledged(store: Store) -> None:
    transport = Scripted()
    tel = Telemetry()
    sender = OutboxSender(store.cursor, {TRACES: transport}, FakeClock(T0), tel)
    _enqueue(store, b"a", b"b", b"c")
    assert sender.run_once() is None
    assert transport.sent == [b"a", b"b", b"c"]
    assert _rows(store) == []
    assert tel.get("exports_sent_total").value(destination=TRACES) == 3


def test_a_failing_row_holds_back_the_ones_behind_it_until_the_retry(store: Store) -> None:
    """Alerts arrive in the order they happened: nothing overtakes a row that is waiting for its retry."""
    clock = FakeClock(T0)
    transport = Scripted([SendResult(False, True, 5.0, "UNAVAILABLE"), OK, OK])
    sender = OutboxSender(store.cursor, {TRACES: transport}, clock, Telemetry())
    _enqueue(store, b"a", b"b")
    assert sender.run_once() == pytest.approx(5.0)  # the receiver's RetryInfo delay
    assert transport.sent == [b"a"]
    assert _rows(store) == [(b"a", 1, False), (b"b", 0, False)]
    clock.advance(4.9)
    assert sender.run_once() == pytest.approx(0.1)
    clock.advance(0.1)
    sender.run_once()
    assert transport.sent == [b"a", b"a", b"b"]
    assert _rows(store) == []


def test_backoff_is_exponential_capped_and_jittered() -> None:
    sender = OutboxSender(_no_store, {}, FakeClock(T0), Telemetry(), backoff_initial=1.0, backoff_max=60.0,
                          rng=random.Random(1))
    for attempts, base in ((0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0)):
        delays = [sender.backoff(attempts, None) for _ in range(200)]
        assert base * 0.5 <= min(delays) and max(delays) <= min(base * 1.5, 60.0)  # the cap is the longest wait
        assert max(delays) - min(delays) > base * 0.4  # jittered, not in step
    assert sender.backoff(7, 3.0) == 3.0  # the receiver's delay wins
    assert sender.backoff(0, 10_000.0) == 60.0  # but is capped


def test_a_destination_cap_bounds_the_retries_but_not_the_receivers_delay(store: Store) -> None:
    """Alertmanager is paged through: after a long outage its next try is at most max_backoff away (30 s), not
    the 300 s (450 with jitter) of the alert spans. A Retry-After longer than that is still honoured."""
    am = "alertmanager"
    sender = OutboxSender(_no_store, {}, FakeClock(T0), Telemetry(), max_backoff={am: 30.0}, rng=random.Random(2))
    assert max(sender.backoff(a, None, am) for a in range(30) for _ in range(20)) <= 30.0
    assert min(sender.backoff(20, None, am) for _ in range(200)) >= 15.0
    assert max(sender.backoff(8, None, TRACES) for _ in range(200)) > 200.0  # other destinations keep theirs
    assert sender.backoff(20, 120.0, am) == 120.0  # Alertmanager's own Retry-After wins over the cap
    assert sender.backoff(20, 10_000.0, am) == 300.0  # within backoff_max

    clock = FakeClock(T0)
    down = Scripted([DOWN] * 100)
    sender = OutboxSender(store.cursor, {am: down}, clock, Telemetry(), max_backoff={am: 30.0})
    cur = store.cursor()
    enqueue(cur, am, b"page", 1, clock.now())
    cur.close()
    waits = []
    for _ in range(12):  # twelve failed tries: a few minutes of outage
        wait = sender.run_once()
        assert wait is not None
        waits.append(wait)
        clock.advance(wait)
    assert len(down.sent) == 12 and max(waits) <= 30.0


def test_a_permanent_refusal_is_kept_as_dead_and_does_not_block(store: Store) -> None:
    transport = Scripted([SendResult(False, False, None, "INVALID_ARGUMENT: bad span"), OK])
    tel = Telemetry()
    sender = OutboxSender(store.cursor, {TRACES: transport}, FakeClock(T0), tel)
    _enqueue(store, b"bad", b"good")
    sender.run_once()
    assert transport.sent == [b"bad", b"good"]
    assert _rows(store) == [(b"bad", 1, True)]
    assert sender.depth() == {TRACES: (0, 1)}
    assert "otel_evaluator_outbox_dead{destination=\"traces\"} 1" in tel.render_prometheus()


def test_an_outage_and_a_restart_lose_nothing(tmp_path: Path) -> None:
    """Down for an hour with a restart in between: every row arrives afterwards, in order."""
    path = str(tmp_path / "ev.duckdb")
    clock = FakeClock(T0)
    store = Store(StoreSettings(path))
    store.start()
    down = Scripted([DOWN] * 1000)
    sender = OutboxSender(store.cursor, {TRACES: down}, clock, Telemetry(), backoff_initial=1.0, backoff_max=120.0)
    for minute in range(30):
        _enqueue(store, f"alert-{minute}".encode(), at=clock.now())
        sender.run_once()
        clock.advance(60)
    store.shutdown()  # the daemon restarts
    store = Store(StoreSettings(path))
    store.start()
    up = Scripted()
    sender = OutboxSender(store.cursor, {TRACES: up}, clock, Telemetry())
    for minute in range(30, 60):
        _enqueue(store, f"alert-{minute}".encode(), at=clock.now())
        clock.advance(60)
    clock.advance(300)  # past any backoff
    sender.run_once()
    assert up.sent == [f"alert-{m}".encode() for m in range(60)]
    assert _rows(store) == []
    assert all(p.startswith(b"alert-0") for p in down.sent)  # only the head was retried during the outage
    store.shutdown()


def test_shutdown_interrupts_the_wait(store: Store, thread_guard: None) -> None:
    sender = OutboxSender(store.cursor, {TRACES: Scripted([DOWN] * 10)}, FakeClock(T0), Telemetry(),
                          idle_poll=60.0)
    _enqueue(store, b"x")
    sender.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    sender.shutdown()
    sender.shutdown()
    assert time.monotonic() - t0 < 5
    assert _rows(store)[0][0] == b"x"  # unsent rows stay for the next start
