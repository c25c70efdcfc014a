"""Rules as frozen data: what the loader builds from YAML and what kinds, the state machine and the engine read.

A rule names the spans it reads (a Selector), how they split into series (group_by), what its kind computes
(the kind's spec), and how the alert behaves over time (for_runs, for, keep_firing_for, hysteresis).
docs/rules.md is the reference for the file format and must match the loader.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import duckdb

RUNGS = ("freshness", "completeness", "distribution", "prediction_quality", "custom")
RUNG_ORDER = {name: i for i, name in enumerate(RUNGS)}
OPS = (">", ">=", "<", "<=", "==", "!=", "outside", "inside")

# Alert states. "resolved" behaves like "inactive" for what follows; "nodata" never replaces "firing".
INACTIVE, PENDING, FIRING, RESOLVED, NODATA = "inactive", "pending", "firing", "resolved", "nodata"

SeriesKey = tuple[tuple[str, str], ...]  # sorted (attribute, value) pairs of the rule's group_by


@dataclass(frozen=True)
class Condition:
    """value <op> threshold; for outside/inside the threshold is a [low, high] pair."""

    op: str
    threshold: float | tuple[float, float]

    def violated(self, value: float) -> bool:
        t = self.threshold
        if self.op in ("outside", "inside"):
            assert isinstance(t, tuple)
            inside = t[0] <= value <= t[1]
            return not inside if self.op == "outside" else inside
        assert isinstance(t, float | int)
        return {
            ">": value > t, ">=": value >= t, "<": value < t, "<=": value <= t, "==": value == t, "!=": value != t,
        }[self.op]

    def describe(self) -> str:
        t = self.threshold
        if isinstance(t, tuple):
            return f"{self.op} [{_num(t[0])}, {_num(t[1])}]"
        return f"{self.op} {_num(t)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.6g}"


@dataclass(frozen=True)
class Selector:
    """Which spans a rule reads: span name, service name, attribute equality (all optional, ANDed)."""

    span: str | None = None
    service: str | None = None
    where: tuple[tuple[str, str | float], ...] = ()  # (attribute, value): strings match span_strings, numbers


# -- kind specs: one frozen dataclass per kind -----------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdSpec:
    value: str  # the numeric attribute of each run, e.g. data.freshness_lag_hours
    lookback: float = 7 * 86400.0  # how far back the first evaluation looks for runs (seconds)


@dataclass(frozen=True)
class BaselineSpec:
    value: str
    method: str = "relative"  # relative | zscore | quantile_band
    tolerance: float = 0.05  # relative: |value - mean| / |mean| > tolerance violates
    z: float = 3.0  # zscore: |value - mean| / std > z violates
    quantiles: tuple[float, float] = (0.05, 0.95)  # quantile_band: value outside [q_lo, q_hi] of history violates
    history_runs: int | None = None  # baseline = the previous N runs ...
    history_window: float | None = None  # ... or the runs in this many seconds before the run (e.g. 7d)
    min_history: int = 3  # fewer baseline runs than this: no data
    seasonality: str | None = None  # None | weekday (only runs on the same UTC weekday form the baseline)
    lookback: float = 7 * 86400.0


@dataclass(frozen=True)
class AbsenceSpec:
    expected_every: float | None = None  # a run is expected at least this often (seconds) ...
    grace: float = 0.0  # ... plus this much slack
    lag_attribute: str | None = None  # or: this attribute (unix seconds of the newest event) ...
    max_lag: float | None = None  # ... may be at most this far behind the evaluation time (seconds)
    lookback: float = 35 * 86400.0  # series seen within this window are expected to keep reporting


@dataclass(frozen=True)
class SqlSpec:
    query: str  # a SELECT returning a `value` column; every other column is a series label


KindSpec = ThresholdSpec | BaselineSpec | AbsenceSpec | SqlSpec


@dataclass(frozen=True)
class Rule:
    name: str  # the alert name
    group: str
    kind: str
    rung: str
    owner: str
    severity: str
    spec: Any  # the kind's spec dataclass
    condition: Condition | None = None  # threshold / sql / absence comparisons
    resolve: Condition | None = None  # hysteresis: while firing, the alert stays until this no longer holds
    selector: Selector = field(default_factory=Selector)
    group_by: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    for_runs: int = 1
    for_seconds: float = 0.0
    keep_firing_for: float = 0.0
    source: str = ""  # file:line of the rule

    @property
    def id(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def fingerprint(self) -> str:
        """Changes when anything that affects judgement changes; unchanged rules keep their state on reload."""
        data = asdict(self)
        data.pop("source")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RuleGroup:
    name: str
    interval: float  # seconds
    rules: tuple[Rule, ...]
    source: str = ""
    # Ladder inhibition: while an alert of a higher rung fires for a series whose value of one of these labels is
    # D, transitions of lower rungs for D are recorded as inhibited and not sent. Empty: off.
    inhibit_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleSet:
    groups: tuple[RuleGroup, ...] = ()

    def rules(self) -> list[Rule]:
        return [r for g in self.groups for r in g.rules]


# -- what kinds return ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One judgement of one series.

    Per-run kinds (threshold, baseline) return one Sample per run, `at` = the run's end time and `run_key` its
    span_key; kinds judged at the evaluation time (absence, sql) return one per series with `at` = ts.
    violated None means "no data": the kind cannot judge (too little history, no rows for a known series).
    still_violated is the hysteresis verdict used while the alert fires (defaults to violated).
    """

    series: SeriesKey
    at: float  # unix seconds
    value: float | None
    threshold: float | tuple[float, float] | None
    violated: bool | None
    still_violated: bool | None = None
    run_key: int | None = None
    spans: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of the run(s) judged
    detail: str = ""  # how the value was reached, e.g. "mean of 7 runs 10000000"

    @property
    def hysteresis_violated(self) -> bool | None:
        return self.violated if self.still_violated is None else self.still_violated


class RuleError(Exception):
    """A rule could not be evaluated (bad SQL at run time, a missing attribute); the rule is marked unhealthy."""


@dataclass(frozen=True)
class SeriesCursor:
    """Where a per-run kind left off for one series: runs at or before (at, run_key) were already judged."""

    at: float
    run_key: int


class RuleKind(Protocol):
    """A kind evaluates rules of its kind at time ts. It never reads the clock.

    cursors: per rule id, per series, the last judged run (per-run kinds return only runs after it; a series
    with no cursor returns runs within the spec's lookback before ts). Rules are passed together so a kind can
    batch similar rules into one query.
    """

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 cursors: dict[str, dict[SeriesKey, SeriesCursor]]) -> dict[str, list[Sample] | RuleError]: ...


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
