"""Runs each rule group on its interval with APScheduler 3.x; the evaluation time comes from the injected clock.

One job per group, never two runs of a group at once (max_instances=1). The evaluation time is the start of the
interval slot the clock is in (floor(now / interval) * interval), so evaluations land on the same instants
however late a job starts. Slots skipped because the previous evaluation overran are counted, not evaluated
late in a burst (coalesce=True).
"""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from evaluator.clock import Clock
from evaluator.rules.engine import RuleEngine
from evaluator.rules.model import RuleGroup
from evaluator.telemetry import Telemetry


class GroupScheduler:
    def __init__(
        self,
        engine: RuleEngine,
        clock: Clock,
        telemetry: Telemetry,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._log = log or structlog.get_logger("scheduler")
        self._scheduler: BackgroundScheduler | None = None
        self._groups: dict[str, RuleGroup] = {}
        self._last_slot: dict[str, float] = {}
        self._lock = threading.Lock()
        self._missed = telemetry.counter("rule_group_missed_slots_total",
                                         "Evaluation slots skipped because a group's evaluation overran.",
                                         ("group",))
        self._failures = telemetry.counter("rule_group_failures_total",
                                           "Group evaluations that failed as a whole (e.g. the store).", ("group",))

    # -- the job body (called by APScheduler; tests call it directly with a fake clock) -------------------------
    def run_slot(self, name: str) -> float | None:
        """Evaluate the group for the current slot, unless that slot was already evaluated. Returns the slot."""
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                return None
            slot = math.floor(self._clock.now() / group.interval) * group.interval
            last = self._last_slot.get(name)
            if last is not None:
                if slot <= last:
                    return None
                missed = round((slot - last) / group.interval) - 1
                if missed > 0:
                    self._missed.inc(missed, group=name)
                    self._log.warning("evaluation slots missed", group=name, missed=missed)
            self._last_slot[name] = slot
        try:
            self._engine.evaluate_group(group, slot)
        except Exception as exc:  # a store failure: the next slot tries again
            self._failures.inc(group=name)
            self._log.error("group evaluation failed", group=name, error=str(exc))
        return slot

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
            for g in groups:
                scheduler.add_job(self.run_slot, IntervalTrigger(seconds=g.interval, timezone="UTC"),
                                  args=(g.name,), id=g.name, name=f"rule group {g.name}",
                                  next_run_time=datetime.now(UTC))  # first evaluation right away
        self._log.info("rule groups scheduled", groups={g.name: g.interval for g in groups})

    def shutdown(self) -> None:
        """Stop scheduling and wait for evaluations in progress. Idempotent; safe before start."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=True)

