"""Runs each rule group on its interval with APScheduler 3.x; the evaluation time comes from the injected clock.

One job per group, never two runs of a group at once (max_instances=1). The evaluation time is the start of the
interval slot the clock is in (floor(now / interval) * interval), so evaluations land on the same instants
however late a job starts. A slot whose job did not run (the previous evaluation overran, the daemon was down)
is counted here, and judged in the next evaluation: the engine judges every slot after the last one it judged
(up to its max_catch_up), so nothing is skipped in silence.

`evaluate_now` (admin POST /evaluate) evaluates a group at the clock's current time, outside the slots. Per group,
a lock held from choosing the evaluation time to the end of the evaluation serializes it with the scheduled job,
and evaluation times never go backwards: a slot at or before an on-demand evaluation is skipped (the group was
just evaluated at a later time), and an on-demand evaluation never runs at a time before the group's last one.
"""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from evaluator.clock import Clock
from evaluator.rules.engine import AlertEvent, RuleEngine
from evaluator.rules.model import RuleGroup
from evaluator.rules.shape import transition_record
from evaluator.telemetry import Telemetry

DEFAULT_EVALUATION_DELAY = 30.0


class GroupScheduler:
    def __init__(
        self,
        engine: RuleEngine,
        clock: Clock,
        telemetry: Telemetry,
        log: structlog.typing.FilteringBoundLogger | None = None,
        evaluation_delay: float = DEFAULT_EVALUATION_DELAY,
    ) -> None:
        """evaluation_delay: a slot is evaluated this long after it starts, so that spans that ended before the
        slot and are still on their way (SDK batching, a Collector's queue) are in the store when it is judged,
        as they are when `replay` judges the same slot later (Prometheus calls this the rule query offset)."""
        self._engine = engine
        self._delay = max(0.0, evaluation_delay)
        self._clock = clock
        self._log = log or structlog.get_logger("scheduler")
        self._scheduler: BackgroundScheduler | None = None
        self._groups: dict[str, RuleGroup] = {}
        self._last_slot: dict[str, float] = {}
        self._last_eval: dict[str, float] = {}  # the latest evaluation time per group, slot or on demand
        self._lock = threading.Lock()
        # per scheduled group, see evaluate_now; made under _lock (a plain dict read and filled by the APScheduler
        # threads, admin requests and reloads), never for a name that is not scheduled (no growth from requests)
        self._eval_locks: dict[str, threading.Lock] = {}
        self._missed = telemetry.counter("rule_group_missed_slots_total",
                                         "Evaluation slots whose scheduled run did not happen (an evaluation overran, "
                                         "or the daemon was down); they are judged by the next evaluation.",
                                         ("group",))
        self._failures = telemetry.counter("rule_group_failures_total",
                                           "Group evaluations that failed as a whole (e.g. the store).", ("group",))

    # -- the job body (called by APScheduler; tests call it directly with a fake clock) -------------------------
    def _eval_lock(self, name: str) -> threading.Lock | None:
        """The evaluation lock of a scheduled group (None when no group of that name is scheduled)."""
        with self._lock:
            if name not in self._groups:
                return None
            lock = self._eval_locks.get(name)
            if lock is None:
                lock = self._eval_locks[name] = threading.Lock()
            return lock

    def run_slot(self, name: str) -> float | None:
        """Evaluate the group for the current slot, unless that slot was already evaluated. Returns the slot."""
        eval_lock = self._eval_lock(name)
        if eval_lock is None:
            return None
        with eval_lock:
            with self._lock:
                group = self._groups.get(name)
                if group is None:
                    return None
                slot = math.floor((self._clock.now() - self._delay) / group.interval) * group.interval
                last = self._last_slot.get(name)
                if last is not None:
                    if slot <= last:
                        return None
                    missed = round((slot - last) / group.interval) - 1
                    if missed > 0:
                        self._missed.inc(missed, group=name)
                        self._log.warning("evaluation slots missed", group=name, missed=missed)
                self._last_slot[name] = slot
                if slot <= self._last_eval.get(name, -math.inf):
                    return None  # evaluated on demand at a later time already: time must not go backwards
                self._last_eval[name] = slot
            try:
                self._engine.evaluate_group(group, [slot])
            except Exception as exc:  # a store failure: the next slot tries again
                self._failures.inc(group=name)
                self._log.error("group evaluation failed", group=name, error=str(exc))
            return slot

    def evaluate_now(self, name: str, at: float | None = None) -> tuple[float, list[AlertEvent]] | None:
        """Evaluate the group now (the clock's time, or `at` when given, or the group's last evaluation time if
        that is later). Waits for a scheduled evaluation of the group in progress. None if no such group is
        scheduled; an evaluation that fails raises."""
        eval_lock = self._eval_lock(name)
        if eval_lock is None:
            return None
        with eval_lock:
            with self._lock:
                group = self._groups.get(name)
                if group is None:
                    return None
                ts = max(self._clock.now() if at is None else at, self._last_eval.get(name, -math.inf))
                self._last_eval[name] = ts
            return ts, self._engine.evaluate_group(group, [ts])

    def evaluate_all_now(self, at: float | None = None) -> dict[str, Any]:
        """Every scheduled group now, or at `at` (admin POST /evaluate): the groups evaluated, with their evaluation
        time, the transitions (the one transition shape, evaluator.rules.shape) and the rules that failed."""
        with self._lock:
            names = list(self._groups)
        groups: list[dict[str, Any]] = []
        transitions: list[dict[str, Any]] = []
        for name in names:
            done = self.evaluate_now(name, at)
            if done is None:
                continue  # removed by a reload meanwhile
            ts, events = done
            with self._lock:
                group = self._groups.get(name)
            groups.append({"name": name, "evaluated_at": _iso(ts), "rules": len(group.rules) if group else None})
            transitions.extend(transition_record(ev) for ev in events)
        unhealthy = {k: v for k, v in self._engine.health.items() if v}
        return {"groups": groups, "transitions": transitions, "unhealthy": unhealthy}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, groups: tuple[RuleGroup, ...]) -> None:
        with self._lock:
            if self._scheduler is not None:
                return
            self._scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
                "max_instances": 1, "coalesce": True, "misfire_grace_time": None})
            self._scheduler.start()
        self.reschedule(groups)

    def reschedule(self, groups: tuple[RuleGroup, ...]) -> None:
        """Replace the jobs with one per group (after a rule reload); the last slot of kept groups is kept."""
        with self._lock:
            scheduler = self._scheduler
            if scheduler is None:
                self._groups = {g.name: g for g in groups}
                return
            scheduler.remove_all_jobs()
            self._groups = {g.name: g for g in groups}
            self._last_slot = {k: v for k, v in self._last_slot.items() if k in self._groups}
            self._last_eval = {k: v for k, v in self._last_eval.items() if k in self._groups}
            for g in groups:
                # every slot + the delay (epoch-aligned: APScheduler counts intervals from start_date), and once
                # right away (a job of its own: a first run now would shift the interval chain off the slots)
                trigger = IntervalTrigger(seconds=g.interval, timezone="UTC",
                                          start_date=datetime.fromtimestamp(self._delay, UTC))
                scheduler.add_job(self.run_slot, trigger, args=(g.name,), id=g.name, name=f"rule group {g.name}")
                scheduler.add_job(self.run_slot, args=(g.name,), id=g.name + "/start",
                                  name=f"rule group {g.name} at start", next_run_time=datetime.now(UTC))
        self._log.info("rule groups scheduled", groups={g.name: g.interval for g in groups})

    def shutdown(self) -> None:
        """Stop scheduling and wait for evaluations in progress. Idempotent; safe before start."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
