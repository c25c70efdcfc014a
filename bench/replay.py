"""Replay benchmark: a year of daily runs for a few datasets, one group of 10 rules (5 threshold, 5 baseline over
runs and windows, weekday seasonality on one) evaluated every hour, as `otel-evaluator replay` does at the group's
slots: 8,760 evaluations.

Measured, each the median of --repeats runs:
- engine: the engine in this process, as `replay` drives it (evaluate_group over chunks of evaluation times, state
  in memory, the file opened read-only): evaluations per second, wall and CPU seconds;
- cli: `otel-evaluator replay --db ... --rules ... --from ... --to ...` as a user runs it (start-up included):
  wall and CPU seconds of the process, and its start-up alone (a replay of one evaluation);
- per-step: the same engine called once per evaluation time (how the daemon steps, and how replay worked before
  it batched), over the first --per-step-hours slots, as evaluations per second.
Both ways of stepping must give the same transitions; the benchmark checks it on the per-step range.

    .venv/bin/python bench/replay.py                    # the table
    .venv/bin/python bench/replay.py --json out.json    # and the figures as JSON
    .venv/bin/python bench/replay.py --profile 30       # cProfile of one engine replay, top 30 functions
    .venv/bin/python bench/replay.py --profile 30 --profile-per-step --skip-cli   # ... of the per-step calls

Data: spans written by the daemon's own span writer (one group commit per day); seeds are fixed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.storegen import evaluator_cmd, median_timed, span_columns, write_store
from evaluator.commands.rules import CHUNK, replay_steps
from evaluator.log import configure_logging
from evaluator.receiver.columns import SpanColumns
from evaluator.rules.backends import MemoryState
from evaluator.rules.engine import AlertEvent, RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.loader import load_rules
from evaluator.rules.model import RuleGroup
from evaluator.store.store import Store, StoreSettings

DAY = 86400
HOUR = 3600
T0 = 1_735_689_600  # 2025-01-01T00:00:00Z
DATASETS = ("payments", "orders", "customers", "ledger")
SPAN, SERVICE = "features.daily.run", "bench-pipelines"

RULES = f"""\
groups:
  - name: bench-replay
    interval: 1h
    rules:
      # five thresholds
      - {{alert: FreshnessLag, kind: threshold, rung: freshness, owner: bench, severity: page,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset],
          value: data.freshness_lag_hours, op: ">", threshold: 0.5}}
      - {{alert: RowsFloor, kind: threshold, rung: completeness, owner: bench, severity: page,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset],
          value: data.row_count, op: "<", threshold: 100000}}
      - {{alert: NullRateCap, kind: threshold, rung: completeness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset],
          value: data.null_rate, op: ">", threshold: 0.05}}
      - {{alert: DurationCap, kind: threshold, rung: freshness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset],
          value: data.duration_seconds, op: ">", threshold: 7200, for_runs: 2}}
      - {{alert: AmountFloor, kind: threshold, rung: distribution, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset],
          value: data.amount_paise.median, op: "<", threshold: 1000}}
      # five baselines: over runs and over windows, four methods, one with weekday seasonality
      - {{alert: RowCountWeek, kind: baseline, rung: completeness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset], value: data.row_count,
          baseline: {{window: 7d, method: relative, tolerance: 0.1}}}}
      - {{alert: RowCountZ, kind: baseline, rung: completeness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset], value: data.row_count,
          baseline: {{runs: 30, method: zscore, z: 3}}}}
      - {{alert: NullRateRobust, kind: baseline, rung: completeness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset], value: data.null_rate,
          baseline: {{runs: 14, method: robust, z: 3.5}}}}
      - {{alert: AmountBand, kind: baseline, rung: distribution, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset], value: data.amount_paise.median,
          baseline: {{window: 30d, method: quantile_band, quantiles: [0.01, 0.99], min_history: 5}}}}
      - {{alert: DurationWeekday, kind: baseline, rung: freshness, owner: bench, severity: ticket,
          select: {{span: {SPAN}, service: {SERVICE}}}, group_by: [data.dataset], value: data.duration_seconds,
          baseline: {{runs: 4, method: relative, tolerance: 0.25, seasonality: weekday}}, for_runs: 2}}
"""

WEEKLY = np.array([1.0, 1.05, 1.02, 1.0, 0.95, 0.6, 0.55])  # Monday first


def day_batches(days: int, seed: int) -> Iterator[SpanColumns]:
    """One run per dataset per day (06:00 UTC plus a few minutes per dataset), with a handful of broken days."""
    rng = np.random.default_rng(seed)
    n = len(DATASETS)
    base_rows = np.array([1e7, 4e6, 2.5e5, 8e5])
    broken = {int(d) for d in rng.choice(np.arange(30, days), size=min(8, max(days - 30, 0)), replace=False)}
    for day in range(days):
        end = T0 + day * DAY + 6 * HOUR + np.arange(n) * 300.0
        weekday = (day + 2) % 7  # 2025-01-01 was a Wednesday
        rows = base_rows * rng.normal(1.0, 0.02, n)
        lag = np.abs(rng.normal(0.1, 0.05, n))
        nulls = rng.binomial(100_000, 0.01, n) / 100_000
        amount = 22_000 * rng.lognormal(0.0, 0.05, n)
        duration = 1800 * WEEKLY[weekday] * rng.normal(1.0, 0.04, n)
        if day in broken:
            i = day % n
            rows[i] *= 0.7
            lag[i] = 6.0
            nulls[i] = 0.08
            amount[i] /= 100
            duration[i] *= 5
        yield span_columns(SPAN, SERVICE, end, {
            "data.row_count": np.round(rows), "data.freshness_lag_hours": lag, "data.null_rate": nulls,
            "data.amount_paise.median": amount, "data.duration_seconds": duration,
        }, {"data.dataset": list(DATASETS)}, rng)


def open_engine(db: str, rules_path: str) -> tuple[Store, RuleEngine, RuleGroup]:
    """What `replay` opens: the file read-only, state in memory, one engine."""
    ruleset = load_rules([rules_path])
    store = Store(StoreSettings(path=db, read_only=True))
    store.start()
    engine = RuleEngine(store.cursor, new_kinds(), MemoryState())
    engine.load(ruleset)
    return store, engine, ruleset.groups[0]


def engine_replay(db: str, rules_path: str, times: list[float], per_step: bool,
                  profile: cProfile.Profile | None = None) -> tuple[float, float, list[AlertEvent]]:
    """Evaluate the group at `times` as replay does (chunks of CHUNK) or once per time; wall and CPU seconds."""
    store, engine, group = open_engine(db, rules_path)
    events: list[AlertEvent] = []
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        if per_step:
            for t in times:
                events.extend(engine.evaluate_group(group, [t]))
        else:
            for i in range(0, len(times), CHUNK):
                events.extend(engine.evaluate_group(group, times[i:i + CHUNK]))
        if profile is not None:
            profile.disable()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        unhealthy = {k: v for k, v in engine.health.items() if v}
        if unhealthy:
            raise SystemExit(f"rules failed: {json.dumps(unhealthy)[:2000]}")
    finally:
        store.shutdown()
    return wall, cpu, events


def transition_keys(events: list[AlertEvent]) -> list[tuple[str, str, float, str, str]]:
    return sorted((ev.rule.id, str(ev.transition.series), ev.transition.at, ev.transition.from_state,
                   ev.transition.to_state) for ev in events)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365, help="days of daily runs (default 365)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median; default 3)")
    parser.add_argument("--per-step-hours", type=int, default=720,
                        help="slots evaluated one call each for the per-step figure (default 720, a month; 0 skips)")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the otel-evaluator replay command")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="also profile one engine replay with cProfile and print the top N functions")
    parser.add_argument("--profile-per-step", action="store_true",
                        help="with --profile: profile the per-step calls (--per-step-hours of them) instead")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here ('-' for stdout)")
    args = parser.parse_args()
    configure_logging("warning")  # as the replay command does: transitions are not logged one by one

    with tempfile.TemporaryDirectory(prefix="bench-replay-") as workdir:  # removed afterwards, store and all
        return run(args, workdir)


def run(args: argparse.Namespace, workdir: str) -> int:
    db = os.path.join(workdir, "bench.duckdb")
    rules_path = os.path.join(workdir, "bench.rules.yaml")
    Path(rules_path).write_text(RULES)
    t_load = time.perf_counter()
    spans = write_store(db, day_batches(args.days, seed=11))
    load_s = time.perf_counter() - t_load
    group = load_rules([rules_path]).groups[0]
    load_before = os.getloadavg()[0]
    start, end = float(T0), float(T0 + args.days * DAY - HOUR)
    times = replay_steps(group, start, end, None)
    n = len(times)

    walls, cpus, transitions = [], [], 0
    for _ in range(args.repeats):
        wall, cpu, events = engine_replay(db, rules_path, times, per_step=False)
        walls.append(wall)
        cpus.append(cpu)
        transitions = len(events)
    figures: dict[str, object] = {
        "datasets": len(DATASETS), "days": args.days, "spans": spans, "rules": len(group.rules),
        "evaluations": n, "transitions": transitions, "load_seconds": round(load_s, 2), "repeats": args.repeats,
        "cores": os.cpu_count(), "load_average_1m_before": round(load_before, 2),
        "engine_wall_seconds": round(statistics.median(walls), 3),
        "engine_cpu_seconds": round(statistics.median(cpus), 3),
        "engine_evaluations_per_second": round(n / statistics.median(walls)),
        "engine_evaluations_per_cpu_second": round(n / statistics.median(cpus)),
    }

    if not args.skip_cli:
        argv = [*evaluator_cmd(), "replay", "--db", db, "--rules", rules_path, "--from", iso(start), "--to", iso(end),
                "--format", "json"]
        runs, mid = median_timed(argv, args.repeats)
        out = json.loads(mid.stdout)
        if out["evaluations"] != n or len(out["transitions"]) != transitions:
            raise SystemExit(f"the CLI replay disagrees: {out['evaluations']} evaluations, "
                             f"{len(out['transitions'])} transitions (engine: {n}, {transitions})")
        one = [*evaluator_cmd(), "replay", "--db", db, "--rules", rules_path, "--from", iso(start), "--to",
               iso(start), "--format", "json"]
        _, startup = median_timed(one, args.repeats)
        figures.update({
            "cli_wall_seconds": round(mid.wall, 3),
            "cli_cpu_seconds": round(statistics.median(t.cpu for t in runs), 3),
            "cli_evaluations_per_second": round(n / mid.wall),
            "cli_evaluations_per_cpu_second": round(n / statistics.median(t.cpu for t in runs)),
            "cli_startup_wall_seconds": round(startup.wall, 3),
        })

    if args.per_step_hours > 0:
        k = min(args.per_step_hours, n)
        sub = times[:k]
        step_walls: list[float] = []
        step_cpus: list[float] = []
        step_events: list[AlertEvent] = []
        for _ in range(args.repeats):
            wall, cpu, step_events = engine_replay(db, rules_path, sub, per_step=True)
            step_walls.append(wall)
            step_cpus.append(cpu)
        _, _, chunk_events = engine_replay(db, rules_path, sub, per_step=False)
        same = transition_keys(step_events) == transition_keys(chunk_events)
        figures.update({
            "per_step_evaluations": k,
            "per_step_wall_seconds": round(statistics.median(step_walls), 3),
            "per_step_cpu_seconds": round(statistics.median(step_cpus), 3),
            "per_step_evaluations_per_second": round(k / statistics.median(step_walls)),
            "per_step_evaluations_per_cpu_second": round(k / statistics.median(step_cpus)),
            "per_step_same_transitions": same,
        })
        if not same:
            print("warning: per-step and chunked evaluation gave different transitions", file=sys.stderr)

    figures["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print_table(figures)
    if args.profile:
        prof = cProfile.Profile()
        if args.profile_per_step:
            engine_replay(db, rules_path, times[:max(args.per_step_hours, 1)], per_step=True, profile=prof)
        else:
            engine_replay(db, rules_path, times, per_step=False, profile=prof)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.profile)
        buf.write("\n")
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
        print(buf.getvalue())
    if args.json:
        text = json.dumps(figures, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def print_table(f: dict[str, object]) -> None:
    print(f"{f['rules']} rules over {f['days']} days x {f['datasets']} datasets ({f['spans']} run spans), "
          f"{f['evaluations']} hourly evaluations, {f['transitions']} transitions; median of {f['repeats']}")
    rows = [("engine (replay's chunks)", f["engine_evaluations_per_second"], f["engine_evaluations_per_cpu_second"],
             f["engine_wall_seconds"], f["engine_cpu_seconds"])]
    if "cli_wall_seconds" in f:
        rows.append(("otel-evaluator replay (process)", f["cli_evaluations_per_second"],
                     f["cli_evaluations_per_cpu_second"], f["cli_wall_seconds"], f["cli_cpu_seconds"]))
        rows.append(("  of which start-up (1 evaluation)", "", "", f["cli_startup_wall_seconds"], ""))
    if "per_step_wall_seconds" in f:
        rows.append((f"engine, one call per step ({f['per_step_evaluations']} steps)",
                     f["per_step_evaluations_per_second"], f["per_step_evaluations_per_cpu_second"],
                     f["per_step_wall_seconds"], f["per_step_cpu_seconds"]))
    print(f"{'':44} {'evals/s':>9} {'evals/CPU-s':>12} {'wall s':>9} {'CPU s':>9}")
    for name, rate, cpu_rate, wall, cpu in rows:
        print(f"{name:44} {rate!s:>9} {cpu_rate!s:>12} {wall!s:>9} {cpu!s:>9}")
    if "per_step_same_transitions" in f:
        print(f"per-step and chunked transitions identical: {f['per_step_same_transitions']}")
    print(f"load average (1 min) before/after: {f['load_average_1m_before']} / {f['load_average_1m_after']} "
          f"on {f['cores']} cores (wall times stretch on a busy machine; CPU seconds much less)")


if __name__ == "__main__":
    sys.exit(main())
