"""The DuckDB schema: a public interface (postmortem SQL reads it), documented in docs/schema.md.

Spans live in `spans`; their attributes live in three long tables by type, with the span's end time repeated on
every row so a rule scans one narrow table (measured: the long numeric table scans 8.75M values in under a
second; a MAP or JSON column is 2-3x slower). Change this file and docs/schema.md together, and bump
SCHEMA_VERSION with a migration in `store.py`.
"""

from __future__ import annotations

SCHEMA_VERSION = 6

DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS meta (
        key VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS spans (
        span_key BIGINT NOT NULL,
        trace_id VARCHAR NOT NULL,
        span_id VARCHAR NOT NULL,
        parent_span_id VARCHAR,
        name VARCHAR NOT NULL,
        kind INTEGER NOT NULL,
        start_time TIMESTAMP NOT NULL,
        end_time TIMESTAMP NOT NULL,
        status_code INTEGER NOT NULL,
        status_message VARCHAR,
        service_name VARCHAR,
        scope_name VARCHAR,
        resource_attributes JSON,
        received_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS span_numbers (
        span_key BIGINT NOT NULL,
        time TIMESTAMP NOT NULL,
        key VARCHAR NOT NULL,
        value DOUBLE NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS span_strings (
        span_key BIGINT NOT NULL,
        time TIMESTAMP NOT NULL,
        key VARCHAR NOT NULL,
        value VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS span_arrays (
        span_key BIGINT NOT NULL,
        time TIMESTAMP NOT NULL,
        key VARCHAR NOT NULL,
        numbers DOUBLE[],
        strings VARCHAR[]
    )""",
    # -- rules: the current state per rule and series, every transition, and each rule's health ----------------
    """CREATE TABLE IF NOT EXISTS alert_state (
        rule_id VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,
        series JSON NOT NULL,
        state VARCHAR NOT NULL,
        value DOUBLE,
        threshold JSON,
        detail VARCHAR,
        active_at TIMESTAMP,
        fired_at TIMESTAMP,
        resolved_at TIMESTAMP,
        last_violation_at TIMESTAMP,
        consecutive_violations INTEGER NOT NULL,
        last_run_at TIMESTAMP,
        last_run_key BIGINT,
        violating_spans STRUCT(trace_id VARCHAR, span_id VARCHAR)[],
        PRIMARY KEY (rule_id, series)
    )""",
    """CREATE SEQUENCE IF NOT EXISTS alerts_seq""",
    """CREATE TABLE IF NOT EXISTS alerts (
        seq BIGINT NOT NULL DEFAULT nextval('alerts_seq'),
        evaluated_at TIMESTAMP NOT NULL,
        rule_id VARCHAR NOT NULL,
        alert_name VARCHAR NOT NULL,
        group_name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        rung VARCHAR NOT NULL,
        owner VARCHAR NOT NULL,
        severity VARCHAR NOT NULL,
        series JSON NOT NULL,
        from_state VARCHAR NOT NULL,
        state VARCHAR NOT NULL,
        value DOUBLE,
        threshold JSON,
        consecutive_violations INTEGER NOT NULL,
        run_at TIMESTAMP,
        summary VARCHAR,
        detail VARCHAR,
        labels JSON,
        annotations JSON,
        violating_spans STRUCT(trace_id VARCHAR, span_id VARCHAR)[]
    )""",
    # v5: ladder inhibition (an inhibited transition is recorded, not sent)
    """ALTER TABLE alerts ADD COLUMN IF NOT EXISTS inhibited BOOLEAN DEFAULT false""",
    # v6: when a transition happened on the judgements' time line (a run's time, a slot) beside when it was
    # evaluated, and the start of its episode; a kind's memory per series (a baseline's entered runs) and whether
    # the firing episode was sent (inhibition)
    """ALTER TABLE alerts ADD COLUMN IF NOT EXISTS changed_at TIMESTAMP""",
    """ALTER TABLE alerts ADD COLUMN IF NOT EXISTS started_at TIMESTAMP""",
    """ALTER TABLE alert_state ADD COLUMN IF NOT EXISTS memory JSON""",
    """ALTER TABLE alert_state ADD COLUMN IF NOT EXISTS announced BOOLEAN DEFAULT false""",
    # how far each rule has been judged (the last evaluation, or the last slot for kinds judged at slots), with
    # the fingerprint it was judged with: a changed rule starts again
    """CREATE TABLE IF NOT EXISTS rule_progress (
        rule_id VARCHAR PRIMARY KEY,
        fingerprint VARCHAR NOT NULL,
        judged_to TIMESTAMP NOT NULL,
        seen_key BIGINT
    )""",
    """CREATE TABLE IF NOT EXISTS rule_health (
        rule_id VARCHAR PRIMARY KEY,
        group_name VARCHAR NOT NULL,
        alert_name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        health VARCHAR NOT NULL,
        last_error VARCHAR,
        last_eval_at TIMESTAMP,
        last_duration_seconds DOUBLE
    )""",
    # distribution rules with a frozen baseline: captured once per rule and series, then compared against
    """CREATE TABLE IF NOT EXISTS frozen_baselines (
        rule_id VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,
        series JSON NOT NULL,
        captured_at TIMESTAMP NOT NULL,
        window_start TIMESTAMP NOT NULL,
        window_end TIMESTAMP NOT NULL,
        bounds DOUBLE[],
        categories VARCHAR[],
        proportions DOUBLE[] NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (rule_id, series)
    )""",
    # prediction-quality values per evaluation and window: a window is judged again as late labels arrive
    """CREATE TABLE IF NOT EXISTS quality_values (
        rule_id VARCHAR NOT NULL,
        series JSON NOT NULL,
        evaluated_at TIMESTAMP NOT NULL,
        window_start TIMESTAMP NOT NULL,
        window_end TIMESTAMP NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE,
        predictions BIGINT NOT NULL,
        labelled BIGINT NOT NULL,
        coverage DOUBLE,
        details JSON
    )""",
    # alert outputs waiting to be sent: written in the transaction that records the transitions, deleted only
    # once the receiver acknowledged them; `dead` rows were refused for good (kept, counted, not retried)
    """CREATE SEQUENCE IF NOT EXISTS outbox_seq""",
    """CREATE TABLE IF NOT EXISTS outbox (
        seq BIGINT PRIMARY KEY DEFAULT nextval('outbox_seq'),
        created_at TIMESTAMP NOT NULL,
        destination VARCHAR NOT NULL,
        payload BLOB NOT NULL,
        items INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TIMESTAMP NOT NULL,
        last_error VARCHAR,
        dead BOOLEAN NOT NULL DEFAULT false
    )""",
    # Every attribute of a span as text, one row each: the easy way in for ad-hoc postmortem SQL.
    """CREATE OR REPLACE VIEW span_attributes AS
        SELECT span_key, time, key, CAST(value AS VARCHAR) AS value, 'number' AS type FROM span_numbers
        UNION ALL
        SELECT span_key, time, key, value, 'string' AS type FROM span_strings
        UNION ALL
        SELECT span_key, time, key,
               CAST(coalesce(to_json(numbers), to_json(strings)) AS VARCHAR) AS value, 'array' AS type
        FROM span_arrays""",
)

# Tables that hold user data, in the order `otel-evaluator export` writes them.
PUBLIC_TABLES = ("spans", "span_numbers", "span_strings", "span_arrays", "alerts", "alert_state", "rule_health",
                 "frozen_baselines", "quality_values")
