"""The alert lifecycle per rule and series, as pure functions over stored values (no timers, no clock).

inactive -> pending -> firing -> resolved, plus nodata. Transitions are comparisons of stored timestamps and
counters: consecutive violating runs (for_runs), time since the first violation (for), time since the last
violation (keep_firing_for). "No data" never resolves a firing alert; a firing alert stays firing through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from evaluator.rules.model import FIRING, INACTIVE, NODATA, PENDING, RESOLVED, Rule, Sample, SeriesKey

MAX_VIOLATING_SPANS = 20  # span links kept per episode (the first and the latest ones)


@dataclass(frozen=True)
class SeriesState:
    series: SeriesKey = ()
    state: str = INACTIVE
    value: float | None = None
    threshold: float | tuple[float, float] | None = None
    detail: str = ""
    active_at: float | None = None  # first violation of the current episode (run time or evaluation time)
    fired_at: float | None = None
    resolved_at: float | None = None
    last_violation_at: float | None = None
    consecutive: int = 0  # consecutive violating runs (or ticks, for kinds judged at evaluation time)
    last_run_at: float | None = None  # the newest run judged (per-run kinds)
    last_run_key: int | None = None
    violating_spans: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Transition:
    rule_id: str
    series: SeriesKey
    at: float  # evaluation time at which the change was decided
    from_state: str
    to_state: str
    value: float | None
    threshold: float | tuple[float, float] | None
    consecutive: int
    run_at: float | None  # the run that caused it (per-run kinds)
    spans: tuple[tuple[str, str], ...] = ()
    detail: str = ""
    evaluated_at: float | None = None  # the evaluation that decided it (at is when it happened in data time)
    started_at: float | None = None  # the firing episode's start (fired_at), on firing and resolved transitions


@dataclass
class Step:
    state: SeriesState
    transitions: list[Transition] = field(default_factory=list)


def _change(step: Step, rule: Rule, ts: float, new: SeriesState, sample_at: float | None) -> None:
    old = step.state
    if new.state != old.state:
        step.transitions.append(Transition(
            rule.id, new.series, ts, old.state, new.state, new.value, new.threshold, new.consecutive, sample_at,
            new.violating_spans, new.detail,
        ))
    step.state = new


def apply_sample(step: Step, rule: Rule, sample: Sample, ts: float) -> None:
    """Fold one judgement into the series state."""
    s = step.state
    run_at = sample.at if sample.run_key is not None else None  # kinds judged at ts have no run
    base = replace(s, value=sample.value, threshold=sample.threshold, detail=sample.detail)
    if sample.run_key is not None:
        base = replace(base, last_run_at=sample.at, last_run_key=sample.run_key)
    violated = sample.hysteresis_violated if s.state == FIRING else sample.violated
    if violated is None:  # no data
        if s.state in (FIRING, NODATA):
            _change(step, rule, ts, base, run_at)
        else:
            _change(step, rule, ts, replace(base, state=NODATA, consecutive=0, active_at=None,
                                            violating_spans=()), run_at)
        return
    if violated:
        spans = s.violating_spans + sample.spans
        if len(spans) > MAX_VIOLATING_SPANS:
            spans = spans[:MAX_VIOLATING_SPANS // 2] + spans[-MAX_VIOLATING_SPANS // 2:]
        new = replace(base, consecutive=s.consecutive + 1, last_violation_at=sample.at, violating_spans=spans)
        if s.state in (INACTIVE, RESOLVED, NODATA):
            new = replace(new, state=PENDING, active_at=sample.at, fired_at=None, resolved_at=None)
        if new.state == PENDING and _due(rule, new, ts):
            new = replace(new, state=FIRING, fired_at=ts)
        _change(step, rule, ts, new, run_at)
        return
    # not violated
    new = replace(base, consecutive=0)
    if s.state == PENDING:
        new = replace(new, state=INACTIVE, active_at=None, violating_spans=())
    elif s.state == FIRING:
        if rule.keep_firing_for and s.last_violation_at is not None \
                and ts - s.last_violation_at < rule.keep_firing_for:
            new = replace(new, state=FIRING)
        else:
            new = replace(new, state=RESOLVED, resolved_at=ts, active_at=None)
    elif s.state == NODATA:
        new = replace(new, state=INACTIVE)
    _change(step, rule, ts, new, run_at)


def _due(rule: Rule, s: SeriesState, ts: float) -> bool:
    return (s.consecutive >= rule.for_runs and s.active_at is not None
            and ts - s.active_at >= rule.for_seconds)


def apply_tick(step: Step, rule: Rule, ts: float) -> None:
    """What time alone can change, after the samples of a tick: a pending alert whose `for` has elapsed fires;
    a firing alert whose keep_firing_for has run out since its last violation (with no violation since)
    resolves."""
    s = step.state
    if s.state == PENDING and _due(rule, s, ts):
        _change(step, rule, ts, replace(s, state=FIRING, fired_at=ts), None)
    elif (s.state == FIRING and s.consecutive == 0 and rule.keep_firing_for and s.last_violation_at is not None
          and ts - s.last_violation_at >= rule.keep_firing_for):
        _change(step, rule, ts, replace(s, state=RESOLVED, resolved_at=ts, active_at=None), None)


def evaluate_series(rule: Rule, prev: SeriesState, samples: list[Sample], ts: float) -> Step:
    """Fold a tick's samples for one series (in run order) and the passage of time into its state."""
    step = Step(prev)
    for sample in sorted(samples, key=lambda x: (x.at, x.run_key or 0)):
        apply_sample(step, rule, sample, ts)
    apply_tick(step, rule, ts)
    return step
