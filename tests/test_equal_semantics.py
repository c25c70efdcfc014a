"""One evaluation semantics: the live daemon, `replay` and `eval --at` decide the same alerts.

A real daemon (`serve` as a subprocess) gets random histories through the OpenTelemetry SDK's OTLP/gRPC exporter,
step by step: the spans that end in a step, in shuffled order, then `POST /evaluate {"at": step}`. Now and then it
is killed with SIGKILL (before or in the middle of a step's data, or while it evaluates) and restarted on the same
file, sometimes a few steps later (downtime: the steps in between are not evaluated, and their data arrive after
the restart, before the next evaluation, as from a Collector's queue). Then, over the stopped daemon's file:
- `replay --from t0 --to tN` (each group at its own slots) must report the transitions in the daemon's `alerts`
  table, which must hold every transition `POST /evaluate` answered (and, when no evaluation was killed, only
  those);
- `eval --at t0 ... tN` (one engine) must show, at every step the daemon evaluated, the daemon's states then
  (`alert_state`, read through `POST /query`);
- a fresh `eval --at ti` (a new process: no state) must show the daemon's state, value and threshold of every
  series (value and threshold only for a windowed rule with a resolve threshold); for the per-run kinds
  (threshold, baseline, absence) everything.

The data are stamped in the future (from a day boundary after tomorrow), so the daemon's own scheduler, which
evaluates at the real clock's slots, runs before the first step, and after each restart it is waited for: it comes
before the next step, as it does when data arrive in real time.

Below the property: its regression examples, and minimal reproductions of what it found.
`EQUAL_SEMANTICS_EXAMPLES=200` runs a longer hunt (the default keeps the property at about a minute on two cores);
`EQUAL_SEMANTICS_SHRINK=1` shrinks a failing example.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from evaluator.admin.client import AdminError, AdminUnavailable
from evaluator.daemon import Daemon
from evaluator.testing import DaemonProcess, FakeClock, daemon_process, loopback_config, wait_for

HOUR, DAY = 3600, 86400
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
CI = os.environ.get("CI") == "true"
EXAMPLES = int(os.environ.get("EQUAL_SEMANTICS_EXAMPLES", "4"))
# an example takes seconds (a daemon, its restarts, three to five commands): shrinking a failure can take many
# minutes, so it is asked for (EQUAL_SEMANTICS_SHRINK=1); a failure prints its scenario, which runs again as is
SHRINK = bool(os.environ.get("EQUAL_SEMANTICS_SHRINK"))
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])]
PER_RUN_KINDS = {"threshold", "baseline", "absence"}
TIME_FIELDS = ("active_at", "fired_at", "resolved_at", "last_violation_at", "last_run_at")


# -- the scenario: everything relative to t0, so a failing example can be written down and run again ---------------

@dataclass(frozen=True)
class Run:
    """One pipeline run: a `run` span of a dataset with its lag (threshold, sql) and row count (baselines)."""

    dataset: str
    at: int  # end time, seconds after t0 (from -step + 1: the first step's data)
    lag: float
    rows: float


@dataclass(frozen=True)
class Values:
    """The values of the distribution's stream (`event` spans) of one partner in one step."""

    partner: str
    step: int  # the values end in (t(step - 1), t(step)]
    n: int
    shifted: bool


@dataclass(frozen=True)
class Predictions:
    """The predictions of one model in one step, and the labels that come for them later."""

    model: str
    step: int
    n: int
    good: bool  # scores that separate the classes (auc about 1), or noise (about 0.5)
    coverage: float  # the share of predictions that get a label


@dataclass(frozen=True)
class Rules:
    """The knobs of the rules (the rule file is rendered from them)."""

    lag_for_runs: int = 1
    lag_for: float = 0.0  # in steps
    lag_keep: float = 0.0  # keep_firing_for, in steps
    lag_resolve: bool = False  # resolve_threshold 8 (hysteresis)
    rows_exclude: str = "violations"
    rows_method: str = "relative"
    window_method: str = "robust"
    absence_grace: float = 0.0  # in steps
    absence_for_runs: int = 1
    psi_for_runs: int = 1
    psi_keep: int = 0  # in steps
    psi_resolve: bool = False  # resolve_threshold 0.1 (hysteresis: a fresh eval may then say another state)
    pq_metric: str = "auc"
    pq_for_runs: int = 1
    pq_for: float = 0.0  # in steps
    sql_keep: int = 0  # in steps
    one_group: bool = False  # every rule in the group of the windowed kinds
    runs_every: int = 1  # the per-run group's interval, in steps


@dataclass(frozen=True)
class Outage:
    """The daemon is killed at step `step` (`before` its data, in the `mid`dle of it, or `during` its evaluation,
    which is then done again) and restarted `missed` steps later: the steps in between are not evaluated."""

    step: int
    phase: str
    missed: int = 0


@dataclass(frozen=True)
class Scenario:
    step: int  # seconds between evaluations: the interval of the group of the windowed kinds
    n_steps: int  # evaluations at t0 + i * step, i = 0 .. n_steps
    runs: tuple[Run, ...] = ()
    values: tuple[Values, ...] = ()
    predictions: tuple[Predictions, ...] = ()
    label_lag: float = 0.5  # labels end this many steps after their prediction
    rules: Rules = field(default_factory=Rules)
    outages: tuple[Outage, ...] = ()
    fresh: tuple[int, ...] = ()  # steps checked with a fresh `eval --at`
    seed: int = 0  # values, scores, labels, send order


# -- generating scenarios ------------------------------------------------------------------------------------------

LAGS_OK = (2.0, 9.99, 10.0)  # threshold 10, op ">": on the threshold is ok
LAGS_BAD = (10.01, 30.0)
ROWS_OK = (100.0, 97.0, 103.0, 100.0)
ROWS_BAD = (50.0, 160.0, 125.0)


@st.composite
def _flags(draw: st.DrawFn, n: int) -> list[bool]:
    """n flags in clusters: incidents of a few consecutive True."""
    out: list[bool] = []
    while len(out) < n:
        length = draw(st.integers(1, 4))
        bad = draw(st.booleans()) if out and not out[-1] else False
        out.extend([bad] * length)
    return out[:n]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    step = draw(st.sampled_from([HOUR, DAY]))
    n_steps = draw(st.integers(6, 16))
    runs: list[Run] = []
    for dataset in ("a", "b")[:draw(st.integers(1, 2))]:
        every = draw(st.sampled_from([1, 1, 2]))  # runs every step (hourly, daily), or every other
        offset = draw(st.sampled_from([0.25, 0.5, 1.0]))  # where in its step a run ends (1.0: on the step)
        slots = range(0, n_steps + 1, every)
        bad = draw(_flags(len(slots)))
        for k, i in enumerate(slots):
            if k > 1 and draw(st.integers(0, 9)) == 0:
                continue  # a gap: the run did not happen
            at = (i - 1) * step + int(offset * step)
            lag = draw(st.sampled_from(LAGS_BAD if bad[k] else LAGS_OK))
            rows = draw(st.sampled_from(ROWS_BAD if bad[k] else ROWS_OK))
            runs.append(Run(dataset, at, lag, rows))
    values: list[Values] = []
    for partner in ("p1", "p2")[:draw(st.integers(1, 2))]:
        shifted = draw(_flags(n_steps + 1))
        for i in range(n_steps + 1):
            values.append(Values(partner, i, draw(st.sampled_from([30, 30, 8, 0])), shifted[i]))
    predictions: list[Predictions] = []
    for model in ("m1", "m2")[:draw(st.integers(1, 2))]:
        bad = draw(_flags(n_steps + 1))
        for i in range(n_steps + 1):
            predictions.append(Predictions(model, i, draw(st.sampled_from([20, 20, 5, 0])), not bad[i],
                                           draw(st.sampled_from([1.0, 1.0, 0.3]))))
    rules = Rules(
        lag_for_runs=draw(st.integers(1, 3)), lag_for=draw(st.sampled_from([0.0, 1.5])),
        lag_keep=draw(st.sampled_from([0.0, 1.0, 2.5])), lag_resolve=draw(st.booleans()),
        rows_exclude=draw(st.sampled_from(["violations", "none"])),
        rows_method=draw(st.sampled_from(["relative", "zscore"])),
        window_method=draw(st.sampled_from(["robust", "quantile_band"])),
        absence_grace=draw(st.sampled_from([0.0, 0.5])), absence_for_runs=draw(st.integers(1, 2)),
        psi_for_runs=draw(st.integers(1, 2)), psi_keep=draw(st.integers(0, 2)), psi_resolve=draw(st.booleans()),
        pq_metric=draw(st.sampled_from(["auc", "coverage"])), pq_for_runs=draw(st.integers(1, 2)),
        pq_for=draw(st.sampled_from([0.0, 1.5])),
        sql_keep=draw(st.integers(0, 1)), one_group=draw(st.booleans()),
        runs_every=draw(st.sampled_from([1, 1, 2])) if n_steps % 2 == 0 else 1,
    )
    outages: list[Outage] = []
    i = draw(st.integers(1, n_steps))
    while i <= n_steps and len(outages) < 3 and draw(st.booleans()):
        missed = draw(st.sampled_from([0, 0, 1, 3]))
        phase = draw(st.sampled_from(["before", "mid", "during"]))
        if i + missed > n_steps or phase == "during":
            missed = 0
        outages.append(Outage(i, phase, missed))
        i += missed + draw(st.integers(1, 4))
    down = _down_steps(outages)
    evaluated = [i for i in range(n_steps + 1) if i not in down]
    fresh = tuple(sorted(set(draw(st.lists(st.sampled_from(evaluated), min_size=1, max_size=2)))))
    return Scenario(step, n_steps, tuple(runs), tuple(values), tuple(predictions),
                    draw(st.sampled_from([0.5, 1.5])), rules, tuple(outages), fresh, draw(st.integers(0, 2**32 - 1)))


def _down_steps(outages: Iterable[Outage]) -> set[int]:
    return {o.step + k for o in outages for k in range(o.missed)}


# -- rules -----------------------------------------------------------------------------------------------------------

def rules_yaml(sc: Scenario) -> str:
    """The rule file of a scenario: every kind, per-run kinds in group `runs`, windowed ones in `windows`."""
    s, r = sc.step, sc.rules

    def d(steps: float) -> str:
        return f"{round(steps * s)}s"

    resolve = "\n        resolve_threshold: 8" if r.lag_resolve else ""
    psi_resolve = "\n        resolve_threshold: 0.1" if r.psi_resolve else ""
    band = {"relative": "tolerance: 0.2", "zscore": "z: 3", "robust": "z: 3", "quantile_band": "quantiles: [0.1, 0.9]"}
    per_run = f"""
      - alert: Lag
        kind: threshold
        rung: freshness
        owner: data
        select: {{span: run}}
        group_by: [data.dataset]
        value: data.lag
        op: ">"
        threshold: 10{resolve}
        for_runs: {r.lag_for_runs}
        for: {d(r.lag_for)}
        keep_firing_for: {d(r.lag_keep)}
        lookback: 400d
      - alert: Rows
        kind: baseline
        rung: completeness
        owner: producer
        select: {{span: run}}
        group_by: [data.dataset]
        value: data.rows
        baseline: {{runs: 3, method: {r.rows_method}, {band[r.rows_method]}, min_history: 2, exclude: {r.rows_exclude}}}
        lookback: 400d
      - alert: RowsWindow
        kind: baseline
        rung: completeness
        owner: producer
        select: {{span: run}}
        group_by: [data.dataset]
        value: data.rows
        baseline: {{window: {d(4)}, method: {r.window_method}, {band[r.window_method]}, min_history: 3}}
        lookback: 400d
      - alert: Missing
        kind: absence
        rung: freshness
        owner: data
        select: {{span: run}}
        group_by: [data.dataset]
        expected_every: {d(1)}
        grace: {d(r.absence_grace)}
        for_runs: {r.absence_for_runs}
        lookback: 400d"""
    windowed = f"""
      - alert: AmountPSI
        kind: distribution
        rung: distribution
        owner: partners
        select: {{span: event}}
        group_by: [data.partner]
        attribute: data.amount
        method: psi
        current: {d(1)}
        baseline: {{window: {d(3)}}}
        bins: 5
        min_samples: 20
        op: ">"
        threshold: 0.25{psi_resolve}
        for_runs: {r.psi_for_runs}
        keep_firing_for: {d(r.psi_keep)}
      - alert: ModelQuality
        kind: prediction_quality
        rung: prediction_quality
        owner: ml
        select: {{span: predict}}
        group_by: [ml.model.version]
        metric: {r.pq_metric}
        window: {d(2)}
        label_delay: {d(2)}
        {"min_labels: 10" if r.pq_metric == "auc" else ""}
        op: "<"
        threshold: {0.7 if r.pq_metric == "auc" else 0.5}
        for_runs: {r.pq_for_runs}
        for: {d(r.pq_for)}
      - alert: LagSQL
        kind: sql
        rung: custom
        owner: data
        query: |
          SELECT d.value AS dataset, max(n.value) AS value
          FROM spans s
          JOIN span_strings d ON d.span_key = s.span_key AND d.key = 'data.dataset'
          JOIN span_numbers n ON n.span_key = s.span_key AND n.key = 'data.lag'
          WHERE s.name = 'run' AND s.end_time > $ts - INTERVAL '{2 * s} seconds' AND s.end_time <= $ts
          GROUP BY ALL
        op: ">"
        threshold: 10
        keep_firing_for: {d(r.sql_keep)}"""
    if r.one_group:
        return f"groups:\n  - name: windows\n    interval: {s}s\n    rules:{per_run}{windowed}\n"
    return (f"groups:\n  - name: runs\n    interval: {s * r.runs_every}s\n    rules:{per_run}\n"
            f"  - name: windows\n    interval: {s}s\n    rules:{windowed}\n")


KINDS = {"Lag": "threshold", "Rows": "baseline", "RowsWindow": "baseline", "Missing": "absence",
         "AmountPSI": "distribution", "ModelQuality": "prediction_quality", "LagSQL": "sql"}


def kind_of(rule_id: str) -> str:
    return KINDS[rule_id.split("/", 1)[1]]


# -- spans -------------------------------------------------------------------------------------------------------------

def first_step_time(now: float, interval: int) -> int:
    """t0: the next day boundary after now + 1 day that is also a slot of every group (replay evaluates each group
    at its own slots, up to the last step), so the daemon's scheduler (at the real clock) always evaluates before
    every step."""
    every = math.lcm(DAY, interval)
    return (math.floor((now + DAY) / every) + 1) * every


def build_spans(sc: Scenario, t0: int) -> list[list[ReadableSpan]]:
    """The spans of each step: those that end in (t(i - 1), t(i)], made with the SDK's tracer."""
    rng = random.Random(sc.seed)
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "pipeline"}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("equal-semantics")

    def emit(name: str, end: int, attrs: dict[str, Any]) -> None:
        span = tracer.start_span(name, start_time=(end - 1) * 10**9, attributes=attrs)
        span.end(end_time=end * 10**9)

    for r in sc.runs:
        emit("run", t0 + r.at, {"data.dataset": r.dataset, "data.lag": r.lag, "data.rows": r.rows})
    for v in sc.values:
        start = t0 + (v.step - 1) * sc.step
        for j in range(v.n):
            x = rng.gauss(160.0 if v.shifted else 100.0, 15.0)
            emit("event", start + (j + 1) * sc.step // (v.n + 1), {"data.partner": v.partner, "data.amount": x})
    for p in sc.predictions:
        start = t0 + (p.step - 1) * sc.step
        for j in range(p.n):
            label, u = rng.random() < 0.5, rng.random()
            score = (0.6 + 0.4 * u if label else 0.4 * u) if p.good else u
            end = start + (j + 1) * sc.step // (p.n + 1)
            pid = f"{p.model}-{p.step}-{j}"
            emit("predict", end, {"ml.model.version": p.model, "ml.prediction_id": pid, "ml.score": score})
            if rng.random() < p.coverage:
                emit("label", end + round(sc.label_lag * sc.step), {"ml.prediction_id": pid, "ml.label": int(label)})
    provider.shutdown()
    steps: list[list[ReadableSpan]] = [[] for _ in range(sc.n_steps + 1)]
    for span in mem.get_finished_spans():
        assert span.end_time is not None
        i = math.ceil((span.end_time // 10**9 - t0) / sc.step)
        if 0 <= i <= sc.n_steps:
            steps[i].append(span)
    for batch in steps:
        rng.shuffle(batch)  # runs out of order within a step
    return steps


# -- the live daemon ---------------------------------------------------------------------------------------------------

class Live:
    """The daemon under test: started, killed and restarted on one file; what it answered."""

    def __init__(self, db: Path, rules: Path, t0: int) -> None:
        # without the daemon's self-monitoring group: its 1-minute slots would each be judged when an evaluation
        # jumps a day ahead (1440 of them), which takes seconds, and its alerts are not the scenario's
        config = db.parent / "config.yaml"
        config.write_text("self_monitoring:\n  enabled: false\n")
        self.args = ["--config", str(config), "--db", str(db), "--rules", str(rules), *PORTS]
        self.t0 = t0
        self.proc: DaemonProcess | None = None
        self.exporter: OTLPSpanExporter | None = None
        self.answered: list[dict[str, Any]] = []  # the transitions of every acknowledged POST /evaluate
        self.logs: list[str] = []
        self.restarts = 0

    def start(self) -> None:
        """Start the daemon and wait for its scheduler's first evaluation of every rule (at the real clock, before
        t0), so that it comes before the next step, as it does when data arrive in real time."""
        proc = self.proc = DaemonProcess(self.args).start()
        self.exporter = OTLPSpanExporter(endpoint=proc.grpc_endpoint, insecure=True, timeout=30)
        if self.restarts == 0:
            wait_for(lambda: len(proc.query("SELECT rule_id FROM rule_health WHERE epoch(last_eval_at) < "
                                            f"{self.t0}")) >= len(KINDS), timeout=60, interval=0.05)
        # after a restart the scheduler's slot (the real clock) is before what was judged: the engine skips it
        self.restarts += 1

    def kill(self) -> None:
        assert self.proc is not None and self.exporter is not None
        self.exporter.shutdown()
        self.proc.kill()
        self.logs.extend(self.proc.lines)
        self.proc = self.exporter = None

    def stop(self) -> None:
        assert self.proc is not None and self.exporter is not None
        self.exporter.shutdown()
        code = self.proc.stop()
        self.logs.extend(self.proc.lines)
        self.proc = self.exporter = None
        assert code == 0, "\n".join(self.logs[-30:])

    def send(self, spans: Sequence[ReadableSpan]) -> None:
        assert self.exporter is not None
        if spans:
            assert self.exporter.export(list(spans)) == SpanExportResult.SUCCESS

    def evaluate(self, at: int) -> dict[str, Any]:
        assert self.proc is not None
        for _ in range(100):
            try:
                answer = self.proc.evaluate(at)
            except AdminError as exc:
                if exc.status != 503:  # starting up
                    raise
                time.sleep(0.05)
                continue
            unhealthy = {k: v for k, v in answer["unhealthy"].items() if ours(k)}
            assert not unhealthy, unhealthy
            self.answered.extend(answer["transitions"])
            return answer
        raise AssertionError("POST /evaluate kept answering 503")

    def evaluate_and_kill(self, at: int, delay: float) -> None:
        """POST /evaluate and SIGKILL the daemon `delay` seconds later, whatever it is doing then; an answer that
        came before the kill counts as acknowledged."""
        assert self.proc is not None
        proc = self.proc
        done: list[dict[str, Any]] = []

        def call() -> None:
            with contextlib.suppress(AdminError, AdminUnavailable, OSError, ValueError):  # killed before it answered
                done.append(proc.evaluate(at))

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(delay)
        self.kill()
        caller.join(30)
        if done:
            self.answered.extend(done[0]["transitions"])

    def states(self) -> dict[tuple[str, str], dict[str, Any]]:
        assert self.proc is not None
        rows = self.proc.query(
            "SELECT rule_id, series, state, value, threshold, detail, consecutive_violations, "
            + ", ".join(f"epoch_ms({f}) AS {f}" for f in TIME_FIELDS) + " FROM alert_state")
        return {(r["rule_id"], _series(r["series"])): _state(r) for r in rows}

    def transitions(self) -> list[tuple[Any, ...]]:
        assert self.proc is not None
        rows = self.proc.query("SELECT rule_id, series, from_state, state, epoch_ms(changed_at) AS changed_at, value "
                               "FROM alerts ORDER BY seq")
        return [(r["rule_id"], _series(r["series"]), r["from_state"], r["state"], r["changed_at"], _num(r["value"]))
                for r in rows]


# -- normalising the shapes (the store's columns through /query, the commands' JSON) -----------------------------------

def _series(s: Any) -> str:
    return json.dumps(json.loads(s) if isinstance(s, str) else s, sort_keys=True)


def _num(x: Any) -> Any:
    """A value as a comparable key: non-finite values are strings in both JSON shapes ("inf", "Infinity")."""
    if x is None:
        return None
    if isinstance(x, list):
        return tuple(_num(v) for v in x)
    f = float(x)
    return repr(f) if not math.isfinite(f) else f


def _ms(iso: str | None) -> int | None:
    if iso is None:
        return None
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp() * 1000)


def _state(r: dict[str, Any]) -> dict[str, Any]:
    threshold = r["threshold"]
    if isinstance(threshold, str):
        threshold = json.loads(threshold)
    out = {"state": r["state"], "value": _num(r["value"]), "threshold": _num(threshold), "detail": r["detail"] or "",
           "consecutive_violations": r["consecutive_violations"]}
    for f in TIME_FIELDS:
        out[f] = r[f] if isinstance(r[f], int | None) else _ms(r[f])
    return out


def _transition(t: dict[str, Any]) -> tuple[Any, ...]:
    return (t["rule_id"], _series(t["series"]), t["from_state"], t["state"], _ms(t["changed_at"]), _num(t["value"]))


def _eval_states(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for r in results:
        assert r["state"] != "error", r
        if not r["series"] and r["detail"].startswith("no series"):
            continue  # a rule without any series yet: not a row of alert_state
        out[(r["rule_id"], _series(r["series"]))] = _state(r)
    return out


# -- the commands ----------------------------------------------------------------------------------------------------

class Cli:
    """`otel-evaluator ARGS` started now (several run at once: they open the file read-only)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "evaluator", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def json(self) -> Any:
        out, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"{' '.join(self.args)}: exit {self.proc.returncode}\n{err}"
        return json.loads(out)


# -- comparing ---------------------------------------------------------------------------------------------------------

def _iso(t: int | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(rows: Iterable[tuple[Any, ...]]) -> str:
    return "\n".join(f"  {r[0]} {r[1]} {r[2]}->{r[3]} at {_iso(r[4])} value {r[5]}" for r in rows) or "  (none)"


def same_transitions(what: str, got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> list[str]:
    """The difference of two lists of transitions (as multisets), or nothing."""
    g, w = Counter(got), Counter(want)
    if g == w:
        return []
    only_got = sorted((g - w).elements(), key=lambda r: (r[4], r[0], r[1]))
    only_want = sorted((w - g).elements(), key=lambda r: (r[4], r[0], r[1]))
    return [f"{what}:\nonly in the first:\n{_show(only_got)}\nonly in the second:\n{_show(only_want)}"]


def same_states(what: str, got: dict[tuple[str, str], dict[str, Any]], want: dict[tuple[str, str], dict[str, Any]],
                fields: Sequence[str] | None = None) -> list[str]:
    """The series whose states differ (in `fields`, default all), or nothing."""
    lines = []
    for key in sorted(set(got) | set(want)):
        a, b = got.get(key), want.get(key)
        if a is None or b is None:
            lines.append(f"  {key[0]} {key[1]}: {'missing' if a is None else a} vs {'missing' if b is None else b}")
            continue
        names = fields or sorted(set(a) | set(b))
        diff = {f: (a.get(f), b.get(f)) for f in names if a.get(f) != b.get(f)}
        if diff:
            lines.append(f"  {key[0]} {key[1]} ({a['state']} vs {b['state']}): {diff}")
    return [f"{what}:\n" + "\n".join(lines)] if lines else []


def known_from_history(daemon: dict[tuple[str, str], dict[str, Any]],
                       fresh: dict[tuple[str, str], dict[str, Any]]) -> set[tuple[str, str]]:
    """The windowed series whose daemon state a fresh eval cannot know, as docs/rules.md says ("One evaluation
    semantics"): an alert kept firing through "no data", a resolve (a fresh eval never saw it fire: inactive), a
    series the rule's data stopped mentioning ("no longer judged", absent from a fresh eval)."""
    out = set()
    for key, a in daemon.items():
        b = fresh.get(key)
        gone = b is None and str(a.get("detail", "")).startswith("no longer judged")
        if gone or (b is not None and (a["state"], b["state"]) in (("firing", "nodata"), ("resolved", "inactive"))):
            out.add(key)
    return out


def _part(states: dict[tuple[str, str], Any], which: Callable[[str], bool]) -> dict[tuple[str, str], Any]:
    return {k: v for k, v in states.items() if which(k[0])}


def ours(rule_id: str) -> bool:
    """A rule of the scenario (not of the daemon's own self-monitoring group)."""
    return rule_id.split("/", 1)[1] in KINDS


# -- the property ------------------------------------------------------------------------------------------------------

def run_daemon(sc: Scenario, db: Path, rules: Path, times: list[int], spans: list[list[ReadableSpan]]
               ) -> tuple[dict[int, dict[tuple[str, str], dict[str, Any]]], list[tuple[Any, ...]], list[str]]:
    """Feed the daemon step by step, with the scenario's outages: its states after each evaluation, the
    transitions it recorded, and what failed."""
    outages = {o.step: o for o in sc.outages}
    down = _down_steps(sc.outages)
    rng = random.Random(sc.seed + 1)
    live = Live(db, rules, times[0])
    states: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}
    live.start()
    try:
        queued: list[ReadableSpan] = []  # data that waited while the daemon was down
        for i, t in enumerate(times):
            batch = queued + spans[i]
            queued = []
            outage = outages.get(i)
            if outage is not None and outage.phase in ("before", "mid"):
                half = len(batch) // 2 if outage.phase == "mid" else 0
                live.send(batch[:half])
                live.kill()
                batch = batch[half:]
            if i in down:
                queued = batch
                continue
            if live.proc is None:
                live.start()
            live.send(batch)
            if outage is not None and outage.phase == "during":
                live.evaluate_and_kill(t, rng.uniform(0.0, 0.08))
                live.start()  # an evaluation killed before it answered is done again
            live.evaluate(t)
            states[i] = _part(live.states(), ours)
        recorded = [t for t in live.transitions() if ours(t[0])]
        live.stop()
    finally:
        if live.proc is not None:
            live.kill()
    answered = [t for t in map(_transition, live.answered) if ours(t[0])]
    # every transition the daemon answered is recorded (SIGKILL loses nothing acknowledged); an evaluation killed
    # before it answered may have been recorded too (one transaction), so the table may hold more
    missing = Counter(answered) - Counter(recorded)
    problems = ["answered by POST /evaluate, not in the alerts table:\n" + _show(missing.elements())] if missing else []
    if not any(o.phase == "during" for o in sc.outages):
        problems += same_transitions("transitions: the daemon's alerts table (first) vs its answers to POST /evaluate "
                                     "(second)", recorded, answered)
    return states, recorded, problems


@dataclass
class Checked:
    problems: list[str]  # every mismatch, described
    recorded: list[tuple[Any, ...]]  # the daemon's transitions (rule_id, series, from, to, changed_at ms, value)
    t0: int


def check_scenario(sc: Scenario, workdir: Path) -> Checked:
    """Run a scenario through the daemon, replay, eval and fresh evals, and compare."""
    t0 = first_step_time(time.time(), sc.step * sc.rules.runs_every)
    times = [t0 + i * sc.step for i in range(sc.n_steps + 1)]
    db, rules = workdir / "ev.duckdb", workdir / "rules.yaml"
    rules.write_text(rules_yaml(sc))
    daemon_states, recorded, problems = run_daemon(sc, db, rules, times, build_spans(sc, t0))

    iso = [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for t in times]
    base = ["--db", str(db), "--rules", str(rules), "--format", "json"]
    replay = Cli("replay", *base, "--from", iso[0], "--to", iso[-1])  # at each group's own slots
    sequential = Cli("eval", *base, "--at", *iso)
    fresh = {i: Cli("eval", *base, "--at", iso[i]) for i in sc.fresh}
    replayed = [_transition(t) for t in replay.json()["transitions"]]
    evaluations = sequential.json()["evaluations"]
    fresh_states = {i: _eval_states(p.json()["evaluations"][0]["results"]) for i, p in fresh.items()}

    problems += same_transitions("transitions: the daemon's alerts table (first) vs replay (second)", recorded,
                                 replayed)
    assert [e["evaluated_at"] for e in evaluations] == [s.replace("Z", ".000Z") for s in iso]
    for i, states in daemon_states.items():
        problems += same_states(f"step {i} ({iso[i]}): the daemon vs eval --at t0 .. tN", states,
                                _eval_states(evaluations[i]["results"]))
    def per_run(rule_id: str) -> bool:
        return kind_of(rule_id) in PER_RUN_KINDS

    def hysteresis(rule_id: str) -> bool:  # a windowed rule whose state a fresh eval may not know (the contract)
        return rule_id == "windows/AmountPSI" and sc.rules.psi_resolve

    def windowed(rule_id: str) -> bool:
        return not per_run(rule_id) and not hysteresis(rule_id)

    for i, states in fresh_states.items():
        where = f"step {i} ({iso[i]}): the daemon vs a fresh eval --at"
        daemon = daemon_states[i]
        problems += same_states(f"{where}, per-run kinds", _part(daemon, per_run), _part(states, per_run))
        history = known_from_history(_part(daemon, windowed), _part(states, windowed))
        problems += same_states(f"{where}, windowed kinds",
                                {k: v for k, v in _part(daemon, windowed).items() if k not in history},
                                {k: v for k, v in _part(states, windowed).items() if k not in history},
                                fields=("state", "value", "threshold"))
        problems += same_states(f"{where}, a windowed kind with a resolve threshold", _part(daemon, hysteresis),
                                _part(states, hysteresis), fields=("value", "threshold"))
    return Checked(problems, recorded, t0)


def _daily(values: Sequence[float]) -> tuple[Run, ...]:
    """Runs of dataset a, one a step, at a quarter of each step (lag 2: healthy)."""
    return tuple(Run("a", i * DAY - 3 * DAY // 4, 2.0, v) for i, v in enumerate(values))


# 48 rows a day for 10 days, 19 for 4 (an incident), 48 for 8: `runs: 3, relative, tolerance 0.2, min_history 2`
# resolves on the first healthy run after the incident against the last 3 runs that entered (mean 48), in the
# daemon, replay and eval alike (fresh evals just after the 18th and 19th runs)
BASELINE_INCIDENT = Scenario(step=DAY, n_steps=21, runs=_daily([48.0] * 10 + [19.0] * 4 + [48.0] * 8),
                             fresh=(17, 18))

# hourly runs, one violating run (lag 30) at step 3 with `for: 1.5h` and `keep_firing_for: 2.5h`, judged late: the
# daemon is down for steps 3 to 5 and judges runs 3 to 6 at once at step 6. The next run is ok before `for` ran
# out: inactive -> pending -> inactive, never a firing -> resolved flash
SHORT_VIOLATION_AFTER_DOWNTIME = Scenario(
    step=HOUR, n_steps=8, runs=tuple(Run("a", i * HOUR - 3 * HOUR // 4, 30.0 if i == 3 else 2.0, 100.0)
                                     for i in range(9)),
    rules=Rules(lag_for=1.5, lag_keep=2.5), outages=(Outage(3, "before", 3),), fresh=(6, 8))


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=CI, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])
@example(BASELINE_INCIDENT)
@example(SHORT_VIOLATION_AFTER_DOWNTIME)
@given(scenarios())
def test_daemon_replay_and_eval_decide_the_same_alerts(sc: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="equal-semantics-") as workdir:
        problems = check_scenario(sc, Path(workdir)).problems
    assert not problems, "\n\n".join(problems)


def test_a_short_violation_judged_late_is_not_a_flash(tmp_path: Path) -> None:
    """The daemon down while a short violation happens: judged at once after the restart, it is pending and then
    inactive at the runs' own times, as replay and eval say."""
    checked = check_scenario(SHORT_VIOLATION_AFTER_DOWNTIME, tmp_path)
    assert not checked.problems, "\n\n".join(checked.problems)
    lag = [(t[2], t[3], (t[4] // 1000 - checked.t0) / HOUR) for t in checked.recorded if t[0] == "runs/Lag"]
    assert lag == [("inactive", "pending", 2.25), ("pending", "inactive", 3.25)]


# -- minimal reproductions of what the property found --------------------------------------------------------------

RESTART_RULES = """groups:
  - name: g
    interval: 1h
    rules:
      - alert: Missing
        kind: absence
        rung: freshness
        owner: data
        select: {span: run}
        group_by: [data.dataset]
        expected_every: 1h
        for_runs: 3
      - alert: Lag
        kind: threshold
        rung: freshness
        owner: data
        select: {span: run}
        group_by: [data.dataset]
        value: data.lag
        op: ">"
        threshold: 10
"""


def _send_run(daemon: Daemon, end: int, lag: float) -> None:
    """One run of dataset a ending at `end` (unix seconds), with the SDK."""
    assert daemon.grpc is not None
    provider = TracerProvider(resource=Resource.create({"service.name": "pipeline"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{daemon.grpc.port}",
                                                                     insecure=True)))
    span = provider.get_tracer("restart").start_span("run", start_time=(end - 60) * 10**9)
    span.set_attributes({"data.dataset": "a", "data.lag": lag})
    span.end(end_time=end * 10**9)
    provider.shutdown()


def _transitions(daemon: Daemon, rule_id: str) -> list[tuple[str, str, str]]:
    """POST /evaluate now: the transitions of one rule, as (from, to, changed_at)."""
    return [(t["from_state"], t["state"], t["changed_at"]) for t in daemon.evaluate_now()["transitions"]
            if t["rule_id"] == rule_id]


def _restart(daemon: Daemon, clock: FakeClock, at: int) -> Daemon:
    """Stop the daemon, start a new one on its file at `at`, and let its scheduler evaluate its first slot."""
    daemon.shutdown()
    clock.set(at)
    restarted = Daemon(daemon.config, clock=clock)
    restarted.start()
    restarted.scheduler.run_slot("g")  # now, or already done by the start-up job
    return restarted


def _iso_ms(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_absence_deadlines_are_judged_once_when_the_daemon_restarts_within_a_slot(tmp_path: Path) -> None:
    """A run at 10:11, then none. POST /evaluate at 12:50 judges the
    deadlines 11:11 and 12:11 (pending, 2 of for_runs 3). The daemon restarts at 12:55; its scheduler evaluates
    the slot 12:00, before the previous evaluation's time. POST /evaluate at 12:56 must not judge 12:11 again:
    the third missed run is 13:11, so the alert is still pending with 2 violations."""
    (tmp_path / "rules.yaml").write_text(RESTART_RULES)
    noon = (math.floor(time.time() / DAY) + 30) * DAY + 12 * HOUR  # any slot: the clock is fake
    clock = FakeClock(noon - 2 * HOUR + 15 * 60)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(tmp_path / "rules.yaml"),)), clock=clock)
    daemon.start()
    try:
        daemon.scheduler.run_slot("g")  # the slot 10:00
        _send_run(daemon, noon - 2 * HOUR + 11 * 60, 2.0)
        clock.set(noon + 50 * 60)
        assert _transitions(daemon, "g/Missing") == [("inactive", "pending", _iso_ms(noon - HOUR + 11 * 60))]
        daemon = _restart(daemon, clock, noon + 55 * 60)
        clock.set(noon + 56 * 60)
        again = _transitions(daemon, "g/Missing")
        cur = daemon.store.cursor()
        state = cur.execute("SELECT state, consecutive_violations FROM alert_state WHERE rule_id = 'g/Missing'"
                            ).fetchall()
        cur.close()
    finally:
        daemon.shutdown()
    assert (again, state) == ([], [("pending", 2)])


def test_a_late_run_is_judged_when_the_daemon_restarts_within_a_slot(tmp_path: Path) -> None:
    """A run of 12:30 is judged at 12:50; a run of 12:20 (lag 30) arrives at 12:53, late. A daemon that goes on
    judges it at its own time when it evaluates next (firing, "late: ..."). Restarted at 12:55, the daemon's
    scheduler evaluates the slot 12:00 first, which reads no run of 12:20 (after its time) but counts it as
    seen: the late run must still be judged at 12:56."""
    (tmp_path / "rules.yaml").write_text(RESTART_RULES)
    noon = (math.floor(time.time() / DAY) + 30) * DAY + 12 * HOUR
    clock = FakeClock(noon + 5 * 60)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(tmp_path / "rules.yaml"),)), clock=clock)
    daemon.start()
    try:
        daemon.scheduler.run_slot("g")
        _send_run(daemon, noon + 30 * 60, 2.0)
        clock.set(noon + 50 * 60)
        assert _transitions(daemon, "g/Lag") == []
        _send_run(daemon, noon + 20 * 60, 30.0)
        daemon = _restart(daemon, clock, noon + 55 * 60)
        clock.set(noon + 56 * 60)
        late = _transitions(daemon, "g/Lag")
    finally:
        daemon.shutdown()
    assert late == [("inactive", "firing", _iso_ms(noon + 20 * 60))]


def test_fresh_eval_of_a_windowed_alert_firing_through_no_data(tmp_path: Path) -> None:
    """A distribution alert fires at step 4; at step 5 the current window has no values ("no data"), which never
    resolves it: the daemon says firing. A fresh `eval --at` step 5 judges only step 5 (for_runs 1, no for or
    keep_firing_for) and says nodata."""
    values = tuple(Values("p1", i, 30 if 0 < i < 5 else 0, i == 4) for i in range(6))
    problems = check_scenario(Scenario(step=HOUR, n_steps=5, values=values, fresh=(5,)), tmp_path).problems
    assert not problems, "\n\n".join(problems)


def test_fresh_eval_at_the_slot_a_windowed_alert_resolves(tmp_path: Path) -> None:
    """The sql rule (max lag over the last two steps > 10) fires at step 3 and resolves at step 5: the daemon says
    resolved at step 5. A fresh `eval --at` step 5 judges only step 5 and says inactive."""
    runs = tuple(Run("a", i * HOUR - 3 * HOUR // 4, 30.0 if i == 3 else 2.0, 100.0) for i in range(6))
    problems = check_scenario(Scenario(step=HOUR, n_steps=5, runs=runs, fresh=(5,)), tmp_path).problems
    assert not problems, "\n\n".join(problems)


def test_fresh_eval_of_a_windowed_series_that_stopped_returning_rows(tmp_path: Path) -> None:
    """The sql rule fires for dataset a at step 2; from step 4 its query returns no row for a (no run in the last
    two steps): the daemon says "no longer judged" (no data: the firing alert keeps firing, and a state that is
    not firing becomes nodata, never silently frozen). A fresh `eval --at` step 5 has no series a at all
    (documented in docs/rules.md); everything else agrees."""
    runs = tuple(Run("a", i * HOUR - 3 * HOUR // 4, 30.0 if i == 2 else 2.0, 100.0) for i in range(3))
    problems = check_scenario(Scenario(step=HOUR, n_steps=5, runs=runs, fresh=(5,)), tmp_path).problems
    assert not problems, "\n\n".join(problems)


# -- the baseline incident, as a new user runs it ------------------------------------------------------------------

INCIDENT_RULES = """groups:
  - name: completeness
    interval: 1m
    rules:
      - alert: RowCount
        kind: baseline
        rung: completeness
        owner: producer
        select: {span: features.daily.run}
        group_by: [data.dataset]
        value: data.row_count
        baseline: {runs: 3, method: relative, tolerance: 0.2, min_history: 2%s}
        lookback: 30d
"""


@pytest.mark.parametrize(("exclude", "transitions", "after_run_18"), [
    (None, [(0, "inactive", "nodata"), (2, "nodata", "inactive"), (10, "inactive", "firing"),
            (14, "firing", "resolved")], "inactive"),
    # violating runs enter the baseline: the 19s become normal (resolved on the 4th), the recovery fires until the
    # last 3 runs are 48 again: resolved on the 18th run
    ("none", [(0, "inactive", "nodata"), (2, "nodata", "inactive"), (10, "inactive", "firing"),
              (13, "firing", "resolved"), (14, "resolved", "firing"), (17, "firing", "resolved")], "resolved"),
])
def test_a_baseline_incident_in_the_daemon_and_in_eval(tmp_path: Path, exclude: str | None,
                                                       transitions: list[tuple[int, str, str]],
                                                       after_run_18: str) -> None:
    """48 rows a day for 10 days, 19 for 4, 48 for 8, sent with the SDK to a daemon (as a backfill of the last 22
    days) that is asked to evaluate after each run; then `eval --at` an hour after the 18th run over its file: both
    say the same state, against the last 3 runs that entered the baseline (mean 48)."""
    rules = tmp_path / "rows.rules.yaml"
    rules.write_text(INCIDENT_RULES % (f", exclude: {exclude}" if exclude else ""))
    db = tmp_path / "ev.duckdb"
    first = (math.floor(time.time() / DAY) - 22) * DAY + 6 * HOUR
    values = [48] * 10 + [19] * 4 + [48] * 8
    seen: list[tuple[int, str, str]] = []
    daemon_after_18: dict[str, Any] = {}
    with daemon_process(["--db", str(db), "--rules", str(rules), *PORTS]) as proc:
        provider = TracerProvider(resource=Resource.create({"service.name": "feature-pipeline"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=proc.grpc_endpoint, insecure=True)))
        tracer = provider.get_tracer("rows")
        for i, rows in enumerate(values):
            end = (first + i * DAY) * 10**9
            span = tracer.start_span("features.daily.run", start_time=end - 600 * 10**9)
            span.set_attribute("data.dataset", "orders")
            span.set_attribute("data.row_count", rows)
            span.end(end_time=end)
            answer = proc.evaluate()
            seen += [(i, t["from_state"], t["state"]) for t in answer["transitions"]
                     if t["rule_id"] == "completeness/RowCount"]
            if i == 17:
                (daemon_after_18,) = proc.query("SELECT state, value, threshold, detail FROM alert_state "
                                                "WHERE rule_id = 'completeness/RowCount'")
        provider.shutdown()
        assert proc.stop() == 0
    assert seen == transitions, seen
    assert daemon_after_18["state"] == after_run_18
    assert daemon_after_18["detail"] == "mean of 3 runs 48, deviation +0.0%"
    at = datetime.fromtimestamp(first + 17 * DAY + HOUR, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = Cli("eval", "--db", str(db), "--rules", str(rules), "--at", at, "--format", "json").json()
    (row,) = result["evaluations"][0]["results"]
    assert (row["series"], row["state"], row["value"], row["threshold"], row["detail"]) == (
        {"data.dataset": "orders"}, after_run_18, 0.0, [-0.2, 0.2], "mean of 3 runs 48, deviation +0.0%")
    assert json.loads(daemon_after_18["threshold"]) == row["threshold"] and daemon_after_18["value"] == row["value"]
