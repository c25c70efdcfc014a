"""`otel-evaluator demo`: with a daemon of its own (mode A) and with a running one (mode B), as a user runs it,
saying up front whose store the spans go into; options that contradict each other refused; the payments story's
data it sends."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from evaluator.demo import payments
from evaluator.testing import daemon_process

ROOT = Path(__file__).resolve().parent.parent
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _start_line(out: str, subject: str = payments.DATASET) -> str:
    """The rung marked "start here" in the block of one subject of a printed ladder (each subject has its own)."""
    lines = out.splitlines()
    block = lines[lines.index(subject) + 1:]
    block = block[:next((i for i, ln in enumerate(block) if not ln.startswith("  ")), len(block))]
    marked = [ln for ln in block if "<- start here" in ln]
    assert len(marked) == 1, out
    return marked[0]


def test_story_data_is_the_scenario() -> None:
    now = 1_800_000_000.0
    spans = payments.story(now)
    runs = [s for s in spans if s.name == payments.RUN_SPAN]
    assert len(runs) == 15 and all(s.service == payments.SERVICE for s in runs)
    assert [r.end_ns for r in runs] == sorted(r.end_ns for r in runs)
    assert all(s.end_ns < now * 1e9 for s in spans)
    assert runs[-1].attributes["data.freshness_lag_hours"] == 6.0
    assert runs[-1].attributes["data.row_count"] == 8_412_406
    assert all(r.attributes["data.freshness_lag_hours"] == 0.02 for r in runs[:-1])
    rows = [r.attributes["data.row_count"] for r in runs[:-1]]
    assert all(abs(x / 10_000_000 - 1) <= 0.025 for x in rows)
    healthy = runs[0].attributes["data.amount_paise.histogram.counts"]
    broken = runs[-1].attributes["data.amount_paise.histogram.counts"]
    assert len(healthy) == len(broken) == 10 and abs(sum(broken) - 8_412_406) <= 5
    assert healthy.index(max(healthy)) == 5 and broken.index(max(broken)) == 2  # Rs 100-1000 -> Rs 0.1-1
    txns = [s for s in spans if s.name == payments.TXN_SPAN]
    last6h = [s for s in txns if s.end_ns > (now - 6 * 3600) * 1e9]
    b = sorted(s.attributes["data.amount_paise"] for s in last6h if s.attributes["data.partner"] == "partner-b")
    a = sorted(s.attributes["data.amount_paise"] for s in last6h if s.attributes["data.partner"] == "partner-a")
    assert len(a) == len(b) == payments.TXN_PER_PARTNER_NOW
    assert 50 <= a[len(a) // 2] / b[len(b) // 2] <= 200  # partner-b reports rupees: 100x smaller
    assert payments.story(now) == spans  # deterministic


@pytest.mark.slow
def test_demo_starts_its_own_daemon_and_names_freshness_first(tmp_path: Path) -> None:
    result = _cli("demo", "--local", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    start = _start_line(result.stdout)
    assert "1. freshness" in start and "firing" in start and "(data-platform)" in start
    assert re.search(r"^done in \d+\.\d s", result.stdout, re.M), result.stdout
    store = re.search(r"store (\S+evaluator\.duckdb)", result.stdout)
    assert store is not None and not Path(store.group(1)).parent.exists()  # the temporary directory is gone
    assert "otel-evaluator demo --keep" in result.stdout and "docs/postmortem.md" in result.stdout


@pytest.mark.slow
def test_demo_keeps_its_store_for_ladder_and_sql(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = _cli("demo", "--local", "--keep", str(keep))
    assert result.returncode == 0, result.stdout + result.stderr
    db = keep / "evaluator.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        counts = dict(con.sql("SELECT name, count(*) FROM spans GROUP BY name").fetchall())
        firing = sorted(r[0] for r in con.sql("SELECT alert_name FROM alert_state s JOIN (SELECT DISTINCT rule_id, "
                                              "alert_name FROM alerts) USING (rule_id) WHERE state = 'firing'")
                        .fetchall())
    finally:
        con.close()
    assert counts == {payments.RUN_SPAN: 15, payments.TXN_SPAN: 620}
    assert firing == ["PaymentsAmountDrift", "PaymentsAmountMedian", "PaymentsAmountPSI", "PaymentsFreshnessLag",
                      "PaymentsRowCount"]
    ladder = _cli("ladder", "--db", str(db), "--rules", str(ROOT / "rules"))
    assert ladder.returncode == 0 and ladder.stderr == "", ladder.stderr
    assert ladder.stdout.splitlines()[0] == payments.DATASET
    assert "1. freshness" in _start_line(ladder.stdout)
    again = _cli("demo", "--local", "--keep", str(keep))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_demo_against_a_running_daemon(tmp_path: Path) -> None:
    with daemon_process(["--rules", str(ROOT / "rules"), *PORTS], cwd=str(tmp_path)) as proc:
        t0 = time.monotonic()
        result = _cli("demo", "--admin", proc.admin_url, "--endpoint", proc.grpc_endpoint)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        # said before anything is sent: which daemon, which store, and that the spans stay there
        assert lines[1] == (f"  using the daemon at {proc.admin_url}: the demo's spans go to its OTLP/gRPC endpoint "
                            f"{proc.grpc_endpoint} and into its store ({tmp_path / 'evaluator.duckdb'}), and stay "
                            "there: the demo cannot take them out again, and the daemon's rules judge them like any "
                            "other data."), result.stdout
        assert lines[2] == "  For a store of the demo's own: otel-evaluator demo --local (or --keep DIR)"
        assert lines[3].startswith("  sent 15 daily runs")
        assert "1. freshness" in _start_line(result.stdout)
        assert "otel_evaluator_spans_stored_total 635" in proc.metrics(), time.monotonic() - t0
        assert proc.stop() == 0


@pytest.mark.slow
def test_demo_says_plainly_when_the_running_daemon_has_no_payments_rules(tmp_path: Path) -> None:
    config = tmp_path / "evaluator.yaml"
    config.write_text("self_monitoring:\n  enabled: false\n")  # no group at all, not even the daemon's own
    with daemon_process(["--config", str(config), *PORTS], cwd=str(tmp_path)) as proc:
        result = _cli("demo", "--admin", proc.admin_url, "--endpoint", proc.grpc_endpoint)
        assert proc.stop() == 0
    assert result.returncode == 1
    assert "has no payments rules loaded" in result.stdout and "--rules rules/" in result.stdout
    assert f"the ladder is empty: the daemon at {proc.admin_url} has no rules loaded" in result.stdout


def test_demo_without_its_rules_fails_clearly(tmp_path: Path) -> None:
    result = _cli("demo", "--local", "--rules", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_demo_refuses_what_it_would_otherwise_ignore(tmp_path: Path) -> None:
    """--keep (a store of the demo's own daemon) with --admin or --endpoint (a running daemon), and an --admin
    where nothing answers (the demo would start a daemon of its own in its place): exit 2, nothing started."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again when the block ends
    keep = tmp_path / "demo"
    both = _cli("demo", "--keep", str(keep), "--admin", nobody)
    assert both.returncode == 2 and both.stdout == "" and not keep.exists()
    assert both.stderr == ("otel-evaluator: --keep runs the demo on a daemon of its own, and --admin names a running "
                           "daemon to use instead: give one or the other\n")
    local = _cli("demo", "--local", "--endpoint", "127.0.0.1:4317")
    assert local.returncode == 2 and "--local runs the demo on a daemon of its own, and --endpoint" in local.stderr
    absent = _cli("demo", "--admin", nobody)
    assert absent.returncode == 2 and absent.stdout == ""
    assert absent.stderr.startswith(f"otel-evaluator: nothing answers at {nobody} (")
    assert "drop --admin to let the demo start its own" in absent.stderr
