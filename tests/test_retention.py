"""Retention: old spans and exactly their attribute rows go, alert history is kept longer, state is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pytest
import structlog.testing
import yaml
from conftest import RunningDaemon
from spans import request, span

from evaluator.config import load_config
from evaluator.daemon import Daemon
from evaluator.receiver.fastdecode import decode_bytes
from evaluator.store.retention import DAY, RetentionSettings, RetentionWorker, database_free_bytes
from evaluator.store.store import Store, StoreSettings
from evaluator.store.writer import SpanWriter
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock, loopback_config, wait_for
from evaluator.yamlsrc import InvalidConfig

NOW = 1_770_000_000.0  # the fake clock's "now", seconds
US = 1_000_000
SPAN_KEEP = 35 * DAY
CUTOFF_US = int((NOW - SPAN_KEEP) * US)  # spans ending strictly before this are deleted

# end times (µs) around the cutoff: strictly before it goes, at it or after it stays
OLD_ENDS = (CUTOFF_US - 100 * 86_400 * US, CUTOFF_US - 1)
KEPT_ENDS = (CUTOFF_US, CUTOFF_US + 1, int(NOW * US))
ATTRS: dict[str, Any] = {"data.row_count": 7, "data.dataset": "payments", "data.bounds": [1.0, 2.0],
                         "data.tags": ["a", "b"], "flag": True}

ATTR_TABLES = ("span_numbers", "span_strings", "span_arrays")
ALL_TABLES = ("spans", *ATTR_TABLES, "alerts", "quality_values", "alert_state", "frozen_baselines", "rule_health",
              "outbox")


def _store_spans(store: Store, ends_us: tuple[int, ...]) -> None:
    writer = SpanWriter(store, Telemetry())
    writer.start()
    try:
        spans = [span(attrs=ATTRS, start=e * 1000 - 1000, end=e * 1000) for e in ends_us]
        decoded = decode_bytes(request(*spans).SerializeToString(), ("data.",))
        assert len(decoded.columns) == len(ends_us)
        writer.submit(decoded.columns, int(NOW * US)).result(timeout=30)
    finally:
        writer.shutdown()


def _store_alert_history(cur: duckdb.DuckDBPyConnection, evaluated_us: list[int]) -> None:
    for i, at in enumerate(evaluated_us):
        ts = f"make_timestamp({at}::BIGINT)"
        cur.execute(f"INSERT INTO alerts (evaluated_at, rule_id, alert_name, group_name, kind, rung, owner, severity, "
                    f"series, from_state, state, consecutive_violations) VALUES ({ts}, 'r{i}', 'A', 'g', 'threshold', "
                    f"'freshness', 'team', 'page', '{{}}', 'inactive', 'firing', 1)")
        cur.execute(f"INSERT INTO quality_values VALUES ('r{i}', '{{}}', {ts}, {ts}, {ts}, 'auc', 0.9, 10, 5, 0.5, "
                    f"NULL)")
        # current state and pending outputs: never deleted, however old
        cur.execute(f"INSERT INTO alert_state (rule_id, fingerprint, series, state, consecutive_violations, "
                    f"active_at) VALUES ('r{i}', 'f', '{{}}', 'firing', 1, {ts})")
        cur.execute(f"INSERT INTO frozen_baselines VALUES ('r{i}', 'f', '{{}}', {ts}, {ts}, {ts}, [1.0], NULL, "
                    f"[1.0], 3)")
        cur.execute(f"INSERT INTO rule_health VALUES ('r{i}', 'g', 'A', 'threshold', 'ok', NULL, {ts}, 0.1)")
        cur.execute(f"INSERT INTO outbox (created_at, destination, payload, items, next_attempt_at) "
                    f"VALUES ({ts}, 'traces', 'x'::BLOB, 1, {ts})")


def _rows(cur: duckdb.DuckDBPyConnection, table: str) -> set[tuple[Any, ...]]:
    rows = cur.execute(f"SELECT * FROM {table}").fetchall()
    return {tuple(str(v) for v in r) for r in rows}


def _epoch_us(cur: duckdb.DuckDBPyConnection, table: str, column: str) -> list[int]:
    return sorted(r[0] for r in cur.execute(f"SELECT epoch_us({column}) FROM {table}").fetchall())


@pytest.fixture
def file_store(tmp_path: Path) -> Any:
    store = Store(StoreSettings(str(tmp_path / "ev.duckdb")))
    store.start()
    yield store
    store.shutdown()


def test_one_run_deletes_exactly_the_old_spans_and_their_attributes(file_store: Store) -> None:
    _store_spans(file_store, OLD_ENDS + KEPT_ENDS)
    cur = file_store.cursor()
    alert_keep = 400 * DAY
    alert_times = [int((NOW - alert_keep) * US) - 1,  # older than the alert retention: deleted
                   int((NOW - alert_keep) * US),  # exactly at the alert cutoff: kept
                   int((NOW - 36 * DAY) * US)]  # older than the span retention, newer than the alert one: kept
    _store_alert_history(cur, alert_times)
    before = {t: _rows(cur, t) for t in ALL_TABLES}
    old_keys = {r[0] for r in cur.execute(
        f"SELECT span_key FROM spans WHERE epoch_us(end_time) < {CUTOFF_US}").fetchall()}
    assert len(old_keys) == len(OLD_ENDS)
    expected_attr_rows = {t: {r for r in before[t] if int(r[0]) not in old_keys} for t in ATTR_TABLES}
    for t in ATTR_TABLES:  # every old span has rows in every attribute table, so each table really loses some
        assert expected_attr_rows[t] < before[t]

    tel = Telemetry()
    worker = RetentionWorker(file_store, tel, FakeClock(NOW), RetentionSettings())
    deleted = worker.run_once()

    after = {t: _rows(cur, t) for t in ALL_TABLES}
    assert _epoch_us(cur, "spans", "end_time") == sorted(KEPT_ENDS)  # the boundary span is kept
    assert after["spans"] == {r for r in before["spans"] if int(r[0]) not in old_keys}
    for t in ATTR_TABLES:
        assert after[t] == expected_attr_rows[t], t
    assert _epoch_us(cur, "alerts", "evaluated_at") == sorted(alert_times[1:])
    assert _epoch_us(cur, "quality_values", "evaluated_at") == sorted(alert_times[1:])
    for t in ("alert_state", "frozen_baselines", "rule_health", "outbox"):
        assert after[t] == before[t], t
    assert deleted == {"spans": 2, "span_numbers": 4, "span_strings": 2, "span_arrays": 4, "alerts": 1,
                       "quality_values": 1}
    for t, n in deleted.items():
        assert tel.get("retention_deleted_rows_total").value(table=t) == n
    assert tel.get("retention_runs_total").total() == 1
    assert tel.get("retention_last_run_timestamp_seconds").total() == NOW
    # checkpointed: the WAL is folded into the file
    wal = file_store.settings.path + ".wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) < 4096
    assert database_free_bytes(cur) >= 0

    # a second run finds nothing more to delete
    assert set(worker.run_once().values()) == {0}
    cur.close()


def test_freed_space_is_reused(tmp_path: Path) -> None:
    store = Store(StoreSettings(str(tmp_path / "ev.duckdb")))
    store.start()
    try:
        cur = store.cursor()
        old = CUTOFF_US - 86_400 * US
        cur.execute(f"INSERT INTO span_strings SELECT i, make_timestamp({old}::BIGINT), 'data.k', "
                    f"repeat(md5(i::VARCHAR), 8) FROM range(300000) t(i)")
        cur.execute("CHECKPOINT")
        size_full = os.path.getsize(store.settings.path)
        free_before = database_free_bytes(cur)
        RetentionWorker(store, Telemetry(), FakeClock(NOW), RetentionSettings()).run_once()
        assert cur.execute("SELECT count(*) FROM span_strings").fetchone() == (0,)
        assert database_free_bytes(cur) > free_before  # the deleted rows' blocks are free now
        new = int(NOW * US)
        cur.execute(f"INSERT INTO span_strings SELECT i, make_timestamp({new}::BIGINT), 'data.k', "
                    f"repeat(md5(i::VARCHAR), 8) FROM range(300000) t(i)")
        cur.execute("CHECKPOINT")
        assert os.path.getsize(store.settings.path) <= size_full * 1.2  # reused, not appended
        cur.close()
    finally:
        store.shutdown()


def test_disabled_retention_deletes_nothing(file_store: Store, thread_guard: None) -> None:
    _store_spans(file_store, OLD_ENDS + KEPT_ENDS)
    cur = file_store.cursor()
    before = {t: _rows(cur, t) for t in ALL_TABLES}
    off = RetentionSettings(spans_seconds=None, alerts_seconds=None)
    assert not off.enabled
    assert RetentionWorker(file_store, Telemetry(), FakeClock(NOW), off).run_once() == {}
    never = RetentionWorker(file_store, Telemetry(), FakeClock(NOW), RetentionSettings(interval_seconds=None))
    never.start()  # no thread at all
    never.shutdown()
    assert {t: _rows(cur, t) for t in ALL_TABLES} == before
    # spans off, alerts on: only the alert history is judged
    _store_alert_history(cur, [int((NOW - 500 * DAY) * US)])
    deleted = RetentionWorker(file_store, Telemetry(), FakeClock(NOW),
                              RetentionSettings(spans_seconds=None)).run_once()
    assert deleted == {"alerts": 1, "quality_values": 1}
    assert _rows(cur, "spans") == before["spans"]
    cur.close()


def test_daemon_runs_retention_on_its_interval(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    cfg = loopback_config(tmp_path / "ev.duckdb", retention=RetentionSettings(interval_seconds=0.05))
    daemon = Daemon(cfg, clock=clock)
    daemon.start()
    try:
        running = RunningDaemon(daemon)
        tel = daemon.telemetry
        now_ns = int(NOW * 1e9)
        recent = span(attrs={"data.n": 1}, start=now_ns - 2 * 86_400 * 10**9, end=now_ns - 86_400 * 10**9)
        ancient = span(attrs={"data.n": 2}, start=now_ns - 41 * 86_400 * 10**9, end=now_ns - 40 * 86_400 * 10**9)
        running.export(request(recent, ancient))
        wait_for(lambda: running.sql("SELECT count(*) FROM span_numbers")[0][0] == 1)
        assert running.sql("SELECT value FROM span_numbers") == [(1.0,)]
        runs = tel.get("retention_runs_total").total()
        wait_for(lambda: tel.get("retention_runs_total").total() >= runs + 3)  # it keeps running
        clock.advance(34 * DAY)  # the recent span is now 35 days old: exactly at the cutoff, kept
        wait_for(lambda: tel.get("retention_runs_total").total() >= runs + 6)
        assert running.sql("SELECT count(*) FROM spans") == [(1,)]
        clock.advance(1)  # one second past
        wait_for(lambda: running.sql("SELECT count(*) FROM spans") == [(0,)])
        # counted once the run (and its checkpoint) is done, a moment after the rows are gone
        wait_for(lambda: tel.get("retention_deleted_rows_total").value(table="spans") == 2)
        assert tel.get("retention_failures_total").total() == 0
        text = tel.render_prometheus()
        assert "otel_evaluator_store_free_bytes " in text
        assert "otel_evaluator_retention_last_run_duration_seconds " in text
    finally:
        daemon.shutdown()
    assert daemon.retention._thread is None


def test_retention_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    assert load_config(None).retention == RetentionSettings(35 * DAY, 400 * DAY, 3600.0)
    path.write_text("store:\n  retention:\n    spans: 14d\n    alerts: off\n    interval: 10m\n")
    assert load_config(str(path)).retention == RetentionSettings(14 * DAY, None, 600.0, spans_configured=True)
    path.write_text("store:\n  retention:\n    spans: 0\n    interval: \"off\"\n")
    cfg = load_config(str(path)).retention
    assert cfg == RetentionSettings(None, 400 * DAY, None, spans_configured=True) and not cfg.enabled
    path.write_text("store:\n  retention:\n    spans: forever\n    alerts: -1d\n    interval: 12\n    keep: 1\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key in ((3, "store.retention.spans"), (4, "store.retention.alerts"), (5, "store.retention.interval"),
                      (6, "store.retention.keep")):
        assert f"{path}:{line}: {key}:" in text, text


def test_documented_defaults_are_the_defaults(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"store": {"retention": block["store"]["retention"]}}))
    assert load_config(str(path)).retention == RetentionSettings(spans_configured=True)


FRAUD_RULES = Path(__file__).resolve().parent.parent / "rules" / "fraud-model.rules.yaml"


def test_unset_span_retention_is_lengthened_for_the_rules_and_a_set_one_refuses(tmp_path: Path) -> None:
    """fraud-model reads 7 days of predictions 30 days late: with the 35-day default its oldest week would be
    deleted under it. Unset, retention grows to that history plus a day; set explicitly to less, the daemon does
    not start, naming each rule, where it is written and the dates it reads."""
    old = span(attrs={"ml.score": 0.5}, start=int((NOW - 37.5 * DAY) * 1e9), end=int((NOW - 37.5 * DAY) * 1e9))
    cfg = loopback_config(tmp_path / "a.duckdb", rules=(str(FRAUD_RULES),))
    with structlog.testing.capture_logs() as logs:
        daemon = Daemon(cfg, clock=FakeClock(NOW))
        daemon.start()
        try:
            RunningDaemon(daemon).export(request(old))
            kept, deleted = daemon.retention.spans_seconds, daemon.retention.run_once()["spans"]
        finally:
            daemon.shutdown()
    assert (kept, deleted) == (38 * DAY, 0)  # 37.5 days old: kept
    lengthened = [e for e in logs if e["event"].startswith("raw span retention lengthened")]
    assert [(e["rule"], e["kept_days"]) for e in lengthened] == [("fraud-model/FraudModelAUC", 38.0)]

    explicit = replace(cfg, store=replace(cfg.store, path=str(tmp_path / "b.duckdb")),
                       retention=RetentionSettings(spans_seconds=35 * DAY, spans_configured=True))
    daemon = Daemon(explicit, clock=FakeClock(NOW))
    with pytest.raises(InvalidConfig) as err:
        daemon.start()
    daemon.shutdown()
    assert not (tmp_path / "b.duckdb").exists()  # refused before anything started
    lines = {p.key: p for p in err.value.problems}
    assert sorted(lines) == ["groups.fraud-model.FraudLabelCoverage", "groups.fraud-model.FraudModelAUC"]
    auc = lines["groups.fraud-model.FraudModelAUC"]
    assert (auc.file, auc.line) == (str(FRAUD_RULES), 9)
    assert auc.why.startswith("reads spans 37d back from each evaluation (now: since 2025-12-27T02:40:00Z), longer "
                              "than store.retention.spans keeps (35d): set store.retention.spans to 37d or more, "
                              "or leave it unset"), auc.why


# A distribution rule compared with a fixed range of 2018, whatever the evaluation time.
FIXED = """groups:
  - name: drift
    rules:
      - alert: AmountDrift
        kind: distribution
        rung: distribution
        owner: partners
        attribute: data.amount
        method: psi
        current: 1d
        baseline: {from: 2018-01-01, to: 2018-10-30}
        bounds: [10, 100]
        min_samples: 5
        op: ">"
        threshold: 0.2
"""
FROM, TO = 1_514_764_800.0, 1_540_857_600.0  # 2018-01-01 and 2018-10-30, UTC


def _amounts(ends: list[float]) -> Any:
    return request(*(span(attrs={"data.amount": 20.0 + i}, start=int(e * 1e9) - 1000, end=int(e * 1e9))
                     for i, e in enumerate(ends)))


def eval_rows(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """(rule id, row) of every result in `eval --format json` output: the rows are the objects with a detail."""
    if isinstance(doc, list):
        return [row for item in doc for row in eval_rows(item)]
    if not isinstance(doc, dict):
        return []
    if "detail" in doc:
        return [(str(doc.get("rule_id", doc.get("rule"))), doc)]
    return [row for value in doc.values() for row in eval_rows(value)]


def test_a_fixed_baseline_keeps_its_spans_through_retention(tmp_path: Path) -> None:
    """With store.retention.spans unset, retention deletes spans past its cutoff except those a rule's fixed
    baseline reads, (from, to], with exactly their attribute rows; the rule then still has a value."""
    rules = tmp_path / "drift.rules.yaml"
    rules.write_text(FIXED)
    in_range = [FROM + 1, FROM + 30 * DAY, FROM + 100 * DAY, FROM + 200 * DAY, TO - 1, TO]
    outside = [FROM - 15 * DAY, FROM, TO + 1, TO + 30 * DAY, NOW - 40 * DAY]  # before, at from, after the range
    recent = [NOW - 3600.0 * h for h in range(1, 7)]
    db = tmp_path / "ev.duckdb"
    with structlog.testing.capture_logs() as logs:
        daemon = Daemon(loopback_config(db, rules=(str(rules),)), clock=FakeClock(NOW))
        daemon.start()
        try:
            running = RunningDaemon(daemon)
            running.export(_amounts(in_range + outside + recent))
            wait_for(lambda: running.sql("SELECT count(*) FROM spans")[0][0] == 17)
            deleted = daemon.retention.run_once()
            ends = sorted(r[0] for r in running.sql("SELECT epoch_us(end_time) FROM spans"))
            attrs = sorted(r[0] for r in running.sql("SELECT epoch_us(time) FROM span_numbers"))
        finally:
            daemon.shutdown()
    assert (deleted["spans"], deleted["span_numbers"]) == (len(outside), len(outside))
    assert ends == attrs == sorted(round(e * US) for e in in_range + recent)
    assert [e["ranges"] for e in logs if e["event"].startswith("raw spans in the rules' fixed baseline")] == [
        ["2018-01-01T00:00:00Z..2018-10-30T00:00:00Z"]]

    result = subprocess.run([sys.executable, "-m", "evaluator", "eval", "--db", str(db), "--rules", str(rules),
                             "--at", str(NOW), "--format", "json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ((_, row),) = eval_rows(json.loads(result.stdout))
    assert row["value"] is not None and "n 6/6 (current/baseline)" in row["detail"], row


def test_an_explicit_span_retention_that_deletes_a_fixed_baseline_refuses_to_start(tmp_path: Path) -> None:
    """`serve` exits 2 and names the rule, its file:line and the dates it reads; nothing is opened."""
    rules = tmp_path / "drift.rules.yaml"
    rules.write_text(FIXED)
    config = tmp_path / "evaluator.yaml"
    config.write_text("store:\n  retention:\n    spans: 35d\nrules: [drift.rules.yaml]\n")
    db = tmp_path / "ev.duckdb"
    result = subprocess.run([sys.executable, "-m", "evaluator", "serve", "--config", str(config), "--db", str(db),
                             "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen",
                             "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert f"{rules}:4: groups.drift.AmountDrift: reads the spans from 2018-01-01T00:00:00Z to " \
           "2018-10-30T00:00:00Z (its fixed baseline) at every evaluation; store.retention.spans (35d) deletes " \
           "them: set store.retention.spans to off, or leave it unset" in result.stderr, result.stderr
    assert not db.exists()


def test_a_reload_that_retention_would_cut_short_is_refused(tmp_path: Path) -> None:
    """SIGHUP's reload checks the same: refused, the running rules and retention stay; with retention unset the
    same reload is taken and the new rule's range is spared."""
    rules = tmp_path / "r.rules.yaml"
    first = "groups:\n  - name: g\n    rules:\n      - {alert: A, kind: absence, rung: freshness, owner: x, " \
            "expected_every: 1d}\n"
    for configured in (True, False):
        rules.write_text(first)
        cfg = loopback_config(tmp_path / f"{configured}.duckdb", rules=(str(rules),),
                              retention=RetentionSettings(spans_seconds=400 * DAY, spans_configured=configured))
        daemon = Daemon(cfg, clock=FakeClock(NOW))
        daemon.start()
        try:
            before = daemon.engine.ruleset
            rules.write_text(first + FIXED.split("    rules:\n", 1)[1])
            with structlog.testing.capture_logs() as logs:
                taken = daemon.reload_rules()
            if configured:
                assert not taken and daemon.engine.ruleset is before
                assert (daemon.retention.spans_seconds, daemon.retention.kept_ranges) == (400 * DAY, ())
                (refused,) = [e for e in logs if e["event"].startswith("rule reload refused")]
                assert refused["problems"] == [
                    f"{rules}:5: groups.g.AmountDrift: reads the spans from 2018-01-01T00:00:00Z to "
                    "2018-10-30T00:00:00Z (its fixed baseline) at every evaluation; store.retention.spans (400d) "
                    "deletes them: set store.retention.spans to off, or leave it unset (the daemon then keeps what "
                    "the rules read), or change the rule"]
            else:
                assert taken and [r.name for r in daemon.engine.ruleset.rules()] == ["A", "AmountDrift"]
                assert (daemon.retention.spans_seconds, daemon.retention.kept_ranges) == (400 * DAY, ((FROM, TO),))
        finally:
            daemon.shutdown()


def test_reach_counts_fixed_ranges_and_merges_them() -> None:
    from evaluator.rules.kinds.distribution import DistributionSpec
    from evaluator.rules.model import Rule, RuleGroup, RuleSet
    from evaluator.rules.reach import history_reach, kept_ranges

    def dist(**kw: Any) -> Rule:
        return Rule(name=str(kw), group="g", kind="distribution", rung="distribution", owner="x", severity="page",
                    spec=DistributionSpec("data.x", current=DAY, **kw))

    fixed = dist(baseline_range=(FROM, TO), baseline_window=None)
    frozen = dist(baseline_window=30 * DAY, frozen=True)
    assert (history_reach(fixed), history_reach(frozen)) == (DAY, 31 * DAY)  # the current window; both windows
    rs = RuleSet((RuleGroup("g", 60.0, (fixed, frozen, dist(baseline_range=(TO - DAY, TO + DAY)),
                                        dist(baseline_range=(NOW - DAY, NOW)))),))
    assert kept_ranges(rs) == ((FROM, TO + DAY), (NOW - DAY, NOW))
