"""Rung 4 end to end: the daemon, the real OTel SDK sending predictions and their labels 3 days later, scores that
decouple from labels after day 10; the AUC rule fires once the decoupled predictions' labels mature, not before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from evaluator.daemon import Daemon
from evaluator.testing import FakeClock, loopback_config

DAY = 86400
T0 = 1_793_491_200  # 2026-11-01T00:00:00Z
RULES = """\
groups:
  - name: fraud-model
    interval: 1h
    rules:
      - alert: FraudModelAUC
        kind: prediction_quality
        rung: prediction_quality
        owner: ml-platform
        severity: page
        annotations:
          summary: "{{ series.ml.model.version }}: AUC {{ value }} below {{ threshold }} ({{ detail }})"
        select: {span: model.predict, service: fraud-model}
        group_by: [ml.model.version]
        metric: auc
        window: 2d
        label_delay: 3d
        min_labels: 50
        op: "<"
        threshold: 0.86
      - alert: FraudLabelCoverage
        kind: prediction_quality
        rung: prediction_quality
        owner: ml-platform
        select: {span: model.predict, service: fraud-model}
        metric: coverage
        window: 2d
        label_delay: 3d
        op: "<"
        threshold: 0.5
"""


def _send(endpoint: str) -> None:
    rng = np.random.default_rng(42)
    provider = TracerProvider(resource=Resource.create({"service.name": "fraud-model"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   max_export_batch_size=512))
    labels = TracerProvider(resource=Resource.create({"service.name": "chargeback-feed"}))
    labels.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                 max_export_batch_size=512))
    model, feed = provider.get_tracer("model"), labels.get_tracer("feed")
    for hour in range(20 * 24):
        for k in range(4):
            at = (T0 + hour * 3600 + k * 600) * 10**9
            label = int(rng.random() < 0.3)
            decoupled = hour >= 10 * 24
            score = rng.random() if decoupled else min(1.0, max(0.0, 0.25 + 0.5 * label + rng.normal(0, 0.15)))
            pid = f"p-{hour}-{k}"
            span = model.start_span("model.predict", start_time=at - 14_000_000)
            span.set_attribute("ml.prediction_id", pid)
            span.set_attribute("ml.score", float(score))
            span.set_attribute("ml.model.version", "v7")
            span.end(end_time=at)
            lab = feed.start_span("chargeback.label", start_time=at + 3 * DAY * 10**9 - 1000)
            lab.set_attribute("ml.prediction_id", pid)
            lab.set_attribute("ml.label", label)
            lab.end(end_time=at + 3 * DAY * 10**9)
    assert provider.force_flush(60_000) and labels.force_flush(60_000)
    provider.shutdown()
    labels.shutdown()


def test_auc_rule_fires_once_the_decoupled_predictions_labels_mature(tmp_path: Path) -> None:
    rules = tmp_path / "fraud.rules.yaml"
    rules.write_text(RULES)
    clock = FakeClock(T0)
    daemon = Daemon(loopback_config(tmp_path / "ev.duckdb", rules=(str(rules),)), clock=clock)
    daemon.start()
    try:
        assert daemon.grpc is not None
        _send(f"127.0.0.1:{daemon.grpc.port}")
        cur = daemon.store.cursor()
        assert cur.execute("SELECT count(*) FROM spans").fetchone() == (2 * 20 * 24 * 4,)
        cur.close()
        group = daemon.engine.ruleset.groups[0]
        states: dict[int, str] = {}
        for day in range(4, 21):
            clock.set(T0 + day * DAY)
            daemon.engine.evaluate_group(group, clock.now())
            cur = daemon.store.cursor()
            row = cur.execute("SELECT state FROM alert_state WHERE rule_id = 'fraud-model/FraudModelAUC'").fetchone()
            cur.close()
            states[day] = row[0] if row else "none"
        # The matured window at day d holds predictions from (d-5, d-3]: all good until day 13.
        assert all(states[d] in ("none", "inactive", "nodata") for d in range(4, 13)), states
        assert states[14] == "firing" and states[20] == "firing", states
        cur = daemon.store.cursor()
        first = cur.execute("SELECT min(evaluated_at) FROM alerts WHERE alert_name = 'FraudModelAUC' "
                            "AND state = 'firing'").fetchone()
        coverage = cur.execute("SELECT count(*) FROM alerts WHERE alert_name = 'FraudLabelCoverage' "
                               "AND state = 'firing'").fetchone()
        history = cur.execute("SELECT count(*), min(coverage) FROM quality_values "
                              "WHERE rule_id = 'fraud-model/FraudModelAUC' AND value IS NOT NULL").fetchone()
        summary = cur.execute("SELECT summary FROM alerts WHERE alert_name = 'FraudModelAUC' AND state = 'firing'"
                              ).fetchone()
        cur.close()
        assert first is not None and first[0].day in (14, 15)  # Nov 14 or 15: the first matured decoupled window
        assert coverage == (0,)  # labels kept arriving: coverage never fell
        assert history is not None and history[0] >= 10 and history[1] == 1.0
        assert summary is not None and summary[0].startswith("v7: AUC 0.")
    finally:
        daemon.shutdown()
