"""The rule engine: evaluate a group at one or more times, fold what the kinds found into alert state, record it.

`evaluate_group(group, steps)` never reads the clock: the scheduler passes the slot times it evaluates (one, or
the slots it missed), `POST /evaluate` the time now, `eval` one time, `replay` and `test` a series of times. It is
the one evaluation path of every mode; only the state backend differs (the store's tables or memory).

An evaluation:
1. loads each rule's snapshot: its series states (with each kind's memory) and how far it was judged;
2. asks each kind for its judgements. Per-run kinds are asked once, up to the last step: their samples sit on the
   runs' (or deadlines') own times. Kinds judged at slots are asked at each evaluation time and at every slot of
   the group (multiples of its interval) passed since their last judgement, so a slot missed while the daemon was
   down is judged late rather than never; on a rule's first evaluation from the slots its `for`,
   `keep_firing_for` and `for_runs` can remember (at most `max_catch_up` slots; older missed slots are counted and
   logged, never skipped in silence);
3. folds the judgements step by step on their own time line (evaluator.rules.state), so the transitions do not
   depend on how the evaluations were stepped; on a rule's first evaluation, transitions older than its lookback
   are folded into its state but not reported (they happened before anyone was watching);
4. applies ladder inhibition after each step: while a higher rung fires for a dataset, lower rungs' transitions
   for it are recorded as inhibited and not sent; an inhibited alert still firing when its inhibitor stops is sent
   then (a release), and a resolve is never sent for an alert that was never sent;
5. hands everything to the backend, which records it in one transaction.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import duckdb
import structlog

from evaluator.rules.backends import (
    Evaluation,
    MemoryState,
    RuleSnapshot,
    RuleStatus,
    StateBackend,
)
from evaluator.rules.budget import BudgetCursor, Deadlines
from evaluator.rules.model import (
    FIRING,
    NODATA,
    RESOLVED,
    RUNG_ORDER,
    KindResult,
    Record,
    Rule,
    RuleError,
    RuleGroup,
    RuleKind,
    RulePrior,
    RuleSet,
    Sample,
    SeriesCursor,
    SeriesKey,
)
from evaluator.rules.select import max_span_key
from evaluator.rules.shape import series_json
from evaluator.rules.state import SeriesState, Step, Transition, advance, apply_sample
from evaluator.rules.template import render
from evaluator.telemetry import Telemetry

__all__ = ["AlertEvent", "MemoryState", "RuleEngine", "RuleStatus", "series_json"]

DEFAULT_BUDGET = 30.0  # seconds one evaluation of a rule may take, unless its rule or group says otherwise
DEFAULT_MAX_CATCH_UP = 1440  # the daemon's limit of slots judged per rule and evaluation (a day of 1-minute slots)
NODATA_SUMMARY = "nodata_summary"  # the annotation that overrides the default text of a nodata transition


@dataclass(frozen=True)
class AlertEvent:
    """A transition with everything an output needs (alert spans, Alertmanager, logs)."""

    rule: Rule
    transition: Transition
    summary: str
    annotations: dict[str, str]
    inhibited: bool = False  # ladder inhibition: recorded, not sent


@dataclass
class _Judged:
    """One rule's judgements for this evaluation, before folding."""

    samples: list[Sample]
    memory: dict[SeriesKey, Any]
    records: list[Record]
    judged_to: float
    # transitions at or before this are folded, not reported: for a series seen for the first time (and every
    # series of a rule evaluated for the first time), what happened before its lookback happened unwatched
    report_after: float
    seen_key: int | None = None


def slots_between(interval: float, after: float, until: float) -> list[float]:
    """The multiples of interval in (after, until]."""
    k = math.floor(after / interval) + 1
    last = math.floor(until / interval)
    return [i * interval for i in range(k, last + 1)]


def first_slot_horizon(rule: Rule, interval: float) -> float:
    """How far before its first evaluation a rule judged at slots is judged: what its state can remember."""
    return rule.for_seconds + rule.keep_firing_for + max(rule.for_runs - 1, 0) * interval


class RuleEngine:
    def __init__(
        self,
        cursor_factory: Any,
        kinds: Mapping[str, RuleKind],
        state: StateBackend,
        telemetry: Telemetry | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        max_catch_up: int | None = None,
        default_budget: float | None = DEFAULT_BUDGET,
        group_deadline: bool = False,
    ) -> None:
        """cursor_factory() returns a new DuckDB cursor (Store.cursor), closed by the engine after use. kinds:
        one instance per kind name, owned by this engine (kinds keep no state, but nothing is shared).
        max_catch_up: at most this many slots judged per rule and evaluation (None: all, as eval, replay and test
        do; the daemon sets a limit so that a long downtime does not stall it)."""
        self._cursor = cursor_factory
        self._kinds = kinds
        self.state = state
        self._log = log or structlog.get_logger("rules")
        self.ruleset = RuleSet()
        self._max_catch_up = None if max_catch_up is None else max(1, max_catch_up)
        self._default_budget = default_budget
        self._group_deadline = group_deadline  # the daemon: a group's evaluation ends within its interval
        self._deadline: float | None = None
        self._deadlines = Deadlines()
        self._health: dict[str, str | None] = {}
        self._health_lock = threading.Lock()
        self._group_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._group_locks_lock = threading.Lock()
        tel = telemetry or Telemetry()
        self._evals = tel.counter("rule_evaluations_total", "Rule evaluations, by outcome.", ("outcome",))
        self._transitions = tel.counter("alert_transitions_total", "Alert state transitions, by new state.",
                                        ("state",))
        self._group_seconds = tel.gauge("rule_group_last_duration_seconds",
                                        "How long the last evaluation of a group took.", ("group",))
        self._nodata = tel.counter("rule_series_nodata_total",
                                   "Judgements of a series that could not be judged (no data), per rule and reason "
                                   "(e.g. too_few_values, bad_histogram, warming_up, not_a_number, too_few_labels).",
                                   ("rule_id", "reason"))
        self._over = tel.counter("rule_evaluations_stopped_total",
                                 "Rule evaluations stopped: over the rule's time budget, or left when the group's "
                                 "evaluation had taken the group's interval.", ("reason",))
        self._skipped = tel.counter("rule_slots_skipped_total",
                                    "Slots of rules judged at slots that were not judged because more were missed "
                                    "than max_catch_up (after downtime).", ("group",))
        self._alert_value = tel.gauge("alert_value", "Each rule's latest value per series.", ("rule_id", "series"))
        self._alert_state = tel.gauge(
            "alert_state", "Each rule's state per series: inactive 0, pending 1, firing 2, resolved 3, nodata 4.",
            ("rule_id", "series"))
        self._rule_transitions = tel.counter("alert_rule_transitions_total",
                                             "Alert transitions per rule, by the state entered.", ("rule_id", "state"))
        unhealthy = tel.gauge("rules_unhealthy", "Rules whose last evaluation failed.")
        tel.add_collector(lambda: unhealthy.set(sum(1 for e in self.health.values() if e is not None)))

    @property
    def health(self) -> dict[str, str | None]:
        """Per rule id, the error of its last evaluation (None when it was healthy). A copy: safe to iterate."""
        with self._health_lock:
            return dict(self._health)

    def load(self, ruleset: RuleSet) -> None:
        """Swap in a new rule set. State is keyed by rule id and fingerprint, so unchanged rules keep it."""
        unknown = sorted({r.kind for r in ruleset.rules()} - set(self._kinds))
        if unknown:
            raise ValueError(f"no evaluator for kind(s) {', '.join(unknown)}")
        self.ruleset = ruleset
        ids = {r.id for r in ruleset.rules()}
        with self._health_lock:
            self._health = {k: v for k, v in self._health.items() if k in ids}

    def _group_lock(self, name: str) -> threading.Lock:
        with self._group_locks_lock:
            return self._group_locks[name]

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate_group(self, group: RuleGroup, steps: float | Sequence[float],
                       slot_interval: float | None = None) -> list[AlertEvent]:
        """Evaluate the group at each of `steps` (in order) and record the result; returns the transitions.
        slot_interval: the slots of kinds judged at slots, when not the group's interval (`test` judges them at its
        evaluation_interval, `replay --step` at its step: the timeline they were asked for)."""
        times = sorted({float(steps)} if isinstance(steps, int | float) else {float(t) for t in steps})
        if not times:
            return []
        with self._group_lock(group.name):
            t0 = time.perf_counter()
            rules = list(group.rules)
            prior = self.state.load(rules)
            # never before what was judged already (a restarted scheduler's first slot can be earlier than the last
            # on-demand evaluation): runs that ended in between would be passed over
            floor = max((p.judged_to for p in prior.values() if p.judged_to is not None), default=-math.inf)
            times = [t for t in times if t >= floor]
            if not times:
                return []
            self._deadline = time.monotonic() + group.interval if self._group_deadline and len(times) == 1 else None
            judged, errors, durations = self._judge(group, rules, prior, times, slot_interval or group.interval)
            statuses, events, records = self._fold(group, rules, prior, judged, errors, durations, times)
            self.state.save(Evaluation(group, times[-1], statuses, events, records))
            self._after(group, statuses, events)
            self._group_seconds.set(time.perf_counter() - t0, group=group.name)
            return events

    def evaluate_all(self, steps: float | Sequence[float], slot_interval: float | None = None) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for group in self.ruleset.groups:
            events.extend(self.evaluate_group(group, steps, slot_interval))
        return events

    def _judge(self, group: RuleGroup, rules: list[Rule], prior: dict[str, RuleSnapshot], times: list[float],
               interval: float) -> tuple[dict[str, _Judged], dict[str, str], dict[str, float]]:
        judged: dict[str, _Judged] = {}
        errors: dict[str, str] = {}
        durations: dict[str, float] = defaultdict(float)
        by_kind: dict[str, list[Rule]] = defaultdict(list)
        for rule in rules:
            by_kind[rule.kind].append(rule)
        cur = self._cursor()
        try:
            for kind_name, batch in by_kind.items():
                kind = self._kinds[kind_name]
                if getattr(kind, "timeline", "runs") == "slots":
                    self._judge_slots(group, interval, kind, batch, prior, times, cur, judged, errors, durations)
                else:
                    key_hi = max_span_key(cur)  # first: runs committed after this are the next evaluation's
                    priors = {r.id: _prior(prior[r.id], key_hi) for r in batch}
                    results = self._call(kind, batch, times[-1], cur, priors, durations)
                    for rule in batch:
                        outcome = results.get(rule.id)
                        if isinstance(outcome, RuleError) or outcome is None:
                            errors[rule.id] = str(outcome or "the kind returned no result for this rule")
                            continue
                        lookback = float(getattr(rule.spec, "lookback", 0.0) or 0.0)
                        judged[rule.id] = _Judged(outcome.samples, outcome.memory, outcome.records, times[-1],
                                                  times[0] - lookback, key_hi)
        finally:
            cur.close()
        return judged, errors, durations

    def _judge_slots(self, group: RuleGroup, interval: float, kind: RuleKind, batch: list[Rule],
                     prior: dict[str, RuleSnapshot], times: list[float], cur: duckdb.DuckDBPyConnection,
                     judged: dict[str, _Judged], errors: dict[str, str], durations: dict[str, float]) -> None:
        wanted: dict[float, list[Rule]] = defaultdict(list)
        for rule in batch:
            since = prior[rule.id].judged_to
            start = since if since is not None else \
                math.floor((times[0] - first_slot_horizon(rule, interval)) / interval) * interval - interval
            # every slot since the last judgement (missed ones included), and each evaluation time itself: a slot
            # when the scheduler evaluates, any time for POST /evaluate, eval, replay and test
            slots = sorted(set(slots_between(interval, start, times[-1])) | {t for t in times if t > start})
            if getattr(kind, "changes_only", False):  # it judges the process now: past slots say nothing
                slots = [t for t in times if t > start] or slots[-1:]
            if self._max_catch_up is not None and len(slots) > self._max_catch_up:
                skipped = len(slots) - self._max_catch_up
                self._skipped.inc(skipped, group=group.name)
                self._log.warning("missed slots not judged: more than max_catch_up", group=group.name,
                                  rule=rule.id, skipped=skipped, first_judged=slots[-self._max_catch_up])
                slots = slots[-self._max_catch_up:]
            judged[rule.id] = _Judged([], {}, [], slots[-1] if slots else (since or -math.inf), -math.inf)
            if not slots and since is None:
                judged[rule.id].judged_to = -math.inf
            for slot in slots:
                wanted[slot].append(rule)
        priors = {r.id: _prior(prior[r.id]) for r in batch}
        series_known = {r.id: set(prior[r.id].states) for r in batch}
        for slot in sorted(wanted):
            todo = [r for r in wanted[slot] if r.id not in errors]
            if not todo:
                continue
            results = self._call(kind, todo, slot, cur, priors, durations)
            for rule in todo:
                outcome = results.get(rule.id)
                if isinstance(outcome, RuleError) or outcome is None:
                    errors[rule.id] = str(outcome or "the kind returned no result for this rule")
                    continue
                j = judged[rule.id]
                seen = {s.series for s in outcome.samples}
                silent = set() if getattr(kind, "changes_only", False) else series_known[rule.id] - seen
                for key in sorted(silent):  # known, but this judgement says nothing of it
                    j.samples.append(Sample(key, slot, None, None, None, None, None, (),
                                                "no longer judged: the rule's data has nothing for this series "
                                                "now (no row from the query, no values or predictions in the "
                                                "window)", "no_longer_seen"))
                j.samples.extend(outcome.samples)
                series_known[rule.id] |= seen
                j.records.extend(outcome.records)
                if outcome.memory:
                    j.memory.update(outcome.memory)
                    p = priors[rule.id]
                    series = dict(p.series)
                    for key, memory in outcome.memory.items():
                        c = series.get(key)
                        series[key] = SeriesCursor(c.at if c else None, c.run_key if c else None, memory)
                    priors[rule.id] = RulePrior(p.since, series)
        for rule_id in errors:
            judged.pop(rule_id, None)

    def budget(self, rule: Rule) -> float | None:
        """How long one evaluation of the rule may take: its own budget (or its group's), else the default."""
        return rule.budget if rule.budget is not None else self._default_budget

    def _call(self, kind: RuleKind, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
              priors: dict[str, RulePrior], durations: dict[str, float]) -> dict[str, KindResult | RuleError]:
        """Ask a kind about rules, each call within its rules' time budget: rules of one budget together when the
        kind batches them (they share queries), else one by one."""
        parts: dict[float | None, list[Rule]] = defaultdict(list)
        if getattr(kind, "batched", True):
            for r in rules:
                parts[self.budget(r)].append(r)
            calls = list(parts.values())
        else:
            calls = [[r] for r in rules]
        out: dict[str, KindResult | RuleError] = {}
        for part in calls:
            out.update(self._bounded_call(kind, part, ts, cur, priors, durations))
        return out

    def _bounded_call(self, kind: RuleKind, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                      priors: dict[str, RulePrior],
                      durations: dict[str, float]) -> dict[str, KindResult | RuleError]:
        """One call of a kind within the rules' time budget. Over it, a batch is run again rule by rule, each
        within its own budget, so only the rule that runs away is stopped: it gets "over its time budget", the
        others their results."""
        budgets = [self.budget(r) for r in rules]
        seconds = None if any(b is None for b in budgets) else max(cast(list[float], budgets))
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                why = "not evaluated: its group's evaluation already took the group's interval"
                self._over.inc(len(rules), reason="group_interval")
                return {r.id: RuleError(why) for r in rules}
            seconds = left if seconds is None else min(seconds, left)
        k0 = time.perf_counter()
        with BudgetCursor(cur, seconds, self._deadlines) as bounded:
            try:
                raw = kind.evaluate(rules, ts, bounded, priors)  # type: ignore[arg-type]
            except (duckdb.Error, RuleError, ValueError, TypeError) as exc:
                raw = {r.id: RuleError(f"{type(exc).__name__}: {exc}") for r in rules}
        share = (time.perf_counter() - k0) / len(rules)
        for r in rules:
            durations[r.id] += share
        if bounded.expired:
            if len(rules) > 1:
                out: dict[str, KindResult | RuleError] = {}
                for r in rules:
                    out.update(self._bounded_call(kind, [r], ts, cur, priors, durations))
                return out
            self._over.inc(reason="rule_budget")
            assert seconds is not None
            return {rules[0].id: RuleError(f"over its time budget of {seconds:g} s: stopped (DuckDB interrupt); "
                                           "make it cheaper or give it a larger budget")}
        out = {}
        for rule_id, v in raw.items():
            out[rule_id] = KindResult(v) if isinstance(v, list) else v
        return out

    def _fold(self, group: RuleGroup, rules: list[Rule], prior: dict[str, RuleSnapshot], judged: dict[str, _Judged],
              errors: dict[str, str], durations: dict[str, float],
              times: list[float]) -> tuple[list[RuleStatus], list[AlertEvent], list[Record]]:
        ok = [r for r in rules if r.id in judged]
        for rule in ok:
            for s in judged[rule.id].samples:
                if s.violated is None:
                    self._nodata.inc(rule_id=rule.id, reason=s.reason or "other")
        states: dict[str, dict[SeriesKey, SeriesState]] = {r.id: dict(prior[r.id].states) for r in ok}
        queues: dict[str, dict[SeriesKey, list[Sample]]] = {}
        for rule in ok:
            by_series: dict[SeriesKey, list[Sample]] = defaultdict(list)
            for s in sorted(judged[rule.id].samples, key=lambda x: (x.at, x.run_key or 0)):
                by_series[s.series].append(s)
            queues[rule.id] = by_series
            for key in by_series:
                states[rule.id].setdefault(key, SeriesState(series=key))
        # per rule and series, the position of the next judgement not folded yet; the series time can change
        heads: dict[str, dict[SeriesKey, int]] = {r.id: dict.fromkeys(queues[r.id], 0) for r in ok}
        sensitive = {r.id: {k for k, st in states[r.id].items() if _time_sensitive(r, st)} for r in ok}
        events: list[AlertEvent] = []
        # who has been told: whether each series' firing episode was sent; kept apart from the fold, which may
        # resolve and clear a series within one step before the step's events are looked at
        told = {(r.id, k): s.announced for r in ok for k, s in prior[r.id].states.items()}
        for i, t in enumerate(times):
            last = i == len(times) - 1
            step_events: list[AlertEvent] = []
            for rule in ok:
                rid = rule.id
                known = prior[rid].states if prior[rid].judged_to is not None else {}
                new_after = judged[rid].report_after
                due = [k for k, n in heads[rid].items()
                       if n < len(queues[rid][k]) and (last or queues[rid][k][n].at <= t)]
                for key in set(due) | sensitive[rid]:
                    series_samples = queues[rid].get(key, [])
                    start = n = heads[rid].get(key, 0)
                    while n < len(series_samples) and (last or series_samples[n].at <= t):
                        n += 1
                    if key in heads[rid]:
                        heads[rid][key] = n
                    step = Step(states[rid][key], t)
                    for sample in series_samples[start:n]:
                        apply_sample(step, rule, sample)
                    advance(step, rule, t)
                    states[rid][key] = step.state
                    if _time_sensitive(rule, step.state):
                        sensitive[rid].add(key)
                    else:
                        sensitive[rid].discard(key)
                    report_after = -math.inf if key in known else new_after
                    step_events.extend(self._event(rule, tr) for tr in step.transitions if tr.at > report_after)
            if step_events or i == 0 or last or any(sensitive.values()):
                events.extend(self._inhibit(group, ok, states, step_events, t, told))
        statuses: list[RuleStatus] = []
        records: list[Record] = []
        for rule in rules:
            if rule.id in errors:
                statuses.append(RuleStatus(rule, prior[rule.id].states, errors[rule.id], durations.get(rule.id, 0.0)))
                continue
            j = judged[rule.id]
            final = states[rule.id]
            for key, memory in j.memory.items():
                final[key] = replace(final.get(key) or SeriesState(series=key), memory=memory)
            before = prior[rule.id].states
            changed = tuple(s for k, s in final.items() if before.get(k) != s)
            judged_to = j.judged_to if math.isfinite(j.judged_to) else None
            statuses.append(RuleStatus(rule, final, None, durations.get(rule.id, 0.0), changed, judged_to,
                                       j.seen_key))
            records.extend(j.records)
        return statuses, events, records

    def _event(self, rule: Rule, t: Transition) -> AlertEvent:
        annotations = {k: render(v, rule, t) for k, v in rule.annotations if k != NODATA_SUMMARY}
        if t.to_state == NODATA:
            template = dict(rule.annotations).get(NODATA_SUMMARY)
            annotations["summary"] = render(template, rule, t) if template else _nodata_summary(rule, t)
        summary = annotations.get("summary") or _default_summary(rule, t)
        return AlertEvent(rule, t, summary, annotations)

    def _inhibit(self, group: RuleGroup, rules: list[Rule], states: dict[str, dict[SeriesKey, SeriesState]],
                 events: list[AlertEvent], t: float, told: dict[tuple[str, SeriesKey], bool]) -> list[AlertEvent]:
        """Ladder inhibition after one step, and who has been told: a firing sent marks its series announced, a
        resolve of a series never announced is recorded but not sent, and an announced-nothing series still firing
        once nothing above it fires is sent now (a release)."""
        by_id = {r.id: r for r in rules}
        highest: dict[str, int] = {}
        if group.inhibit_labels:
            for rule in rules:
                order = RUNG_ORDER[rule.rung]
                for s in states[rule.id].values():
                    d = _dataset(group.inhibit_labels, s.series) if s.state == FIRING else None
                    if d is not None:
                        highest[d] = min(highest.get(d, order), order)

        def inhibited(rule: Rule, series: SeriesKey) -> bool:
            d = _dataset(group.inhibit_labels, series) if group.inhibit_labels else None
            above = highest.get(d) if d is not None else None
            return above is not None and above < RUNG_ORDER[rule.rung]

        out: list[AlertEvent] = []
        for ev in events:
            rule, tr = ev.rule, ev.transition
            told_key = (rule.id, tr.series)
            blocked = inhibited(rule, tr.series)
            if tr.to_state == RESOLVED and tr.from_state == FIRING and not told.get(told_key, False):
                blocked = True  # never sent as firing: its resolve is not sent either
            if tr.to_state == FIRING and not blocked:
                told[told_key] = True
            elif tr.to_state == RESOLVED or (tr.from_state != FIRING and tr.to_state != FIRING):
                told[told_key] = False
            out.append(replace(ev, inhibited=blocked) if blocked else ev)
        for rule_id, series_states in states.items():
            rule = by_id[rule_id]
            for key, s in series_states.items():
                announced = told.get((rule_id, key), False) if s.state == FIRING else False
                if s.state == FIRING and not announced and not inhibited(rule, key):
                    release = Transition(rule.id, key, t, FIRING, FIRING, s.value, s.threshold, s.consecutive,
                                         s.last_run_at, s.violating_spans,
                                         (s.detail + "; " if s.detail else "") + "sent now: nothing above it fires",
                                         t, s.active_at)
                    out.append(self._event(rule, release))
                    announced = told[(rule_id, key)] = True
                if s.announced != announced:
                    series_states[key] = replace(s, announced=announced)
        return out

    def _after(self, group: RuleGroup, statuses: list[RuleStatus], events: list[AlertEvent]) -> None:
        with self._health_lock:
            for st in statuses:
                before = self._health.get(st.rule.id)
                if st.error is not None and before != st.error:
                    self._log.warning("rule unhealthy", rule=st.rule.id, error=st.error)
                elif st.error is None and before:
                    self._log.info("rule healthy again", rule=st.rule.id)
                self._health[st.rule.id] = st.error
        for st in statuses:
            self._evals.inc(outcome="error" if st.error else "ok")
            if st.error is None:
                for s in st.states.values():
                    self._publish(st.rule, s)
        for ev in events:
            self._transitions.inc(state=ev.transition.to_state)
            self._rule_transitions.inc(rule_id=ev.rule.id, state=ev.transition.to_state)
            self._log.info("alert " + ev.transition.to_state + (" (inhibited)" if ev.inhibited else ""),
                           rule=ev.rule.id, series=dict(ev.transition.series), value=ev.transition.value,
                           previous=ev.transition.from_state, summary=ev.summary)

    def _publish(self, rule: Rule, s: SeriesState) -> None:
        series = series_json(s.series)
        self._alert_state.set(_STATE_NUMBERS.get(s.state, -1), rule_id=rule.id, series=series)
        if s.value is not None and math.isfinite(s.value):
            self._alert_value.set(s.value, rule_id=rule.id, series=series)


_STATE_NUMBERS = {"inactive": 0, "pending": 1, "firing": 2, "resolved": 3, "nodata": 4}


def _prior(snapshot: RuleSnapshot, key_hi: int | None = None) -> RulePrior:
    return RulePrior(snapshot.judged_to, {
        k: SeriesCursor(s.last_run_at, s.last_run_key, s.memory) for k, s in snapshot.states.items()},
        snapshot.seen_key if snapshot.judged_to is not None else None, key_hi)


def _time_sensitive(rule: Rule, s: SeriesState) -> bool:
    """Whether time alone can change this state (advance would do something)."""
    if s.state == "pending":
        return s.consecutive >= rule.for_runs
    return s.state == FIRING and s.consecutive == 0 and bool(rule.keep_firing_for)


def _dataset(labels: tuple[str, ...], series: SeriesKey) -> str | None:
    values = dict(series)
    return next((values[label] for label in labels if values.get(label)), None)


def _series_text(series: SeriesKey) -> str:
    return ", ".join(f"{k}={v}" for k, v in series) or "all"


def _nodata_summary(rule: Rule, t: Transition) -> str:
    return f"{rule.name}: no data for {_series_text(t.series)}" + (f": {t.detail}" if t.detail else "")


def _default_summary(rule: Rule, t: Transition) -> str:
    value = "no data" if t.value is None else f"{t.value:.6g}"
    return f"{rule.name} {t.to_state} for {_series_text(t.series)}: value {value}" + \
        (f" ({t.detail})" if t.detail else "")
