"""Command speed: `otel-evaluator test rules/payments.test.yaml`, and `eval` of one KS distribution rule over
50,000 baseline values against 50,000 current values.

Measured, each the median of --repeats runs of the real command as a process:
- test: wall and CPU seconds of `otel-evaluator test rules/payments.test.yaml` (every test of the file, each on a
  fresh store through the real ingest path);
- eval: `otel-evaluator eval --at T` with the KS rule, and with an empty rule file over the same store (the
  start-up: interpreter, imports, opening the file); the difference is the rule's cost as a user sees it. The same
  evaluation in this process (engine.evaluate_group once, fresh engine state) is reported beside it.

    .venv/bin/python bench/eval_speed.py
    .venv/bin/python bench/eval_speed.py --repeats 9 --json out.json

The values are written by the daemon's own span writer; seeds are fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.storegen import evaluator_cmd, median_timed, span_columns, write_store
from evaluator.log import configure_logging
from evaluator.receiver.columns import SpanColumns
from evaluator.rules.backends import MemoryState
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.loader import load_rules
from evaluator.store.store import Store, StoreSettings

ROOT = Path(__file__).resolve().parent.parent
HOUR, DAY = 3600, 86400
AT = 1_764_576_000  # 2025-12-01T08:00:00Z, a slot of the hourly group
SPAN, SERVICE = "payments.transaction", "payments-api"

KS_RULE = f"""\
groups:
  - name: bench-eval
    interval: 1h
    rules:
      - alert: AmountKS
        kind: distribution
        rung: distribution
        owner: bench
        severity: ticket
        select: {{span: {SPAN}, service: {SERVICE}}}
        source: values
        attribute: data.amount_paise
        method: ks
        current: 6h
        baseline: {{window: 30d}}
        min_samples: 1000
        op: ">"
        threshold: 0.1
"""


def value_batches(n_base: int, n_cur: int, seed: int, batch: int = 10_000) -> Iterator[SpanColumns]:
    """n_base transactions over the 30 days before the current window, then n_cur in the 6 h current window,
    whose amounts are 50% larger (D about 0.16: the rule fires)."""
    rng = np.random.default_rng(seed)
    cur_lo = AT - 6 * HOUR
    base_t = np.sort(rng.uniform(cur_lo - 30 * DAY + 1, cur_lo, n_base))
    cur_t = np.sort(rng.uniform(cur_lo + 1, AT, n_cur))
    base_v = np.round(rng.lognormal(np.log(22_000), 1.0, n_base))
    cur_v = np.round(rng.lognormal(np.log(22_000 * 1.5), 1.0, n_cur))
    times, values = np.concatenate([base_t, cur_t]), np.concatenate([base_v, cur_v])
    for i in range(0, len(times), batch):
        yield span_columns(SPAN, SERVICE, times[i:i + batch], {"data.amount_paise": values[i:i + batch]},
                           rng=rng, duration_s=0.05)


def in_process(db: str, rules: str, repeats: int) -> tuple[float, float | None]:
    """The evaluation alone: a fresh engine over the file opened read-only, evaluate_group once at AT."""
    ruleset = load_rules([rules])
    walls = []
    value = None
    for _ in range(repeats):
        store = Store(StoreSettings(path=db, read_only=True))
        store.start()
        try:
            state = MemoryState()
            engine = RuleEngine(store.cursor, new_kinds(), state)
            engine.load(ruleset)
            t0 = time.perf_counter()
            engine.evaluate_group(ruleset.groups[0], [float(AT)])
            walls.append(time.perf_counter() - t0)
            errors = {k: v for k, v in engine.health.items() if v}
            if errors:
                raise SystemExit(f"the KS rule failed: {errors}")
            states = state.states(ruleset.groups[0].rules[0])
            value = next(iter(states.values())).value if states else None
        finally:
            store.shutdown()
    return statistics.median(walls), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (median; default 5)")
    parser.add_argument("--values", type=int, default=50_000, help="values per side of the KS rule (default 50000)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here ('-' for stdout)")
    args = parser.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as workdir:  # removed afterwards, store and all
        return run(args, workdir)


def run(args: argparse.Namespace, workdir: str) -> int:
    load_before = os.getloadavg()[0]
    test_file = str(ROOT / "rules" / "payments.test.yaml")
    test_runs, test_mid = median_timed([*evaluator_cmd(), "test", test_file], args.repeats, cwd=str(ROOT))

    db = os.path.join(workdir, "bench.duckdb")
    rules, empty = os.path.join(workdir, "ks.rules.yaml"), os.path.join(workdir, "empty.rules.yaml")
    Path(rules).write_text(KS_RULE)
    Path(empty).write_text("groups: []\n")
    t_load = time.perf_counter()
    spans = write_store(db, value_batches(args.values, args.values, seed=5))
    load_s = time.perf_counter() - t_load
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(AT))
    eval_runs, eval_mid = median_timed([*evaluator_cmd(), "eval", "--db", db, "--rules", rules, "--at", at,
                                        "--format", "json"], args.repeats)
    results = json.loads(eval_mid.stdout)["evaluations"][0]["results"]
    if not results or results[0].get("value") is None:
        raise SystemExit(f"the KS rule judged nothing: {results}")
    start_runs, start_mid = median_timed([*evaluator_cmd(), "eval", "--db", db, "--rules", empty, "--at", at,
                                          "--format", "json"], args.repeats)
    engine_s, value = in_process(db, rules, args.repeats)

    f = {
        "repeats": args.repeats, "cores": os.cpu_count(), "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "test_wall_seconds": round(test_mid.wall, 3),
        "test_cpu_seconds": round(statistics.median(t.cpu for t in test_runs), 3),
        "test_output_tail": test_mid.stdout.strip().splitlines()[-1],
        "ks_values_per_side": args.values, "ks_spans": spans, "ks_load_seconds": round(load_s, 2),
        "ks_value": value,
        "eval_ks_wall_seconds": round(eval_mid.wall, 3),
        "eval_ks_cpu_seconds": round(statistics.median(t.cpu for t in eval_runs), 3),
        "eval_empty_wall_seconds": round(start_mid.wall, 3),
        "eval_empty_cpu_seconds": round(statistics.median(t.cpu for t in start_runs), 3),
        "eval_ks_minus_startup_seconds": round(eval_mid.wall - start_mid.wall, 3),
        "ks_in_process_seconds": round(engine_s, 3),
    }
    print(f"median of {args.repeats}; seconds")
    print(f"{'':58} {'wall':>7} {'CPU':>7}")
    print(f"{'otel-evaluator test rules/payments.test.yaml':58} {f['test_wall_seconds']:>7} "
          f"{f['test_cpu_seconds']:>7}   ({f['test_output_tail']})")
    print(f"{'otel-evaluator eval, empty rule file (start-up)':58} {f['eval_empty_wall_seconds']:>7} "
          f"{f['eval_empty_cpu_seconds']:>7}")
    print(f"{f'otel-evaluator eval, KS rule {args.values} vs {args.values} values':58} "
          f"{f['eval_ks_wall_seconds']:>7} {f['eval_ks_cpu_seconds']:>7}   (D = {value:.4f})")
    print(f"{'  the KS rule: eval minus start-up':58} {f['eval_ks_minus_startup_seconds']:>7}")
    print(f"{'  the KS rule: one evaluation in process':58} {f['ks_in_process_seconds']:>7}")
    print(f"load average (1 min) before/after: {f['load_average_1m_before']} / {f['load_average_1m_after']} "
          f"on {f['cores']} cores")
    if args.json:
        text = json.dumps(f, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
