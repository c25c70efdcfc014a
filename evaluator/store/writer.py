"""The single span writer: group commit into DuckDB, then acknowledge.

Receiver threads submit decoded batches and wait on a future. One writer thread takes everything queued,
inserts it in one transaction, commits (DuckDB fsyncs its WAL on commit), and only then resolves the futures, so
an Export is answered OK only once its spans are durable. While one commit runs, the next group accumulates:
under load the cost of a commit is shared by many requests.

Fairness: batches wait in one queue per client and are taken round-robin (up to max_group_spans), so one
client's backlog never puts another's batch behind several commits; and the batches of light clients in a group
are committed first, on their own, so a small request waits for a small commit rather than for a flood's.

Idempotence: collectors retry, so (trace_id, span_id) arrives twice. A duplicate is a resend of the same span,
so it has the same start time; the insert anti-joins the batch against stored spans whose start time lies within
the batch's own start-time range. Zone maps on `spans.start_time` prune the scan to recent row groups, so the
cost stays flat as the table grows (measured: a primary-key index instead costs ~3 s per million spans and
grows with the table, plus its memory).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future

import duckdb
import pyarrow as pa
import structlog

from evaluator.store.columns import SpanColumns
from evaluator.store.store import Store
from evaluator.telemetry import Telemetry
from evaluator.worker import WorkerStatus, error_text, worker_errors


class WriterClosed(Exception):
    """The writer is shutting down or stopped; the request was not stored (retryable)."""


_INSERT_SPANS = """
INSERT INTO spans
SELECT b.* FROM (
    SELECT DISTINCT ON (trace_id, span_id) * FROM incoming_spans ORDER BY trace_id, span_id, span_key
) b
ANTI JOIN (
    SELECT trace_id, span_id, start_time FROM spans
    WHERE start_time BETWEEN make_timestamp({lo}) AND make_timestamp({hi})
) s ON s.trace_id = b.trace_id AND s.span_id = b.span_id AND s.start_time = b.start_time
RETURNING span_key
"""


class _Item:
    __slots__ = ("batch", "client", "future", "received_us")

    def __init__(self, batch: SpanColumns, received_us: int, client: str = "") -> None:
        self.batch = batch
        self.received_us = received_us
        self.client = client
        self.future: Future[None] = Future()


class _FairQueue:
    """The batches waiting to commit, one FIFO per client, taken round-robin into groups.

    With one FIFO for all, a client that keeps many big batches queued puts everyone else behind them (and, past
    max_group_spans, behind several commits). Round-robin puts every client's oldest batch into the next group.
    With a single client (or all batches from client ""), it is the plain FIFO it replaces."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Item]] = {}  # insertion order is the round-robin order
        self._closed = False

    def put(self, item: _Item | None) -> None:
        """Queue a batch; None closes the queue (what is queued is still taken)."""
        with self._cond:
            if item is None:
                self._closed = True
            else:
                self._queues.setdefault(item.client, deque()).append(item)
            self._cond.notify()

    def take(self, max_spans: int) -> list[_Item] | None:
        """Wait for batches; then a group of at least one, one batch per client per pass, until max_spans spans
        or the queue is empty. None once closed and empty. A client served in a pass moves to the back of the
        order, so when max_spans cuts a pass short the next group starts with the clients it left out."""
        with self._cond:
            while not self._queues:
                if self._closed:
                    return None
                self._cond.wait()
            group: list[_Item] = []
            spans = 0
            while self._queues and (not group or spans < max_spans):
                for client in list(self._queues):
                    if group and spans >= max_spans:
                        break
                    fifo = self._queues.pop(client)
                    item = fifo.popleft()
                    group.append(item)
                    spans += len(item.batch)
                    if fifo:
                        self._queues[client] = fifo  # to the back
            return group


def light_first(group: list[_Item]) -> list[list[_Item]]:
    """The group as commits: the batches of light clients (under half an equal share of the group's spans) in a
    commit of their own before the rest, so that one small request waits for a small commit rather than for the
    flood's. One commit when the group is from one client, or from clients that are all about as heavy."""
    per_client: dict[str, int] = {}
    for item in group:
        per_client[item.client] = per_client.get(item.client, 0) + len(item.batch)
    if len(per_client) < 2:
        return [group]
    light_under = sum(per_client.values()) / (2 * len(per_client))
    light = [item for item in group if per_client[item.client] < light_under]
    if not light or len(light) == len(group):
        return [group]
    return [light, [item for item in group if per_client[item.client] >= light_under]]


class SpanWriter:
    def __init__(
        self,
        store: Store,
        telemetry: Telemetry,
        *,
        max_group_spans: int = 50_000,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._store = store
        self._max_group = max_group_spans
        self._log = log or structlog.get_logger("writer")
        self._queue = _FairQueue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._state_lock = threading.Lock()
        self._next_key = 0
        self._stored = telemetry.counter("spans_stored_total", "Spans committed to the store (new ones).")
        self._dups = telemetry.counter("spans_duplicate_total", "Spans received again and stored once.")
        self._commits = telemetry.counter("store_commits_total", "Group commits of received spans.")
        self._commit_seconds = telemetry.counter("store_commit_seconds_total", "Time spent in group commits.")
        self._failures = telemetry.counter("store_write_failures_total", "Group commits that failed.")
        self._rows = telemetry.counter("rows_stored_total", "Rows committed, by table.", ("table",))
        self._errors = worker_errors(telemetry)
        self._guard = threading.Lock()  # the failure figures, read by status() from other threads
        self._round_failures = 0
        self._consecutive = 0
        self._last_error: str | None = None

    def start(self) -> None:
        with self._state_lock:
            if self._thread is not None:
                return
            cur = self._store.cursor()
            try:
                row = cur.execute("SELECT coalesce(max(span_key), 0) FROM spans").fetchone()
            finally:
                cur.close()
            self._next_key = int(row[0]) + 1 if row else 1
            self._queue = _FairQueue()
            self._thread = threading.Thread(target=self._run, name="span-writer", daemon=True)
            self._accepting = True
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, commit everything already submitted, stop the thread. Idempotent."""
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._accepting = False
            if thread is None:
                return
            self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            self._log.error("span writer did not stop in time", timeout=timeout)

    def submit(self, batch: SpanColumns, received_us: int, client: str = "") -> Future[None]:
        """Queue a batch for the next group commit. client: who sent it; batches are taken round-robin across
        clients and light clients' batches are committed first (_FairQueue, light_first)."""
        item = _Item(batch, received_us, client)
        with self._state_lock:
            if not self._accepting:
                raise WriterClosed("the store is shutting down")
            self._queue.put(item)
        return item.future

    def status(self) -> WorkerStatus:
        """The writer thread as a background worker (/readyz, self-monitoring): running, alive, failed rounds."""
        thread = self._thread
        with self._guard:
            return WorkerStatus("span-writer", thread is not None, thread is not None and thread.is_alive(),
                                self._round_failures, self._consecutive, self._last_error)

    # -- writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:  # the thread ends: said, so that status() and /readyz can tell why
            with self._guard:
                self._last_error = error_text(exc)
            self._log.error("span writer stopped", error=error_text(exc))
            raise

    def _write_loop(self) -> None:
        cur = self._store.cursor()
        try:
            while (taken := self._queue.take(self._max_group)) is not None:
                for group in light_first(taken):
                    try:
                        self._commit(cur, group)
                    except Exception as exc:  # not the commit (handled there): preparing the group
                        self._round_failed(group, exc)
                    else:
                        with self._guard:
                            self._consecutive = 0
        finally:
            cur.close()

    def _round_failed(self, group: list[_Item], exc: Exception) -> None:
        """An unexpected failure outside the commit: the group's requests are answered with it (retryable as a
        store failure), the round is counted and logged, and the thread goes on with the next group."""
        with self._guard:
            self._round_failures += 1
            self._consecutive += 1
            self._last_error = error_text(exc)
        self._errors.inc(worker="span-writer")
        self._failures.inc()
        self._log.error("span writer round failed; it goes on", error=error_text(exc), requests=len(group),
                        exc_info=exc)
        for item in group:
            if not item.future.done():
                item.future.set_exception(exc)

    def _commit(self, cur: duckdb.DuckDBPyConnection, group: list[_Item]) -> None:
        t0 = time.perf_counter()
        base = self._next_key
        parts: dict[str, list[pa.Table]] = {"spans": [], "span_numbers": [], "span_strings": [], "span_arrays": []}
        lo = hi = None
        for item in group:
            b = item.batch
            if len(b):
                for name, table in b.keyed(base, item.received_us).items():
                    parts[name].append(table)
                blo, bhi = b.start_range
                lo = blo if lo is None else min(lo, blo)
                hi = bhi if hi is None else max(hi, bhi)
            base += len(b)
        total = base - self._next_key
        try:
            stored = 0
            if total:
                tables = {name: pa.concat_tables(ts) for name, ts in parts.items()}
                stored = self._insert(cur, tables, lo or 0, hi or 0)
        except Exception as exc:
            self._failures.inc()
            self._log.error("group commit failed", error=str(exc), spans=total)
            for item in group:
                item.future.set_exception(exc)
            return
        self._next_key = base
        self._commits.inc()
        self._commit_seconds.inc(time.perf_counter() - t0)
        self._stored.inc(stored)
        self._dups.inc(total - stored)
        for item in group:
            item.future.set_result(None)

    def _insert(self, cur: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], lo: int, hi: int) -> int:
        cur.execute("BEGIN")
        try:
            cur.register("incoming_spans", tables["spans"])
            inserted = cur.execute(_INSERT_SPANS.format(lo=int(lo), hi=int(hi))).fetchnumpy()["span_key"]
            all_new = len(inserted) == tables["spans"].num_rows
            counts = {"spans": len(inserted)}
            if not all_new:
                cur.register("inserted_keys", pa.table({"span_key": pa.array(inserted, pa.int64())}))
            for name in ("span_numbers", "span_strings", "span_arrays"):
                table = tables[name]
                if not table.num_rows:
                    continue
                cur.register("incoming_rows", table)
                sql = f"INSERT INTO {name} SELECT * FROM incoming_rows"
                if not all_new:
                    sql += " WHERE span_key IN (SELECT span_key FROM inserted_keys)"
                row = cur.execute(sql).fetchone()
                counts[name] = int(row[0]) if row else 0
                cur.unregister("incoming_rows")
            cur.execute("COMMIT")
            for name, count in counts.items():
                self._rows.inc(count, table=name)
            return len(inserted)
        except Exception:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            raise
        finally:
            for view in ("incoming_spans", "inserted_keys", "incoming_rows"):
                with contextlib.suppress(Exception):  # not registered in this round
                    cur.unregister(view)
