"""The store's own parts: schema versioning, read-only opening, the background checkpointer."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from evaluator.store.checkpointer import Checkpointer
from evaluator.store.schema import SCHEMA_VERSION
from evaluator.store.store import Store, StoreError, StoreSettings
from evaluator.telemetry import Telemetry
from evaluator.testing import wait_for


def test_background_checkpointer_folds_the_wal(tmp_path: Path, thread_guard: None) -> None:
    store = Store(StoreSettings(str(tmp_path / "ev.duckdb")))
    store.start()
    tel = Telemetry()
    ck = Checkpointer(store, tel, wal_bytes=1024 * 1024, poll_seconds=0.01)
    ck.start()
    try:
        cur = store.cursor()
        assert cur.execute("SELECT current_setting('checkpoint_threshold')").fetchone() == ("4.0 MiB",)
        for k in range(100):  # many small commits, as the span writer makes (large ones bypass the WAL)
            cur.execute("INSERT INTO span_numbers SELECT i, TIMESTAMP '2026-01-01', 'data.x' || i, i "
                        f"FROM range({k * 2000}, {(k + 1) * 2000}) t(i)")
        cur.close()
        wait_for(lambda: tel.get("store_checkpoints_total").total() >= 1)
        wait_for(lambda: ck.wal_size() < 1024 * 1024)
    finally:
        ck.shutdown()
        ck.shutdown()
        store.shutdown()


def test_an_older_file_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "ev.duckdb")
    store = Store(StoreSettings(path))
    store.start()
    store.shutdown()
    con = duckdb.connect(path)
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    store.start()
    cur = store.cursor()
    assert cur.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
    cur.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    cur.close()
    store.shutdown()
    with pytest.raises(StoreError, match="newer than this otel-evaluator understands"):
        Store(StoreSettings(path)).start()
    with pytest.raises(StoreError, match="newer than this otel-evaluator understands"):
        Store(StoreSettings(path, read_only=True)).start()


def test_read_only_store_needs_an_existing_evaluator_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no DuckDB file"):
        Store(StoreSettings(str(tmp_path / "missing.duckdb"), read_only=True)).start()
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(StoreError, match="not an otel-evaluator store"):
        Store(StoreSettings(str(other), read_only=True)).start()


def test_sql_cannot_reach_the_file_system(tmp_path: Path) -> None:
    """Rules and queries read the store, never files: DuckDB refuses read_csv, COPY and ATTACH on the daemon's
    connection, so a sql rule that tries is unhealthy with a clear error."""
    from evaluator.rules.engine import MemoryState, RuleEngine
    from evaluator.rules.kinds import new_kinds
    from evaluator.rules.model import Condition, Rule, RuleGroup, RuleSet, SqlSpec

    store = Store(StoreSettings(str(tmp_path / "ev.duckdb")))
    store.start()
    try:
        cur = store.cursor()
        for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"COPY spans TO '{tmp_path}/out.csv'",
                    f"ATTACH '{tmp_path}/other.duckdb' AS other"):
            with pytest.raises(duckdb.PermissionException):
                cur.execute(sql)
        cur.close()
        rule = Rule(name="Snoop", group="g", kind="sql", rung="custom", owner="x", severity="info",
                    spec=SqlSpec("SELECT count(*) AS value FROM read_csv('/etc/passwd')"),
                    condition=Condition(">", 0.0))
        group = RuleGroup("g", 60.0, (rule,))
        engine = RuleEngine(store.cursor, new_kinds(), MemoryState())
        engine.load(RuleSet((group,)))
        engine.evaluate_group(group, 1_800_000_000.0)
        assert "Cannot access file" in (engine.health["g/Snoop"] or "")
        assert not (tmp_path / "out.csv").exists()
    finally:
        store.shutdown()
