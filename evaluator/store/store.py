"""The one module that owns the DuckDB file: one connection, a cursor per thread, schema set-up and migration.

DuckDB allows a single writing process per file, so the daemon opens it once and hands cursors to its threads
(the span writer, rule groups, the query endpoint). Cursors share the database instance and see each other's
commits (MVCC); only the span writer writes spans.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import duckdb
import structlog

from evaluator.store.schema import DDL, SCHEMA_VERSION


class StoreError(Exception):
    """The store could not be opened or set up (locked by another process, unreadable, too new)."""


@dataclass(frozen=True)
class StoreSettings:
    path: str = "./evaluator.duckdb"
    memory_limit: str | None = None  # DuckDB syntax, e.g. "1GB"; None keeps DuckDB's default (80% of RAM)
    threads: int | None = None  # None keeps DuckDB's default (one per core)
    read_only: bool = False  # for eval/replay/sql over a stopped daemon's file: nothing is written


class Store:
    def __init__(self, settings: StoreSettings, log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.settings = settings
        self._log = log or structlog.get_logger("store")
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._con is not None:
                return
            path = self.settings.path
            if path != ":memory:" and not self.settings.read_only:
                parent = os.path.dirname(os.path.abspath(path))
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create the folder for {path}: {exc.strerror}") from None
            # No file access from SQL: rules and queries read the store, never the file system (read_csv('/etc/...'),
            # COPY, ATTACH, INSTALL/LOAD are refused by DuckDB itself). The daemon's own inserts use registered
            # Arrow tables, which this does not affect.
            config: dict[str, str | bool | int | float | list[str]] = {"enable_external_access": False}
            if self.settings.memory_limit:
                config["memory_limit"] = self.settings.memory_limit
            if self.settings.threads:
                config["threads"] = self.settings.threads
            if self.settings.read_only and not os.path.exists(path):
                raise StoreError(f"no DuckDB file at {path}")
            try:
                con = duckdb.connect(path, read_only=self.settings.read_only, config=config)
            except duckdb.Error as exc:
                hint = ""
                if "lock" in str(exc).lower():
                    hint = (" (a running daemon holds it: stop the daemon, or copy the file and its .wal and use "
                            "the copy)")
                raise StoreError(f"cannot open DuckDB file {path}: {exc}{hint}") from None
            try:
                if self.settings.read_only:
                    self._check_version(con)
                else:
                    self._migrate(con)
            except Exception:
                con.close()
                raise
            self._con = con
            self._log.info("store opened", path=path, duckdb=duckdb.__version__)

    def shutdown(self) -> None:
        """Checkpoint (fold the WAL into the file) and close. Idempotent."""
        with self._lock:
            con, self._con = self._con, None
        if con is None:
            return
        try:
            if not self.settings.read_only:
                con.execute("CHECKPOINT")
        except duckdb.Error as exc:  # the WAL still holds everything; the next open replays it
            self._log.warning("checkpoint at shutdown failed", error=str(exc))
        con.close()
        self._log.info("store closed", path=self.settings.path)

    @property
    def running(self) -> bool:
        return self._con is not None

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor for the calling thread; close it when done. DuckDB cursors are not thread-safe."""
        con = self._con
        if con is None:
            raise StoreError("store is not open")
        return con.cursor()

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log."""
        total = 0
        for p in (self.settings.path, self.settings.path + ".wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(p)
        return total

    # -- schema ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_version(con: duckdb.DuckDBPyConnection) -> None:
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except duckdb.Error:
            row = None
        if row is None:
            raise StoreError("not an otel-evaluator store (no meta table)")
        if int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"the file has schema version {row[0]}, newer than this otel-evaluator understands "
                             f"({SCHEMA_VERSION}); upgrade otel-evaluator")

    @staticmethod
    def _migrate(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("BEGIN")
        try:
            for stmt in DDL:
                con.execute(stmt)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the file has schema version {row[0]}, newer than this otel-evaluator understands "
                    f"({SCHEMA_VERSION}); upgrade otel-evaluator"
                )
            elif int(row[0]) < SCHEMA_VERSION:  # the DDL above added what is new; nothing is rewritten
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
