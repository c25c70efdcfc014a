"""The benchmarks still run against the code as it is, at toy sizes, and what they check besides time holds.

Benchmarks call the engine, the kinds and the state machine directly; an API change that breaks them should
fail here, not on the day someone wants a figure. Nothing here looks at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_bench(name: str, *args: str, json_path: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args, "--json", str(json_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    data: dict[str, Any] = json.loads(json_path.read_text())
    return data


def test_replay_steps_a_group_hourly_and_per_step_agrees_with_chunks(tmp_path: Path) -> None:
    f = run_bench("replay.py", "--days", "40", "--repeats", "1", "--per-step-hours", "72",
                  json_path=tmp_path / "replay.json")
    assert f["evaluations"] == 40 * 24
    assert f["rules"] == 10
    assert f["spans"] == 40 * 4
    assert f["transitions"] > 0  # the warm-up of the baselines at least
    assert f["per_step_same_transitions"] is True
    assert f["cli_evaluations_per_second"] > 0  # the CLI ran and agreed with the engine (checked by the bench)


def test_eval_speed_runs_the_test_file_and_a_firing_ks_rule(tmp_path: Path) -> None:
    f = run_bench("eval_speed.py", "--repeats", "1", "--values", "2000", json_path=tmp_path / "eval.json")
    assert f["test_output_tail"] == "2 passed, 0 failed"
    assert 0.1 < f["ks_value"] <= 1.0  # the current window is shifted by half: the rule has something to see


def test_baseline_noise_tallies_healthy_and_incident_runs(tmp_path: Path) -> None:
    doc = run_bench("baseline_noise.py", "--scenario", "gauss2", "--scenario", "weekly",
                    "--method", "relative 10%", "--histories", "7", "--runs", "300", "--incident-runs", "400",
                    "--seeds", "1", "--jobs", "1", json_path=tmp_path / "noise.json")
    rows = {(r["scenario"], r["exclude"]): r for r in doc["results"]}
    assert len(rows) == 4
    # a 10% band on 2% Gaussian noise is five standard deviations: nothing healthy alerts, and a 30% drop is
    # caught on every incident run
    quiet = rows[("gauss2", "violations")]
    assert quiet["healthy_violated"] == 0.0
    assert quiet["incident_detected"] == 100.0
    assert quiet["after_violated"] == 0.0
    # weekends at 55-60% of the weekday level violate a 10% band every week without seasonality: 2 runs in 7
    weekly = rows[("weekly", "violations")]
    assert 20.0 < weekly["healthy_violated"] < 40.0
    # with for_runs 1 a series fires exactly on its violating runs; for_runs 2 needs two in a row
    for r in rows.values():
        assert r["healthy_firing_r1"] == r["healthy_violated"]
        assert r["healthy_firing_r2"] <= r["healthy_firing_r1"]


def test_rules_bench_runs_on_the_engine_api(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rules.py"), "--datasets", "4", "--days", "15",
                           "--repeats", "2"], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index('{\n  "rules"'):])  # after the engine's log lines
    assert out["rules"] == 4
    assert out["runs"] == 60
