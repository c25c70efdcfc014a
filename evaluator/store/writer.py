"""The single span writer: group commit into DuckDB, then acknowledge.

Receiver threads submit decoded batches and wait on a future. One writer thread takes everything queued,
inserts it in one transaction, commits (DuckDB fsyncs its WAL on commit), and only then resolves the futures, so
an Export is answered OK only once its spans are durable. While one commit runs, the next group accumulates:
under load the cost of a commit is shared by many requests.

Idempotence: collectors retry, so (trace_id, span_id) arrives twice. A duplicate is a resend of the same span,
so it has the same start time; the insert anti-joins the batch against stored spans whose start time lies within
the batch's own start-time range. Zone maps on `spans.start_time` prune the scan to recent row groups, so the
cost stays flat as the table grows (measured: a primary-key index instead costs ~3 s per million spans and
grows with the table, plus its memory).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future

import duckdb
import pyarrow as pa
import structlog

from evaluator.receiver.columns import SpanColumns
from evaluator.store.store import Store
from evaluator.telemetry import Telemetry


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
    __slots__ = ("batch", "future", "received_us")

    def __init__(self, batch: SpanColumns, received_us: int) -> None:
        self.batch = batch
        self.received_us = received_us
        self.future: Future[None] = Future()


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
        self._queue: queue.Queue[_Item | None] = queue.Queue()
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
            self._queue = queue.Queue()
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

    def submit(self, batch: SpanColumns, received_us: int) -> Future[None]:
        item = _Item(batch, received_us)
        with self._state_lock:
            if not self._accepting:
                raise WriterClosed("the store is shutting down")
            self._queue.put(item)
        return item.future

    # -- writer thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        cur = self._store.cursor()
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                group = [first]
                spans = len(first.batch)
                while spans < self._max_group:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    group.append(nxt)
                    spans += len(nxt.batch)
                self._commit(cur, group)
        finally:
            cur.close()

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
