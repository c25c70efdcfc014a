"""The outbox: alert outputs are stored before they are sent and removed only once acknowledged.

The rule engine writes each evaluation's alert spans (one serialized OTLP request) into the `outbox` table in the
same transaction that records the transitions, so an alert that is in `alerts` is also waiting to be sent. The
OutboxSender sends each destination's rows strictly in order (the oldest first; a row that fails holds back the
ones behind it, so alerts arrive in the order they happened), deletes a row when the receiver acknowledges it,
and backs off with jitter on retryable failures, honouring the receiver's RetryInfo / Retry-After. The longest
wait between retries is capped per destination (`max_backoff`: a page to Alertmanager should not wait minutes
after an outage ends), the receiver's own delay only by `backoff_max`. The state is in DuckDB, so a restart
resumes where it stopped. A row refused for good (e.g. INVALID_ARGUMENT) is marked dead:
kept for inspection and counted, not retried. Time comes from the injected clock; shutdown interrupts a backoff
wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import duckdb
import structlog

from evaluator.clock import Clock
from evaluator.store.outbox import enqueue
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker

if TYPE_CHECKING:
    from evaluator.exporter.transport import SendResult, Transport

TRACES = "traces"
__all__ = ["TRACES", "OutboxSender", "enqueue"]  # enqueue: the store's, re-exported for the exporter's users


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)


class OutboxSender(PeriodicWorker):
    def __init__(
        self,
        cursor_factory: Callable[[], duckdb.DuckDBPyConnection],
        transports: Mapping[str, Transport],
        clock: Clock,
        telemetry: Telemetry,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        max_backoff: Mapping[str, float] | None = None,
        idle_poll: float = 1.0,
        rng: random.Random | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """backoff_max: the longest wait between retries, the receiver's RetryInfo / Retry-After included;
        max_backoff: per destination, a shorter cap for the sender's own exponential backoff."""
        super().__init__("outbox-sender", idle_poll)
        self._cursor = cursor_factory
        self._transports = dict(transports)
        self._clock = clock
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_backoff = dict(max_backoff or {})
        self._rng = rng or random.Random()
        self._log = log or structlog.get_logger("outbox")
        self._sent = telemetry.counter("exports_sent_total", "Outbox requests acknowledged by the receiver.",
                                       ("destination",))
        self._items = telemetry.counter("exported_items_total", "Alert spans acknowledged by the receiver.",
                                        ("destination",))
        self._failed = telemetry.counter("export_failures_total", "Failed sends, by whether they will be retried.",
                                         ("destination", "retryable"))
        depth = telemetry.gauge("outbox_depth", "Requests waiting in the outbox (not dead).", ("destination",))
        dead = telemetry.gauge("outbox_dead", "Requests refused for good, kept in the outbox.", ("destination",))

        def collect() -> None:
            for dest, (waiting, refused) in self.depth().items():
                depth.set(waiting, destination=dest)
                dead.set(refused, destination=dest)

        telemetry.add_collector(collect)

    # -- one pass (tests drive it with a fake clock) ----------------------------------------------------------
    def run_once(self) -> float | None:
        """Send what is due, in order per destination. Returns the seconds until the next row is due (None when
        the outbox is empty)."""
        next_due: float | None = None
        for destination, transport in self._transports.items():
            while not self.stopping:
                row = self._head(destination)
                if row is None:
                    break
                seq, payload, items, attempts, due = row
                now = self._clock.now()
                if due > now:
                    next_due = due - now if next_due is None else min(next_due, due - now)
                    break
                # acknowledged or dead: the next row; retryable: this row again, now due later (ends the loop)
                self._record(destination, seq, items, attempts, transport.send(payload), now)
        return next_due

    def _head(self, destination: str) -> tuple[int, bytes, int, int, float] | None:
        cur = self._cursor()
        try:
            row = cur.execute("SELECT seq, payload, items, attempts, epoch_us(next_attempt_at) FROM outbox "
                              "WHERE destination = ? AND NOT dead ORDER BY seq LIMIT 1", [destination]).fetchone()
        finally:
            cur.close()
        if row is None:
            return None
        return int(row[0]), bytes(row[1]), int(row[2]), int(row[3]), row[4] / 1e6

    def _record(self, destination: str, seq: int, items: int, attempts: int, result: SendResult, now: float) -> None:
        cur = self._cursor()
        try:
            if result.ok:
                cur.execute("DELETE FROM outbox WHERE seq = ?", [seq])
                self._sent.inc(destination=destination)
                self._items.inc(items, destination=destination)
                if result.error:  # a partial success: acknowledged, but the receiver said something
                    self._log.warning("receiver accepted alerts partially", destination=destination,
                                      message=result.error)
                return
            self._failed.inc(destination=destination, retryable=str(result.retryable).lower())
            if not result.retryable:
                cur.execute("UPDATE outbox SET dead = true, attempts = attempts + 1, last_error = ? WHERE seq = ?",
                            [result.error, seq])
                self._log.error("receiver refused alerts for good; kept in the outbox as dead",
                                destination=destination, seq=seq, error=result.error)
                return
            delay = self.backoff(attempts, result.retry_after, destination)
            cur.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                        "WHERE seq = ?", [_dt(now + delay), result.error, seq])
            if attempts == 0:
                self._log.warning("sending alerts failed; retrying", destination=destination, error=result.error,
                                  retry_in=round(delay, 2))
        finally:
            cur.close()

    def backoff(self, attempts: int, retry_after: float | None, destination: str | None = None) -> float:
        """The receiver's delay when it gave one (at most backoff_max); else exponential from backoff_initial with
        +-50% jitter, so that many evaluators do not retry in step, and never above the destination's cap."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self._backoff_max)
        cap = min(self._backoff_max, self._max_backoff.get(destination or "", self._backoff_max))
        base = min(cap, self._backoff_initial * 2 ** min(attempts, 30))
        return min(cap, base * self._rng.uniform(0.5, 1.5))

    def depth(self) -> dict[str, tuple[int, int]]:
        cur = self._cursor()
        try:
            rows = cur.execute("SELECT destination, count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE dead) "
                               "FROM outbox GROUP BY destination").fetchall()
        finally:
            cur.close()
        out = {d: (0, 0) for d in self._transports}
        out.update({d: (int(w), int(x)) for d, w, x in rows})
        return out

    def tick(self) -> float | None:
        try:
            return self.run_once()
        except duckdb.Error as exc:  # the store is closing or failed; try again at the next poll
            self._log.warning("outbox pass failed", error=str(exc))
            return None
