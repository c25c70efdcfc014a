"""The real CLI daemon as a subprocess: durability under SIGKILL, graceful SIGTERM, start-up errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pytest
from conftest import TRACE_EXPORT
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from spans import request, span

from evaluator.daemon import Daemon
from evaluator.testing import DaemonProcess, daemon_process, loopback_config

# Spans are stamped now: a daemon on the system clock deletes spans older than its retention (35 days) at start.
NOW = time.time_ns()
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]

pytestmark = pytest.mark.slow


def _export(endpoint: str, req: Any) -> Any:
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                   response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
        return call(req.SerializeToString(), timeout=30)


def test_sigkill_right_after_ack_loses_no_acknowledged_span(tmp_path: Path) -> None:
    """Every span acknowledged before kill -9 is in the file after a restart (group commit is durable)."""
    db = tmp_path / "ev.duckdb"
    acked: list[str] = []
    stop = threading.Event()
    with daemon_process(["--db", str(db), *PORTS]) as proc:
        def client(worker: int) -> None:
            i = 0
            while not stop.is_set():
                sid = (worker << 32 | i + 1).to_bytes(8, "big")
                try:
                    _export(proc.grpc_endpoint, request(*[
                        span(attrs={"data.row_count": i, "data.worker": worker}, start=NOW,
                             span_id=(int.from_bytes(sid, "big") * 100 + j).to_bytes(8, "big"))
                        for j in range(50)]))
                except grpc.RpcError:
                    return  # the daemon died mid-call: not acknowledged
                acked.extend((int.from_bytes(sid, "big") * 100 + j).to_bytes(8, "big").hex() for j in range(50))
                i += 1

        workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in workers:
            t.start()
        while len(acked) < 2000:
            threading.Event().wait(0.01)
        proc.kill()  # SIGKILL while clients are mid-flight
        stop.set()
        for t in workers:
            t.join()
    assert len(acked) >= 2000
    # restart on the same file: the WAL is replayed
    with daemon_process(["--db", str(db), *PORTS]) as proc2:
        assert proc2.stop() == 0
    con = duckdb.connect(str(db), read_only=True)
    stored = {r[0] for r in con.execute("SELECT span_id FROM spans").fetchall()}
    con.close()
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged spans lost"


def test_sigterm_stops_gracefully_and_checkpoints(tmp_path: Path) -> None:
    """SIGTERM: exit 0, everything committed and checkpointed into the file (no WAL left)."""
    db = tmp_path / "ev.duckdb"
    with daemon_process(["--db", str(db), *PORTS]) as proc:
        _export(proc.grpc_endpoint, request(*[span(attrs={"data.row_count": i}, start=NOW) for i in range(10)]))
        assert proc.stop(signal.SIGTERM) == 0
    assert any("otel-evaluator stopped" in line for line in proc.lines)
    assert not (tmp_path / "ev.duckdb.wal").exists() or (tmp_path / "ev.duckdb.wal").stat().st_size == 0
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM spans").fetchone() == (10,)
    con.close()


def test_sigint_also_stops_gracefully(tmp_path: Path) -> None:
    with daemon_process(["--db", str(tmp_path / "ev.duckdb"), *PORTS]) as proc:
        assert proc.stop(signal.SIGINT) == 0


def test_invalid_config_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    """An invalid config fails at start-up with every problem listed by file, line and key; exit code 2."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "store:\n"
        "  path: 42\n"
        "  threads: zero\n"
        "receivers:\n"
        "  grpc:\n"
        "    listen: nowhere\n"
        "  max_request_size: 12 parsecs\n"
        "  retry_after: soon\n"
        "log:\n"
        "  level: loud\n"
        "colour: blue\n"
    )
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    err = result.stderr
    for expected in (f"{cfg}:2: store.path", f"{cfg}:3: store.threads", f"{cfg}:6: receivers.grpc.listen",
                     f"{cfg}:7: receivers.max_request_size", f"{cfg}:8: receivers.retry_after",
                     f"{cfg}:10: log.level", f"{cfg}:11: colour: unknown key"):
        assert expected in err, err


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", "--config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot read file" in result.stderr


def test_invalid_exporter_environment_exits_2(tmp_path: Path) -> None:
    """The OTEL_EXPORTER_OTLP_* variables are checked when the daemon is built: a bad one is a usage error."""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", *PORTS], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr and "OTEL_EXPORTER_OTLP_PROTOCOL" in result.stderr
    assert not (tmp_path / "evaluator.duckdb").exists()


def test_port_in_use_fails_start_up_with_exit_3(tmp_path: Path) -> None:
    """A busy port is a clear start-up error (exit 3), not a second daemon silently sharing it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag in ("--grpc-listen", "--http-listen"):
            args = [*PORTS]
            args[args.index(flag) + 1] = f"127.0.0.1:{port}"
            proc = DaemonProcess(["--db", str(tmp_path / "ev.duckdb"), *args])
            with pytest.raises(RuntimeError, match="start-up failed"):
                proc.start()
            assert proc.proc is not None and proc.proc.wait(30) == 3


def test_config_file_and_flags(tmp_path: Path) -> None:
    """A config file sets the store and ports; a flag overrides the file."""
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(
        f"store:\n  path: {tmp_path / 'from-file.duckdb'}\n"
        "receivers:\n  keep_prefixes: ['pipeline.']\n  http:\n    enabled: false\n"
        "  grpc:\n    listen: 127.0.0.1:0\n"
        "admin:\n  listen: 127.0.0.1:0\n"
    )
    with daemon_process(["--config", str(cfg)], cwd=str(tmp_path)) as proc:
        assert "http" not in proc.ports
        _export(proc.grpc_endpoint, request(span(attrs={"pipeline.rows": 1}, start=NOW),
                                            span(attrs={"data.rows": 1}, start=NOW)))
        with urllib.request.urlopen(proc.admin_url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
        assert proc.stop() == 0
    con = duckdb.connect(str(tmp_path / "from-file.duckdb"), read_only=True)
    assert con.execute("SELECT key FROM span_numbers").fetchall() == [("pipeline.rows",)]
    con.close()
    with daemon_process(["--config", str(cfg), "--db", str(tmp_path / "flag.duckdb")]) as proc:
        assert proc.stop() == 0
    assert (tmp_path / "flag.duckdb").exists()


def test_embedded_defaults_in_a_fresh_folder(tmp_path: Path) -> None:
    """No config and no flags but free ports: ./evaluator.duckdb in the working directory."""
    with daemon_process(PORTS, cwd=str(tmp_path)) as proc:
        assert proc.stop() == 0
    assert (tmp_path / "evaluator.duckdb").exists()


def test_second_daemon_on_the_same_file_fails_clearly(tmp_path: Path) -> None:
    db = str(tmp_path / "ev.duckdb")
    with daemon_process(["--db", db, *PORTS]):
        second = DaemonProcess(["--db", db, *PORTS])
        with pytest.raises(RuntimeError, match="cannot open DuckDB file"):
            second.start()
        assert second.proc is not None and second.proc.wait(30) == 3


def test_start_stop_start_leaves_no_threads(tmp_path: Path, thread_guard: None) -> None:
    """In-process: start -> stop -> start -> stop works and leaves no thread behind; stop is idempotent."""
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb"))
    daemon.shutdown()  # safe before start
    for round_ in range(2):
        daemon.start()
        endpoint = f"127.0.0.1:{daemon.grpc.port if daemon.grpc else 0}"
        _export(endpoint, request(span(attrs={"data.round": round_}, start=NOW)))
        daemon.shutdown()
        daemon.shutdown()
    daemon.start()
    cur = daemon.store.cursor()
    assert cur.execute("SELECT count(*) FROM spans").fetchone() == (2,)
    cur.close()
    daemon.shutdown()


def test_help_explains_the_defaults() -> None:
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for text in ("127.0.0.1:4317", "127.0.0.1:4318", "13133", "evaluator.duckdb", "SIGTERM"):
        assert text in result.stdout


def test_importing_the_cli_starts_no_thread() -> None:
    """`serve` blocks its stop signals before any thread exists; that needs a thread-free import of the CLI
    (a thread that predates the mask takes SIGTERM with the default action: killed, no graceful stop)."""
    code = "import os, evaluator.cli; print(len(os.listdir('/proc/self/task')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "1", result.stderr


def test_sigterm_the_moment_start_is_logged(tmp_path: Path) -> None:
    """SIGTERM while the daemon is still writing its start-up log line stops it gracefully (no deadlock)."""
    for i in range(5):
        with daemon_process(["--db", str(tmp_path / f"ev{i}.duckdb"), *PORTS]) as proc:
            assert proc.stop(signal.SIGTERM, timeout=30) == 0
        assert any("otel-evaluator stopped" in line for line in proc.lines)
