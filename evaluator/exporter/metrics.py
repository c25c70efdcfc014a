"""Sends the daemon's figures as OTLP metrics every OTEL_METRIC_EXPORT_INTERVAL (default 60 s).

The figures are the Telemetry registry: the daemon's own counters and gauges and, published there by the rule
engine, each rule's latest value and state per series and its transitions. Admin /metrics shows the same registry
in the Prometheus text format, so the two always agree. A failed send is logged and counted, not retried: the next
report carries the cumulative counts anyway.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from evaluator.clock import Clock
from evaluator.exporter.encode import alert_metrics_request
from evaluator.exporter.transport import SendResult, Transport
from evaluator.telemetry import Telemetry
from evaluator.worker import PeriodicWorker

DEFAULT_INTERVAL = 60.0


def export_interval(env: Mapping[str, str]) -> float:
    """OTEL_METRIC_EXPORT_INTERVAL in milliseconds -> seconds. Raises ValueError."""
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL must be milliseconds, got {raw!r}") from None
    if ms <= 0:
        raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL must be above 0, got {raw!r}")
    return ms / 1000.0


class MetricsReporter(PeriodicWorker):
    def __init__(self, transport: Transport, telemetry: Telemetry, clock: Clock, *, interval: float = DEFAULT_INTERVAL,
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        super().__init__("metrics-reporter", interval)
        self._transport = transport
        self._telemetry = telemetry
        self._clock = clock
        self._log = log or structlog.get_logger("metrics")
        self._start_ns = int(clock.now() * 1e9)
        self._reports = telemetry.counter("metric_reports_total", "OTLP metrics reports, by outcome.", ("outcome",))

    def report_once(self) -> SendResult:
        self._telemetry.collect()
        request = alert_metrics_request((), {}, self._telemetry, now_ns=int(self._clock.now() * 1e9),
                                        start_ns=self._start_ns)
        result = self._transport.send(request.SerializeToString())
        self._reports.inc(outcome="sent" if result.ok else "failed")
        if not result.ok:
            self._log.warning("sending metrics failed", error=result.error)
        return result

    def tick(self) -> float | None:
        self.report_once()
        return None

    def after_stop(self) -> None:
        """A last report at shutdown, so the final counts are not lost."""
        self.report_once()
