"""Admin POST /query and `otel-evaluator sql`: one read-only statement, refused otherwise, within row, time and
concurrency limits; JSON, CSV and Arrow agree. Against the real daemon, spans sent through its gRPC receiver."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pyarrow as pa
import pytest
from conftest import RunningDaemon
from spans import T0, request, span

from evaluator.admin.server import AdminSettings
from evaluator.daemon import Daemon
from evaluator.postmortem.query import QueryLimits, column_values, text_value
from evaluator.testing import daemon_process, loopback_config

PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
SLOW = "SELECT count(*) FROM range(1000000000000) a"  # ~minutes of work: only an interrupt ends it


def post(url: str, body: Any, *, content_type: str = "application/json", accept: str | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if not isinstance(body, str)
                                                 else body.encode())
    headers = {"Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    req = urllib.request.Request(url + "/query", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def query(d: RunningDaemon, sql: str, **fields: Any) -> tuple[int, Any]:
    status, _, body = post(d.admin_url, {"sql": sql, **fields})
    return status, json.loads(body)


def send_runs(d: RunningDaemon, n: int = 3) -> None:
    d.export(request(*[span(attrs={"data.row_count": 1000 + i, "data.dataset": f"ds{i % 2}",
                                   "data.bounds": [1.5, 2.5], "ml.big": 2**60 + i},
                            start=T0 + i * 60_000_000_000) for i in range(n)]))


def metric(d: RunningDaemon, outcome: str) -> float:
    return d.daemon.telemetry.get("queries_total").value(outcome=outcome)


# -- results ------------------------------------------------------------------------------------------------------
def test_json_csv_and_arrow_carry_the_same_values(daemon: RunningDaemon) -> None:
    send_runs(daemon)
    sql = ("SELECT s.span_key, s.name, s.end_time, n.key, n.value, a.numbers, "
           "'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, (2::BIGINT ** 60)::BIGINT AS big, NULL AS nothing, "
           "{'k': 1} AS struct, 1.25::DECIMAL(10, 2) AS dec, TIMESTAMPTZ '2026-01-02 03:04:05+00' AS tz, "
           "INTERVAL 90 MINUTE AS iv, true AS yes "
           "FROM spans s JOIN span_numbers n USING (span_key) JOIN span_arrays a USING (span_key) "
           "WHERE n.key = 'data.row_count' ORDER BY s.span_key")
    status, doc = query(daemon, sql)
    assert status == 200, doc
    assert doc["row_count"] == 3 and doc["truncated"] is False and doc["elapsed_seconds"] >= 0
    names = [c["name"] for c in doc["columns"]]
    types = {c["name"]: c["type"] for c in doc["columns"]}
    assert types["end_time"] == "TIMESTAMP" and types["value"] == "DOUBLE" and types["numbers"] == "DOUBLE[]"
    first = dict(zip(names, doc["rows"][0], strict=True))
    assert first["name"] == "features.daily.run" and first["value"] == 1000.0
    assert first["end_time"] == "2025-10-09T08:53:20.001000"  # T0 + 1 ms, ISO-8601, naive UTC as stored
    assert first["numbers"] == [1.5, 2.5]
    assert (first["nan"], first["inf"], first["big"], first["nothing"]) == ("NaN", "Infinity", str(2**60), None)
    assert first["struct"] == {"k": 1} and first["dec"] == 1.25 and first["yes"] is True
    assert first["tz"] == "2026-01-02T03:04:05+00:00" and first["iv"] == "PT5400S"

    status, headers, body = post(daemon.admin_url, {"sql": sql, "format": "csv"})
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == names
    assert table[1:] == [[text_value(v) for v in row] for row in doc["rows"]]

    status, headers, body = post(daemon.admin_url, {"sql": sql}, accept="application/vnd.apache.arrow.stream")
    assert status == 200 and headers["Content-Type"] == "application/vnd.apache.arrow.stream"
    assert headers["X-Row-Count"] == "3" and headers["X-Truncated"] == "false"
    arrow = pa.ipc.open_stream(body).read_all()
    assert arrow.column_names == names and arrow.schema.field("end_time").type == pa.timestamp("us")
    assert [list(r) for r in zip(*[column_values(c) for c in arrow.columns], strict=True)] == doc["rows"]


def test_text_plain_body_and_describe_show_explain(daemon: RunningDaemon) -> None:
    status, _, body = post(daemon.admin_url, "SELECT 41 + 1 AS answer", content_type="text/plain")
    assert status == 200 and json.loads(body)["rows"] == [[42]]
    for sql, column in (("DESCRIBE spans", "column_name"), ("SHOW TABLES", "name"), ("SUMMARIZE alerts", "min"),
                        ("EXPLAIN SELECT count(*) FROM spans", "explain_value"),
                        ("EXPLAIN ANALYZE SELECT count(*) FROM spans", "explain_value"),
                        ("FROM spans LIMIT 1", "span_key"), ("VALUES (1)", "col0")):
        status, doc = query(daemon, sql)
        assert status == 200, (sql, doc)
        assert column in [c["name"] for c in doc["columns"]], (sql, doc["columns"])


def test_row_limit_truncates_and_can_be_raised_up_to_the_maximum(make_daemon: Any) -> None:
    d = make_daemon(admin=AdminSettings(listen="127.0.0.1:0", query=QueryLimits(default_rows=100, max_rows=5000)))
    status, doc = query(d, "SELECT i FROM range(25000) t(i) ORDER BY i")
    assert status == 200 and doc["row_count"] == 100 and doc["truncated"] is True
    assert doc["rows"][-1] == [99]
    status, doc = query(d, "SELECT i FROM range(4000) t(i)", max_rows=4000)
    assert status == 200 and doc["row_count"] == 4000 and doc["truncated"] is False
    status, doc = query(d, "SELECT i FROM range(4000) t(i)", max_rows=10)
    assert doc["row_count"] == 10 and doc["truncated"] is True
    status, doc = query(d, "SELECT 1", max_rows=5001)
    assert status == 400 and "over the limit of 5000" in doc["error"]
    status, headers, body = post(d.admin_url, {"sql": "SELECT i FROM range(300) t(i)", "format": "arrow"})
    assert headers["X-Truncated"] == "true" and pa.ipc.open_stream(body).read_all().num_rows == 100


def test_a_slow_query_is_interrupted_at_its_time_limit_and_ingest_goes_on(daemon: RunningDaemon) -> None:
    start = time.monotonic()
    status, doc = query(daemon, SLOW, timeout=1)
    took = time.monotonic() - start
    assert status == 400 and doc["reason"] == "timeout", doc
    assert "time limit of 1 s" in doc["error"]
    assert took < 5, took
    assert metric(daemon, "timeout") == 1
    send_runs(daemon, 2)  # the store and the receivers are unaffected
    assert daemon.sql("SELECT count(*) FROM spans") == [(2,)]
    status, doc = query(daemon, "SELECT count(*) AS n FROM spans")
    assert status == 200 and doc["rows"] == [[2]]


def test_too_many_concurrent_queries_answer_503_with_retry_after(make_daemon: Any) -> None:
    d = make_daemon(admin=AdminSettings(listen="127.0.0.1:0", query=QueryLimits(max_concurrent=1)))
    results: list[tuple[int, Any]] = []
    slow = threading.Thread(target=lambda: results.append(query(d, SLOW, timeout=3)))
    slow.start()
    try:
        time.sleep(0.5)
        status, headers, body = post(d.admin_url, {"sql": "SELECT 1"})
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(body)["reason"] == "busy"
    finally:
        slow.join(30)
    assert results and results[0][1]["reason"] == "timeout"
    assert query(d, "SELECT 1")[0] == 200
    assert metric(d, "busy") == 1 and metric(d, "ok") == 1


def test_bad_requests(daemon: RunningDaemon) -> None:
    status, _, body = post(daemon.admin_url, {"sql": "SELECT 1", "format": "xml"})
    assert status == 400 and "unknown format" in json.loads(body)["error"]
    status, _, body = post(daemon.admin_url, b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = post(daemon.admin_url, {"query": "SELECT 1"})
    assert status == 400 and '"sql"' in json.loads(body)["error"]
    status, _, body = post(daemon.admin_url, {"sql": "SELECT " + "1 + " * 300_000 + "1"})
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    status, _, body = post(daemon.admin_url, {"sql": "SELEC 1"})
    assert status == 400 and json.loads(body)["reason"] == "error" and "does not parse" in json.loads(body)["error"]
    status, _, body = post(daemon.admin_url, {"sql": "SELECT * FROM no_such_table"})
    doc = json.loads(body)
    assert status == 400 and "no_such_table does not exist" in doc["error"] and "EXPLAIN" not in doc["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(daemon.admin_url + "/query", timeout=5)
    assert err.value.code == 405
    metrics = urllib.request.urlopen(daemon.admin_url + "/metrics", timeout=5).read().decode()
    assert 'otel_evaluator_queries_total{outcome="error"} 2' in metrics
    assert 'otel_evaluator_queries_total{outcome="refused"} 3' in metrics


# -- refusals -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, Path]]:
    tmp = tmp_path_factory.mktemp("refusals")
    daemon = Daemon(loopback_config(tmp / "evaluator.duckdb"))
    daemon.start()
    running = RunningDaemon(daemon)
    send_runs(running)
    try:
        yield running, tmp
    finally:
        daemon.shutdown()
    # after every refusal, the file itself: the three spans, no table or view x, nothing attached or exported
    con = duckdb.connect(str(tmp / "evaluator.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM spans").fetchall() == [(3,)]
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'x'").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'x'").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM meta").fetchall() == [(1,)]
    finally:
        con.close()


REFUSALS = [
    ("INSERT INTO meta VALUES ('x', 'y')", "INSERT"),
    ("UPDATE spans SET name = 'x'", "UPDATE"),
    ("DELETE FROM spans", "DELETE"),
    ("TRUNCATE spans", "DELETE"),
    ("MERGE INTO meta USING meta AS m ON true WHEN MATCHED THEN DELETE", "MERGE"),
    ("CREATE TABLE x AS SELECT 1 AS a", "CREATE"),
    ("CREATE TABLE x (a INTEGER)", "CREATE"),
    ("CREATE VIEW x AS SELECT 1", "CREATE"),
    ("DROP TABLE spans", "DROP"),
    ("ALTER TABLE spans ADD COLUMN x INTEGER", "ALTER"),
    ("COPY spans TO '{tmp}/out.csv'", "COPY"),
    ("COPY meta FROM '/etc/passwd'", "COPY"),
    ("ATTACH '{tmp}/x.duckdb' AS x", "ATTACH"),
    ("DETACH evaluator", "DETACH"),
    ("INSTALL httpfs", "INSTALL/LOAD"),
    ("LOAD httpfs", "INSTALL/LOAD"),
    ("SET threads = 1", "SET"),
    ("RESET threads", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("EXPORT DATABASE '{tmp}/dump'", "EXPORT DATABASE"),
    ("IMPORT DATABASE '{tmp}/dump'", "IMPORT DATABASE"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("ANALYZE", "ANALYZE"),
    ("BEGIN TRANSACTION", "transaction"),
    ("COMMIT", "transaction"),
    ("ROLLBACK", "transaction"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("USE memory", "SET"),
    ("UPDATE EXTENSIONS", "this statement"),
    ("PIVOT spans ON name", "PIVOT"),
    ("CREATE MACRO x(a) AS a", "CREATE"),
    ("CREATE SECRET (TYPE s3)", "CREATE"),
    ("SELECT 1; DELETE FROM spans", "2 statements"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("WITH d AS (DELETE FROM spans RETURNING *) SELECT count(*) FROM d", "DELETE in its plan"),
    ("WITH i AS (INSERT INTO meta VALUES ('x', 'y') RETURNING *) SELECT * FROM i", "INSERT in its plan"),
    ("EXPLAIN ANALYZE WITH d AS (DELETE FROM spans RETURNING *) SELECT count(*) FROM d", "DELETE in its plan"),
    ("EXPLAIN DELETE FROM spans", "DELETE (or TRUNCATE) after EXPLAIN"),
    ("SELECT nextval('alerts_seq')", "tries to write"),
    ("SELECT * FROM checkpoint()", "CHECKPOINT in its plan"),
    ("SELECT * FROM read_csv('/etc/passwd')", "cannot read files"),
    ("SELECT * FROM read_text('/etc/passwd')", "cannot read files"),
    ("SELECT * FROM read_parquet('/etc/passwd')", "cannot read files"),
    ("SELECT * FROM glob('/etc/*')", "cannot read files"),
    ("SELECT $x", "parameters"),
]


def _state(d: RunningDaemon) -> list[Any]:
    counts = [d.sql(f"SELECT count(*) FROM {t}")[0][0] for t in ("spans", "span_numbers", "span_strings",
                                                                  "span_arrays", "meta", "alerts")]
    tables = sorted(r[0] for r in d.sql("SELECT table_name FROM duckdb_tables()"))
    views = sorted(r[0] for r in d.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal"))
    sequences = d.sql("SELECT sequence_name, last_value FROM duckdb_sequences() ORDER BY 1")
    databases = sorted(r[0] for r in d.sql("SELECT database_name FROM duckdb_databases()"))
    settings = d.sql("SELECT value FROM duckdb_settings() WHERE name IN ('threads', 'enable_profiling') ORDER BY name")
    return [counts, tables, views, sequences, databases, settings]


@pytest.mark.parametrize("sql,named", REFUSALS, ids=[s for s, _ in REFUSALS])
def test_every_kind_of_write_or_file_access_is_refused_and_changes_nothing(
        shared: tuple[RunningDaemon, Path], sql: str, named: str) -> None:
    d, tmp = shared
    sql = sql.format(tmp=tmp)
    before = _state(d)
    refused = metric(d, "refused")
    status, headers, body = post(d.admin_url, {"sql": sql})
    doc = json.loads(body)
    assert status == 400 and headers["Content-Type"] == "application/json", doc
    assert doc["reason"] == "refused", doc
    assert doc["error"].startswith("refused") and named in doc["error"], doc["error"]
    assert "root:" not in body.decode()  # /etc/passwd was not read
    assert metric(d, "refused") == refused + 1
    assert _state(d) == before
    assert "x" not in before[1]
    assert not any(p.name != "evaluator.duckdb" and not p.name.startswith("evaluator.duckdb")
                   for p in tmp.iterdir()), list(tmp.iterdir())


# -- the sql command ---------------------------------------------------------------------------------------------
def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], capture_output=True, text=True, timeout=120,
                          input=stdin)


def test_sql_command_against_a_running_daemon_and_its_file(tmp_path: Path) -> None:
    db = tmp_path / "evaluator.duckdb"
    with daemon_process(["--db", str(db), *PORTS]) as proc:
        d_admin = proc.admin_url
        with grpc.insecure_channel(proc.grpc_endpoint) as channel:
            call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                       request_serializer=None, response_deserializer=None)
            call(request(*[span(attrs={"data.row_count": 10 * i, "data.dataset": "payments"}) for i in range(3)])
                 .SerializeToString(), timeout=30)
        live = run_cli("sql", "--admin", d_admin, "SELECT key, value FROM span_numbers ORDER BY value")
        assert live.returncode == 0, live.stderr
        assert live.stdout.splitlines() == ["key            | value",
                                            "---------------+------",
                                            "data.row_count |   0.0",
                                            "data.row_count |  10.0",
                                            "data.row_count |  20.0",
                                            "3 rows"]
        piped = run_cli("sql", "--admin", d_admin, "--format", "csv", "-",
                        stdin="SELECT count(*) AS n FROM spans")
        assert piped.returncode == 0 and piped.stdout == "n\n3\n", piped
        refused = run_cli("sql", "--admin", d_admin, "DELETE FROM spans")
        assert refused.returncode == 1 and "refused DELETE" in refused.stderr and refused.stdout == ""
        truncated = run_cli("sql", "--admin", d_admin, "--max-rows", "2", "SELECT * FROM range(5)")
        assert truncated.returncode == 0
        assert truncated.stdout.splitlines()[-2:] == ["2 rows", "(truncated at 2 rows: raise --max-rows or narrow "
                                                      "the query)"]
        slow = run_cli("sql", "--admin", d_admin, "--timeout", "1", SLOW)
        assert slow.returncode == 1 and "time limit" in slow.stderr
        as_json = json.loads(run_cli("sql", "--admin", d_admin, "--format", "json", "SELECT 1 AS a").stdout)
        assert as_json["rows"] == [[1]] and as_json["columns"] == [{"name": "a", "type": "INTEGER"}]
        # while the daemon holds the file, the file cannot be read: no daemon at the address and a locked file
        locked = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db), "SELECT 1")
        assert locked.returncode == 2 and "no daemon at http://127.0.0.1:9" in locked.stderr
        assert proc.stop() == 0
    offline = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db),
                      "SELECT key, value FROM span_numbers ORDER BY value")
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == live.stdout
    assert run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db), "--format", "csv",
                   "SELECT count(*) AS n FROM spans").stdout == "n\n3\n"
    refused = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db),
                      "WITH d AS (DELETE FROM spans RETURNING *) SELECT count(*) FROM d")
    assert refused.returncode == 1 and "refused: the query tries to write;" in refused.stderr  # the file is read-only
    passwd = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db), "SELECT * FROM read_csv('/etc/passwd')")
    assert passwd.returncode == 1 and "cannot read files" in passwd.stderr and "root:" not in passwd.stdout
    slow = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db), "--timeout", "1", SLOW)
    assert slow.returncode == 1 and "time limit of 1 s" in slow.stderr
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM spans").fetchall() == [(3,)]
    con.close()
    missing = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(tmp_path / "nope.duckdb"), "SELECT 1")
    assert missing.returncode == 2 and "no DuckDB file" in missing.stderr
    file_only = run_cli("sql", "--db", str(db), "--format", "json", "SELECT count(*) AS n FROM spans")  # no --admin
    assert file_only.returncode == 0 and json.loads(file_only.stdout)["rows"] == [[3]], file_only.stderr
    missing = run_cli("sql", "--db", str(tmp_path / "nope.duckdb"), "SELECT 1")
    assert missing.returncode == 2 and "no DuckDB file" in missing.stderr and "no daemon" not in missing.stderr
    empty = run_cli("sql", "--admin", "http://127.0.0.1:9", "--db", str(db), "-", stdin="  ")
    assert empty.returncode == 2 and "no SQL" in empty.stderr


def test_table_rendering_pads_and_right_aligns_numbers() -> None:
    from evaluator.commands.sql import render_table

    doc = {"columns": [{"name": "name", "type": "VARCHAR"}, {"name": "n", "type": "BIGINT"},
                       {"name": "at", "type": "TIMESTAMP"}],
           "rows": [["a", 1, "2026-01-01T00:00:00"], ["bbbbbb", 12345, None], ["two\nlines", None, None]],
           "row_count": 3, "truncated": False}
    assert render_table(doc).splitlines() == [
        "name       | n     | at",
        "-----------+-------+--------------------",
        "a          |     1 | 2026-01-01T00:00:00",
        "bbbbbb     | 12345 |",
        "two\\nlines |       |",
        "3 rows",
    ]
    assert render_table({**doc, "rows": doc["rows"][:1], "row_count": 1}).splitlines()[-1] == "1 row"


def test_limits_from_the_config_file(tmp_path: Path) -> None:
    from evaluator.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("admin:\n  query:\n    default_rows: 50\n    max_rows: 2000\n    timeout: 5s\n"
                        "    max_concurrent: 4\n")
    cfg = load_config(str(cfg_file))
    assert cfg.admin.query == replace(QueryLimits(), default_rows=50, max_rows=2000, timeout_seconds=5.0,
                                      max_concurrent=4)


def test_documented_query_limits_are_the_defaults(tmp_path: Path) -> None:
    import yaml

    from evaluator.config import load_config

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"admin": {"query": block["admin"]["query"]}}))
    assert load_config(str(path)).admin.query == QueryLimits()
