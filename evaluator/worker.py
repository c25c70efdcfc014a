"""A component whose thread runs `tick()` over and over until shutdown: the checkpointer, the outbox sender and the
metrics reporter share this lifecycle (start is idempotent; shutdown is idempotent, safe before start, and
interrupts the wait; wake() runs the next tick now)."""

from __future__ import annotations

import threading


class PeriodicWorker:
    def __init__(self, name: str, interval: float) -> None:
        self._name = name
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()

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
        while not self._stop.is_set():
            wanted = self.tick()
            self._wake.wait(self.interval if wanted is None else max(0.0, min(wanted, self.interval)))
            self._wake.clear()
