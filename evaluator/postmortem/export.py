"""`otel-evaluator export --to DIR`: the public tables as zstd Parquet files and a manifest.json.

The daemon's DuckDB has external access disabled, so COPY TO is impossible there; the Parquet files are written
here, with pyarrow, from Arrow record batches, and memory stays bounded: at most one chunk (`--chunk-rows`) is
held at a time.

Two sources, like `sql`:

- a running daemon: each table is read through admin POST /query as Arrow IPC in chunks of at most chunk-rows
  rows, by keyset pagination on an ordered column (`span_key` for the span tables, `seq` for alerts, `rule_id`,
  `evaluated_at`): `WHERE key > <last> ORDER BY key LIMIT n+1`. A key may repeat (the attribute tables hold
  several rows per span), so a chunk that ends inside a run of equal keys is cut before that run and the next
  chunk starts at it; a run longer than a chunk is fetched alone. Never one unbounded response.
- the DuckDB file, read-only, when no daemon answers: one streaming read per table.

Consistency of a live export: the span tables are cut at the largest span_key committed when the export starts
(a span and its attributes are committed together), so spans, span_numbers, span_strings and span_arrays agree
with each other and hold exactly the spans committed before the export began (retention deleting old spans
while the export runs can still remove rows from a table not yet exported). Every chunk is its own snapshot: the
other tables (alerts, alert_state, ...) are each read as of the moment their chunks ran, not as of one instant.
From a file, everything is one snapshot.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from evaluator.store.store import Store

SPAN_TABLES = ("spans", "span_numbers", "span_strings", "span_arrays")
KEYS = {"spans": "span_key", "span_numbers": "span_key", "span_strings": "span_key", "span_arrays": "span_key",
        "alerts": "seq", "alert_state": "rule_id", "rule_health": "rule_id", "frozen_baselines": "rule_id",
        "quality_values": "evaluated_at"}
TIME_COLUMN = {"spans": "end_time", "span_numbers": "time", "span_strings": "time", "span_arrays": "time"}
ONE_KEY_MAX_ROWS = 1_000_000  # the rows of one key, fetched alone when they do not fit a chunk
BUSY_RETRIES = 30
EPOCH = datetime(1970, 1, 1)
CONSISTENCY_LIVE = ("span tables cut at span_key_max (the spans committed when the export began); every chunk of "
                    "every other table is its own snapshot")
CONSISTENCY_FILE = "one snapshot of the file"


class ExportError(Exception):
    pass


class Source(Protocol):
    description: dict[str, Any]

    def rows(self, sql: str) -> list[list[Any]]:
        """A small query's rows (JSON-safe values)."""

    def batches(self, table: str, where: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
        """Every row of `table` matching `where`, as record batches of at most chunk_rows rows; the first item is
        an empty batch carrying the schema."""


def literal(v: Any) -> str:
    """A key value as a DuckDB literal (the query endpoint takes no parameters)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, datetime):
        return f"TIMESTAMP '{v.replace(tzinfo=None).isoformat(sep=' ')}'"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    raise ExportError(f"cannot page on a key of type {type(v).__name__}")


def _where(conditions: list[str]) -> str:
    return (" WHERE " + " AND ".join(conditions)) if conditions else ""


# -- sources --------------------------------------------------------------------------------------------------------
class DaemonSource:
    """Reads through a running daemon's POST /query."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.description = {"mode": "daemon", "admin": client.url}

    def _post(self, payload: dict[str, Any]) -> bytes:
        from evaluator.admin.client import AdminError
        from evaluator.postmortem.query import CLIENT_WAIT_SECONDS, error_message

        for _ in range(BUSY_RETRIES):
            try:
                body, _ = self.client.request("POST", "/query", json.dumps(payload).encode(),
                                              {"Content-Type": "application/json"}, timeout=CLIENT_WAIT_SECONDS)
                return bytes(body)
            except AdminError as exc:
                if exc.status != 503:
                    raise ExportError(f"the daemon refused a query: {error_message(exc.message)}") from None
                time.sleep(1.0)  # busy: other queries hold the slots
        raise ExportError("the daemon stayed busy (too many concurrent queries); try again later")

    def rows(self, sql: str) -> list[list[Any]]:
        doc = json.loads(self._post({"sql": sql, "format": "json"}))
        return list(doc["rows"])

    def batches(self, table: str, where: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
        key = KEYS[table]
        last: Any = None
        schema: pa.Schema | None = None
        while True:
            conditions = where + ([f"{key} > {literal(last)}"] if last is not None else [])
            sql = f"SELECT * FROM {table}{_where(conditions)} ORDER BY {key} LIMIT {chunk_rows + 1}"
            chunk = pa.ipc.open_stream(self._post({"sql": sql, "format": "arrow", "max_rows": chunk_rows})).read_all()
            if schema is None:
                schema = chunk.schema
                yield pa.RecordBatch.from_pylist([], schema)
            if chunk.num_rows < chunk_rows:  # all that is left (the server cuts at chunk_rows of the n+1 asked)
                yield from chunk.to_batches()
                return
            keys = chunk.column(key).to_pylist()
            boundary = keys[-1]
            keep = len(keys)
            while keep and keys[keep - 1] == boundary:
                keep -= 1
            if keep == 0:  # one key holds more than a chunk: fetch it alone
                one_sql = f"SELECT * FROM {table}{_where([*where, f'{key} = {literal(boundary)}'])}"
                one = pa.ipc.open_stream(self._post({"sql": one_sql, "format": "arrow",
                                                     "max_rows": ONE_KEY_MAX_ROWS})).read_all()
                if one.num_rows >= ONE_KEY_MAX_ROWS:
                    raise ExportError(f"{table}: more than {ONE_KEY_MAX_ROWS} rows share {key} = {boundary}")
                yield from one.to_batches(max_chunksize=chunk_rows)
                last = boundary
                continue
            yield from chunk.slice(0, keep).to_batches()
            last = keys[keep - 1]


class FileSource:
    """Reads the DuckDB file (read-only) in one transaction: one snapshot."""

    def __init__(self, store: Store) -> None:
        """store: started, read-only (evaluator.admin.client.open_file_store); closed by close()."""
        self.store = store
        self.cur = self.store.cursor()
        self.cur.execute("BEGIN TRANSACTION")
        self.description = {"mode": "file", "path": os.path.abspath(store.settings.path)}

    def close(self) -> None:
        self.cur.close()
        self.store.shutdown()

    def rows(self, sql: str) -> list[list[Any]]:
        from evaluator.postmortem.query import json_value

        return [[json_value(v) for v in row] for row in self.cur.execute(sql).fetchall()]

    def batches(self, table: str, where: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
        reader = self.cur.sql(f"SELECT * FROM {table}{_where(where)}").to_arrow_reader(chunk_rows)
        try:
            yield pa.RecordBatch.from_pylist([], reader.schema)
            yield from reader
        finally:
            reader.close()


# -- the export -----------------------------------------------------------------------------------------------------
@dataclass
class TableResult:
    table: str
    file: str
    rows: int
    columns: list[dict[str, str]]
    bytes: int
    seconds: float
    filter: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "file": self.file, "rows": self.rows, "columns": self.columns,
                "bytes": self.bytes, "filter": self.filter}


@dataclass
class Progress:
    stream: TextIO | None
    interval: float = 0.2
    _last: float = field(default=0.0)

    def update(self, table: str, done: int, total: int, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        self.stream.write(f"\r{table}: {done:,} / {total:,} rows{pct}\033[K")
        if final:
            self.stream.write("\r\033[K")
        self.stream.flush()


def export(source: Source, out_dir: str, tables: list[str], since: float | None, chunk_rows: int,
           stdout: TextIO, progress: Progress) -> dict[str, Any]:
    """Write each table and the manifest; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    version_rows = source.rows("SELECT value FROM meta WHERE key = 'schema_version'")
    schema_version = int(version_rows[0][0]) if version_rows else None
    exported_at = datetime.now(UTC)
    span_key_max = int(source.rows("SELECT coalesce(max(span_key), 0) FROM spans")[0][0])
    since_literal = None
    if since is not None:
        since_literal = literal(EPOCH + timedelta(microseconds=round(since * 1_000_000)))
    results = []
    for table in tables:
        where: list[str] = []
        if table in SPAN_TABLES:
            where.append(f"span_key <= {span_key_max}")
            if since_literal is not None:
                where.append(f"{TIME_COLUMN[table]} >= {since_literal}")
        results.append(_export_table(source, out_dir, table, where, chunk_rows, progress))
        r = results[-1]
        stdout.write(f"{table}: {r.rows} rows -> {r.file} ({r.bytes:,} bytes, {r.seconds:.1f} s)\n")
        stdout.flush()
    manifest = {
        "format": "otel-evaluator export",
        "schema_version": schema_version,
        "exported_at": exported_at.isoformat().replace("+00:00", "Z"),
        "source": source.description,
        "consistency": CONSISTENCY_LIVE if source.description["mode"] == "daemon" else CONSISTENCY_FILE,
        "span_key_max": span_key_max,
        "since": since_literal,
        "compression": "zstd",
        "tables": [r.as_dict() for r in results],
    }
    path = os.path.join(out_dir, "manifest.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return manifest


def _export_table(source: Source, out_dir: str, table: str, where: list[str], chunk_rows: int,
                  progress: Progress) -> TableResult:
    start = time.monotonic()
    columns = [{"name": str(r[0]), "type": str(r[1])} for r in source.rows(f"DESCRIBE {table}")]
    total = int(source.rows(f"SELECT count(*) FROM {table}{_where(where)}")[0][0])
    name = f"{table}.parquet"
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    pending: list[pa.RecordBatch] = []
    pending_rows = done = 0
    try:
        for batch in source.batches(table, where, chunk_rows):
            if writer is None or schema is None:
                schema = batch.schema
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            if batch.schema != schema:  # never seen; a chunk typed differently would not fit the file
                batch = pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            if pending_rows >= chunk_rows:  # one row group per chunk: few, large row groups
                writer.write_table(pa.Table.from_batches(pending), row_group_size=chunk_rows)
                done += pending_rows
                pending, pending_rows = [], 0
                progress.update(table, done, total)
        if writer is None:
            raise ExportError(f"{table}: no schema came back")
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=chunk_rows)
            done += pending_rows
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    progress.update(table, done, total, final=True)
    return TableResult(table, name, done, columns, os.path.getsize(path), time.monotonic() - start,
                       " AND ".join(where) or None)
