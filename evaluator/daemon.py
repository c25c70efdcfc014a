"""The daemon: builds the components from a Config and starts and stops them in dependency order.

Downstream parts start first and stop last (store -> writer -> receivers/admin); on shutdown the receivers stop
accepting and finish their in-flight exports while the writer still commits, then the writer drains, then the
store checkpoints and closes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog

from evaluator.admin.server import AdminServer
from evaluator.clock import Clock, SystemClock
from evaluator.config import Config, admin_external_url
from evaluator.exporter.alertmanager import (
    ALERTMANAGER,
    AlertmanagerRefresher,
    AlertmanagerTransport,
    transitions_payload,
)
from evaluator.exporter.encode import alert_spans_request
from evaluator.exporter.metrics import MetricsReporter, export_interval
from evaluator.exporter.otlp_config import from_env
from evaluator.exporter.outbox import TRACES, OutboxSender
from evaluator.exporter.transport import Transport, make_transport
from evaluator.receiver.grpc_server import GrpcReceiver
from evaluator.receiver.http_server import HttpReceiver
from evaluator.receiver.ingest import Ingestor
from evaluator.rules.backends import DuckDBState, OutboxEncoder
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.kinds.selfcheck import SELF_KIND, Probes, RetentionView, SelfCheckKind
from evaluator.rules.loader import load_rules
from evaluator.rules.model import RuleSet
from evaluator.rules.reach import cut_short, describe_range, kept_ranges, retention_problems
from evaluator.rules.scheduler import DEFAULT_EVALUATION_DELAY, GroupScheduler
from evaluator.security.auth import Authenticator, TokenError
from evaluator.selfmon import ladder_rules, self_group, with_self_group
from evaluator.store.checkpointer import Checkpointer
from evaluator.store.retention import DAY, RetentionWorker, store_free_bytes
from evaluator.store.store import Store
from evaluator.store.writer import SpanWriter
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker, WorkerStatus
from evaluator.yamlsrc import InvalidConfig, Problem


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        telemetry: Telemetry | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """env: the environment the OTEL_EXPORTER_OTLP_* variables are read from (default os.environ).
        Raises InvalidConfig for an invalid exporter setting."""
        self.config = config
        self.clock = clock or SystemClock()
        self.telemetry = telemetry or Telemetry()
        self.log = log or structlog.get_logger("daemon")
        self.store = Store(config.store, log=self.log.bind(component="store"))
        self.checkpointer = Checkpointer(self.store, self.telemetry, wal_bytes=config.checkpoint_wal_bytes,
                                         log=self.log.bind(component="checkpointer"))
        self.retention = RetentionWorker(self.store, self.telemetry, self.clock, config.retention,
                                         log=self.log.bind(component="retention"))
        self.writer = SpanWriter(self.store, self.telemetry, max_group_spans=config.max_group_spans,
                                 log=self.log.bind(component="writer"))
        self.ingestor = Ingestor(self.writer, self.telemetry, self.clock, config.ingest,
                                 log=self.log.bind(component="ingest"))
        self.auth: Authenticator | None = None
        if config.auth is not None:
            try:
                self.auth = Authenticator.from_settings(config.auth, self.telemetry, environ=env,
                                                        log=self.log.bind(component="auth"))
            except (TokenError, OSError) as exc:
                raise InvalidConfig([Problem("auth", 0, "", str(exc))]) from None
        self.grpc = (
            # gRPC core refuses messages over its own limit before our handler runs, uncounted; at twice our
            # limit, every realistic oversize request reaches the ingestor, which answers and counts it.
            GrpcReceiver(self.ingestor, replace(config.grpc, max_receive_bytes=2 * config.ingest.max_request_bytes),
                         log=self.log.bind(component="grpc"), auth=self.auth)
            if config.grpc else None
        )
        self.http = (HttpReceiver(self.ingestor, config.http, log=self.log.bind(component="http"), auth=self.auth,
                                  telemetry=self.telemetry)
                     if config.http else None)
        self.admin = AdminServer(config.admin, self.telemetry, self._not_ready_reason,
                                 log=self.log.bind(component="admin"), cursor_factory=self.store.cursor,
                                 auth=self.auth, evaluate=self.evaluate_now,
                                 rules=lambda: ladder_rules(self.engine.ruleset.rules()))
        environ = os.environ if env is None else env
        try:
            traces = from_env(environ, "traces", base=config.exporter)
            transport = make_transport(traces, "traces")
            metrics_transport = make_transport(from_env(environ, "metrics", base=config.exporter), "metrics")
            interval = export_interval(environ)
        except ValueError as exc:
            raise InvalidConfig([Problem("exporter", 0, "", str(exc))]) from None
        self.metrics: MetricsReporter | None = None
        if metrics_transport is not None:
            self.metrics = MetricsReporter(metrics_transport, self.telemetry, self.clock, interval=interval,
                                           log=self.log.bind(component="metrics"))
        transports: dict[str, Transport] = {}
        encoders: dict[str, OutboxEncoder] = {}

        def alert_base_url() -> str:  # alert links point at the admin server (its port is bound at start)
            return admin_external_url(config.admin, self.admin.port)

        if transport is not None:
            transports[TRACES] = transport
            encoders[TRACES] = lambda events: alert_spans_request(
                events, base_url=alert_base_url()).SerializeToString()
        am = config.alertmanager
        self.alertmanager: AlertmanagerRefresher | None = None
        if am.url:
            am_transport = AlertmanagerTransport(am, self.clock)  # one, shared: re-sends keep the outbox's order
            transports[ALERTMANAGER] = am_transport
            encoders[ALERTMANAGER] = lambda events: transitions_payload(events, alert_base_url())
            self.alertmanager = AlertmanagerRefresher(
                am_transport, self.store.cursor, lambda: {r.id: r for r in self.engine.ruleset.rules()},
                self.clock, self.telemetry, am, alert_base_url, log=self.log.bind(component="alertmanager"))
        self.outbox: OutboxSender | None = None
        state = DuckDBState(self.store.cursor)
        if transports:
            self.outbox = OutboxSender(self.store.cursor, transports, self.clock, self.telemetry,
                                       max_backoff={ALERTMANAGER: am.max_backoff_seconds},
                                       log=self.log.bind(component="outbox"))
            state = DuckDBState(self.store.cursor, encoders, self.outbox.wake)
        self.exporter_endpoint = traces.endpoint
        self.workers: list[PeriodicWorker] = [w for w in (self.checkpointer, self.retention, self.outbox, self.metrics,
                                                          self.alertmanager) if w is not None]
        for worker in self.workers:  # a failing round is logged under the component and counted
            worker.report_to(self.telemetry, self.log.bind(component=worker.name))
        self.self_group = self_group(config.self_monitoring)
        kinds = new_kinds()
        if self.self_group is not None:
            kinds[SELF_KIND] = self._self_check_kind()
        self.engine = RuleEngine(self.store.cursor, kinds, state, self.telemetry,
                                 log=self.log.bind(component="rules"),
                                 max_catch_up=config.evaluation.max_catch_up,
                                 default_budget=config.evaluation.budget, group_deadline=True)
        self.scheduler = GroupScheduler(self.engine, self.clock, self.telemetry,
                                        log=self.log.bind(component="scheduler"),
                                        evaluation_delay=config.evaluation.delay)
        self._ready = False
        self._lock = threading.Lock()
        size = self.telemetry.gauge("store_size_bytes", "Bytes of the DuckDB file and its WAL.")
        self.telemetry.add_collector(lambda: size.set(self.store.size_bytes()))
        free = self.telemetry.gauge("store_free_bytes", "Bytes of free blocks inside the DuckDB file (space freed by "
                                    "retention, reused before the file grows).")
        self.telemetry.add_collector(lambda: free.set(store_free_bytes(self.store)))

    def _self_check_kind(self) -> SelfCheckKind:
        """The self checks, looking at this daemon's components (evaluator/rules/kinds/selfcheck.py)."""
        settings = self.config.self_monitoring
        probes = Probes(
            clock=self.clock, telemetry=self.telemetry, health=lambda: self.engine.health,
            rules=lambda: self.engine.ruleset.rules(), workers=self.worker_statuses,
            retention=lambda: RetentionView(self.retention.settings.enabled, self.retention.spans_seconds,
                                            self.retention.kept_ranges))
        # a slot is the present while the scheduler may still be evaluating it (its interval plus the evaluation
        # delay after it), with an interval to spare
        present = 2 * settings.interval_seconds + DEFAULT_EVALUATION_DELAY
        return SelfCheckKind(probes, window=settings.interval_seconds,
                             outbox_max_age=settings.outbox_max_age_seconds, present=present)

    def worker_statuses(self) -> list[WorkerStatus]:
        """Every background thread: the periodic workers and the span writer."""
        return [w.status() for w in self.workers] + [self.writer.status()]

    def evaluate_now(self, at: float | None = None) -> dict[str, Any]:
        """Admin POST /evaluate: every rule group at the clock's time now (or `at`). Serialized per group with the
        scheduler's own runs, never at a time before the group's last evaluation (GroupScheduler.evaluate_now)."""
        why = self._not_running_reason()
        if why is not None:
            raise RuntimeError(why)
        return self.scheduler.evaluate_all_now(at)

    def _not_running_reason(self) -> str | None:
        if not self._ready:
            return "starting or stopping"
        if not self.store.running:
            return "store closed"
        return None

    def _not_ready_reason(self) -> str | None:
        """/readyz: None when ready; else why not, naming each background worker that cannot go on (its thread
        ended, or its last rounds all failed: evaluator/worker.py)."""
        why = self._not_running_reason()
        if why is not None:
            return why
        problems = [f"{s.name} {s.problem}" for s in self.worker_statuses() if s.problem is not None]
        return "; ".join(problems) or None

    def start(self) -> None:
        """Start everything or, if a part fails, stop what started and raise."""
        with self._lock:
            ruleset = load_rules(list(self.config.rules)) if self.config.rules else RuleSet()
            self._fit_retention(ruleset)  # InvalidConfig: an explicit span retention deletes what a rule reads
            ruleset = with_self_group(ruleset, self.self_group)
            self.engine.load(ruleset)
            try:
                self.store.start()
                self.checkpointer.start()
                self.writer.start()
                self.retention.start()
                if self.outbox is not None:
                    self.outbox.start()
                if self.metrics is not None:
                    self.metrics.start()
                if self.alertmanager is not None:
                    self.alertmanager.start()
                if ruleset.groups:
                    self.scheduler.start(ruleset.groups)
                self.admin.start()
                if self.grpc:
                    self.grpc.start()
                if self.http:
                    self.http.start()
            except BaseException:
                self._stop_all()
                raise
            self._ready = True
            self.log.info(
                "otel-evaluator started", pid=os.getpid(), db=self.config.store.path, config=self.config.source,
                grpc_port=self.grpc.port if self.grpc else None, http_port=self.http.port if self.http else None,
                admin_port=self.admin.port, keep_prefixes=self.config.ingest.keep_prefixes,
                rule_groups=len(ruleset.groups), rules=len(ruleset.rules()),
                alert_export=self.exporter_endpoint or "none: alerts are stored and logged, not sent",
            )

    def _fit_retention(self, ruleset: RuleSet) -> None:
        """Raw spans must outlive what a rule reads: its moving window and any fixed range (reach.py).

        `store.retention.spans` unset: it is lengthened to the longest moving window plus a day, and the spans of
        the rules' fixed ranges are spared. Set explicitly, it is kept exactly, and rules reading spans it deletes
        are refused with InvalidConfig naming each rule, its file:line and the dates it needs, before anything
        changes (so a refused reload leaves the running rules and retention as they were)."""
        settings = self.config.retention
        kept = settings.spans_seconds
        if kept is None or not settings.enabled:
            return
        if settings.spans_configured:
            problems = retention_problems(ruleset, kept, self.clock.now())
            if problems:
                raise InvalidConfig(problems)
            self.retention.spans_seconds, self.retention.kept_ranges = kept, ()
            return
        short = cut_short(ruleset, kept)
        ranges = kept_ranges(ruleset)
        self.retention.spans_seconds = kept
        if short:
            rule_id, reach = max(short, key=lambda item: item[1])
            self.retention.spans_seconds = reach + DAY
            self.log.info("raw span retention lengthened to cover the longest rule history", rule=rule_id,
                          reads_days=round(reach / DAY, 2), kept_days=round((reach + DAY) / DAY, 2))
        self.retention.kept_ranges = ranges
        if ranges:
            self.log.info("raw spans in the rules' fixed baseline ranges are kept past retention",
                          ranges=[describe_range(r) for r in ranges])

    def reload_rules(self) -> bool:
        """Load the rule files again (SIGHUP). Unchanged rules keep their state; an invalid set (or one an
        explicit span retention cuts short) is refused and the running rules stay. Returns whether the new rules
        are in force."""
        try:
            ruleset = load_rules(list(self.config.rules)) if self.config.rules else RuleSet()
            self._fit_retention(ruleset)
            ruleset = with_self_group(ruleset, self.self_group)
        except InvalidConfig as exc:
            self.log.error("rule reload refused: the running rules stay",
                           problems=[str(p) for p in exc.problems])
            return False
        self.engine.load(ruleset)
        if ruleset.groups:
            self.scheduler.start(ruleset.groups)  # no-op when running
        self.scheduler.reschedule(ruleset.groups)
        self.log.info("rules reloaded", rule_groups=len(ruleset.groups), rules=len(ruleset.rules()))
        return True

    def shutdown(self) -> None:
        """Stop accepting, finish in-flight exports, commit, checkpoint. Idempotent; safe before start."""
        with self._lock:
            if self._ready:
                self.log.info("otel-evaluator stopping")
            self._stop_all()

    def _stop_all(self) -> None:
        self._ready = False
        grace = self.config.shutdown_grace_seconds
        if self.grpc:
            self.grpc.stop_accepting()
        for receiver in (self.grpc, self.http):
            if receiver is not None:
                receiver.shutdown(grace)
        self.scheduler.shutdown()
        if self.alertmanager is not None:
            self.alertmanager.shutdown()
        if self.outbox is not None:
            self.outbox.shutdown()
        self.writer.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()
        self.retention.shutdown()
        self.checkpointer.shutdown()
        self.admin.shutdown(1.0)
        self.store.shutdown()
