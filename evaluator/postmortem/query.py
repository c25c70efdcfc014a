"""Postmortem SQL: run one read-only statement against the store, with limits, for admin POST /query and `sql`.

What may run is decided by DuckDB itself, never by pattern matching on the text:

- the text must parse (`extract_statements`) as exactly one statement of type SELECT (which includes DESCRIBE,
  SHOW, SUMMARIZE, FROM-first and VALUES queries) or EXPLAIN [ANALYZE] of such a SELECT. Everything else is
  refused by type: INSERT/UPDATE/DELETE/MERGE, CREATE/DROP/ALTER, COPY, ATTACH/DETACH, INSTALL/LOAD,
  SET/RESET/USE, PRAGMA (and IMPORT DATABASE, which DuckDB classifies as one), CALL (and CHECKPOINT), EXPORT
  DATABASE, VACUUM/ANALYZE, transactions, PREPARE/EXECUTE, PIVOT statements;
- its physical plan (`EXPLAIN (FORMAT json)`) must not hold a writing or state-changing operator: DuckDB runs
  `WITH d AS (DELETE ... RETURNING *) SELECT ...` as a SELECT and deletes (shared with sql rules:
  `evaluator.rules.kinds.sql.writing_operator`);
- it runs inside `BEGIN TRANSACTION READ ONLY`, so anything that still tries to write fails and is rolled back;
- the store's connection has external access disabled: read_csv('/etc/passwd'), read_parquet, glob, ... fail
  with DuckDB's permission error, reported as refused.

Limits: a row limit (the result is read as Arrow record batches until one row past the limit, then dropped and
reported `truncated`), a time limit (a timer interrupts the cursor), and at most `max_concurrent` queries at once
(beyond: QueryBusy, so postmortem queries cannot starve ingest and rules). Counted in
`otel_evaluator_queries_total{outcome}`: ok, refused, error, timeout, busy.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from evaluator.telemetry import Telemetry

FORMATS = {"json": "application/json", "csv": "text/csv; charset=utf-8",
           "arrow": "application/vnd.apache.arrow.stream"}
ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
OUTCOMES = ("ok", "refused", "error", "timeout", "busy")
MAX_SAFE_INT = 2**53 - 1
_PLAN_PREFIX = "EXPLAIN (FORMAT json) "
_EXPLAIN = re.compile(r"^\s*explain\s+(?:\([^()]*\)\s*)?(?:analy[sz]e\s+)?", re.IGNORECASE)
# what DuckDB calls the statement types we refuse, in the words the user wrote
_TYPE_WORDS = {
    "INSERT": "INSERT", "UPDATE": "UPDATE", "DELETE": "DELETE (or TRUNCATE)", "MERGE_INTO": "MERGE",
    "CREATE": "CREATE", "DROP": "DROP (or DEALLOCATE)", "ALTER": "ALTER (or COMMENT ON)", "COPY": "COPY",
    "COPY_DATABASE": "COPY FROM DATABASE", "ATTACH": "ATTACH", "DETACH": "DETACH", "LOAD": "INSTALL/LOAD",
    "EXTENSION": "an extension statement", "SET": "SET/RESET/USE", "VARIABLE_SET": "SET VARIABLE",
    "PRAGMA": "PRAGMA (or IMPORT DATABASE)", "CALL": "CALL (or CHECKPOINT)", "EXPORT": "EXPORT DATABASE",
    "VACUUM": "VACUUM/ANALYZE", "TRANSACTION": "a transaction statement (BEGIN/COMMIT/ROLLBACK)",
    "PREPARE": "PREPARE", "EXECUTE": "EXECUTE", "MULTI": "PIVOT (a statement that runs several)",
    "CREATE_FUNC": "CREATE FUNCTION", "ANALYZE": "ANALYZE",
}


class QueryProblem(Exception):
    """A query that did not produce a result; `reason` is refused, error, timeout or busy; `status` the HTTP one."""

    reason = "error"
    status = 400

    def as_dict(self) -> dict[str, str]:
        return {"error": str(self), "reason": self.reason}


class QueryRefused(QueryProblem):
    """Not a single read-only statement, or it touches files: nothing ran."""

    reason = "refused"


class QueryFailed(QueryProblem):
    """DuckDB could not parse, bind or run it."""

    reason = "error"


class QueryTimeout(QueryProblem):
    """It ran longer than its time limit and was interrupted."""

    reason = "timeout"


class QueryBusy(QueryProblem):
    """Too many queries are running; retry later (503 with Retry-After)."""

    reason = "busy"
    status = 503


@dataclass(frozen=True)
class QueryLimits:
    default_rows: int = 10_000
    max_rows: int = 1_000_000  # a request may raise its row limit up to this
    timeout_seconds: float = 30.0  # default and maximum: a request may only lower it
    max_concurrent: int = 2
    max_body_bytes: int = 1 << 20  # POST /query body


@dataclass
class QueryResult:
    columns: list[tuple[str, str]]  # name, DuckDB type
    schema: pa.Schema
    batches: list[pa.RecordBatch]
    row_count: int
    truncated: bool
    elapsed_seconds: float

    def rows(self) -> list[list[Any]]:
        """Every row, values made JSON-safe (see json_value)."""
        out: list[list[Any]] = []
        for batch in self.batches:
            cols = [column_values(col) for col in batch.columns]
            out.extend([list(row) for row in zip(*cols, strict=True)] if cols else [[] for _ in range(batch.num_rows)])
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"columns": [{"name": n, "type": t} for n, t in self.columns], "rows": self.rows(),
                "row_count": self.row_count, "truncated": self.truncated,
                "elapsed_seconds": round(self.elapsed_seconds, 6)}

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), allow_nan=False, separators=(",", ":")).encode()

    def to_csv(self) -> bytes:
        return render_csv([n for n, _ in self.columns], self.rows()).encode()

    def to_arrow(self) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            for batch in self.batches:
                writer.write_batch(batch)
        return bytes(sink.getvalue().to_pybytes())

    def encode(self, fmt: str) -> bytes:
        if fmt == "csv":
            return self.to_csv()
        if fmt == "arrow":
            return self.to_arrow()
        return self.to_json()


# -- values -----------------------------------------------------------------------------------------------------
def json_value(v: Any) -> Any:
    """A value as JSON can carry it exactly: times as ISO-8601 (TIMESTAMP naive, as stored: UTC), integers beyond
    2^53 and long decimals as strings, NaN/Infinity as the strings "NaN", "Infinity", "-Infinity", BLOBs as
    base64, intervals as ISO-8601 durations, MAPs as objects (or [key, value] pairs when a key is not text)."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return v if abs(v) <= MAX_SAFE_INT else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, Decimal):
        if not v.is_finite():
            return str(v)
        exponent = v.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return json_value(int(v))
        return float(v) if len(v.as_tuple().digits) <= 15 else str(v)
    if isinstance(v, datetime | date | dtime):
        return v.isoformat()
    if isinstance(v, timedelta):
        return _duration(0, v.days, v.seconds * 1_000_000_000 + v.microseconds * 1000)
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    months = getattr(v, "months", None)
    if months is not None:  # pyarrow MonthDayNano (a named tuple)
        return _duration(int(months), int(v.days), int(v.nanoseconds))
    if isinstance(v, list | tuple):
        if v and all(isinstance(p, tuple) and len(p) == 2 for p in v):  # an Arrow MAP: [(key, value), ...]
            if all(isinstance(p[0], str) for p in v):
                return {p[0]: json_value(p[1]) for p in v}
            return [[json_value(p[0]), json_value(p[1])] for p in v]
        return [json_value(x) for x in v]
    return str(v)


def _duration(months: int, days: int, nanos: int) -> str:
    sign = "-" if months < 0 and days <= 0 and nanos <= 0 and (months or days or nanos) else ""
    if sign:
        months, days, nanos = -months, -days, -nanos
    out = "P"
    if months:
        out += f"{months // 12}Y" if months % 12 == 0 else f"{months}M"
    if days:
        out += f"{days}D"
    if nanos or out == "P":
        seconds = Decimal(nanos) / Decimal(1_000_000_000)
        out += f"T{seconds.normalize():f}S"
    return sign + out


def column_values(col: pa.Array | pa.ChunkedArray) -> list[Any]:
    try:
        values = col.to_pylist()
    except (OverflowError, ValueError, pa.ArrowException):  # e.g. TIMESTAMP 'infinity' is beyond Python's datetime
        values = col.cast(pa.string()).to_pylist()
    return [json_value(v) for v in values]


def text_value(v: Any) -> str:
    """A JSON-safe value as one CSV or table cell: NULL empty, booleans true/false, nested values as JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def render_csv(names: list[str], rows: Iterable[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([text_value(v) for v in row])
    return out.getvalue()


# -- checks -----------------------------------------------------------------------------------------------------
def checked_statement(cur: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The one read-only statement in `sql`, ready to run. QueryRefused or QueryFailed otherwise."""
    from evaluator.rules.kinds.sql import writing_operator

    if not sql.strip():
        raise QueryRefused("no SQL given")
    stmt = _one_statement(cur, sql)
    inner = stmt.query
    if stmt.type == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN.match(stmt.query)
        if m is None:
            raise QueryRefused("refused EXPLAIN: only EXPLAIN [ANALYZE] followed by a SELECT may run")
        inner_stmt = _one_statement(cur, stmt.query[m.end():], within="EXPLAIN")
        if inner_stmt.type != duckdb.StatementType.SELECT:
            raise QueryRefused(f"refused EXPLAIN of {_type_words(inner_stmt.type)}: only a SELECT may be explained")
        inner = inner_stmt.query
    try:
        op = writing_operator(cur, inner)
    except ValueError as exc:
        raise QueryRefused(f"refused: {exc}") from None
    except duckdb.Error as exc:
        raise _failure(exc) from None
    if op is not None:
        raise QueryRefused(f"refused: the query would write or change the database ({op} in its plan, e.g. a "
                           "data-modifying WITH clause); only reading queries may run")
    return stmt.query


def _one_statement(cur: duckdb.DuckDBPyConnection, sql: str, within: str = "") -> Any:
    where = f" after {within}" if within else ""
    try:
        statements = cur.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryFailed(f"the query does not parse: {_first_line(exc)}") from None
    except ValueError:  # a statement type the Python client does not know
        raise QueryRefused(f"refused{where}: not a SELECT; only one read-only SELECT (or DESCRIBE, SHOW, SUMMARIZE, "
                           "EXPLAIN) may run") from None
    if len(statements) != 1:
        raise QueryRefused(f"refused{where}: {len(statements)} statements; send exactly one read-only SELECT")
    stmt = statements[0]
    kind: Any
    try:
        kind = stmt.type
    except ValueError:  # a statement type the Python client does not know (e.g. UPDATE EXTENSIONS)
        kind = "this statement"
    if kind not in ALLOWED:
        raise QueryRefused(f"refused {_type_words(kind)}{where}: only one read-only SELECT (or DESCRIBE, SHOW, "
                           "SUMMARIZE, EXPLAIN) may run; the store is not changed through this endpoint")
    if stmt.named_parameters:
        names = ", ".join(sorted("?" if p.isdigit() else f"${p}" for p in stmt.named_parameters))
        raise QueryRefused(f"refused: the query has parameters ({names}); write the values into the SQL")
    return stmt


def _type_words(t: Any) -> str:
    name = getattr(t, "name", str(t))
    return _TYPE_WORDS.get(name, name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.split("\n\n", 1)[0].strip()


def _failure(exc: duckdb.Error) -> QueryProblem:
    text = _without_explain(str(exc).strip())
    if isinstance(exc, duckdb.PermissionException) or "file system operations are disabled" in text:
        return QueryRefused(f"refused: the store's SQL cannot read files or the network ({_first_line(exc)}); query "
                            "the tables (docs/schema.md) instead")
    if "read-only mode" in text or "read-only transaction" in text:
        why = "" if 'type "EXPLAIN"' in text else f" ({_first_line(exc)})"
        return QueryRefused(f"refused: the query tries to write{why}; only reading queries may run, and nothing "
                            "was changed")
    if isinstance(exc, duckdb.InterruptException):
        return QueryTimeout("the query was interrupted")
    return QueryFailed(f"the query failed: {text}")


def _without_explain(text: str) -> str:
    """DuckDB's message for an error found by the plan check quotes our EXPLAIN prefix; show the user's text."""
    prefix = _PLAN_PREFIX
    lines = text.split("\n")
    for i, line in enumerate(lines):
        at = line.find(prefix)
        if at < 0:
            continue
        lines[i] = line[:at] + line[at + len(prefix):]
        if i + 1 < len(lines) and lines[i + 1][:at + len(prefix)].strip() == "":
            lines[i + 1] = lines[i + 1][:at] + lines[i + 1][at + len(prefix):]
    return "\n".join(lines)


# -- running ----------------------------------------------------------------------------------------------------
class QueryRunner:
    """Runs checked queries on cursors from `cursor_factory` (the store's), within the limits."""

    def __init__(self, cursor_factory: Callable[[], duckdb.DuckDBPyConnection], telemetry: Telemetry | None = None,
                 limits: QueryLimits | None = None) -> None:
        self.limits = limits or QueryLimits()
        self._cursor = cursor_factory
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self._queries = (telemetry or Telemetry()).counter(
            "queries_total", "Postmortem SQL queries (admin /query, sql, export) by outcome.", ("outcome",))

    def row_limit(self, requested: Any) -> int:
        if requested is None:
            return self.limits.default_rows
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise QueryRefused(f"max_rows must be a positive integer, not {requested!r}")
        if requested > self.limits.max_rows:
            raise QueryRefused(f"max_rows {requested} is over the limit of {self.limits.max_rows}")
        return requested

    def time_limit(self, requested: Any) -> float:
        if requested is None:
            return self.limits.timeout_seconds
        if isinstance(requested, bool) or not isinstance(requested, int | float) or not requested > 0:
            raise QueryRefused(f"timeout must be a positive number of seconds, not {requested!r}")
        return min(float(requested), self.limits.timeout_seconds)

    def count(self, outcome: str) -> None:
        self._queries.inc(outcome=outcome)

    def run(self, sql: str, max_rows: Any = None, timeout: Any = None) -> QueryResult:
        """The result, or a QueryProblem (counted either way)."""
        return self.run_encoded(sql, None, max_rows, timeout)[0]

    def run_encoded(self, sql: str, fmt: str | None, max_rows: Any = None,
                    timeout: Any = None) -> tuple[QueryResult, bytes]:
        """The result and, when `fmt` is given, its encoding (made while the query still holds its slot, so at most
        max_concurrent results are in memory at once)."""
        try:
            limit, seconds = self.row_limit(max_rows), self.time_limit(timeout)
        except QueryProblem:
            self.count("refused")
            raise
        if not self._slots.acquire(blocking=False):
            self.count("busy")
            raise QueryBusy(f"{self.limits.max_concurrent} queries are already running; retry later")
        try:
            result = self._run(sql, limit, seconds)
            data = result.encode(fmt) if fmt is not None else b""
        except QueryProblem as exc:
            self.count(exc.reason)
            raise
        finally:
            self._slots.release()
        self.count("ok")
        return result, data

    def _run(self, sql: str, limit: int, seconds: float) -> QueryResult:
        start = time.monotonic()
        try:
            cur = self._cursor()
        except Exception as exc:  # the store is closed (shutting down)
            raise QueryBusy(f"store unavailable: {exc}") from None
        fired = threading.Event()

        def interrupt() -> None:
            fired.set()
            cur.interrupt()

        timer = threading.Timer(seconds, interrupt)
        timer.daemon = True
        timer.start()
        try:
            try:
                statement = checked_statement(cur, sql)  # before the transaction: its refusals are the clearer
                cur.execute("BEGIN TRANSACTION READ ONLY")
                return self._fetch(cur, statement, limit, start)
            except (duckdb.Error, QueryProblem) as exc:
                if fired.is_set():
                    raise QueryTimeout(f"the query ran longer than its time limit of {seconds:g} s and was "
                                       "interrupted; narrow it (a time range, fewer joins) or raise the timeout "
                                       "(up to the server's limit)") from None
                if isinstance(exc, QueryProblem):
                    raise
                raise _failure(exc) from None
        finally:
            timer.cancel()
            timer.join()
            cur.close()  # also ends the read-only transaction

    @staticmethod
    def _fetch(cur: duckdb.DuckDBPyConnection, statement: str, limit: int, start: float) -> QueryResult:
        rel = cur.sql(statement)
        if rel is None:  # cannot happen for SELECT/EXPLAIN, but never hand back nothing silently
            raise QueryFailed("the statement returned no result")
        columns = [(name, str(t)) for name, t in zip(rel.columns, rel.types, strict=True)]
        reader = rel.to_arrow_reader(min(limit + 1, 65_536))
        batches: list[pa.RecordBatch] = []
        rows = 0
        truncated = False
        try:
            for batch in reader:
                if rows + batch.num_rows > limit:
                    batch = batch.slice(0, limit - rows)
                    truncated = True
                if batch.num_rows:
                    batches.append(batch)
                    rows += batch.num_rows
                if truncated:
                    break
        finally:
            reader.close()
        return QueryResult(columns, reader.schema, batches, rows, truncated, time.monotonic() - start)


def parse_request(body: bytes, content_type: str, accept: str) -> tuple[str, str, Any, Any]:
    """(sql, format, max_rows, timeout) from a POST /query body: JSON {"sql", "format", "max_rows", "timeout"}, or
    the SQL itself as text/plain. The format comes from the body, else the Accept header, else JSON."""
    fmt: str | None = None
    max_rows = timeout = None
    if "json" in (content_type or "").lower():
        try:
            doc = json.loads(body or b"null")
        except ValueError as exc:
            raise QueryRefused(f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("sql"), str):
            raise QueryRefused('the body must be a JSON object with "sql" (text), and optionally "format", '
                               '"max_rows", "timeout"')
        unknown = sorted(set(doc) - {"sql", "format", "max_rows", "timeout"})
        if unknown:
            raise QueryRefused(f"unknown field(s) {', '.join(unknown)}; known: sql, format, max_rows, timeout")
        sql = doc["sql"]
        fmt, max_rows, timeout = doc.get("format"), doc.get("max_rows"), doc.get("timeout")
    else:
        try:
            sql = body.decode("utf-8")
        except UnicodeDecodeError:
            raise QueryRefused("the body is not UTF-8 text") from None
    if fmt is None:
        fmt = format_from_accept(accept)
    if fmt not in FORMATS:
        raise QueryRefused(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return sql, fmt, max_rows, timeout


def format_from_accept(accept: str) -> str:
    accept = (accept or "").lower()
    if "apache.arrow" in accept:
        return "arrow"
    if "text/csv" in accept:
        return "csv"
    return "json"


CLIENT_WAIT_SECONDS = 900.0  # how long the commands wait for an answer; the daemon enforces its own time limit


def error_message(body: str) -> str:
    """The "error" of a JSON error body, else the body itself."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    return str(doc.get("error", body)) if isinstance(doc, dict) else body
