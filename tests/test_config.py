"""The config file's exporter and alertmanager sections: parsed into settings, every error positioned."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluator.config import load_config
from evaluator.yamlsrc import InvalidConfig


def test_exporter_and_alertmanager_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("exporter:\n  endpoint: http://collector:4318\n  protocol: grpc\n  headers: {x-team: payments}\n"
                    "  compression: gzip\n  timeout: 5s\nalertmanager:\n  url: http://am:9093\n"
                    "  resend_interval: 30s\n")
    cfg = load_config(str(path))
    assert (cfg.exporter.endpoint, cfg.exporter.protocol, cfg.exporter.headers, cfg.exporter.compression,
            cfg.exporter.timeout_seconds) == ("http://collector:4318", "grpc", (("x-team", "payments"),), "gzip", 5.0)
    assert (cfg.alertmanager.url, cfg.alertmanager.resend_interval) == ("http://am:9093", 30.0)


def test_bad_exporter_and_alertmanager_values_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("exporter:\n  protocol: carrier-pigeon\n  compression: zstd\nalertmanager:\n"
                    "  url: ftp://am\n  resend_interval: 0s\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key in ((2, "exporter.protocol"), (3, "exporter.compression"), (5, "alertmanager.url"),
                      (6, "alertmanager.resend_interval")):
        assert f"{path}:{line}: {key}:" in text, text
