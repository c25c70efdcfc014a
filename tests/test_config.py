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


def test_alertmanager_max_backoff_and_admin_external_url(tmp_path: Path) -> None:
    from dataclasses import replace

    import yaml

    from evaluator.config import admin_external_url

    path = tmp_path / "c.yaml"
    path.write_text("alertmanager:\n  url: http://am:9093\n  max_backoff: 10s\n"
                    "admin:\n  listen: 0.0.0.0:9000\n  external_url: https://dq.example.com/evaluator/\n")
    cfg = load_config(str(path))
    assert cfg.alertmanager.max_backoff_seconds == 10.0
    assert cfg.admin.external_url == "https://dq.example.com/evaluator"
    assert admin_external_url(cfg.admin, 9000) == "https://dq.example.com/evaluator"
    defaults = load_config(None)
    assert (defaults.alertmanager.max_backoff_seconds, defaults.admin.external_url) == (30.0, None)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    path.write_text(yaml.safe_dump({"alertmanager": {"max_backoff": block["alertmanager"]["max_backoff"]},
                                    "admin": {"external_url": block["admin"]["external_url"]}}))
    documented = load_config(str(path))  # the documented defaults are the defaults
    assert (documented.alertmanager.max_backoff_seconds, documented.admin.external_url) == (30.0, None)
    path.write_text("admin:\n  listen: 0.0.0.0:0\n  external_url: null\n")
    derived = load_config(str(path)).admin
    assert admin_external_url(derived, 41234, hostname="ev-7") == "http://ev-7:41234"  # the port bound
    assert admin_external_url(replace(derived, listen="[::1]:13133")) == "http://[::1]:13133"


def test_bad_max_backoff_and_external_url_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("alertmanager:\n  max_backoff: 0s\nadmin:\n  external_url: evaluator.example.com\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    assert f"{path}:2: alertmanager.max_backoff: must be above 0" in text, text
    assert f"{path}:4: admin.external_url: must be an http:// or https:// URL" in text, text
    path.write_text("alertmanager:\n  max_backoff: soon\n")
    with pytest.raises(InvalidConfig, match=r"alertmanager\.max_backoff: bad duration"):
        load_config(str(path))
    path.write_text("admin:\n  external_url: https://ev.example.com/?x=1\n")
    with pytest.raises(InvalidConfig, match=r"admin\.external_url: must not have a query"):
        load_config(str(path))


MERGED_CONFIG = """\
exporter: &net
  endpoint: http://collector:4318
  timeout: 5s
alertmanager:
  <<: *net
  endpoint: null
  url: http://am:9093
receivers:
  grpc: &listen
    listen: 127.0.0.1:4317
    max_workers: 4
  http:
    <<: *listen
    listen: 127.0.0.1:4318
"""


def test_merge_keys_in_the_config_file(tmp_path: Path) -> None:
    """`<<: *anchor` merges a map, explicit keys win, and a merged key that does not belong is reported at the
    line of the anchor that brought it, under the key it landed in."""
    path = tmp_path / "c.yaml"
    path.write_text(MERGED_CONFIG.replace("    max_workers: 4\n", ""))
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    assert f"{path}:2: alertmanager.endpoint: unknown key" not in text  # overridden by the explicit one ...
    assert f"{path}:6: alertmanager.endpoint: unknown key" in text, text  # ... which is reported itself
    path.write_text(MERGED_CONFIG.replace("  endpoint: null\n", "").replace("  <<: *net\n", "  timeout: 9s\n"))
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    assert str(err.value) == f"{path}:10: receivers.http.max_workers: unknown key (allowed: enabled, listen, " \
                             "max_connections, tls)"
    path.write_text("exporter: &net\n  timeout: 5s\nalertmanager:\n  <<: *net\n  url: http://am:9093\n"
                    "receivers:\n  grpc: &listen {listen: \"127.0.0.1:4317\", max_workers: 4}\n"
                    "  http: {<<: {listen: \"127.0.0.1:4318\"}, max_connections: 7}\n")
    cfg = load_config(str(path))
    assert (cfg.alertmanager.url, cfg.alertmanager.timeout_seconds) == ("http://am:9093", 5.0)
    assert cfg.http is not None and (cfg.http.listen, cfg.http.max_connections) == ("127.0.0.1:4318", 7)
    path.write_text("exporter: &net\n  timeout: 5s\nalertmanager:\n  <<: *net\n  timeout: 9s\n  url: http://am\n")
    assert load_config(str(path)).alertmanager.timeout_seconds == 9.0
    path.write_text("exporter: &net\n  timeout: 5s\nalertmanager:\n  <<: [*net, 7s]\n  url: http://am\n")
    with pytest.raises(InvalidConfig, match=rf"{path}:4: <<: a merge key takes a mapping .* got '7s'"):
        load_config(str(path))


def test_config_messages_show_yaml_values(tmp_path: Path) -> None:
    """A size, a duration or an address given a list shows the list as written, not Python objects."""
    path = tmp_path / "c.yaml"
    path.write_text("store:\n  memory_limit: [1, GiB]\n  checkpoint_wal_size: {size: 1}\n"
                    "receivers:\n  retry_after: [1s]\n  grpc: {listen: [a, 1]}\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key, shown in ((2, "store.memory_limit", "bad size [1, GiB]"),
                             (3, "store.checkpoint_wal_size", "bad size {size: 1}"),
                             (5, "receivers.retry_after", "bad duration [1s]"),
                             (6, "receivers.grpc.listen", "must be a string, got [a, 1]")):
        assert f"{path}:{line}: {key}: {shown}" in text, text
    assert "Node(" not in text


def test_the_evaluation_section_reaches_the_engine_and_the_scheduler(tmp_path: Path) -> None:
    from evaluator.daemon import Daemon

    path = tmp_path / "c.yaml"
    path.write_text(f"store: {{path: {tmp_path / 'ev.duckdb'}}}\nevaluation:\n  delay: 5s\n  max_catch_up: 10\n"
                    "  budget: 2m\n")
    cfg = load_config(str(path))
    assert (cfg.evaluation.delay, cfg.evaluation.max_catch_up, cfg.evaluation.budget) == (5.0, 10, 120.0)
    daemon = Daemon(cfg)
    assert daemon.scheduler._delay == 5.0 and daemon.engine._max_catch_up == 10
    assert daemon.engine._default_budget == 120.0


def test_bad_evaluation_values_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("evaluation:\n  delay: -1s\n  max_catch_up: 0\n  budget: 0s\n  colour: red\n")
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key in ((2, "evaluation.delay"), (3, "evaluation.max_catch_up"), (4, "evaluation.budget"),
                      (5, "evaluation.colour")):
        assert f"{path}:{line}: {key}:" in text, text
