"""`otel-evaluator export`: every public table as zstd Parquet plus manifest.json, from a running daemon (chunked
through POST /query) and from its file; the files hold exactly the store's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
from conftest import RunningDaemon
from spans import T0, request, span

from evaluator.daemon import Daemon
from evaluator.store.schema import PUBLIC_TABLES, SCHEMA_VERSION
from evaluator.testing import loopback_config

HOUR_NS = 3600 * 1_000_000_000
NO_DAEMON = "http://127.0.0.1:9"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "OTEL_EVALUATOR_PROGRESS"}
    return subprocess.run([sys.executable, "-m", "evaluator", "export", *args], capture_output=True, text=True,
                          timeout=120, env={**environ, **(env or {})})


def fill(d: RunningDaemon) -> None:
    """Five runs (3 numbers, 6 strings, an array each) through the receiver, and rows in the rule tables."""
    d.export(request(*[span(attrs={"data.row_count": 100 + i, "data.freshness_lag_hours": i / 3, "ml.score": 0.5,
                                   **{f"data.tag{j}": f"v{i}-{j}" for j in range(5)}, "data.dataset": "payments",
                                   "data.bounds": [1.0, 2.0, float(i)]},
                            start=T0 + i * HOUR_NS, end=T0 + i * HOUR_NS + 1000) for i in range(5)]))
    for i in range(3):
        d.sql("INSERT INTO alerts (evaluated_at, rule_id, alert_name, group_name, kind, rung, owner, severity, series, "
              "from_state, state, value, threshold, consecutive_violations, summary, labels, violating_spans) VALUES "
              "(TIMESTAMP '2026-01-01 00:00:00' + INTERVAL (?) HOUR, 'g/A', 'A', 'g', 'threshold', 'freshness', "
              "'data-platform', 'page', '{\"data.dataset\": \"payments\"}', 'ok', 'firing', ?, '{\"op\": \">\"}', 1, "
              "'it''s late', '{}', [{'trace_id': 'ab', 'span_id': 'cd'}])", [i, 1.5 * i])
    d.sql("INSERT INTO alert_state VALUES ('g/A', 'f1', '{}', 'firing', 2.5, NULL, 'x', NULL, NULL, NULL, NULL, 1, "
          "NULL, 7, [], NULL, true)")
    d.sql("INSERT INTO rule_health VALUES ('g/A', 'g', 'A', 'threshold', 'ok', NULL, TIMESTAMP '2026-01-01', 0.01)")
    d.sql("INSERT INTO frozen_baselines VALUES ('g/B', 'f2', '{}', now(), now(), now(), [0.0, 1.0], NULL, "
          "[0.5, 0.5], 10)")
    for i in range(2):
        d.sql("INSERT INTO quality_values VALUES ('g/C', '{}', TIMESTAMP '2026-01-02', now(), now(), 'auc', ?, 10, "
              "8, 0.8, NULL)", [0.5 + i / 10])


def same_rows(con: duckdb.DuckDBPyConnection, table: str, path: Path, where: str = "") -> int:
    """The Parquet file holds exactly the table's rows (read back with pyarrow and with DuckDB); their count."""
    source = sorted(repr(r) for r in con.execute(f"SELECT * FROM {table} {where}").fetchall())
    arrow = pq.read_table(path)
    assert arrow.column_names == [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall()]
    back = sorted(repr(tuple(row.values())) for row in arrow.to_pylist())
    assert back == source, table
    for a, b in ((f"(SELECT * FROM {table} {where})", f"read_parquet('{path}')"),
                 (f"read_parquet('{path}')", f"(SELECT * FROM {table} {where})")):
        assert con.execute(f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})").fetchone() == (0,)
    meta = pq.ParquetFile(path).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            assert meta.row_group(g).column(c).compression == "ZSTD"
    return len(source)


def check_manifest(out: Path, mode: str, counts: dict[str, int], tables: tuple[str, ...] = PUBLIC_TABLES) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["source"]["mode"] == mode
    assert manifest["exported_at"].endswith("Z") and manifest["compression"] == "zstd"
    assert [t["table"] for t in manifest["tables"]] == list(tables)
    for t in manifest["tables"]:
        assert t["file"] == f"{t['table']}.parquet" and t["rows"] == counts[t["table"]]
        assert t["bytes"] == (out / t["file"]).stat().st_size
    spans = next(t for t in manifest["tables"] if t["table"] == "spans") if "spans" in tables else None
    if spans:
        assert {"name": "end_time", "type": "TIMESTAMP"} in spans["columns"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.parquet" for t in tables] + ["manifest.json"])


def test_export_from_a_daemon_in_chunks_and_from_its_file(tmp_path: Path) -> None:
    db = tmp_path / "evaluator.duckdb"
    daemon = Daemon(loopback_config(db))
    daemon.start()
    try:
        running = RunningDaemon(daemon)
        fill(running)
        # chunks of 4 rows: chunks end inside a span's attributes, and one span has 6 strings (more than a chunk)
        live = run_cli("--to", str(tmp_path / "live"), "--admin", running.admin_url, "--chunk-rows", "4")
        assert live.returncode == 0, live.stderr
        assert live.stderr == ""  # not a terminal: no progress line
        queries = daemon.telemetry.get("queries_total").value(outcome="ok")
        assert queries > 30  # many bounded requests, never one big one
        assert daemon.telemetry.get("queries_total").value(outcome="refused") == 0
    finally:
        daemon.shutdown()
    offline = run_cli("--to", str(tmp_path / "file"), "--admin", NO_DAEMON, "--db", str(db))
    assert offline.returncode == 0, offline.stderr
    lines = offline.stdout.splitlines()
    assert len(lines) == len(PUBLIC_TABLES) and lines[0].startswith("spans: 5 rows -> spans.parquet (")
    con = duckdb.connect()  # unrestricted: it reads the Parquet files and attaches the stopped daemon's file
    con.execute(f"ATTACH '{db}' AS store (READ_ONLY)")
    con.execute("USE store")
    for out, mode in ((tmp_path / "live", "daemon"), (tmp_path / "file", "file")):
        counts = {t: same_rows(con, t, out / f"{t}.parquet") for t in PUBLIC_TABLES}
        assert counts["spans"] == 5 and counts["span_numbers"] == 15 and counts["span_strings"] == 30
        assert counts["alerts"] == 3 and counts["quality_values"] == 2 and counts["alert_state"] == 1
        check_manifest(out, mode, counts)
    con.close()


def test_tables_since_progress_and_usage(tmp_path: Path) -> None:
    db = tmp_path / "evaluator.duckdb"
    daemon = Daemon(loopback_config(db))
    daemon.start()
    try:
        fill(RunningDaemon(daemon))
    finally:
        daemon.shutdown()
    since = "2025-10-09T10:53:20Z"  # T0 + 2 h: the last three runs
    out = tmp_path / "some"
    result = run_cli("--to", str(out), "--admin", NO_DAEMON, "--db", str(db), "--tables", "spans,span_numbers,alerts",
                     "--since", since, env={"OTEL_EVALUATOR_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr
    # one line rewritten in place (\r; text mode reads it as \n), cleared at the end of each table
    assert "spans: 3 / 3 rows (100%)\x1b[K" in result.stderr and "span_numbers: 9 / 9 rows" in result.stderr
    con = duckdb.connect()
    con.execute(f"ATTACH '{db}' AS store (READ_ONLY)")
    con.execute("USE store")
    counts = {"spans": same_rows(con, "spans", out / "spans.parquet", f"WHERE end_time >= TIMESTAMP '{since[:-1]}'"),
              "span_numbers": same_rows(con, "span_numbers", out / "span_numbers.parquet",
                                        f"WHERE time >= TIMESTAMP '{since[:-1]}'"),
              "alerts": same_rows(con, "alerts", out / "alerts.parquet")}
    con.close()
    assert counts == {"spans": 3, "span_numbers": 9, "alerts": 3}
    check_manifest(out, "file", counts, ("spans", "span_numbers", "alerts"))
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    assert manifest["since"] == "TIMESTAMP '2025-10-09 10:53:20'"

    quiet = run_cli("--to", str(tmp_path / "quiet"), "--db", str(db), "--tables", "spans",  # --db alone: the file
                    env={"OTEL_EVALUATOR_PROGRESS": "0"})
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert json.loads((tmp_path / "quiet" / "manifest.json").read_text())["source"]["mode"] == "file"
    bad = run_cli("--to", str(tmp_path / "bad"), "--admin", NO_DAEMON, "--db", str(db), "--tables", "spans,outbox")
    assert bad.returncode == 2 and "unknown table(s) outbox" in bad.stderr and not (tmp_path / "bad").exists()
    missing = run_cli("--to", str(tmp_path / "missing"), "--admin", NO_DAEMON, "--db", str(tmp_path / "no.duckdb"))
    assert missing.returncode == 2 and "no daemon at" in missing.stderr and "no DuckDB file" in missing.stderr
    bad_since = run_cli("--to", str(tmp_path / "x"), "--admin", NO_DAEMON, "--db", str(db), "--since", "yesterday")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
