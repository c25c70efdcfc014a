"""`otel-evaluator demo`: with a daemon of its own (mode A) and with a running one (mode B), as a user runs it;
the payments story's data it sends."""

from __future__ import annotations

import re
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
NOBODY = "http://127.0.0.1:9"  # no daemon answers there


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _start_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if "<- start here" in ln]
    assert len(lines) == 1, out
    return lines[0]


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
    result = _cli("demo", "--admin", NOBODY, cwd=tmp_path)
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
    ladder = _cli("ladder", "--admin", NOBODY, "--db", str(db))
    assert ladder.returncode == 0, ladder.stderr
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
        assert f"using the daemon at {proc.admin_url}" in result.stdout
        assert "1. freshness" in _start_line(result.stdout)
        assert "otel_evaluator_spans_stored_total 635" in proc.metrics(), time.monotonic() - t0
        assert proc.stop() == 0


@pytest.mark.slow
def test_demo_says_plainly_when_the_running_daemon_has_no_payments_rules(tmp_path: Path) -> None:
    with daemon_process(PORTS, cwd=str(tmp_path)) as proc:
        result = _cli("demo", "--admin", proc.admin_url, "--endpoint", proc.grpc_endpoint)
        assert proc.stop() == 0
    assert result.returncode == 1
    assert "has no payments rules loaded" in result.stdout and "--rules rules/" in result.stdout
    assert "no dataset has alert state yet" in result.stdout


def test_demo_without_its_rules_fails_clearly(tmp_path: Path) -> None:
    result = _cli("demo", "--local", "--rules", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no such file or folder" in result.stderr
