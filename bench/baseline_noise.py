"""Baseline noise: how often a baseline rule alerts on HEALTHY runs, and whether it catches an incident, for every
method, history length and exclusion, on noisy healthy data.

Each configuration judges series of daily runs with the kind's own pure code (evaluator.rules.kinds.baseline
`step`, with the kind's weekday split for `seasonality: weekday`), and the verdicts are folded through the alert
state machine (evaluator.rules.state.evaluate_series) of a Rule built in code with for_runs 1 and 2. No store: a
run costs microseconds.

Measured per configuration, over --seeds seeds:
- healthy (--runs runs per series): the share of judged runs (after warm-up) whose verdict is violated, and the
  share in `firing` state after the run with for_runs 1 and for_runs 2;
- incident (a second series per seed, with 10-run incidents at x0.7, 300 runs apart): the share of incident runs
  whose verdict is violated (detected), the share of incidents whose first run is, and the share of the 20 healthy
  runs after each incident that violate (false alerts after it: are they judged against the healthy level?).

Data (2000 daily runs per series by default):
  gauss2      row count, Gaussian, CV 2%          gauss10   row count, Gaussian, CV 10%
  lognormal   median amount, lognormal sigma 0.3  nulls     null rate: Binomial(50,000 rows, 0.2%) / rows
  nulls_sparse  null rate of ~2 nulls a run: Binomial(20,000 rows, 0.01%) / rows (often 0)
  weekly      row count with a weekly pattern (weekends at 55-60%) and 3% noise, judged without seasonality
  weekly_wd   the same data with `seasonality: weekday`

    .venv/bin/python bench/baseline_noise.py                   # the full table and what meets the criteria
    .venv/bin/python bench/baseline_noise.py --markdown        # the compact tables of docs/performance.md
    .venv/bin/python bench/baseline_noise.py --json noise.json --jobs 2

A configuration meets the criteria of a signal when, on that signal's data, at most --max-healthy (5%) of healthy
runs are firing with for_runs 1, at least --min-detect (80%) of the incident runs are detected (the alert fires
at the incident and stays firing through it), and at most --max-after (5%) of the 20 runs after an incident
violate.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluator.rules.kinds.baseline import Memory, Verdict, step, weekday
from evaluator.rules.model import FIRING, INACTIVE, BaselineSpec, Rule, Sample
from evaluator.rules.state import SeriesState, evaluate_series

DAY = 86400
T0 = 1_735_516_800  # 2024-12-30T00:00:00Z, a Monday
INCIDENT_RUNS, INCIDENT_FACTOR, AFTER_RUNS = 10, 0.7, 20
WEEKLY = np.array([1.0, 1.05, 1.02, 1.0, 0.95, 0.6, 0.55])  # Monday first


# -- data ----------------------------------------------------------------------------------------------------------

def _gauss(cv: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    return lambda rng, n: 1e6 * (1 + cv * rng.standard_normal(n))


def _lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
    return 22_000 * np.exp(0.3 * rng.standard_normal(n))


def _nulls(rows: int, p: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    return lambda rng, n: rng.binomial(rows, p, n) / rows


def _weekly(rng: np.random.Generator, n: int) -> np.ndarray:
    days = (np.arange(n) + weekday(T0 * 1_000_000)) % 7
    return 1e6 * WEEKLY[days] * (1 + 0.03 * rng.standard_normal(n))


@dataclass(frozen=True)
class Scenario:
    name: str
    signal: str  # the signal type it stands for
    what: str
    make: Callable[[np.random.Generator, int], np.ndarray]
    seasonality: str | None = None


SCENARIOS = (
    Scenario("gauss2", "row counts", "Gaussian, CV 2%", _gauss(0.02)),
    Scenario("gauss10", "row counts", "Gaussian, CV 10%", _gauss(0.10)),
    Scenario("lognormal", "medians of amounts", "lognormal, sigma 0.3", _lognormal),
    Scenario("nulls", "null rates", "Binomial(50k, 0.2%)/50k, CV 10%", _nulls(50_000, 0.002)),
    Scenario("nulls_sparse", "null rates", "Binomial(20k, 0.01%)/20k, ~2 nulls, 14% zeros", _nulls(20_000, 0.0001)),
    Scenario("weekly", "weekly pattern", "weekly pattern + 3% noise, no seasonality", _weekly),
    Scenario("weekly_wd", "weekly pattern", "weekly pattern + 3% noise, seasonality: weekday", _weekly, "weekday"),
)

# -- configurations ------------------------------------------------------------------------------------------------

METHODS: tuple[tuple[str, dict[str, object]], ...] = (
    ("relative 5%", {"method": "relative", "tolerance": 0.05}),
    ("relative 10%", {"method": "relative", "tolerance": 0.10}),
    ("relative 20%", {"method": "relative", "tolerance": 0.20}),
    ("zscore 2", {"method": "zscore", "z": 2.0}),
    ("zscore 2.5", {"method": "zscore", "z": 2.5}),
    ("zscore 3", {"method": "zscore", "z": 3.0}),
    ("robust 3", {"method": "robust", "z": 3.0}),
    ("robust 3.5", {"method": "robust", "z": 3.5}),
    ("quantile 5-95", {"method": "quantile_band", "quantiles": (0.05, 0.95)}),
    ("quantile 1-99", {"method": "quantile_band", "quantiles": (0.01, 0.99)}),
)
HISTORIES = (7, 14, 30)
EXCLUDES = ("violations", "none")


@dataclass(frozen=True)
class Config:
    method: str  # its label in METHODS
    history: int
    exclude: str

    def spec(self, seasonality: str | None) -> BaselineSpec:
        kw = dict(METHODS)[self.method]
        return BaselineSpec("x", history_runs=self.history, exclude=self.exclude, seasonality=seasonality,
                            **kw)  # type: ignore[arg-type]




def configs(histories: Sequence[int] = HISTORIES, methods: Sequence[str] | None = None) -> list[Config]:
    return [Config(m, h, e) for m, _ in METHODS if methods is None or m in methods for e in EXCLUDES
            for h in histories]


# -- judging and folding -------------------------------------------------------------------------------------------

def judge_series(spec: BaselineSpec, values: Sequence[float] | np.ndarray) -> list[Verdict]:
    """The kind's verdicts for one series of daily runs: `step` per run, on the weekday's own memory with
    `seasonality: weekday` (as BaselineKind splits a series)."""
    mems: dict[int, Memory] = {}
    seasonal = spec.seasonality == "weekday"
    out = []
    for i, x in enumerate(values):
        t_us = (T0 + i * DAY) * 1_000_000
        mem = mems.setdefault(weekday(t_us) if seasonal else -1, Memory())
        out.append(step(spec, mem, t_us, float(x), detail=False))
    return out


def firing_after_each(rule: Rule, verdicts: Sequence[Verdict]) -> np.ndarray:
    """Whether the series is firing after each run, folding the verdicts one run per evaluation.

    Two kinds of run cannot change the state's name for these rules (no `for`, no keep_firing_for, no hysteresis),
    so they are not folded (only value fields and the violation count would change, and the count matters only
    while pending): an ok run while inactive stays inactive, a violating run while firing stays firing
    (state.apply_sample). Every other run goes through evaluate_series."""
    assert not rule.for_seconds and not rule.keep_firing_for and rule.resolve is None
    firing = np.zeros(len(verdicts), dtype=bool)
    st = SeriesState()
    for i, v in enumerate(verdicts):
        if (v.violated is False and st.state == INACTIVE) or (v.violated is True and st.state == FIRING):
            firing[i] = st.state == FIRING
            continue
        at = (T0 + i * DAY) * 1.0
        sample = Sample((), at, v.value, v.threshold, v.violated, None, i + 1)
        st = evaluate_series(rule, st, [sample], at).state
        firing[i] = st.state == FIRING
    return firing


def _rule(spec: BaselineSpec, for_runs: int) -> Rule:
    return Rule(name="noise", group="bench", kind="baseline", rung="completeness", owner="bench", severity="ticket",
                spec=spec, for_runs=for_runs)


def incident_starts(n: int) -> list[int]:
    return list(range(300, n - INCIDENT_RUNS - AFTER_RUNS, 300))


@dataclass
class Tally:
    judged: int = 0
    violated: int = 0
    firing1: int = 0
    firing2: int = 0
    incident_runs: int = 0
    detected: int = 0
    incident_firing1: int = 0
    incident_firing2: int = 0
    incidents: int = 0
    first_detected: int = 0
    caught1: int = 0  # incidents during which the alert was firing at least once, for_runs 1
    caught2: int = 0  # ... for_runs 2
    after_runs: int = 0
    after_violated: int = 0

    def add(self, other: Tally) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def shares(self) -> dict[str, float]:
        def pct(a: int, b: int) -> float:
            return round(100.0 * a / b, 2) if b else math.nan

        return {
            "healthy_violated": pct(self.violated, self.judged),
            "healthy_firing_r1": pct(self.firing1, self.judged),
            "healthy_firing_r2": pct(self.firing2, self.judged),
            "incident_detected": pct(self.detected, self.incident_runs),
            "incident_firing_r1": pct(self.incident_firing1, self.incident_runs),
            "incident_firing_r2": pct(self.incident_firing2, self.incident_runs),
            "incident_first_run": pct(self.first_detected, self.incidents),
            "incident_caught_r1": pct(self.caught1, self.incidents),
            "incident_caught_r2": pct(self.caught2, self.incidents),
            "after_violated": pct(self.after_violated, self.after_runs),
        }


def measure(task: tuple[str, Config, int, int, int, float]) -> tuple[str, Config, Tally]:
    """One scenario (by name), configuration and seed: a healthy series and an incident series."""
    name, config, seed, runs, incident_len, factor = task
    scenario = next(s for s in SCENARIOS if s.name == name)
    spec = config.spec(scenario.seasonality)
    r1, r2 = _rule(spec, 1), _rule(spec, 2)
    # the data depend on the scenario's data and the seed only: every configuration judges the same runs
    data_key = scenario.name.removesuffix("_wd")
    rng = np.random.default_rng([seed, sum(map(ord, data_key))])
    healthy = scenario.make(rng, runs)
    tally = Tally()
    verdicts = judge_series(spec, healthy)
    judged = np.array([v.violated is not None for v in verdicts])
    violated = np.array([v.violated is True for v in verdicts])
    tally.judged = int(judged.sum())
    tally.violated = int(violated.sum())
    tally.firing1 = int((firing_after_each(r1, verdicts) & judged).sum())
    tally.firing2 = int((firing_after_each(r2, verdicts) & judged).sum())

    values = scenario.make(rng, incident_len)
    starts = incident_starts(incident_len)
    for s in starts:
        values[s:s + INCIDENT_RUNS] *= factor
    verdicts = judge_series(spec, values)
    violated = np.array([v.violated is True for v in verdicts])
    f1, f2 = firing_after_each(r1, verdicts), firing_after_each(r2, verdicts)
    for s in starts:
        inc = slice(s, s + INCIDENT_RUNS)
        after = slice(s + INCIDENT_RUNS, s + INCIDENT_RUNS + AFTER_RUNS)
        tally.incidents += 1
        tally.incident_runs += INCIDENT_RUNS
        tally.detected += int(violated[inc].sum())
        tally.incident_firing1 += int(f1[inc].sum())
        tally.incident_firing2 += int(f2[inc].sum())
        tally.first_detected += int(violated[s])
        tally.caught1 += int(f1[inc].any())
        tally.caught2 += int(f2[inc].any())
        tally.after_runs += AFTER_RUNS
        tally.after_violated += int(violated[after].sum())
    return scenario.name, config, tally


# -- reporting -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Criteria:
    max_healthy: float
    min_detect: float
    max_after: float

    def met(self, s: dict[str, float]) -> bool:
        return (s["healthy_firing_r1"] <= self.max_healthy and s["incident_detected"] >= self.min_detect
                and s["after_violated"] <= self.max_after)


def label(c: Config) -> str:
    return f"{c.method}, runs {c.history}, exclude {c.exclude}"


Results = dict[str, dict[Config, dict[str, float]]]


def print_full(results: Results, scenarios: Sequence[Scenario], factor: float) -> None:
    """Every configuration that was run, per scenario."""
    head = (f"{'configuration':44} {'viol%':>6} {'fire1%':>6} {'fire2%':>6} | {'detect%':>7} {'first%':>6} "
            f"{'caught1%':>8} {'caught2%':>8} {'after%':>6}")
    for sc in scenarios:
        print(f"\n== {sc.name}: {sc.signal}, {sc.what}")
        print(f"{'':44} {'healthy runs':^20} | {f'10-run incidents at x{factor:g}, 20 runs after':^40}")
        print(head)
        for c in results[sc.name]:
            s = results[sc.name][c]
            print(f"{label(c):44} {s['healthy_violated']:>6.1f} {s['healthy_firing_r1']:>6.1f} "
                  f"{s['healthy_firing_r2']:>6.1f} | {s['incident_detected']:>7.1f} {s['incident_first_run']:>6.1f} "
                  f"{s['incident_caught_r1']:>8.1f} {s['incident_caught_r2']:>8.1f} {s['after_violated']:>6.1f}")
    print("\nviol: healthy runs violated; fire1/fire2: healthy runs firing with for_runs 1/2; detect: incident runs "
          "violated; first: incidents whose first run violated; caught1/caught2: incidents during which the alert "
          "fired with for_runs 1/2; after: the 20 runs after an incident violated (all %)")


def print_meeting(results: Results, scenarios: Sequence[Scenario], crit: Criteria) -> None:
    print(f"\nConfigurations meeting the criteria (healthy firing with for_runs 1 <= {crit.max_healthy:g}%, incident "
          f"runs detected >= {crit.min_detect:g}%, violations in the 20 runs after <= {crit.max_after:g}%), "
          f"lowest healthy firing first:")
    for sc in scenarios:
        ok = [(c, s) for c, s in results[sc.name].items() if crit.met(s)]
        ok.sort(key=lambda cs: (cs[1]["healthy_firing_r1"], -cs[1]["incident_detected"]))
        print(f"  {sc.name}: " + ("none" if not ok else ""))
        for c, s in ok[:8]:
            print(f"    {label(c):44} healthy {s['healthy_firing_r1']:.1f}%, detected {s['incident_detected']:.0f}%, "
                  f"after {s['after_violated']:.1f}%")
        if len(ok) > 8:
            print(f"    ... and {len(ok) - 8} more")


def print_markdown(results: Results, scenarios: Sequence[Scenario], histories: Sequence[int]) -> None:
    """The compact tables of docs/performance.md: per scenario, methods x exclusion by history (healthy runs
    violated % / firing with for_runs 2 %, and the incident at the longest history: runs detected % / violations
    in the 20 runs after %); then every scenario side by side at the longest history (healthy violated % /
    incident runs detected %)."""
    longest = max(histories)
    methods = list(dict.fromkeys(c.method for c in results[scenarios[0].name]))
    for sc in scenarios:
        print(f"\n{sc.name} ({sc.what}): healthy violated % / firing with for_runs 2 %\n")
        print("| method | exclude | " + " | ".join(f"runs {h}" for h in histories) +
              f" | incident, runs {longest}: detected / after |")
        print("|---|---|" + "---|" * (len(histories) + 1))
        for m in methods:
            for e in EXCLUDES:
                cells = [f"{s['healthy_violated']:.1f} / {s['healthy_firing_r2']:.1f}"
                         for s in (results[sc.name][Config(m, h, e)] for h in histories)]
                s = results[sc.name][Config(m, longest, e)]
                cells.append(f"{s['incident_detected']:.0f} / {s['after_violated']:.0f}")
                print(f"| {m} | {e} | {' | '.join(cells)} |")
    print(f"\nEvery data set, runs {longest}: healthy violated % / incident runs detected %\n")
    print("| method | exclude | " + " | ".join(sc.name for sc in scenarios) + " |")
    print("|---|---|" + "---|" * len(scenarios))
    for m in methods:
        for e in EXCLUDES:
            cells = [f"{s['healthy_violated']:.1f} / {s['incident_detected']:.0f}"
                     for s in (results[sc.name][Config(m, longest, e)] for sc in scenarios)]
            print(f"| {m} | {e} | {' | '.join(cells)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="healthy runs per series (default 2000)")
    parser.add_argument("--incident-runs", type=int, default=1200,
                        help="runs of each incident series (an incident every 300 runs; default 1200: 3 incidents)")
    parser.add_argument("--incident-factor", type=float, default=INCIDENT_FACTOR,
                        help=f"the incident multiplies the values by this (default {INCIDENT_FACTOR}: -30%%)")
    parser.add_argument("--histories", default=",".join(map(str, HISTORIES)),
                        help="history_runs values, comma-separated (default 7,14,30)")
    parser.add_argument("--method", action="append", choices=[m for m, _ in METHODS],
                        help="only these methods (repeatable; default all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: one per core)")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="only these data (repeatable; default all)")
    parser.add_argument("--max-healthy", type=float, default=5.0)
    parser.add_argument("--min-detect", type=float, default=80.0)
    parser.add_argument("--max-after", type=float, default=5.0)
    parser.add_argument("--markdown", action="store_true", help="print the compact tables instead of the full one")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON here ('-' for stdout)")
    args = parser.parse_args()

    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    histories = [int(h) for h in args.histories.split(",")]
    todo = configs(histories, args.method)
    tasks = [(sc.name, c, seed, args.runs, args.incident_runs, args.incident_factor)
             for sc in scenarios for c in todo for seed in range(args.seeds)]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            out = pool.map(measure, tasks, chunksize=8)
    else:
        out = [measure(t) for t in tasks]
    tallies: dict[str, dict[Config, Tally]] = {sc.name: {c: Tally() for c in todo} for sc in scenarios}
    for name, config, tally in out:
        tallies[name][config].add(tally)
    results = {name: {c: t.shares() for c, t in by.items()} for name, by in tallies.items()}
    elapsed = time.perf_counter() - t0
    crit = Criteria(args.max_healthy, args.min_detect, args.max_after)
    print(f"{len(tasks)} series x ({args.runs} healthy + {args.incident_runs} incident runs), {args.seeds} seeds, "
          f"{elapsed:.1f} s")
    if args.markdown:
        print_markdown(results, scenarios, histories)
    else:
        print_full(results, scenarios, args.incident_factor)
    print_meeting(results, scenarios, crit)
    if args.json:
        doc = {"runs": args.runs, "incident_runs": args.incident_runs, "seeds": args.seeds,
               "incident": {"runs": INCIDENT_RUNS, "factor": args.incident_factor, "after": AFTER_RUNS},
               "results": [{"scenario": name, "method": c.method, "history_runs": c.history, "exclude": c.exclude,
                            **s} for name, by in results.items() for c, s in by.items()]}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
