"""The ladder: on the payments broken day, freshness is where to start; from the daemon and from its file."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from test_rules_e2e import DAY, RULES, T0, send_days

from evaluator.daemon import Daemon
from evaluator.testing import FakeClock, loopback_config

DATASET = "payments/transactions_yesterday"


def test_ladder_names_freshness_first_from_the_daemon_and_from_the_file(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 14 * DAY + 7 * 3600)
    db = tmp_path / "ev.duckdb"
    daemon = Daemon(loopback_config(db, rules=(str(RULES),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        send_days(f"127.0.0.1:{daemon.grpc.port}", range(0, 15), broken={14})
        daemon.engine.evaluate_group(daemon.engine.ruleset.groups[0], clock.now())
        admin = f"http://127.0.0.1:{daemon.admin.port}"
        with urllib.request.urlopen(admin + "/ladder", timeout=5) as resp:
            (ladder,) = json.loads(resp.read())
        assert ladder["dataset"] == DATASET and ladder["start_here"] == "freshness"
        status = {r["rung"]: (r["status"], r["owner"]) for r in ladder["rungs"]}
        assert status == {"freshness": ("firing", "data-platform"), "completeness": ("firing", "producer-team"),
                          "distribution": ("firing", "partner-integration"), "prediction_quality": ("ok", None)}
        with urllib.request.urlopen(admin + "/alerts", timeout=5) as resp:
            alerts = json.loads(resp.read())
        assert sorted(a["alert"] for a in alerts) == ["PaymentsAmountMedian", "PaymentsAmountPSI",
                                                      "PaymentsFreshnessLag", "PaymentsRowCount"]
        live = subprocess.run([sys.executable, "-m", "evaluator", "ladder", "--admin", admin],
                              capture_output=True, text=True, timeout=60)
        assert live.returncode == 0, live.stderr
    finally:
        daemon.shutdown()
    for out in (live.stdout, subprocess.run(
            [sys.executable, "-m", "evaluator", "ladder", "--admin", "http://127.0.0.1:9", "--db", str(db),
             "--dataset", DATASET], capture_output=True, text=True, timeout=60).stdout):
        lines = out.splitlines()
        assert lines[0] == DATASET
        start = [ln for ln in lines if "<- start here" in ln]
        assert len(start) == 1 and "1. freshness" in start[0] and "firing" in start[0], out
        assert "(data-platform)" in start[0]
