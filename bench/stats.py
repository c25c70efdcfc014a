"""Statistics benchmark at production sizes, reading from a real store:

1. distribution: 10M baseline and 10M current values of `data.amount_paise` (yesterday lognormal(10, 1.5),
   today lognormal(4, 1): the payments unit change) in `span_numbers`, two daily windows. Times PSI on the
   baseline's quantile bins two ways:
   - numpy: read both windows into numpy, then evaluator.stats.drift.psi (quantiles + counting in numpy);
   - duckdb_sql: one query computing the baseline's quantiles and both windows' histograms in DuckDB, then
     psi on the two Histograms (no values leave DuckDB).
   Also KS on the same arrays (it needs sorted raw values), and peak memory.
2. prediction quality: 1M prediction spans (`ml.prediction_id`, `ml.score`) and 1M label spans
   (`ml.prediction_id`, `ml.label`, 30 days later); times the join on the string id and the AUC.

    .venv/bin/python bench/stats.py                 # prints medians of 3 repeats, in seconds
    .venv/bin/python bench/stats.py --values 1000000 --predictions 100000

Rows go straight into span_numbers / span_strings with INSERT ... SELECT FROM range(...) and DuckDB's random():
the writer is not under test here (bench/ingest.py measures it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluator.stats.classification import auc
from evaluator.stats.drift import Histogram, ks, psi
from evaluator.store.store import Store, StoreSettings

T = TypeVar("T")
DAY = dt.timedelta(days=1)
T0 = dt.datetime(2025, 11, 1)  # baseline day; the current day follows; predictions the day after
AMOUNT = "data.amount_paise"
NORMAL = "sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())"  # Box-Muller: DuckDB has no normal()

INSERT_AMOUNTS = f"""
    INSERT INTO span_numbers
    SELECT $key_offset + i, $day + to_microseconds(CAST(i * $step_us AS BIGINT)), '{AMOUNT}',
           exp($mean_log + $sigma * {NORMAL})
    FROM range($n) t(i)"""

AMOUNTS_IN_WINDOW = "SELECT value FROM span_numbers WHERE key = $key AND time >= $start AND time < $end"

# Baseline quantiles and both windows' histograms on them in one statement (one scan per part).
PSI_HISTOGRAMS = """
    WITH edges AS (
        SELECT list_sort(list_distinct(quantile_cont(value, $levels))) AS bounds
        FROM span_numbers WHERE key = $key AND time >= $baseline_start AND time < $baseline_end
    )
    SELECT time >= $current_start AS is_current, (SELECT bounds FROM edges) AS bounds,
           histogram(value, (SELECT bounds FROM edges)) AS counts
    FROM span_numbers
    WHERE key = $key AND time >= $baseline_start AND time < $current_end
      AND (time < $baseline_end OR time >= $current_start)
    GROUP BY ALL"""

CREATE_PREDICTIONS = """
    CREATE TEMP TABLE bench_predictions AS
    SELECT i, md5(CAST(i AS VARCHAR)) AS prediction_id, random() AS score FROM range($n) t(i)"""

INSERT_PREDICTION_IDS = """
    INSERT INTO span_strings
    SELECT $key_offset + i, $day + to_microseconds(CAST(i * $step_us AS BIGINT)), 'ml.prediction_id', prediction_id
    FROM bench_predictions"""

INSERT_SCORES = """
    INSERT INTO span_numbers
    SELECT $key_offset + i, $day + to_microseconds(CAST(i * $step_us AS BIGINT)), 'ml.score', score
    FROM bench_predictions"""

INSERT_LABELS = """
    INSERT INTO span_numbers
    SELECT $key_offset + i, $day + to_microseconds(CAST(i * $step_us AS BIGINT)), 'ml.label',
           CASE WHEN random() < score THEN 1 ELSE 0 END
    FROM bench_predictions"""

# What a prediction_quality rule runs: the window's predictions, each with its latest label (collectors retry
# and labels get corrected, so one per id), -1 where none has arrived yet (label coverage).
SCORES_WITH_LABELS = """
    WITH predictions AS (
        SELECT s.value AS prediction_id, n.value AS score
        FROM span_strings s JOIN span_numbers n ON n.span_key = s.span_key
        WHERE s.key = 'ml.prediction_id' AND n.key = 'ml.score'
          AND s.time >= $start AND s.time < $end AND n.time >= $start AND n.time < $end
    ), labels AS (
        SELECT s.value AS prediction_id, arg_max(n.value, n.time) AS label
        FROM span_strings s JOIN span_numbers n ON n.span_key = s.span_key
        WHERE s.key = 'ml.prediction_id' AND n.key = 'ml.label' AND s.time >= $start AND n.time >= $start
        GROUP BY s.value
    )
    SELECT p.score, coalesce(l.label, -1) AS label FROM predictions p LEFT JOIN labels l USING (prediction_id)"""


def build(cur: duckdb.DuckDBPyConnection, n_values: int, n_predictions: int) -> None:
    cur.execute("SELECT setseed(0.42)")
    step = DAY.total_seconds() * 1e6 / n_values
    for offset, day, mean_log, sigma in ((0, T0, 10.0, 1.5), (n_values, T0 + DAY, 4.0, 1.0)):
        cur.execute(INSERT_AMOUNTS, {"key_offset": offset, "day": day, "step_us": step, "mean_log": mean_log,
                                     "sigma": sigma, "n": n_values})
    cur.execute(CREATE_PREDICTIONS, {"n": n_predictions})
    step = DAY.total_seconds() * 1e6 / n_predictions
    pred = {"key_offset": 100_000_000_000, "day": T0 + 2 * DAY, "step_us": step}
    label = {"key_offset": 200_000_000_000, "day": T0 + 32 * DAY, "step_us": step}
    cur.execute(INSERT_PREDICTION_IDS, pred)
    cur.execute(INSERT_SCORES, pred)
    cur.execute(INSERT_PREDICTION_IDS, label)
    cur.execute(INSERT_LABELS, label)
    cur.execute("DROP TABLE bench_predictions")
    cur.execute("CHECKPOINT")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def window(cur: duckdb.DuckDBPyConnection, start: dt.datetime) -> np.ndarray:
    return cur.execute(AMOUNTS_IN_WINDOW, {"key": AMOUNT, "start": start, "end": start + DAY}).fetchnumpy()["value"]


def psi_numpy(cur: duckdb.DuckDBPyConnection, bins: int) -> dict[str, Any]:
    fetch_s, (b, c) = timed(lambda: (window(cur, T0), window(cur, T0 + DAY)))
    psi_s, result = timed(lambda: psi(b, c, bins=bins))
    return {"fetch": fetch_s, "psi": psi_s, "total": fetch_s + psi_s, "value": result.value,
            "n_baseline": result.n_baseline, "n_current": result.n_current}


def psi_sql(cur: duckdb.DuckDBPyConnection, bins: int) -> dict[str, Any]:
    params = {"levels": [i / bins for i in range(1, bins)], "key": AMOUNT, "baseline_start": T0,
              "baseline_end": T0 + DAY, "current_start": T0 + DAY, "current_end": T0 + 2 * DAY}
    query_s, rows = timed(lambda: cur.execute(PSI_HISTOGRAMS, params).fetchall())
    by_side = {bool(is_current): (bounds, counts) for is_current, bounds, counts in rows}
    bounds = by_side[False][0]

    def histogram(is_current: bool) -> Histogram:
        counts = by_side[is_current][1]
        return Histogram(bounds, [counts.get(b, 0) for b in [*bounds, float("inf")]])

    psi_s, result = timed(lambda: psi(histogram(False), histogram(True)))
    return {"query": query_s, "psi": psi_s, "total": query_s + psi_s, "value": result.value}


def ks_numpy(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    fetch_s, (b, c) = timed(lambda: (window(cur, T0), window(cur, T0 + DAY)))
    ks_s, result = timed(lambda: ks(b, c))
    return {"fetch": fetch_s, "ks": ks_s, "total": fetch_s + ks_s, "value": result.value}


def prediction_quality(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    params = {"start": T0 + 2 * DAY, "end": T0 + 3 * DAY}
    join_s, cols = timed(lambda: cur.execute(SCORES_WITH_LABELS, params).fetchnumpy())
    scores, labels = cols["score"], cols["label"]

    def judge() -> tuple[float, float]:
        labelled = labels >= 0
        return auc(scores[labelled], labels[labelled]), float(labelled.mean())

    auc_s, (value, coverage) = timed(judge)
    return {"join": join_s, "auc": auc_s, "total": join_s + auc_s, "value": value,
            "predictions": int(scores.size), "label_coverage": coverage}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds per timed part; other fields from the last run."""
    out = dict(runs[-1])
    for key in ("fetch", "psi", "query", "ks", "join", "auc", "total"):
        if key in out:
            out[f"{key}_seconds_median"] = round(statistics.median(r[key] for r in runs), 3)
            del out[key]
    return out


def peak_traced_mb(fn: Callable[[], object]) -> float:
    """Peak of Python and numpy allocations during `fn` (numpy reports its buffers to tracemalloc; DuckDB's
    own memory is not included)."""
    tracemalloc.start()
    try:
        fn()
        return round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    finally:
        tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=10_000_000, help="values per window")
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-stats-")
    store = Store(StoreSettings(os.path.join(workdir, "bench.duckdb")))
    store.start()
    try:
        cur = store.cursor()
        build_s, _ = timed(lambda: build(cur, args.values, args.predictions))
        rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # One untimed run of each first: one-time imports (scipy for the KS p-value) and cold pages are not
        # what a daemon evaluating every few minutes pays.
        numpy_runs = [psi_numpy(cur, args.bins) for _ in range(args.repeats + 1)][1:]
        sql_runs = [psi_sql(cur, args.bins) for _ in range(args.repeats + 1)][1:]
        ks_runs = [ks_numpy(cur) for _ in range(args.repeats + 1)][1:]
        pq_runs = [prediction_quality(cur) for _ in range(args.repeats + 1)][1:]
        traced_psi = peak_traced_mb(lambda: psi_numpy(cur, args.bins))
        traced_ks = peak_traced_mb(lambda: ks_numpy(cur))
        cur.close()
        size_mb = round(store.size_bytes() / 2**20)
    finally:
        store.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({
        "values_per_window": args.values, "bins": args.bins, "predictions": args.predictions,
        "build_seconds": round(build_s, 1), "store_mb": size_mb,
        "psi_numpy": medians(numpy_runs),
        "psi_duckdb_sql": medians(sql_runs),
        "ks_numpy": medians(ks_runs),
        "prediction_quality": medians(pq_runs),
        "memory_mb": {
            "psi_numpy_traced_peak": traced_psi, "ks_numpy_traced_peak": traced_ks,
            "rss_peak_after_build": round(rss_after_build),
            "rss_peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
        "repeats": args.repeats, "cores": os.cpu_count(), "duckdb": duckdb.__version__, "numpy": np.__version__,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
