"""The alert lifecycle per rule and series, as pure functions over stored values (no timers, no clock).

inactive -> pending -> firing -> resolved, plus nodata. Every judgement (a Sample) carries its reference time: a
run's end time for per-run kinds, the slot time for kinds judged at slots. Transitions are decided on that time
line, not on when an evaluation happens to run:

- a judgement is folded at its own time, after whatever time alone made due before it: a pending alert whose
  `for` has elapsed fires at active_at + for; a firing alert kept by `keep_firing_for` resolves at
  last_violation_at + keep_firing_for when no violation came since;
- so a backlog judged in one evaluation (after downtime, a backfill, `eval`, `replay`) goes through the same
  states, with the same transition times, as the same judgements folded one evaluation at a time.

The transition table (docs/rules.md has it with examples):
- violating: inactive/resolved/nodata -> pending (a new episode: its own active_at and violating runs), pending ->
  firing once `for_runs` consecutive violations and `for` since active_at are reached (both 1 and 0 by default: a
  first violation goes inactive -> firing in one step, never showing pending);
- ok: pending -> inactive; firing -> resolved, unless keep_firing_for since the last violation has not run out;
  nodata -> inactive; resolved -> inactive, which is bookkeeping and not reported as a transition;
- no data: firing stays firing (no data never resolves an alert); nodata stays; inactive/pending/resolved ->
  nodata;
- while firing, `still_violated` (hysteresis) decides instead of `violated`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from evaluator.rules.model import FIRING, INACTIVE, NODATA, PENDING, RESOLVED, Rule, Sample, SeriesKey

MAX_VIOLATING_SPANS = 20  # span links kept per episode (the first and the latest ones)


@dataclass(frozen=True)
class SeriesState:
    series: SeriesKey = ()
    state: str = INACTIVE
    value: float | None = None
    threshold: float | tuple[float, float] | None = None
    detail: str = ""
    active_at: float | None = None  # the current episode's first violation (kept while resolved)
    fired_at: float | None = None
    resolved_at: float | None = None
    last_violation_at: float | None = None
    consecutive: int = 0  # consecutive violating judgements (runs, or slots for kinds judged at slots)
    last_run_at: float | None = None  # the newest run judged (per-run kinds)
    last_run_key: int | None = None
    violating_spans: tuple[tuple[str, str], ...] = ()  # the current episode's violating runs
    memory: Any = None  # what the kind asked to be handed back next time (e.g. a baseline's entered runs)
    announced: bool = False  # the current firing episode was sent (not inhibited)


@dataclass(frozen=True)
class Transition:
    rule_id: str
    series: SeriesKey
    at: float  # when the change happened on the judgements' time line (a run's time, a slot, a due time)
    from_state: str
    to_state: str
    value: float | None
    threshold: float | tuple[float, float] | None
    consecutive: int
    run_at: float | None  # the run that caused it (per-run kinds)
    spans: tuple[tuple[str, str], ...] = ()
    detail: str = ""
    evaluated_at: float | None = None  # the evaluation that decided it (at is when it happened in data time)
    started_at: float | None = None  # the episode's start (its first violation), on firing and resolved transitions


@dataclass
class Step:
    state: SeriesState
    evaluated_at: float | None = None
    transitions: list[Transition] = field(default_factory=list)


def _change(step: Step, rule: Rule, at: float, new: SeriesState, run_at: float | None) -> None:
    old = step.state
    if new.state != old.state and not (old.state == RESOLVED and new.state == INACTIVE):
        started = new.active_at if new.state in (FIRING, RESOLVED) else None
        step.transitions.append(Transition(
            rule.id, new.series, at, old.state, new.state, new.value, new.threshold, new.consecutive, run_at,
            new.violating_spans, new.detail, step.evaluated_at, started,
        ))
    step.state = new


def _due(rule: Rule, s: SeriesState) -> float | None:
    """When a pending alert fires, if time alone can make it (enough consecutive violations already)."""
    if s.consecutive >= rule.for_runs and s.active_at is not None:
        return s.active_at + rule.for_seconds
    return None


def advance(step: Step, rule: Rule, t: float) -> None:
    """What time alone makes due at or before t, each at its due time."""
    s = step.state
    if s.state == PENDING:
        due = _due(rule, s)
        if due is not None and due <= t:
            _change(step, rule, due, replace(s, state=FIRING, fired_at=due), None)
    s = step.state
    if (s.state == FIRING and s.consecutive == 0 and rule.keep_firing_for and s.last_violation_at is not None
            and s.last_violation_at + rule.keep_firing_for <= t):
        due = s.last_violation_at + rule.keep_firing_for
        _change(step, rule, due, replace(s, state=RESOLVED, resolved_at=due), None)


def apply_sample(step: Step, rule: Rule, sample: Sample) -> None:
    """Fold one judgement into the series state at its own time (advance to it first)."""
    t = sample.at
    advance(step, rule, t)
    s = step.state
    run_at = t if sample.run_key is not None else None
    base = replace(s, value=sample.value, threshold=sample.threshold, detail=sample.detail)
    if sample.run_key is not None:
        base = replace(base, last_run_at=t, last_run_key=sample.run_key)
    violated = sample.hysteresis_violated if s.state == FIRING else sample.violated
    if violated is None:  # no data
        if s.state in (FIRING, NODATA):
            _change(step, rule, t, base, run_at)
        else:
            _change(step, rule, t, replace(base, state=NODATA, consecutive=0, active_at=None, violating_spans=(),
                                           announced=False), run_at)
        return
    if violated:
        if s.state in (INACTIVE, RESOLVED, NODATA):  # a new episode
            new = replace(base, state=PENDING, consecutive=1, active_at=t, fired_at=None, resolved_at=None,
                          last_violation_at=t, violating_spans=sample.spans[-MAX_VIOLATING_SPANS:], announced=False)
        else:
            spans = s.violating_spans + sample.spans
            if len(spans) > MAX_VIOLATING_SPANS:
                spans = spans[:MAX_VIOLATING_SPANS // 2] + spans[-MAX_VIOLATING_SPANS // 2:]
            new = replace(base, consecutive=s.consecutive + 1, last_violation_at=t, violating_spans=spans)
        due = _due(rule, new) if new.state == PENDING else None
        if due is not None and due <= t:
            new = replace(new, state=FIRING, fired_at=t)
        _change(step, rule, t, new, run_at)
        return
    new = replace(base, consecutive=0)
    if s.state == PENDING:
        new = replace(new, state=INACTIVE, active_at=None, violating_spans=())
    elif s.state == FIRING:
        if not (rule.keep_firing_for and s.last_violation_at is not None
                and t - s.last_violation_at < rule.keep_firing_for):
            new = replace(new, state=RESOLVED, resolved_at=t)
    elif s.state in (NODATA, RESOLVED):
        new = replace(new, state=INACTIVE, active_at=None, violating_spans=(), announced=False)
    _change(step, rule, t, new, run_at)


def evaluate_series(rule: Rule, prev: SeriesState, samples: list[Sample], ts: float,
                    evaluated_at: float | None = None) -> Step:
    """Fold judgements for one series (in time order) and the passage of time up to ts into its state."""
    step = Step(prev, ts if evaluated_at is None else evaluated_at)
    for sample in sorted(samples, key=lambda x: (x.at, x.run_key or 0)):
        apply_sample(step, rule, sample)
    advance(step, rule, ts)
    return step
