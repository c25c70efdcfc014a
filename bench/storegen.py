"""Synthetic stores for the benchmarks: spans built as Arrow columns and written by the daemon's own span writer
(the same tables, span keys and denormalised times the receivers produce), then the file is closed so the
read-only commands (`eval`, `replay`) can open it.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from evaluator.receiver.columns import ARRAY_SCHEMA, NUMBER_SCHEMA, SPAN_SCHEMA, STRING_SCHEMA, SpanColumns
from evaluator.store.store import Store, StoreSettings
from evaluator.store.writer import SpanWriter
from evaluator.telemetry import Telemetry

US = 1_000_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def span_columns(name: str, service: str, end_s: Sequence[float] | np.ndarray,
                 numbers: Mapping[str, Sequence[float] | np.ndarray],
                 strings: Mapping[str, Sequence[str]] | None = None,
                 rng: np.random.Generator | None = None, duration_s: float = 60.0) -> SpanColumns:
    """One span per end time, each with the given numeric and string attributes (one value per span; NaN in a
    numeric column leaves that attribute off the span)."""
    rng = rng or np.random.default_rng(0)
    n = len(end_s)
    end_us = np.round(np.asarray(end_s, dtype=np.float64) * US).astype(np.int64)
    ids = rng.integers(1, 2**62, size=(n, 3))
    spans = pa.table([
        pa.array([f"{a:016x}{b:016x}" for a, b in ids[:, :2]]), pa.array([f"{c:016x}" for c in ids[:, 2]]),
        pa.nulls(n, pa.string()), pa.array([name] * n), pa.array(np.ones(n, np.int32)),
        pa.array(end_us - round(duration_s * US), pa.timestamp("us")), pa.array(end_us, pa.timestamp("us")),
        pa.array(np.zeros(n, np.int32)), pa.nulls(n, pa.string()), pa.array([service] * n),
        pa.nulls(n, pa.string()), pa.array(["{}"] * n),
    ], schema=SPAN_SCHEMA)
    idx = np.arange(n, dtype=np.int32)
    n_idx, n_key, n_val = [], [], []
    for key, values in numbers.items():
        v = np.asarray(values, dtype=np.float64)
        keep = ~np.isnan(v)
        n_idx.append(idx[keep])
        n_key += [key] * int(keep.sum())
        n_val.append(v[keep])
    number_table = pa.table([pa.array(np.concatenate(n_idx) if n_idx else np.empty(0, np.int32)),
                             pa.array(n_key, pa.string()),
                             pa.array(np.concatenate(n_val) if n_val else np.empty(0))], schema=NUMBER_SCHEMA)
    s_idx, s_key, s_val = [], [], []
    for key, svalues in (strings or {}).items():
        s_idx.append(idx)
        s_key += [key] * n
        s_val += list(svalues)
    string_table = pa.table([pa.array(np.concatenate(s_idx) if s_idx else np.empty(0, np.int32)),
                             pa.array(s_key, pa.string()), pa.array(s_val, pa.string())], schema=STRING_SCHEMA)
    return SpanColumns(spans, number_table, string_table, ARRAY_SCHEMA.empty_table())


def write_store(path: str, batches: Iterable[SpanColumns]) -> int:
    """Write the batches (one group commit each, in order: span keys follow) and close the file. Returns spans."""
    store = Store(StoreSettings(path))
    store.start()
    writer = SpanWriter(store, Telemetry())
    writer.start()
    total = 0
    try:
        for batch in batches:
            writer.submit(batch, int(time.time() * US)).result()
            total += len(batch)
    finally:
        writer.shutdown()
        store.shutdown()
    return total


@dataclass(frozen=True)
class Timed:
    wall: float
    cpu: float  # user + system seconds of the child process
    returncode: int
    stdout: str
    stderr: str


def run_timed(argv: Sequence[str], cwd: str | None = None) -> Timed:
    """Run a command, measuring its wall time and the CPU time of the child (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, check=False,
                          env={**os.environ, "OTEL_EVALUATOR_PROGRESS": "0", "PYTHONPATH": path})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(wall, cpu, proc.returncode, proc.stdout, proc.stderr)


def median_timed(argv: Sequence[str], repeats: int, cwd: str | None = None) -> tuple[list[Timed], Timed]:
    """Run a command `repeats` times; every run, and the one with the median wall time. Fails on a non-zero
    exit (a benchmark of a failing command measures nothing)."""
    runs = []
    for _ in range(repeats):
        t = run_timed(argv, cwd)
        if t.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {t.returncode}:\n{t.stderr[-2000:]}\n{t.stdout[-2000:]}")
        runs.append(t)
    walls = [t.wall for t in runs]
    mid = statistics.median_low(walls)
    return runs, runs[walls.index(mid)]


def evaluator_cmd() -> list[str]:
    """The otel-evaluator command of the checkout this benchmark lives in, run by the benchmark's interpreter:
    `python -m evaluator` with that checkout first on the path (the same code the in-process figures measure;
    `.venv/bin/otel-evaluator` is this very entry point)."""
    return [sys.executable, "-m", "evaluator"]
