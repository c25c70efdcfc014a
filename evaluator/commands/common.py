"""Pieces every command uses: times from the command line, aligned tables, a progress line on a terminal."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from evaluator.timeparse import parse_time
from evaluator.yamlsrc import InvalidConfig

__all__ = ["parse_time"]  # re-exported for the commands

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
PROGRESS_ENV = "OTEL_EVALUATOR_PROGRESS"


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T" and value.endswith("Z"):
        return value[:19] + "Z"  # ISO times to the second in tables
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str], out: TextIO) -> None:
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def write_problems(exc: InvalidConfig, err: TextIO) -> None:
    for p in exc.problems:
        err.write(f"  {p}\n")


def progress_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> TextIO | None:
    """Where a progress line goes: `stream` when it is a terminal, else nowhere. The variable
    OTEL_EVALUATOR_PROGRESS=1 forces it on, =0 off."""
    forced = (os.environ if env is None else env).get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return stream if forced == "1" else None
    try:
        return stream if stream.isatty() else None
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return None


class Progress:
    """One line on a terminal, rewritten in place: evaluation i/N, the time evaluated, transitions, ETA."""

    def __init__(self, stream: TextIO | None, total: int, interval: float = 0.2, what: str = "replay") -> None:
        self._stream = stream
        self._total = total
        self._interval = interval
        self._what = what
        self._t0 = time.monotonic()
        self._last = -math.inf

    def update(self, done: int, at: float, transitions: int) -> None:
        if self._stream is None:
            return
        now = time.monotonic()
        if now - self._last < self._interval and done < self._total:
            return
        self._last = now
        elapsed = now - self._t0
        eta = elapsed / done * (self._total - done) if done else math.nan
        eta_text = "" if math.isnan(eta) else f", ETA {_duration(eta)}"
        self._stream.write(f"\r\x1b[K{self._what} {done}/{self._total} at {iso(at)}, {transitions} transition(s)"
                           f"{eta_text}")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
