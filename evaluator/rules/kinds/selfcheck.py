"""self: the daemon's checks of itself, judged like any rule so they reach the same outputs (the `alerts` and
`alert_state` tables, OTLP alert spans and Alertmanager through the outbox, the ladder).

A rule of kind "self" names one check in its spec; the daemon builds them from `self_monitoring` (evaluator/selfmon.py)
in a group of their own. Rule files cannot use this kind: it exists only in the running daemon, whose components the
checks look at through `Probes`:

- watchdog: always violated, so the receiving side can page when it stops arriving (a dead man's switch);
- rule_health: a rule whose last evaluation failed (the engine's health map), one series per rule;
- outbox: per destination, the oldest alert waiting to be sent is older than `outbox_max_age` (judged at the
  evaluation time against the rows' `created_at`), or a request was refused for good (a new dead row) within the
  last window;
- retention: a loaded rule reads spans that retention as it runs deletes (its moving window is longer than the raw
  spans are kept, or its fixed range is not spared), one series per rule; and the retention worker's last run
  failed (its failures counted with no completed run since), series component=retention;
- ingest: the receivers refused data (requests_refused_total, spans_rejected_total, auth_failures_total of the
  receivers) within the last window;
- workers: a background worker whose thread ended, whose last round failed, or which failed within the last window,
  one series per worker.

The checks look at the live process, so they judge the present: a slot older than `present` seconds before the
clock's time (a slot missed while the daemon was down, an evaluation `at` a past time) is not judged, since what the
process was doing then is not known. "Within the last window" is measured on the clock: a counter that grew is
remembered (as series memory) with the clock time it was seen, so every slot of one evaluation gets the same verdict
and the alert stays for one window after the last increase.

Every series carries `dataset: otel-evaluator`, so the ladder shows the checks under one subject of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from evaluator.clock import Clock
from evaluator.rules.kinds.sql import ts_param
from evaluator.rules.model import KindResult, Rule, RuleError, RulePrior, Sample, SeriesKey, fmt_number
from evaluator.rules.reach import DAY, fixed_range, history_reach
from evaluator.rules.select import Results, evaluate_each
from evaluator.telemetry import Telemetry
from evaluator.worker import WorkerStatus

SELF_KIND = "self"
SUBJECT = "otel-evaluator"  # the `dataset` label of every series: the ladder's subject
CHECKS = ("watchdog", "rule_health", "outbox", "retention", "ingest", "workers")
# The receivers' refusal counters (docs/receiver.md), and for those labelled by server, the receivers' servers.
REFUSAL_COUNTERS = ("requests_refused_total", "spans_rejected_total", "auth_failures_total")
RECEIVER_SERVERS = ("grpc", "http")
NOT_REFUSALS = {("reason", "shutting_down")}  # answered while the daemon stops: not a problem of the data


@dataclass(frozen=True)
class SelfCheckSpec:
    check: str  # one of CHECKS


@dataclass(frozen=True)
class RetentionView:
    """What retention deletes as it runs now (the daemon may have lengthened the configured value)."""

    enabled: bool
    spans_seconds: float | None  # None: raw spans are kept forever
    kept_ranges: tuple[tuple[float, float], ...] = ()  # (start, end] of span end times spared past the cutoff


@dataclass(frozen=True)
class Probes:
    """The running daemon as the checks see it; each callable is read when a check runs."""

    clock: Clock
    telemetry: Telemetry
    health: Callable[[], Mapping[str, str | None]]  # rule id -> its last error (None: healthy)
    rules: Callable[[], Sequence[Rule]]  # the loaded rules
    workers: Callable[[], Sequence[WorkerStatus]]
    retention: Callable[[], RetentionView]


def series_key(**labels: str) -> SeriesKey:
    return tuple(sorted({"dataset": SUBJECT, **labels}.items()))


def _memory(prior: RulePrior | None, key: SeriesKey) -> dict[str, Any]:
    cursor = prior.series.get(key) if prior is not None else None
    memory = cursor.memory if cursor is not None else None
    return dict(memory) if isinstance(memory, dict) else {}


def _known(prior: RulePrior | None, label: str) -> dict[str, SeriesKey]:
    """The series of this rule that earlier evaluations found, by the value of `label`."""
    if prior is None:
        return {}
    return {dict(key)[label]: key for key in prior.series if label in dict(key)}


def _grew(previous: float | None, total: float) -> float:
    """How much a counter grew since `previous`; a smaller total means the process restarted and counts anew."""
    if previous is None:
        return total
    return total - previous if total >= previous else total


def _recent(seen_at: float | None, now: float, window: float) -> bool:
    return seen_at is not None and now - seen_at < window


def _first_line(error: str, rule_id: str) -> str:
    """A rule's error for a one-line detail: its first line, without the rule id it may start with (the whole
    error is in rule_health and the log)."""
    lines = error.strip().splitlines()
    line = lines[0] if lines else error
    return line.removeprefix(f"{rule_id}: ")


def _ago(seconds: float) -> str:
    if seconds >= DAY:
        return f"{fmt_number(seconds / DAY)} d"
    if seconds >= 3600:
        return f"{fmt_number(seconds / 3600)} h"
    if seconds >= 60:
        return f"{fmt_number(seconds / 60)} min"
    return f"{fmt_number(seconds)} s"


class SelfCheckKind:
    """Judges rules of kind "self" at the slots of their group (see evaluator.rules.model.RuleKind)."""

    timeline = "slots"
    changes_only = True  # it judges the process now, and says only what changed: a silent series keeps its state

    def __init__(self, probes: Probes, *, window: float, outbox_max_age: float, present: float) -> None:
        """window: how long an increase of a counter keeps its check violated (the group's interval);
        outbox_max_age: the age of the oldest waiting alert that violates; present: slots older than this before
        the clock's time are not judged."""
        self._probes = probes
        self._window = window
        self._outbox_max_age = outbox_max_age
        self._present = present

    def evaluate(self, rules: list[Rule], ts: float, cur: duckdb.DuckDBPyConnection,
                 prior: Mapping[str, RulePrior] | None = None) -> Results:
        now = self._probes.clock.now()
        if ts < now - self._present:
            return {r.id: [] for r in rules}  # a past slot: what the process did then is not known
        priors = prior or {}
        return evaluate_each(rules, lambda rule: _changes_only(
            self._one(rule, float(ts), now, cur, priors.get(rule.id)), priors.get(rule.id)))

    def _one(self, rule: Rule, ts: float, now: float, cur: duckdb.DuckDBPyConnection,
             prior: RulePrior | None) -> KindResult:
        if not isinstance(rule.spec, SelfCheckSpec):
            raise RuleError(f"{rule.id}: a self rule needs a SelfCheckSpec, not {type(rule.spec).__name__}")
        check = rule.spec.check
        if check == "watchdog":
            return KindResult([Sample(series_key(), ts, 1.0, None, True,
                                      detail="the evaluator is running and evaluating its rules")])
        if check == "rule_health":
            return self._rule_health(ts, prior)
        if check == "outbox":
            return self._outbox(ts, now, cur, prior)
        if check == "retention":
            return self._retention(ts, prior)
        if check == "ingest":
            return self._ingest(ts, now, prior)
        if check == "workers":
            return self._workers(ts, now, prior)
        raise RuleError(f"{rule.id}: unknown self check {check!r} (known: {', '.join(CHECKS)})")

    # -- the checks ----------------------------------------------------------------------------------------------

    def _rule_health(self, ts: float, prior: RulePrior | None) -> KindResult:
        health = self._probes.health()
        known = _known(prior, "rule")
        out = KindResult([])
        for rule_id in sorted(set(known) | {r for r, e in health.items() if e}):
            key = known.get(rule_id) or series_key(rule=rule_id)
            error = health.get(rule_id)
            was_failing = bool(_memory(prior, key).get("failing"))
            if error:
                why = _first_line(error, rule_id)
                out.samples.append(Sample(key, ts, 1.0, None, True, detail=f"rule {rule_id}: {why}"))
            elif rule_id in health:
                out.samples.append(Sample(key, ts, 0.0, None, False, detail=f"rule {rule_id} evaluates again"))
            elif was_failing:
                out.samples.append(Sample(key, ts, 0.0, None, False, detail=f"rule {rule_id} is no longer loaded"))
            else:
                continue  # resolved when it was unloaded; nothing more to say
            out.memory[key] = {"failing": bool(error)}
        return out

    def _outbox(self, ts: float, now: float, cur: duckdb.DuckDBPyConnection, prior: RulePrior | None) -> KindResult:
        rows = cur.execute("""
            SELECT destination,
                   count(*) FILTER (WHERE NOT dead AND created_at <= $ts),
                   epoch_us(min(created_at) FILTER (WHERE NOT dead AND created_at <= $ts)),
                   max(seq) FILTER (WHERE dead),
                   count(*) FILTER (WHERE dead),
                   arg_max(last_error, seq) FILTER (WHERE last_error IS NOT NULL)
            FROM outbox GROUP BY destination""", {"ts": ts_param(ts)}).fetchall()
        found = {str(r[0]): r[1:] for r in rows}
        known = _known(prior, "destination")
        out = KindResult([])
        for destination in sorted(set(found) | set(known)):
            key = known.get(destination) or series_key(destination=destination)
            waiting, oldest_us, dead_seq, dead, error = found.get(destination, (0, None, None, 0, None))
            memory = _memory(prior, key)
            seen_seq = memory.get("dead_seq")
            dead_seen_at = memory.get("dead_seen_at")
            if dead_seq is not None and (seen_seq is None or dead_seq > seen_seq):
                dead_seen_at = now
            age = max(0.0, ts - oldest_us / 1e6) if oldest_us is not None else 0.0
            stuck = age > self._outbox_max_age
            refused = _recent(dead_seen_at, now, self._window)
            why: list[str] = []
            if stuck:
                why.append(f"the oldest of {waiting} alert request(s) waiting for {destination} was recorded "
                           f"{_ago(age)} ago, longer than {_ago(self._outbox_max_age)}")
            if refused:
                why.append(f"{destination} refused alerts for good (kept in the outbox as dead: {dead} in all)")
            if error and why:
                why.append(f"last error: {error}")
            detail = "; ".join(why) or (f"{waiting} alert request(s) waiting for {destination}, none for long"
                                        if waiting else f"nothing waiting for {destination}")
            out.samples.append(Sample(key, ts, age, self._outbox_max_age, stuck or refused, detail=detail))
            out.memory[key] = {"dead_seq": max(int(dead_seq or 0), int(seen_seq or 0)) or None,
                               "dead_seen_at": dead_seen_at}
        return out

    def _retention(self, ts: float, prior: RulePrior | None) -> KindResult:
        view = self._probes.retention()
        conflicts = {rule.id: why for rule in self._probes.rules()
                     if (why := _retention_conflict(rule, view, ts)) is not None}
        known = _known(prior, "rule")
        out = KindResult([])
        for rule_id in sorted(set(known) | set(conflicts)):
            key = known.get(rule_id) or series_key(rule=rule_id)
            why = conflicts.get(rule_id)
            if why is None and not _memory(prior, key).get("failing"):
                continue
            out.samples.append(Sample(key, ts, 1.0 if why else 0.0, None, why is not None,
                                      detail=why or f"retention keeps what rule {rule_id} reads"))
            out.memory[key] = {"failing": why is not None}
        out.samples.append(self._retention_runs(ts, prior, out.memory))
        return out

    def _retention_runs(self, ts: float, prior: RulePrior | None, memory: dict[SeriesKey, Any]) -> Sample:
        """Whether the retention worker's last run failed: its failures grew and no run completed since."""
        key = series_key(component="retention")
        before = _memory(prior, key)
        runs = self._counter_total("retention_runs_total")
        failures = self._counter_total("retention_failures_total")
        failing = bool(before.get("failing"))
        ran, failed = _grew(before.get("runs"), runs) > 0, _grew(before.get("failures"), failures) > 0
        if failed and not ran:
            failing = True
        elif ran:
            failing = False  # a run completed since the last check
        memory[key] = {"runs": runs, "failures": failures, "failing": failing}
        detail = ("the last retention run failed (see the log of component retention): raw spans and old alerts "
                  "are not being deleted" if failing else "retention runs")
        return Sample(key, ts, failures, None, failing, detail=detail)

    def _ingest(self, ts: float, now: float, prior: RulePrior | None) -> KindResult:
        key = series_key()
        before = _memory(prior, key)
        totals_before: dict[str, float] = dict(before.get("totals") or {})
        recent: dict[str, float] = dict(before.get("recent") or {})
        seen_at = before.get("seen_at")
        totals = self._refusals()
        if not _recent(seen_at, now, self._window):
            recent = {}
        for name, total in totals.items():
            grew = _grew(totals_before.get(name), total)
            if grew > 0:
                recent[name] = recent.get(name, 0.0) + grew
                seen_at = now
        violated = _recent(seen_at, now, self._window) and bool(recent)
        count = sum(recent.values()) if violated else 0.0
        detail = (f"{fmt_number(count)} refusal(s) in the last {_ago(self._window)}: "
                  + ", ".join(f"{name} +{fmt_number(n)}" for name, n in sorted(recent.items()))
                  if violated else "no data refused")
        memory = {"totals": totals, "recent": recent if violated else {}, "seen_at": seen_at}
        return KindResult([Sample(key, ts, count, 0.0, violated, detail=detail)], {key: memory})

    def _workers(self, ts: float, now: float, prior: RulePrior | None) -> KindResult:
        known = _known(prior, "worker")
        statuses = {s.name: s for s in self._probes.workers()}
        out = KindResult([])
        for name in sorted(set(known) | {n for n, s in statuses.items() if s.failures or s.problem}):
            key = known.get(name) or series_key(worker=name)
            before = _memory(prior, key)
            status = statuses.get(name)
            failures = status.failures if status is not None else 0
            seen_at = now if _grew(before.get("failures"), failures) > 0 else before.get("seen_at")
            problem = status.problem if status is not None else None
            failing_now = status is not None and status.consecutive_failures > 0
            violated = problem is not None or failing_now or _recent(seen_at, now, self._window)
            if problem is not None:
                detail = f"{name} {problem}"
            elif violated and status is not None:
                detail = (f"{name} failed {status.failures} round(s) since the daemon started, "
                          f"{status.consecutive_failures} in a row now (last: {status.last_error})")
            else:
                detail = f"{name} works"
            value = float(status.consecutive_failures) if status is not None else 0.0
            out.samples.append(Sample(key, ts, value, None, violated, detail=detail))
            out.memory[key] = {"failures": failures, "seen_at": seen_at}
        return out

    # -- reading the telemetry -------------------------------------------------------------------------------------

    def _counter_total(self, name: str) -> float:
        try:
            return self._probes.telemetry.get(name).total()
        except KeyError:
            return 0.0

    def _refusals(self) -> dict[str, float]:
        """Every refusal counter's value per label set, as `name{label="value",...}` (as /metrics shows it)."""
        out: dict[str, float] = {}
        for short in REFUSAL_COUNTERS:
            try:
                metric = self._probes.telemetry.get(short)
            except KeyError:
                continue  # not registered in this daemon (e.g. no auth configured)
            for values, total in metric.samples():
                labels = dict(zip(metric.label_names, values, strict=True))
                if labels.get("server", RECEIVER_SERVERS[0]) not in RECEIVER_SERVERS:
                    continue
                if NOT_REFUSALS & set(labels.items()):
                    continue
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out[f"{metric.name}{{{text}}}" if text else metric.name] = total
        return out


def _changes_only(result: KindResult, prior: RulePrior | None) -> KindResult:
    """Keep a series' judgement only when what it says (violated, detail) differs from the last one kept.

    The checks see the process as it is now, so the slots of one evaluation (after a gap, or POST /evaluate after
    the scheduler's slot) all get the same verdict; folding it once is enough, and a resolved series then stays
    resolved (ladder: ok) instead of going on to inactive at the next slot of the same evaluation."""
    kept: list[Sample] = []
    for sample in result.samples:
        memory = result.memory.setdefault(sample.series, {})
        said = [sample.violated, sample.detail]
        if _memory(prior, sample.series).get("said") != said:
            kept.append(sample)
        memory["said"] = said
    result.samples = kept
    return result


def _retention_conflict(rule: Rule, view: RetentionView, ts: float) -> str | None:
    """Why retention as it runs deletes spans this rule reads, or None."""
    kept = view.spans_seconds
    if not view.enabled or kept is None:
        return None
    why: list[str] = []
    window = history_reach(rule)
    if window is not None and window > kept:
        why.append(f"reads spans {fmt_number(window / DAY)} d back, but raw spans are kept "
                   f"{fmt_number(kept / DAY)} d")
    span = fixed_range(rule)
    if span is not None and not any(lo <= span[0] and span[1] <= hi for lo, hi in view.kept_ranges):
        when = "are being deleted" if span[0] < ts - kept else "will be deleted"
        why.append(f"reads a fixed range of spans that retention does not spare: they {when}")
    if not why:
        return None
    return f"rule {rule.id} " + " and ".join(why) + " (store.retention.spans)"

