"""Time budgets of rule evaluations: a cursor that stops its queries once a deadline has passed.

A kind reads the store through the cursor it is given. `BudgetCursor` wraps the engine's cursor: when the deadline
passes, the engine's `Deadlines` thread calls DuckDB's `interrupt()` on it (the query running then fails with an
interrupt error), and a statement started after the deadline fails at once. The engine turns either into "over
its time budget" for the rules of that call, so one rule that runs away (a cross join of two large ranges, a
window far larger than meant) is stopped and marked unhealthy, and the group goes on. One thread serves every
deadline of an engine (a thread per call cost more than many small queries).

DuckDB has no memory limit per query: memory is bounded for every query together by the store's
`memory_limit` (docs/configuration.md); over it, a query fails with DuckDB's out-of-memory error, which makes that
rule unhealthy in the same way.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from typing import Any

import duckdb


class BudgetExceeded(duckdb.InterruptException):
    """A statement started after its call's deadline."""


class Deadlines:
    """One daemon thread that interrupts cursors whose deadline passed. Started on first use; idle it waits."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, BudgetCursor]] = []
        self._count = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, cursor: BudgetCursor, deadline: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._count), cursor))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rule-budgets", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        """Interrupt what is due; leave (a later add starts the thread again) once every budget has ended, so no
        thread outlives the evaluations."""
        while True:
            with self._cond:
                if all(c.done for _, _, c in self._heap):
                    self._heap.clear()
                    self._thread = None
                    return
                deadline, _, cursor = self._heap[0]
                wait = deadline - time.monotonic()
                if cursor.done:
                    heapq.heappop(self._heap)
                    continue
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            cursor.expire()

    def ended(self) -> None:
        """A budget ended: wake the thread, which leaves when nothing is left to watch."""
        with self._cond:
            self._cond.notify()


class BudgetCursor:
    """A cursor whose statements stop at a deadline. Use as a context manager: leaving it ends the budget."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, seconds: float | None,
                 deadlines: Deadlines | None = None) -> None:
        self._cur = cur
        self.seconds = seconds
        self.expired = False
        self.done = False
        self._lock = threading.Lock()  # an interrupt never lands after the budget ended (on the next call's query)
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self._deadlines = deadlines
        if self._deadline is not None and deadlines is not None:
            deadlines.add(self, self._deadline)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            # nothing running, or the cursor is closed: the next statement checks the deadline
            with contextlib.suppress(duckdb.Error):
                self._cur.interrupt()

    def _check(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.expired = True
            raise BudgetExceeded(f"over its time budget of {self.seconds:g} s")

    def execute(self, query: str, parameters: Any = None) -> Any:
        self._check()
        self._cur.execute(query, parameters)
        return self

    def executemany(self, query: str, parameters: Any = None) -> Any:
        self._check()
        self._cur.executemany(query, parameters)
        return self

    def extract_statements(self, query: str) -> Any:
        self._check()
        return self._cur.extract_statements(query)

    def __getattr__(self, name: str) -> Any:  # fetchall, fetchnumpy, description, register, ...
        return getattr(self._cur, name)

    def __enter__(self) -> BudgetCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.done = True
        if self._deadlines is not None:
            self._deadlines.ended()
