"""A component whose thread runs `tick()` over and over until shutdown: the checkpointer, retention, the outbox
sender, the metrics reporter and the Alertmanager refresher share this lifecycle (start is idempotent; shutdown is
idempotent, safe before start, and interrupts the wait; wake() runs the next tick now).

A tick that raises never ends the thread in silence: the exception is logged with the worker's name, counted
(`worker_errors_total{worker}` once `report_to` gave it the daemon's Telemetry), and the worker waits longer after
each failure in a row (doubling from its interval up to `max_backoff`) and goes on. `status()` says how it is
doing; a worker whose thread ended, or whose last `FAILING_AFTER` ticks all failed, has a `problem`, which the
daemon's /readyz names and the self-monitoring alerts report.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import structlog

from evaluator.telemetry import Counter, Telemetry

FAILING_AFTER = 3  # ticks failed in a row before a worker counts as failing (/readyz names it)
DEFAULT_MAX_BACKOFF = 300.0


@dataclass(frozen=True)
class WorkerStatus:
    """How a background thread is doing: the span writer reports the same shape."""

    name: str
    running: bool  # started and not shut down
    alive: bool  # its thread is alive
    failures: int = 0  # failed rounds since the process started
    consecutive_failures: int = 0  # failed rounds since the last one that succeeded
    last_error: str | None = None  # the latest failure, as "ExceptionType: message"

    @property
    def problem(self) -> str | None:
        """Why this worker cannot go on (None when it can): its thread ended, or it keeps failing."""
        if self.running and not self.alive:
            return "stopped: its thread ended" + (f" ({self.last_error})" if self.last_error else "")
        if self.consecutive_failures >= FAILING_AFTER:
            return f"failing: the last {self.consecutive_failures} rounds failed ({self.last_error})"
        return None


def error_text(exc: BaseException) -> str:
    """An exception as one line for logs and alerts: its type and message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


class PeriodicWorker:
    def __init__(self, name: str, interval: float, *, max_backoff: float = DEFAULT_MAX_BACKOFF) -> None:
        self._name = name
        self.interval = interval
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._worker_state = threading.Lock()  # the failure figures below, read by status() from other threads
        self._worker_failures = 0
        self._worker_consecutive = 0
        self._worker_last_error: str | None = None
        self._worker_errors: Counter | None = None
        self._worker_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("worker").bind(component=name)

    @property
    def name(self) -> str:
        return self._name

    def report_to(self, telemetry: Telemetry, log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        """Count failed ticks in telemetry's `worker_errors_total{worker}` and log them with `log` (the daemon's
        logger for this component). Call before start."""
        self._worker_errors = worker_errors(telemetry)
        if log is not None:
            self._worker_log = log

    def tick(self) -> float | None:
        """One round of work. Returns how soon the next round is wanted (None: after `interval`)."""
        raise NotImplementedError

    def before_start(self) -> None:
        """Set-up that must happen before the thread runs (on the caller's thread; may raise)."""

    def after_stop(self) -> None:
        """Work after the thread stopped (e.g. a last report)."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        self._wake.set()

    def status(self) -> WorkerStatus:
        thread = self._thread
        with self._worker_state:
            return WorkerStatus(self._name, thread is not None, thread is not None and thread.is_alive(),
                                self._worker_failures, self._worker_consecutive, self._worker_last_error)

    def start(self) -> None:
        with self._lifecycle:
            if self._thread is not None:
                return
            self.before_start()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._lifecycle:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join()
        self.after_stop()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    wanted = self.tick()
                except Exception as exc:  # any failure of a round: logged, counted, tried again
                    wait = self._round_failed(exc)
                else:
                    self._round_succeeded()
                    wait = self.interval if wanted is None else max(0.0, min(wanted, self.interval))
                self._wake.wait(wait)
                self._wake.clear()
        except BaseException as exc:  # the thread ends (e.g. SystemExit): said, so status() can tell why
            with self._worker_state:
                self._worker_last_error = error_text(exc)
            self._worker_log.error("background worker stopped", worker=self._name, error=error_text(exc))

    def _round_succeeded(self) -> None:
        with self._worker_state:
            if self._worker_consecutive:
                self._worker_log.info("background worker works again", worker=self._name,
                                     failed_rounds=self._worker_consecutive)
            self._worker_consecutive = 0

    def _round_failed(self, exc: Exception) -> float:
        """Record a failed round; returns how long to wait before the next one (backing off)."""
        with self._worker_state:
            self._worker_failures += 1
            self._worker_consecutive += 1
            self._worker_last_error = error_text(exc)
            consecutive = self._worker_consecutive
        if self._worker_errors is not None:
            self._worker_errors.inc(worker=self._name)
        wait = backoff(self.interval, consecutive, self.max_backoff)
        self._worker_log.error("background worker round failed; it goes on", worker=self._name,
                              error=error_text(exc), failed_rounds=consecutive, retry_in=round(wait, 3),
                              exc_info=exc)
        return wait


def backoff(interval: float, consecutive: int, max_backoff: float) -> float:
    """The wait after `consecutive` failed rounds: the interval, doubled per failure after the first, at most
    max_backoff (never below the interval itself)."""
    return max(interval, min(max_backoff, interval * 2 ** min(max(consecutive - 1, 0), 30)))


def worker_errors(telemetry: Telemetry) -> Counter:
    """The counter of failed background rounds, shared by the periodic workers and the span writer."""
    return telemetry.counter("worker_errors_total", "Rounds of a background worker that failed with an "
                             "unexpected error (logged; the worker backs off and goes on).", ("worker",))
