"""Time budgets of rule evaluations: a cursor that stops its queries once a deadline has passed.

A kind reads the store through the cursor it is given. `BudgetCursor` wraps the engine's cursor: a timer calls
DuckDB's `interrupt()` on it when the deadline passes (the query running then fails with an interrupt error), and
a statement started after the deadline fails at once. The engine turns either into "over its time budget" for the
rules of that call, so one rule that runs away (a cross join of two large ranges, a window far larger than meant)
is stopped and marked unhealthy, and the group goes on.

DuckDB has no memory limit per query: memory is bounded for every query together by the store's
`memory_limit` (docs/configuration.md); over it, a query fails with DuckDB's out-of-memory error, which makes that
rule unhealthy in the same way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import duckdb


class BudgetExceeded(duckdb.InterruptException):
    """A statement started after its call's deadline."""


class BudgetCursor:
    """A cursor whose statements stop at a deadline. Use as a context manager: the timer is cancelled on exit."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, seconds: float | None) -> None:
        self._cur = cur
        self.seconds = seconds
        self.expired = False
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self._timer: threading.Timer | None = None
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
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

    def close_budget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> BudgetCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_budget()
