"""The outbox table: alert outputs stored in the transaction that records them, sent later by the exporter.

The store owns the table; the rule engine's evaluation writes requests into it (evaluations.write_evaluation) and
evaluator.exporter.outbox sends and acknowledges them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)


def enqueue(cur: duckdb.DuckDBPyConnection, destination: str, payload: bytes, items: int, now: float) -> None:
    """Add a request to the outbox within the caller's transaction."""
    cur.execute("INSERT INTO outbox (created_at, destination, payload, items, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
                [_dt(now), destination, payload, items, _dt(now)])
