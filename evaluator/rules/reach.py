"""How far back a rule reads raw spans, so retention never deletes what a loaded rule still reads.

A rule reads spans in two ways, and both count:

- a window that moves with the evaluation time (`window`, seconds before it): a baseline's `history_window`, a
  distribution's current window plus a relative baseline window, a prediction-quality window plus its label
  delay, a threshold's or absence rule's lookback;
- a fixed range of span end times, `(start, end]` in unix seconds, read whatever the evaluation time: a
  distribution's `baseline: {from, to}` (frozen or not: a series seen for the first time captures it then).

What cannot be said from the rule alone is left out: a baseline of the last N runs reaches as far back as its
runs go, and a SQL rule reads what its query reads.

The daemon (Daemon._fit_retention) uses this both ways: with `store.retention.spans` unset it keeps what the rules
read (a longer cutoff, and the fixed ranges spared); set explicitly, a rule reading more than it keeps is refused
(`retention_problems`), since a fixed range is read for as long as the rule exists and any finite retention
reaches it in the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from evaluator.rules.kinds.distribution import DistributionSpec
from evaluator.rules.kinds.prediction_quality import PredictionQualitySpec
from evaluator.rules.model import AbsenceSpec, BaselineSpec, Rule, RuleSet, ThresholdSpec
from evaluator.yamlsrc import Problem

DAY = 86400.0


@dataclass(frozen=True)
class Reach:
    """What one rule reads of the raw spans."""

    rule: Rule
    window: float | None = None  # seconds before the evaluation time (a moving window)
    fixed: tuple[float, float] | None = None  # span end times (start, end], read at every evaluation

def history_reach(rule: Rule) -> float | None:
    """The moving window the rule reads, in seconds before the evaluation time; None when it has none."""
    spec = rule.spec
    if isinstance(spec, BaselineSpec):
        return spec.history_window
    if isinstance(spec, DistributionSpec):
        if spec.baseline_range is not None or spec.baseline_window is None:
            return spec.current
        return spec.current + spec.baseline_window
    if isinstance(spec, PredictionQualitySpec):
        return spec.window + spec.label_delay
    if isinstance(spec, ThresholdSpec | AbsenceSpec):
        return spec.lookback
    return None


def fixed_range(rule: Rule) -> tuple[float, float] | None:
    """The absolute range of span end times the rule reads at every evaluation, if any."""
    spec = rule.spec
    if isinstance(spec, DistributionSpec) and spec.baseline_range is not None:
        return spec.baseline_range
    return None


def reaches(ruleset: RuleSet) -> list[Reach]:
    """The reach of every rule of which something is known."""
    out = [Reach(r, history_reach(r), fixed_range(r)) for r in ruleset.rules()]
    return [r for r in out if r.window is not None or r.fixed is not None]


def kept_ranges(ruleset: RuleSet) -> tuple[tuple[float, float], ...]:
    """The rules' fixed ranges, overlapping ones merged, oldest first: retention spares the spans ending in them."""
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(r.fixed for r in reaches(ruleset) if r.fixed is not None):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def cut_short(ruleset: RuleSet, span_retention: float | None) -> list[tuple[str, float]]:
    """(rule id, window) of every rule whose moving window is longer than raw spans are kept."""
    if span_retention is None:
        return []
    return [(r.rule.id, r.window) for r in reaches(ruleset) if r.window is not None and r.window > span_retention]


def retention_problems(ruleset: RuleSet, span_retention: float, now: float) -> list[Problem]:
    """One problem per rule that reads spans a retention of `span_retention` seconds deletes, at the rule's
    file:line, with the dates it needs: its moving window is longer, or it has a fixed range (read as long as
    the rule exists, so this retention deletes it now or later)."""
    kept = _days(span_retention)
    out: list[Problem] = []
    for reach in reaches(ruleset):
        rule = reach.rule
        why: list[str] = []
        if reach.window is not None and reach.window > span_retention:
            why.append(f"reads spans {_days(reach.window)} back from each evaluation (now: since "
                       f"{_iso(now - reach.window)}), longer than store.retention.spans keeps ({kept})")
        if reach.fixed is not None:
            lo, hi = reach.fixed
            first = lo + span_retention  # when the range's oldest spans are past retention
            when = "deletes them" if first <= now else f"deletes them from {_iso(first)} on"
            why.append(f"reads the spans from {_iso(lo)} to {_iso(hi)} (its fixed baseline) at every evaluation; "
                       f"store.retention.spans ({kept}) {when}")
        if why:
            fix = ("set store.retention.spans to off" if reach.fixed is not None
                   else f"set store.retention.spans to {math.ceil((reach.window or 0.0) / DAY)}d or more")
            out.append(Problem.at(rule.source, f"groups.{rule.group}.{rule.name}",
                                  "; ".join(why) + f": {fix}, or leave it unset (the daemon then keeps what the "
                                  "rules read), or change the rule"))
    return out


def describe_range(span: tuple[float, float]) -> str:
    """A (start, end] range as `start..end`, ISO 8601 UTC (for logs)."""
    return f"{_iso(span[0])}..{_iso(span[1])}"


def _days(seconds: float) -> str:
    return f"{round(seconds / DAY, 2):g}d"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
