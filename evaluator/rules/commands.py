"""`check`, `eval` and `replay`: rules over a stopped daemon's file, opened read-only, state kept in memory.

Each returns an exit code and writes to the streams it is given; only evaluator.cli exits the process.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from evaluator.rules.engine import AlertEvent, MemoryState, RuleEngine, series_json
from evaluator.rules.loader import load_rules
from evaluator.rules.model import RuleSet
from evaluator.store.store import Store, StoreError, StoreSettings
from evaluator.yamlsrc import InvalidConfig, parse_duration

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def parse_time(text: str, now: float | None = None) -> float:
    """ISO-8601 (a missing zone means UTC), unix seconds, or `now` -> unix seconds. Raises ValueError."""
    if text.strip() == "now" and now is not None:
        return now
    if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
        return float(text)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: use ISO-8601 like 2026-11-20T06:00:00Z, unix seconds or now") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str], out: TextIO) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _problems(exc: InvalidConfig, err: TextIO) -> None:
    for p in exc.problems:
        err.write(f"  {p}\n")


def check(paths: list[str], out: TextIO, err: TextIO) -> int:
    try:
        rs = load_rules(paths)
    except InvalidConfig as exc:
        err.write(f"{len(exc.problems)} problem(s):\n")
        _problems(exc, err)
        return EXIT_PROBLEMS
    out.write(f"ok: {len(rs.groups)} group(s), {len(rs.rules())} rule(s)\n")
    return EXIT_OK


def _open(db: str, rules: list[str], err: TextIO) -> tuple[Store, RuleEngine, MemoryState, RuleSet] | int:
    from evaluator.rules.kinds import KINDS

    try:
        rs = load_rules(rules)
    except InvalidConfig as exc:
        err.write("invalid rules:\n")
        _problems(exc, err)
        return EXIT_USAGE
    store = Store(StoreSettings(path=db, read_only=True))
    try:
        store.start()
    except StoreError as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_USAGE
    state = MemoryState()
    engine = RuleEngine(store.cursor, KINDS, state)
    engine.load(rs)
    return store, engine, state, rs


def evaluate_at(db: str, rules: list[str], at: float, fmt: str, out: TextIO, err: TextIO) -> int:
    opened = _open(db, rules, err)
    if isinstance(opened, int):
        return opened
    store, engine, state, rs = opened
    try:
        engine.evaluate_all(at)
    finally:
        store.shutdown()
    rows: list[dict[str, Any]] = []
    for rule in rs.rules():
        error = engine.health.get(rule.id)
        if error:
            rows.append({"rule": rule.id, "series": "", "state": "error", "detail": error})
            continue
        series = state.states.get(rule.id, {})
        if not series:
            rows.append({"rule": rule.id, "series": "", "state": "inactive", "detail": "no series"})
        for key, s in sorted(series.items()):
            rows.append({"rule": rule.id, "rung": rule.rung, "series": series_json(key), "state": s.state,
                         "value": s.value, "threshold": s.threshold, "consecutive": s.consecutive,
                         "since": iso(s.active_at), "detail": s.detail})
    if fmt == "json":
        out.write(json.dumps({"at": iso(at), "results": rows}, indent=2, default=list) + "\n")
    else:
        out.write(f"evaluated at {iso(at)}\n")
        print_table(rows, ["rule", "series", "state", "value", "threshold", "consecutive", "since", "detail"], out)
    return EXIT_PROBLEMS if any(r["state"] == "error" for r in rows) else EXIT_OK


def event_row(ev: AlertEvent) -> dict[str, Any]:
    t = ev.transition
    return {"at": iso(t.at), "rule": ev.rule.id, "rung": ev.rule.rung, "owner": ev.rule.owner,
            "series": series_json(t.series), "from": t.from_state, "to": t.to_state, "value": t.value,
            "threshold": t.threshold, "consecutive": t.consecutive, "run_at": iso(t.run_at), "summary": ev.summary}


PROGRESS_ENV = "OTEL_EVALUATOR_PROGRESS"


def progress_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> TextIO | None:
    """Where replay's progress line goes: `stream` when it is a terminal, else nowhere. The variable
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

    def __init__(self, stream: TextIO | None, total: int, interval: float = 0.2) -> None:
        self._stream = stream
        self._total = total
        self._interval = interval
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
        self._stream.write(f"\r\x1b[Kreplay {done}/{self._total} at {iso(at)}, {transitions} transition(s)"
                           f"{eta_text}")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def replay(db: str, rules: list[str], start: float, end: float, step: str, fmt: str, out: TextIO,
           err: TextIO, progress: TextIO | None = None) -> int:
    """progress: where to draw the progress line (see progress_stream), or None for none."""
    try:
        step_s = parse_duration(step)
    except ValueError as exc:
        err.write(f"otel-evaluator: --step: {exc}\n")
        return EXIT_USAGE
    if step_s <= 0 or end < start:
        err.write("otel-evaluator: need --from <= --to and a positive --step\n")
        return EXIT_USAGE
    opened = _open(db, rules, err)
    if isinstance(opened, int):
        return opened
    store, engine, _state, _ = opened
    steps = math.floor((end - start) / step_s) + 1
    events: list[AlertEvent] = []
    bar = Progress(progress, steps)
    try:
        for i in range(steps):
            at = start + i * step_s
            events.extend(engine.evaluate_all(at))
            bar.update(i + 1, at, len(events))
    finally:
        bar.close()
        store.shutdown()
    rows = [event_row(ev) for ev in events]
    if fmt == "json":
        out.write(json.dumps({"from": iso(start), "to": iso(end), "evaluations": steps, "transitions": rows},
                             indent=2, default=list) + "\n")
    else:
        out.write(f"{steps} evaluations from {iso(start)} to {iso(end)}: {len(rows)} transition(s)\n")
        if rows:
            print_table(rows, ["at", "rule", "series", "from", "to", "value", "threshold", "summary"], out)
    errors = {k: v for k, v in engine.health.items() if v}
    for rule_id, error in errors.items():
        err.write(f"rule {rule_id} failed: {error}\n")
    return EXIT_PROBLEMS if errors else EXIT_OK
