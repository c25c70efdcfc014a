"""Rules as frozen data: what the loader builds from YAML and what kinds, the state machine and the engine read.

A rule names the spans it reads (a Selector), how they split into series (group_by), what its kind computes
(the kind's spec), and how the alert behaves over time (for_runs, for, keep_firing_for, hysteresis).
docs/rules.md is the reference for the file format and must match the loader.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
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


def fmt_number(x: float) -> str:
    """A number for a detail text: 4 significant digits, whole numbers from 100, exponent form when huge/tiny."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e15 or abs(x) < 1e-3:
        return f"{x:.6g}"
    if abs(x) >= 100:
        return str(round(x))
    return f"{x:.4g}"


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
    method: str = "relative"  # relative | zscore | robust | quantile_band
    tolerance: float = 0.05  # relative: |value - mean| / |mean| > tolerance violates
    z: float = 3.0  # zscore: |value - mean| / std > z violates; robust: |value - median| / (1.4826 MAD) > z
    quantiles: tuple[float, float] = (0.05, 0.95)  # quantile_band: value outside [q_lo, q_hi] of history violates
    history_runs: int | None = None  # baseline = the previous N runs ...
    history_window: float | None = None  # ... or the runs in this many seconds before the run (e.g. 7d)
    min_history: int = 3  # fewer baseline runs than this: no data
    seasonality: str | None = None  # None | weekday (only runs on the same UTC weekday form the baseline)
    exclude: str = "violations"  # violations: violating runs never enter the baseline | none: they do
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
    budget: float | None = None  # seconds an evaluation of this rule may take (None: the group's, else the default)

    @cached_property
    def id(self) -> str:
        return f"{self.group}/{self.name}"

    @cached_property
    def fingerprint(self) -> str:
        """Changes when anything that affects judgement changes; unchanged rules keep their state on reload.
        Cached: a rule is frozen, and this is read for every series on every evaluation."""
        data = asdict(self)
        data.pop("source")
        data.pop("budget")  # how long it may take does not change what it decides
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
    budget: float | None = None  # default time budget of the group's rules (seconds)


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
    reason: str = ""  # for "no data": a short code of why (counted per rule and reason), e.g. "too_few_values"

    @property
    def hysteresis_violated(self) -> bool | None:
        return self.violated if self.still_violated is None else self.still_violated


class RuleError(Exception):
    """A rule could not be evaluated (bad SQL at run time, a missing attribute); the rule is marked unhealthy."""


@dataclass(frozen=True)
class SeriesCursor:
    """What the engine hands a kind about one series it knows: the newest run judged (per-run kinds; None for
    kinds judged at slots) and the memory the kind returned for the series last time."""

    at: float | None
    run_key: int | None
    memory: Any = None


@dataclass(frozen=True)
class RulePrior:
    """What the engine hands a kind about one rule: when it was last evaluated (None: never, or since it changed;
    a per-run kind then judges the rule's whole history) and its known series."""

    since: float | None
    series: Mapping[SeriesKey, SeriesCursor] = field(default_factory=dict)
    seen_key: int | None = None  # the highest span key there was at the previous evaluation (None: unknown)
    key_hi: int | None = None  # the highest span key there is now: per-run kinds read runs up to it


@dataclass(frozen=True)
class Record:
    """A side record of an evaluation for the store to write with the evaluation's alert state: a row of
    `quality_values` or `frozen_baselines` (docs/schema.md), as column -> value."""

    table: str
    row: Mapping[str, Any]


@dataclass
class KindResult:
    """What a kind found for one rule: samples, per-series memory to keep with the series' state (returned again
    through SeriesCursor.memory), and side records."""

    samples: list[Sample]
    memory: dict[SeriesKey, Any] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)


TIMELINES = ("runs", "slots")


class RuleKind(Protocol):
    """A kind judges rules of its kind at time ts and returns what it found. It reads the store through `cur`,
    never writes, never reads the clock and keeps no state between calls: whatever it must remember it returns as
    memory, and the engine hands it back.

    timeline "runs": one Sample per run (at = the run's end time, run_key its span_key) for the runs after each
    series' cursor up to ts, or, for a rule evaluated for the first time, every run of its history up to ts.
    timeline "slots": one Sample per series at ts; the engine calls it once per slot of the rule's group (multiples
    of the group interval), so the same slots are judged however evaluations are stepped.
    Rules are passed together so a kind can batch similar rules into one query; one rule's failure is that rule's
    RuleError only.
    """

    timeline: str
    # batched (default True): rules are passed together so a kind can share queries; a kind that answers rule by
    # rule says False, and the engine calls it one rule at a time (each within its own time budget).
    # changes_only (default False): a series a judgement does not mention keeps its state (the self-checks, which
    # say what changed in the running process); otherwise it is judged "no data: no longer judged"

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 prior: Mapping[str, RulePrior]) -> dict[str, list[Sample] | KindResult | RuleError]: ...


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
