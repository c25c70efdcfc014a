"""The docs stay true: the README walk-through works, and every SQL example in docs/ runs on the real schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from evaluator.store.store import Store, StoreSettings
from evaluator.testing import daemon_process

ROOT = Path(__file__).resolve().parent.parent
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]


def _sql_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```sql\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.name}#{i}", block))
    return out


@pytest.mark.parametrize("name,query", _sql_blocks(), ids=[n for n, _ in _sql_blocks()])
def test_documented_sql_runs_on_the_schema(tmp_path: Path, name: str, query: str) -> None:
    store = Store(StoreSettings(str(tmp_path / "ev.duckdb")))
    store.start()
    cur = store.cursor()
    try:
        cur.execute(query).fetchall()
    finally:
        cur.close()
        store.shutdown()


@pytest.mark.slow
def test_readme_walkthrough(tmp_path: Path) -> None:
    """The five-minute walk-through: send a healthy and a broken run with the SDK, stop, query the runs."""
    readme = (ROOT / "README.md").read_text()
    assert 'make serve ARGS="--rules rules/"' in readme and "examples/send_run.py --broken" in readme
    with daemon_process(["--rules", str(ROOT / "rules"), *PORTS], cwd=str(tmp_path)) as proc:
        for extra in ([], ["--broken"]):
            result = subprocess.run([sys.executable, str(ROOT / "examples/send_run.py"), "--endpoint",
                                     proc.grpc_endpoint, *extra], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
        assert "otel_evaluator_spans_stored_total 2" in proc.metrics()
        assert proc.stop() == 0
    result = subprocess.run([sys.executable, "-m", "evaluator", "eval", "--db", str(tmp_path / "evaluator.duckdb"),
                             "--rules", str(ROOT / "rules"), "--at", "now"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    firing = [ln for ln in result.stdout.splitlines() if " firing " in ln]
    assert len(firing) == 1 and "PaymentsFreshnessLag" in firing[0], result.stdout
    con = duckdb.connect(str(tmp_path / "evaluator.duckdb"), read_only=True)
    rows = con.sql("SELECT n.key, n.value FROM spans s JOIN span_numbers n USING (span_key) "
                   "WHERE s.name = 'features.daily.run' ORDER BY s.end_time, n.key").fetchall()
    con.close()
    assert rows == [("data.amount_paise.median", 22000.0), ("data.freshness_lag_hours", 0.02),
                    ("data.row_count", 10240883.0), ("data.amount_paise.median", 55.0),
                    ("data.freshness_lag_hours", 6.0), ("data.row_count", 8412406.0)]


def test_every_documented_command_exists() -> None:
    documented = re.findall(r"^\| `(\w+)[ `]", (ROOT / "docs" / "cli.md").read_text(), re.M)
    assert documented == ["serve", "check", "test", "ladder", "eval", "replay"]
    from evaluator.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    assert set(documented) == set(commands)
