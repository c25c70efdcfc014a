"""The docs stay true: the README walk-through works, and every SQL example in docs/ runs on the real schema."""

from __future__ import annotations

import functools
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from evaluator.store.store import Store, StoreSettings
from evaluator.testing import daemon_process

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]


def _sql_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```sql\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.name}#{i}", block))
    # and the statements README.md passes to `otel-evaluator sql "..."`
    statements = re.findall(r'otel-evaluator sql (?:--\S+ \S+ )*"([^"]+)"', README.read_text())
    for i, statement in enumerate(s for s in statements if "..." not in s):
        out.append((f"README.md#sql{i}", statement))
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


def _five_minutes() -> list[list[str]]:
    """The commands of the README's "Five minutes" sh blocks, each as an argv for this Python."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Five minutes"):readme.index("## Pointing your telemetry")]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.strip().splitlines():
            argv = shlex.split(line.strip())
            assert argv[0] == ".venv/bin/otel-evaluator", line
            commands.append([sys.executable, "-m", "evaluator", *argv[1:]])
    return commands


def _start_here(out: str) -> str:
    """The rung marked "start here" in the payments dataset's block of a printed ladder (each subject has one)."""
    lines = out.splitlines()
    block = lines[lines.index("payments/transactions_yesterday") + 1:]
    block = block[:next((i for i, ln in enumerate(block) if not ln.startswith("  ")), len(block))]
    marked = [ln for ln in block if "<- start here" in ln]
    assert len(marked) == 1, out
    return marked[0]


@pytest.mark.slow
def test_readme_walkthrough(tmp_path: Path) -> None:
    """The five-minute walk-through as the README shows it: the demo with its own daemon, keeping the store;
    ladder and sql on the kept file; then the demo and ladder against a daemon started with the payments rules."""
    readme = (ROOT / "README.md").read_text()
    assert 'make serve ARGS="--rules rules/"' in readme and "examples/send_run.py [--broken]" in readme
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 13133)) == 0:
            pytest.skip("something listens on the default admin port: the demo would use it")
    demo, ladder, sql, demo_live, ladder_live = _five_minutes()
    (tmp_path / "rules").symlink_to(ROOT / "rules")  # the README's commands run in the checkout
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert demo[3:] == ["demo", "--keep", "demo"]
    result = run(demo)
    assert result.returncode == 0, result.stdout + result.stderr
    start = _start_here(result.stdout)
    assert "1. freshness" in start and "firing" in start and "(data-platform)" in start

    result = run(ladder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "payments/transactions_yesterday"
    assert "1. freshness" in _start_here(result.stdout)

    from evaluator.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices  # type: ignore[union-attr]
    if "sql" in commands:
        result = run(sql)
        assert result.returncode == 0, result.stderr
        assert "PaymentsFreshnessLag" in result.stdout and "data-platform" in result.stdout, result.stdout

    live = tmp_path / "live"
    live.mkdir()
    with daemon_process(["--rules", str(ROOT / "rules"), *PORTS], cwd=str(live)) as proc:
        target = ["--admin", proc.admin_url]
        result = run([*demo_live, *target, "--endpoint", proc.grpc_endpoint])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"using the daemon at {proc.admin_url}" in result.stdout
        result = run([*ladder_live, *target])
        assert result.returncode == 0, result.stderr
        assert "1. freshness" in _start_here(result.stdout)
        result = run([sys.executable, str(ROOT / "examples/send_run.py"), "--broken", "--endpoint",
                      proc.grpc_endpoint])
        assert result.returncode == 0, result.stderr
        assert "otel_evaluator_spans_stored_total 636" in proc.metrics()
        assert proc.stop() == 0
    if "sql" not in commands:
        pytest.skip("the README's `sql` step waits for the sql command")


def test_every_documented_command_exists() -> None:
    documented = re.findall(r"^\| `(\w+)[ `]", (ROOT / "docs" / "cli.md").read_text(), re.M)
    assert documented == ["serve", "check", "test", "ladder", "eval", "replay", "sql", "export", "demo"]
    from evaluator.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    assert set(documented) == set(commands)
