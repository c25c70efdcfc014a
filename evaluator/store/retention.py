"""Retention: deletes raw spans (and their attribute rows) and old alert history, then checkpoints.

Raw spans are kept `spans` long (default 35 days: longer than the longest baseline a rule compares with); the
alert history (`alerts`, `quality_values`) is kept `alerts` long (default 400 days). `alert_state`,
`frozen_baselines`, `rule_health` and the `outbox` are never touched: they are current state, not history.

A span is deleted when its end time is strictly older than `now - spans` (a span ending exactly at the cutoff
is kept). Every attribute row repeats its span's end time as `time`, so `time < cutoff` selects exactly the
attribute rows of the deleted spans: no join, and DuckDB's zone maps on the time columns skip the recent row
groups. Each table is cleaned in its own short transaction (attribute tables first, then `spans`, so a crash in
between never leaves attribute rows without their span); DuckDB's MVCC lets the span writer keep appending
meanwhile. A CHECKPOINT afterwards vacuums the deleted rows: their blocks become free blocks inside the file,
which new data reuses (the file does not shrink; `store_free_bytes` shows the reusable part).

Spans a loaded rule reads whatever the time (a distribution's fixed baseline range, `kept_ranges`) are spared
past the cutoff: the attribute rows carry the same end time, so they are spared with exactly their spans.

Time comes from the injected clock, so tests move it with a FakeClock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import duckdb
import structlog

from evaluator.clock import Clock
from evaluator.store.store import Store
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker

DAY = 86400.0


@dataclass(frozen=True)
class RetentionSettings:
    spans_seconds: float | None = 35 * DAY  # raw spans and their attributes; None keeps them forever
    alerts_seconds: float | None = 400 * DAY  # alert history (`alerts`, `quality_values`); None: forever
    interval_seconds: float | None = 3600.0  # how often retention runs; None: never (nothing is deleted)
    spans_configured: bool = False  # set explicitly; otherwise the daemon lengthens it for rules reaching further

    @property
    def enabled(self) -> bool:
        return self.interval_seconds is not None and (self.spans_seconds is not None
                                                      or self.alerts_seconds is not None)


# (table, time column) per retention class, in deletion order
SPAN_TABLES = (("span_numbers", "time"), ("span_strings", "time"), ("span_arrays", "time"), ("spans", "end_time"))
ALERT_TABLES = (("alerts", "evaluated_at"), ("quality_values", "evaluated_at"))


def database_free_bytes(cur: duckdb.DuckDBPyConnection) -> int:
    """Bytes of free blocks inside the database file (reused by new data before the file grows)."""
    rows = cur.execute("SELECT free_blocks * block_size FROM pragma_database_size() "
                       "WHERE database_name = current_database()").fetchall()  # fetchall: a pending result of
    # this pragma left open keeps the next checkpoint from vacuuming deleted rows (measured, DuckDB 2.0)
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def store_free_bytes(store: Store) -> int:
    """database_free_bytes of a running store; 0 when it is closed or busy (read at /metrics scrapes)."""
    try:
        cur = store.cursor()
    except Exception:
        return 0
    try:
        return database_free_bytes(cur)
    except duckdb.Error:
        return 0
    finally:
        cur.close()


class RetentionWorker(PeriodicWorker):
    def __init__(
        self,
        store: Store,
        telemetry: Telemetry,
        clock: Clock,
        settings: RetentionSettings,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        super().__init__("retention", settings.interval_seconds or 3600.0)
        self._store = store
        self._clock = clock
        self.settings = settings
        self.spans_seconds = settings.spans_seconds  # the daemon may lengthen it for the loaded rules
        # (start, end] ranges of span end times that loaded rules read whatever the time (a distribution's fixed
        # baseline): their spans are kept past the cutoff. Set by the daemon with the rules (Daemon._fit_retention).
        self.kept_ranges: tuple[tuple[float, float], ...] = ()
        self._log = log or structlog.get_logger("retention")
        self._deleted = telemetry.counter("retention_deleted_rows_total", "Rows deleted by retention, by table.",
                                          ("table",))
        self._runs = telemetry.counter("retention_runs_total", "Retention runs completed.")
        self._failures = telemetry.counter("retention_failures_total", "Retention runs that failed (retried at "
                                           "the next interval).")
        self._last_run = telemetry.gauge("retention_last_run_timestamp_seconds",
                                         "When retention last completed (Unix time).")
        self._last_duration = telemetry.gauge("retention_last_run_duration_seconds",
                                              "How long the last retention run took, checkpoint included.")

    def start(self) -> None:
        if self.settings.enabled:  # disabled: no thread, nothing deleted
            super().start()

    def tick(self) -> float | None:
        try:
            self.run_once()
        except Exception as exc:  # e.g. the store closing under us, a conflict: try again at the next interval
            self._failures.inc()
            self._log.warning("retention run failed; will retry", error=str(exc))
        return None

    def run_once(self) -> dict[str, int]:
        """Delete what is past retention, then checkpoint. Returns the rows deleted per table."""
        t0 = time.perf_counter()
        now_us = int(self._clock.now() * 1_000_000)
        deleted: dict[str, int] = {}
        plan: list[tuple[tuple[tuple[str, str], ...], float | None]] = [
            (SPAN_TABLES, self.spans_seconds), (ALERT_TABLES, self.settings.alerts_seconds)]
        spared = tuple((math.floor(lo * 1_000_000), math.ceil(hi * 1_000_000)) for lo, hi in self.kept_ranges)
        cur = self._store.cursor()
        try:
            for tables, keep in plan:
                if keep is None:
                    continue
                cutoff_us = now_us - int(keep * 1_000_000)
                for table, column in tables:
                    if self.stopping:
                        return deleted
                    deleted[table] = self._delete(cur, table, column, cutoff_us,
                                                  spared if tables is SPAN_TABLES else ())
            if any(deleted.values()):
                self._checkpoint(cur)
        finally:
            cur.close()
        for table, n in deleted.items():
            self._deleted.inc(n, table=table)
        seconds = time.perf_counter() - t0
        self._runs.inc()
        self._last_run.set(self._clock.now())
        self._last_duration.set(seconds)
        if any(deleted.values()):
            self._log.info("retention deleted old rows", seconds=round(seconds, 3),
                           **{t: n for t, n in deleted.items() if n})
        return deleted

    @staticmethod
    def _delete(cur: duckdb.DuckDBPyConnection, table: str, column: str, cutoff_us: int,
                spared: tuple[tuple[int, int], ...] = ()) -> int:
        """Delete rows older than the cutoff, except those in a spared (start, end] range (µs)."""
        keep = "".join(f" AND NOT ({column} > make_timestamp(?::BIGINT) AND {column} <= make_timestamp(?::BIGINT))"
                       for _ in spared)
        params = [cutoff_us, *(t for r in spared for t in r)]
        row = cur.execute(f"DELETE FROM {table} WHERE {column} < make_timestamp(?::BIGINT){keep}", params).fetchone()
        return int(row[0]) if row else 0

    def _checkpoint(self, cur: duckdb.DuckDBPyConnection) -> None:
        try:
            cur.execute("CHECKPOINT")
        except duckdb.Error as exc:  # a concurrent transaction: the background checkpointer folds it in later
            self._log.info("checkpoint after retention deferred", error=str(exc))
