"""Rule evaluation benchmark: 1,000 rules (half threshold, half baseline) over a year of daily runs for 1,000
datasets (365,000 run spans), each rule watching one dataset. Times one evaluation tick of all of them:

- first: no alert state yet; per-run rules judge each series' whole history (a baseline walks it from the first
  run), reporting only the transitions within their lookback (7 days);
- next day: one new run per dataset arrived since the last tick (the steady state of a daily pipeline);
- idle: no new run since the last tick (most ticks of a daily pipeline evaluated every minute).

    .venv/bin/python bench/rules.py              # prints medians of 5 repeats, in seconds
    .venv/bin/python bench/rules.py --datasets 200

Spans go in through the real writer (Arrow columns, group commit); rules through the real engine and DuckDB state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluator.receiver.columns import (
    ARRAY_SCHEMA,
    NUMBER_SCHEMA,
    SPAN_SCHEMA,
    STRING_SCHEMA,
    SpanColumns,
)
from evaluator.rules.backends import DuckDBState
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.model import BaselineSpec, Condition, Rule, RuleGroup, RuleSet, Selector, ThresholdSpec
from evaluator.store.store import Store, StoreSettings
from evaluator.store.writer import SpanWriter
from evaluator.telemetry import Telemetry

DAY = 86400
T0 = 1_761_955_200  # 2025-11-01T00:00:00Z


def day_columns(day: int, datasets: int, rng: np.random.Generator) -> SpanColumns:
    """One run per dataset on `day` at 06:00 UTC with data.row_count and data.freshness_lag_hours."""
    n = datasets
    end_us = np.full(n, (T0 + day * DAY + 6 * 3600) * 1_000_000, dtype=np.int64)
    ids = rng.integers(1, 2**62, size=(n, 3))
    spans = pa.table([
        pa.array([f"{a:016x}{b:016x}" for a, b in ids[:, :2]]), pa.array([f"{c:016x}" for c in ids[:, 2]]),
        pa.nulls(n, pa.string()), pa.array(["pipeline.run"] * n), pa.array(np.ones(n, np.int32)),
        pa.array(end_us - 60_000_000, pa.timestamp("us")), pa.array(end_us, pa.timestamp("us")),
        pa.array(np.zeros(n, np.int32)), pa.nulls(n, pa.string()), pa.array(["bench-pipelines"] * n),
        pa.nulls(n, pa.string()), pa.array(["{}"] * n),
    ], schema=SPAN_SCHEMA)
    idx = np.arange(n, dtype=np.int32)
    rows = rng.normal(1_000_000, 10_000, n)
    lag = np.abs(rng.normal(0.1, 0.05, n))
    numbers = pa.table([pa.array(np.concatenate([idx, idx])),
                        pa.array(["data.row_count"] * n + ["data.freshness_lag_hours"] * n),
                        pa.array(np.concatenate([rows, lag]))], schema=NUMBER_SCHEMA)
    strings = pa.table([pa.array(idx), pa.array(["data.dataset"] * n), pa.array([f"ds-{i:04d}" for i in range(n)])],
                       schema=STRING_SCHEMA)
    arrays = ARRAY_SCHEMA.empty_table()
    return SpanColumns(spans, numbers, strings, arrays)


def make_rules(datasets: int) -> RuleSet:
    rules = []
    for i in range(datasets):
        sel = Selector(span="pipeline.run", service="bench-pipelines", where=(("data.dataset", f"ds-{i:04d}"),))
        if i % 2:
            rules.append(Rule(name=f"lag-{i}", group="bench", kind="threshold", rung="freshness", owner="bench",
                              severity="page", spec=ThresholdSpec("data.freshness_lag_hours"),
                              condition=Condition(">", 0.5), selector=sel))
        else:
            rules.append(Rule(name=f"rows-{i}", group="bench", kind="baseline", rung="completeness", owner="bench",
                              severity="ticket", spec=BaselineSpec("data.row_count", history_window=7 * DAY),
                              selector=sel))
    return RuleSet((RuleGroup("bench", 60.0, tuple(rules)),))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    workdir = tempfile.mkdtemp(prefix="bench-rules-")
    t_load = time.perf_counter()
    store = Store(StoreSettings(os.path.join(workdir, "bench.duckdb")))
    store.start()
    tel = Telemetry()
    writer = SpanWriter(store, tel)
    writer.start()
    for day in range(args.days):
        writer.submit(day_columns(day, args.datasets, rng), 0).result()
    load_s = time.perf_counter() - t_load
    ruleset = make_rules(args.datasets)
    group = ruleset.groups[0]
    first, next_day, idle = [], [], []
    day = args.days
    for _ in range(args.repeats):
        cur = store.cursor()
        cur.execute("DELETE FROM alert_state")  # a fresh start for the "first" measurement: no state, and no
        cur.execute("DELETE FROM rule_progress")  # record of how far each rule was judged
        cur.close()
        engine = RuleEngine(store.cursor, new_kinds(), DuckDBState(store.cursor), tel)
        engine.load(ruleset)
        ts = T0 + (day - 1) * DAY + 7 * 3600
        t = time.perf_counter()
        engine.evaluate_group(group, ts)
        first.append(time.perf_counter() - t)
        writer.submit(day_columns(day, args.datasets, rng), 0).result()
        t = time.perf_counter()
        engine.evaluate_group(group, ts + DAY)
        next_day.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.evaluate_group(group, ts + DAY + 60)
        idle.append(time.perf_counter() - t)
        unhealthy = {k: v for k, v in engine.health.items() if v}
        if unhealthy:
            print(json.dumps(unhealthy, indent=2)[:2000], file=sys.stderr)
            return 1
        day += 1
    writer.shutdown()
    store.shutdown()
    print(json.dumps({
        "rules": len(group.rules), "datasets": args.datasets, "runs": args.days * args.datasets,
        "load_seconds": round(load_s, 1),
        "first_tick_seconds_median": round(statistics.median(first), 3),
        "next_day_tick_seconds_median": round(statistics.median(next_day), 3),
        "idle_tick_seconds_median": round(statistics.median(idle), 3),
        "repeats": args.repeats, "cores": os.cpu_count(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
