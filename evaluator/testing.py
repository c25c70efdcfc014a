"""Test helpers shipped with the package (as the Collector ships consumertest and structlog ships testing):
a fake clock, an in-process daemon on free loopback ports, and the real CLI daemon as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from evaluator.admin.client import AdminClient
from evaluator.admin.server import AdminSettings
from evaluator.config import Config
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.http_server import HttpSettings
from evaluator.selfmon import SelfMonitoringSettings
from evaluator.store.store import StoreSettings


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, value: float) -> None:
        with self._lock:
            self._now = value


def loopback_config(db_path: str | Path, **changes: Any) -> Config:
    """A Config on free loopback ports (port 0) with the given DuckDB file. Self-monitoring is off unless
    `self_monitoring=` turns it on: a test counts the alerts its own data causes, not the daemon's Watchdog."""
    cfg = Config(
        store=StoreSettings(path=str(db_path)),
        grpc=GrpcSettings(listen="127.0.0.1:0"),
        http=HttpSettings(listen="127.0.0.1:0"),
        admin=AdminSettings(listen="127.0.0.1:0"),
        shutdown_grace_seconds=5.0,
        self_monitoring=SelfMonitoringSettings(enabled=False),
    )
    return replace(cfg, **changes)


class DaemonProcess:
    """`otel-evaluator serve` as a child process, with the ports it chose read from its JSON log."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._started = threading.Event()

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        cmd = [sys.executable, "-m", "evaluator", "serve", "--log-format", "json", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=self.cwd)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        if not self._started.wait(timeout):
            self.kill()
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.lines))
        if not self.ports:
            raise RuntimeError("daemon exited during start-up:\n" + "\n".join(self.lines))
        return self

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "otel-evaluator started":
                self.ports = {k: event[f"{k}_port"] for k in ("grpc", "http", "admin") if event.get(f"{k}_port")}
                self._started.set()
        self._started.set()

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def admin(self, timeout: float = 60.0) -> AdminClient:
        """A client of this daemon's admin endpoint."""
        return AdminClient(self.admin_url, timeout=timeout)

    def evaluate(self, at: float | None = None) -> dict[str, Any]:
        """POST /evaluate: every rule group now, or at `at` (unix seconds); the daemon's answer (groups,
        transitions, unhealthy rules)."""
        answer: dict[str, Any] = self.admin().post_json("/evaluate", {} if at is None else {"at": at})
        return answer

    def query(self, sql: str) -> list[dict[str, Any]]:
        """POST /query: the rows of one read-only statement as {column: value}, values as the endpoint's JSON has
        them (TIMESTAMP as ISO-8601 text, JSON columns as text)."""
        answer = self.admin().post_json("/query", {"sql": sql, "format": "json"})
        names = [c["name"] for c in answer["columns"]]
        return [dict(zip(names, row, strict=True)) for row in answer["rows"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


@contextmanager
def daemon_process(args: list[str], **kwargs: Any) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(args, **kwargs).start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
