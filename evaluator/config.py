"""Daemon configuration: frozen data with embedded defaults, loaded from YAML with every error reported.

`load_config(path)` returns a Config or raises InvalidConfig listing every problem with file, line and key;
`apply_overrides` applies the command-line flags (which win over the file). docs/configuration.md is the
reference and must match this file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from evaluator.admin.server import AdminSettings
from evaluator.exporter.alertmanager import AlertmanagerSettings
from evaluator.exporter.otlp_config import COMPRESSIONS, PROTOCOLS, OtlpExporterConfig
from evaluator.httpbase import split_hostport
from evaluator.log import LEVELS
from evaluator.receiver.fairness import FairnessSettings
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.http_server import HttpSettings
from evaluator.receiver.ingest import IngestSettings
from evaluator.receiver.limits import ACTIONS as LIMIT_ACTIONS
from evaluator.receiver.limits import SpanLimits
from evaluator.security.auth import AuthSettings
from evaluator.security.config import read_auth, read_tls
from evaluator.selfmon import SelfMonitoringSettings
from evaluator.store.retention import RetentionSettings
from evaluator.store.store import StoreSettings
from evaluator.yamlsrc import (
    InvalidConfig,
    Node,
    Problems,
    as_yaml,
    check_keys,
    load_yaml_file,
    read_bool,
    read_duration,
    read_int,
    read_map,
    read_str,
    read_str_list,
    read_str_map,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(value: object) -> int:
    """64MiB, 500MB, 1048576 -> bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"bad size {as_yaml(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"bad size {as_yaml(value)}: must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"bad size {as_yaml(value)}: use bytes or a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


@dataclass(frozen=True)
class EvaluationSettings:
    """How the daemon evaluates rule groups (docs/rules.md, "One evaluation semantics" and "Blast radius")."""

    delay: float = 30.0  # a slot is evaluated this long after it starts, so late-arriving spans are in
    max_catch_up: int = 1440  # slots judged at most per rule and evaluation after downtime
    budget: float = 30.0  # the default time budget of a rule's evaluation (a rule's or group's `budget` wins)


@dataclass(frozen=True)
class Config:
    store: StoreSettings = field(default_factory=StoreSettings)
    max_group_spans: int = 50_000
    checkpoint_wal_bytes: int = 64 * 1024 * 1024  # checkpoint in the background once the WAL is this big
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    grpc: GrpcSettings | None = field(default_factory=GrpcSettings)  # None: receiver disabled
    http: HttpSettings | None = field(default_factory=HttpSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_grace_seconds: float = 10.0
    rules: tuple[str, ...] = ()  # rule files or folders; relative paths are relative to the config file
    exporter: OtlpExporterConfig = field(default_factory=OtlpExporterConfig)  # OTEL_EXPORTER_OTLP_* override it
    alertmanager: AlertmanagerSettings = field(default_factory=AlertmanagerSettings)
    auth: AuthSettings | None = None  # bearer tokens required on all three servers (probes excepted)
    self_monitoring: SelfMonitoringSettings = field(default_factory=SelfMonitoringSettings)  # evaluator/selfmon.py
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    source: str = "(embedded defaults)"



def _read_size(node: Node | None, key: str, problems: Problems) -> int | None:
    if node is None:
        return None
    try:
        return parse_size(node.value)
    except ValueError as exc:
        problems.add(node, key, str(exc))
        return None


def _read_listen(node: Node | None, key: str, problems: Problems) -> str | None:
    value = read_str(node, key, problems)
    if value is None:
        return None
    try:
        split_hostport(value)
    except ValueError as exc:
        problems.add(node, key, str(exc))
        return None
    return value


def _read_off_duration(node: Node | None, key: str, problems: Problems) -> tuple[bool, float | None]:
    """(given, seconds) of a duration that `0` or `off` disables (seconds None)."""
    if node is None:
        return False, None
    if node.value in (0, "0", "off") or node.value is False:  # YAML 1.1 reads a bare `off` as false
        return True, None
    seconds = read_duration(node, key, problems)
    if seconds is not None and seconds <= 0:
        problems.add(node, key, "must be above 0 (or 0/off to disable)")
        seconds = None
    return seconds is not None, seconds


def _read_retention(node: Node, base: RetentionSettings, problems: Problems) -> RetentionSettings:
    check_keys(node, {"spans", "alerts", "interval"}, problems, "store.retention")
    changes: dict[str, Any] = {}  # float | None each; Any: mypy cannot tell which field ** fills
    for key, attr in (("spans", "spans_seconds"), ("alerts", "alerts_seconds"), ("interval", "interval_seconds")):
        given, seconds = _read_off_duration(node.get(key), f"store.retention.{key}", problems)
        if given:
            changes[attr] = seconds
    return replace(base, spans_configured="spans_seconds" in changes or base.spans_configured, **changes)


def _read_limits(node: Node, base: SpanLimits, problems: Problems) -> SpanLimits:
    check_keys(node, {"max_attributes_per_span", "max_attribute_value_length", "action"}, problems,
               "receivers.limits")
    changes: dict[str, int | str | None] = {}
    for key, attr in (("max_attributes_per_span", "max_attributes"),
                      ("max_attribute_value_length", "max_value_length")):
        child = node.get(key)
        if child is None:
            continue
        if child.value is False or child.value == "off":  # YAML 1.1 reads a bare `off` as false
            changes[attr] = None
            continue
        value = read_int(child, f"receivers.limits.{key}", problems, minimum=1)
        if value is not None:
            changes[attr] = value
    action = read_str(node.get("action"), "receivers.limits.action", problems)
    if action is not None and action not in LIMIT_ACTIONS:
        problems.add(node.get("action"), "receivers.limits.action", f"must be one of {', '.join(LIMIT_ACTIONS)}")
    elif action is not None:
        changes["action"] = action
    return replace(base, **changes)  # type: ignore[arg-type]


_CLIENT_HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_RESERVED_HEADERS = {"authorization", "content-type", "content-length", "content-encoding", "host", "te",
                     "user-agent", "transfer-encoding"}


def _read_fairness(node: Node, base: FairnessSettings, problems: Problems) -> FairnessSettings:
    """receivers.fairness: the per-client shares of the in-flight budget (evaluator/receiver/fairness.py)."""
    check_keys(node, {"enabled", "client_header", "min_client_share", "client_idle"}, problems, "receivers.fairness")
    changes: dict[str, Any] = {}
    enabled = read_bool(node.get("enabled"), "receivers.fairness.enabled", problems)
    if enabled is not None:
        changes["enabled"] = enabled
    header_node = node.get("client_header")
    if header_node is not None and (header_node.value is None or header_node.value is False):
        changes["client_header"] = None  # off: identify clients by token, else address
    elif header_node is not None:
        key = "receivers.fairness.client_header"
        header = read_str(header_node, key, problems)
        name = header.strip().lower() if header is not None else None
        if name is not None and (not _CLIENT_HEADER_RE.match(name) or name.endswith("-bin")
                                 or name.startswith("grpc-") or name in _RESERVED_HEADERS):
            problems.add(header_node, key, "must be a header name of letters, digits, '-', '_' or '.', not ending "
                         "in -bin, not starting with grpc- and not a standard header (e.g. otel-evaluator-client)")
        elif name is not None:
            changes["client_header"] = name
    share = _read_size(node.get("min_client_share"), "receivers.fairness.min_client_share", problems)
    if share is not None and share < 1:
        problems.add(node.get("min_client_share"), "receivers.fairness.min_client_share", "must be above 0")
    elif share is not None:
        changes["min_share_bytes"] = share
    idle = read_duration(node.get("client_idle"), "receivers.fairness.client_idle", problems)
    if idle is not None and idle <= 0:
        problems.add(node.get("client_idle"), "receivers.fairness.client_idle", "must be above 0")
    elif idle is not None:
        changes["idle_seconds"] = idle
    return replace(base, **changes)


def _read_external_url(node: Node | None, problems: Problems) -> str | None:
    """admin.external_url: an http(s) URL with a host and no query or fragment, without its trailing "/";
    null (or absent) derives it from admin.listen (admin_external_url)."""
    if node is None or node.value is None:
        return None
    key = "admin.external_url"
    url = read_str(node, key, problems)
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problems.add(node, key, "must be an http:// or https:// URL with a host, e.g. https://evaluator.example.com")
        return None
    if parts.query or parts.fragment:
        problems.add(node, key, "must not have a query (?...) or fragment (#...): alert links add their own")
        return None
    return url.strip().rstrip("/")


def _read_evaluation(node: Node, base: EvaluationSettings, problems: Problems) -> EvaluationSettings:
    """evaluation: delay, max_catch_up, budget."""
    check_keys(node, {"delay", "max_catch_up", "budget"}, problems, "evaluation")
    changes: dict[str, Any] = {}
    delay = read_duration(node.get("delay"), "evaluation.delay", problems)
    if delay is not None and delay < 0:
        problems.add(node.get("delay"), "evaluation.delay", "must not be negative")
    elif delay is not None:
        changes["delay"] = delay
    budget = read_duration(node.get("budget"), "evaluation.budget", problems)
    if budget is not None and budget <= 0:
        problems.add(node.get("budget"), "evaluation.budget", "must be above 0")
    elif budget is not None:
        changes["budget"] = budget
    catch_up = read_int(node.get("max_catch_up"), "evaluation.max_catch_up", problems, minimum=1)
    if catch_up is not None:
        changes["max_catch_up"] = catch_up
    return replace(base, **changes)


def _read_self_monitoring(node: Node, base: SelfMonitoringSettings, problems: Problems) -> SelfMonitoringSettings:
    """self_monitoring: the daemon's own alerts (evaluator/selfmon.py)."""
    where = "self_monitoring"
    check_keys(node, {"enabled", "interval", "owner", "severity", "outbox_max_age", "watchdog", "watchdog_severity"},
               problems, where)
    changes: dict[str, Any] = {"source": f"{node.file}:{node.line}"}
    for key, attr in (("enabled", "enabled"), ("watchdog", "watchdog")):
        changes[attr] = read_bool(node.get(key), f"{where}.{key}", problems)
    for key, attr in (("interval", "interval_seconds"), ("outbox_max_age", "outbox_max_age_seconds")):
        seconds = read_duration(node.get(key), f"{where}.{key}", problems)
        if seconds is not None and seconds <= 0:
            problems.add(node.get(key), f"{where}.{key}", "must be above 0")
            seconds = None
        changes[attr] = seconds
    for key in ("owner", "severity", "watchdog_severity"):
        text = read_str(node.get(key), f"{where}.{key}", problems)
        if text is not None and not text.strip():
            problems.add(node.get(key), f"{where}.{key}", "must not be empty")
            text = None
        changes[key] = text
    return _set(base, **changes)


def admin_external_url(admin: AdminSettings, port: int | None = None, hostname: str | None = None) -> str:
    """Where people reach the admin server (alert links: generatorURL, alert.url): admin.external_url, or else
    http(s)://<admin.listen host>:<port> (port: the one bound, when listen asks for port 0; a wildcard host is
    replaced by this machine's hostname, default socket.gethostname())."""
    if admin.external_url:
        return admin.external_url
    host, listen_port = split_hostport(admin.listen)
    if host in ("0.0.0.0", "::"):
        host = hostname or socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if admin.tls is not None else "http"
    return f"{scheme}://{host}:{port or listen_port}"


_T = TypeVar("_T")


def _set(obj: _T, **changes: object) -> _T:
    """dataclasses.replace, skipping values that were absent or invalid (None)."""
    kept = {k: v for k, v in changes.items() if v is not None}
    return replace(obj, **kept) if kept else obj  # type: ignore[type-var]


def config_from_node(root: Node, problems: Problems) -> Config:
    cfg = Config(source=root.file)
    if not root.is_map():
        problems.add(root, "", "the config file must be a mapping")
        return cfg
    check_keys(root, {"store", "receivers", "admin", "log", "shutdown_grace", "rules", "exporter", "alertmanager",
                      "auth", "self_monitoring", "evaluation"}, problems, "")
    config_dir = os.path.dirname(os.path.abspath(root.file))  # TLS and token files are relative to it
    cfg = replace(cfg, auth=read_auth(root.get("auth"), problems, base=config_dir))
    am = read_map(root.get("alertmanager"), "alertmanager", problems)
    if am is not None:
        check_keys(am, {"url", "resend_interval", "timeout", "max_backoff"}, problems, "alertmanager")
        url = read_str(am.get("url"), "alertmanager.url", problems)
        if url is not None and not url.startswith(("http://", "https://")):
            problems.add(am.get("url"), "alertmanager.url", "must be an http:// or https:// URL")
            url = None
        resend = read_duration(am.get("resend_interval"), "alertmanager.resend_interval", problems)
        if resend is not None and resend <= 0:
            problems.add(am.get("resend_interval"), "alertmanager.resend_interval", "must be above 0")
            resend = None
        max_backoff = read_duration(am.get("max_backoff"), "alertmanager.max_backoff", problems)
        if max_backoff is not None and max_backoff <= 0:
            problems.add(am.get("max_backoff"), "alertmanager.max_backoff", "must be above 0")
            max_backoff = None
        cfg = replace(cfg, alertmanager=_set(cfg.alertmanager, url=url, resend_interval=resend,
                                             timeout_seconds=read_duration(am.get("timeout"), "alertmanager.timeout",
                                                                           problems),
                                             max_backoff_seconds=max_backoff))
    exp = read_map(root.get("exporter"), "exporter", problems)
    if exp is not None:
        keys = ("endpoint", "protocol", "headers", "compression", "timeout", "insecure", "certificate", "client_key",
                "client_certificate")
        check_keys(exp, set(keys), problems, "exporter")
        protocol = read_str(exp.get("protocol"), "exporter.protocol", problems)
        if protocol is not None and protocol not in PROTOCOLS:
            problems.add(exp.get("protocol"), "exporter.protocol", f"must be one of {', '.join(PROTOCOLS)}")
            protocol = None
        compression = read_str(exp.get("compression"), "exporter.compression", problems)
        if compression is not None and compression not in COMPRESSIONS:
            problems.add(exp.get("compression"), "exporter.compression", f"must be one of {', '.join(COMPRESSIONS)}")
            compression = None
        headers = read_str_map(exp.get("headers"), "exporter.headers", problems)
        cfg = replace(cfg, exporter=_set(
            cfg.exporter,
            endpoint=read_str(exp.get("endpoint"), "exporter.endpoint", problems),
            protocol=protocol,
            headers=tuple(sorted(headers.items())) if headers else None,
            compression=compression,
            timeout_seconds=read_duration(exp.get("timeout"), "exporter.timeout", problems),
            insecure=read_bool(exp.get("insecure"), "exporter.insecure", problems),
            certificate=read_str(exp.get("certificate"), "exporter.certificate", problems),
            client_key=read_str(exp.get("client_key"), "exporter.client_key", problems),
            client_certificate=read_str(exp.get("client_certificate"), "exporter.client_certificate", problems),
        ))
    rules = read_str_list(root.get("rules"), "rules", problems)
    if rules is not None:
        base = os.path.dirname(os.path.abspath(root.file))
        cfg = replace(cfg, rules=tuple(os.path.join(base, p) for p in rules))

    store = read_map(root.get("store"), "store", problems)
    if store is not None:
        check_keys(store, {"path", "memory_limit", "threads", "max_group_spans", "checkpoint_wal_size", "retention"},
                   problems, "store")
        retention = read_map(store.get("retention"), "store.retention", problems)
        if retention is not None:
            cfg = replace(cfg, retention=_read_retention(retention, cfg.retention, problems))
        wal = _read_size(store.get("checkpoint_wal_size"), "store.checkpoint_wal_size", problems)
        if wal is not None and wal < 1024 * 1024:
            problems.add(store.get("checkpoint_wal_size"), "store.checkpoint_wal_size", "must be at least 1MiB")
        elif wal is not None:
            cfg = replace(cfg, checkpoint_wal_bytes=wal)
        memory = store.get("memory_limit")
        mem_text = None
        if memory is not None:
            size = _read_size(memory, "store.memory_limit", problems)
            mem_text = f"{size}B" if size is not None else None
        cfg = replace(cfg, store=_set(
            cfg.store,
            path=read_str(store.get("path"), "store.path", problems),
            memory_limit=mem_text,
            threads=read_int(store.get("threads"), "store.threads", problems, minimum=1),
        ))
        group = read_int(store.get("max_group_spans"), "store.max_group_spans", problems, minimum=1)
        if group is not None:
            cfg = replace(cfg, max_group_spans=group)

    rec = read_map(root.get("receivers"), "receivers", problems)
    if rec is not None:
        check_keys(rec, {"keep_prefixes", "keep_all_spans", "max_request_size", "inflight_bytes", "retry_after",
                         "grpc", "http", "limits", "fairness"}, problems, "receivers")
        prefixes = read_str_list(rec.get("keep_prefixes"), "receivers.keep_prefixes", problems)
        if prefixes is not None and not prefixes:
            problems.add(rec.get("keep_prefixes"), "receivers.keep_prefixes",
                         "must name at least one prefix (use keep_all_spans: true to keep every span)")
            prefixes = None
        keep_all = read_bool(rec.get("keep_all_spans"), "receivers.keep_all_spans", problems)
        ingest = _set(
            cfg.ingest,
            keep_prefixes=tuple(prefixes) if prefixes else None,
            max_request_bytes=_read_size(rec.get("max_request_size"), "receivers.max_request_size", problems),
            inflight_bytes=_read_size(rec.get("inflight_bytes"), "receivers.inflight_bytes", problems),
            retry_after_seconds=read_duration(rec.get("retry_after"), "receivers.retry_after", problems),
        )
        if keep_all:
            ingest = replace(ingest, keep_prefixes=None)
        limits = read_map(rec.get("limits"), "receivers.limits", problems)
        if limits is not None:
            ingest = replace(ingest, limits=_read_limits(limits, ingest.limits, problems))
        fairness = read_map(rec.get("fairness"), "receivers.fairness", problems)
        if fairness is not None:
            ingest = replace(ingest, fairness=_read_fairness(fairness, ingest.fairness, problems))
            if ingest.fairness.min_share_bytes > ingest.inflight_bytes:
                problems.add(fairness.get("min_client_share") or fairness, "receivers.fairness.min_client_share",
                             f"must not exceed receivers.inflight_bytes ({ingest.inflight_bytes} bytes)")
        cfg = replace(cfg, ingest=ingest)

        grpc_node = read_map(rec.get("grpc"), "receivers.grpc", problems)
        if grpc_node is not None:
            check_keys(grpc_node, {"enabled", "listen", "max_workers", "max_concurrent_streams", "tls"}, problems,
                       "receivers.grpc")
            grpc_settings = _set(
                GrpcSettings(),
                listen=_read_listen(grpc_node.get("listen"), "receivers.grpc.listen", problems),
                max_workers=read_int(grpc_node.get("max_workers"), "receivers.grpc.max_workers", problems, 1),
                max_concurrent_streams=read_int(grpc_node.get("max_concurrent_streams"),
                                                "receivers.grpc.max_concurrent_streams", problems, 1),
                tls=read_tls(grpc_node.get("tls"), "receivers.grpc.tls", problems, config_dir),
            )
            enabled = read_bool(grpc_node.get("enabled"), "receivers.grpc.enabled", problems)
            cfg = replace(cfg, grpc=None if enabled is False else grpc_settings)
        http_node = read_map(rec.get("http"), "receivers.http", problems)
        if http_node is not None:
            check_keys(http_node, {"enabled", "listen", "max_connections", "tls"}, problems, "receivers.http")
            http_settings = _set(
                HttpSettings(),
                listen=_read_listen(http_node.get("listen"), "receivers.http.listen", problems),
                max_connections=read_int(http_node.get("max_connections"), "receivers.http.max_connections",
                                         problems, 1),
                tls=read_tls(http_node.get("tls"), "receivers.http.tls", problems, config_dir),
            )
            enabled = read_bool(http_node.get("enabled"), "receivers.http.enabled", problems)
            cfg = replace(cfg, http=None if enabled is False else http_settings)

    admin = read_map(root.get("admin"), "admin", problems)
    if admin is not None:
        check_keys(admin, {"listen", "tls", "query", "external_url"}, problems, "admin")
        cfg = replace(cfg, admin=_set(cfg.admin, listen=_read_listen(admin.get("listen"), "admin.listen",
                                                                     problems),
                                      tls=read_tls(admin.get("tls"), "admin.tls", problems, config_dir),
                                      external_url=_read_external_url(admin.get("external_url"), problems)))
        query = read_map(admin.get("query"), "admin.query", problems)
        if query is not None:
            check_keys(query, {"default_rows", "max_rows", "timeout", "max_concurrent"}, problems, "admin.query")
            cfg = replace(cfg, admin=replace(cfg.admin, query=_set(
                cfg.admin.query,
                default_rows=read_int(query.get("default_rows"), "admin.query.default_rows", problems, 1),
                max_rows=read_int(query.get("max_rows"), "admin.query.max_rows", problems, 1),
                timeout_seconds=read_duration(query.get("timeout"), "admin.query.timeout", problems),
                max_concurrent=read_int(query.get("max_concurrent"), "admin.query.max_concurrent", problems, 1),
            )))
            if cfg.admin.query.default_rows > cfg.admin.query.max_rows:
                problems.add(query.get("default_rows"), "admin.query.default_rows", "must not exceed max_rows")

    log = read_map(root.get("log"), "log", problems)
    if log is not None:
        check_keys(log, {"level", "format"}, problems, "log")
        level = read_str(log.get("level"), "log.level", problems)
        if level is not None and level not in LEVELS:
            problems.add(log.get("level"), "log.level", f"must be one of {', '.join(LEVELS)}")
            level = None
        fmt = read_str(log.get("format"), "log.format", problems)
        if fmt is not None and fmt not in ("auto", "json", "console"):
            problems.add(log.get("format"), "log.format", "must be auto, json or console")
            fmt = None
        cfg = replace(cfg, log_level=level or cfg.log_level, log_format=fmt or cfg.log_format)

    self_monitoring = read_map(root.get("self_monitoring"), "self_monitoring", problems)
    if self_monitoring is not None:
        cfg = replace(cfg, self_monitoring=_read_self_monitoring(self_monitoring, cfg.self_monitoring, problems))

    evaluation = read_map(root.get("evaluation"), "evaluation", problems)
    if evaluation is not None:
        cfg = replace(cfg, evaluation=_read_evaluation(evaluation, cfg.evaluation, problems))

    grace = read_duration(root.get("shutdown_grace"), "shutdown_grace", problems)
    if grace is not None:
        cfg = replace(cfg, shutdown_grace_seconds=grace)
    return cfg


def load_config(path: str | None) -> Config:
    """Embedded defaults when path is None; otherwise the file over the defaults. Raises InvalidConfig."""
    if path is None:
        return Config()
    problems = Problems()
    cfg = config_from_node(load_yaml_file(path), problems)
    if problems:
        raise InvalidConfig(problems)
    return cfg


def apply_overrides(
    cfg: Config,
    *,
    db: str | None = None,
    grpc_listen: str | None = None,
    http_listen: str | None = None,
    admin_listen: str | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    rules: list[str] | None = None,
) -> Config:
    """Command-line flags over the file. Raises InvalidConfig for a malformed address."""
    problems = Problems()
    for flag, value in (("--grpc-listen", grpc_listen), ("--http-listen", http_listen),
                        ("--admin-listen", admin_listen)):
        if value is not None:
            try:
                split_hostport(value)
            except ValueError as exc:
                problems.add(None, flag, str(exc), file="command line")
    if problems:
        raise InvalidConfig(problems)
    if db is not None:
        cfg = replace(cfg, store=replace(cfg.store, path=db))
    if grpc_listen is not None:
        cfg = replace(cfg, grpc=replace(cfg.grpc or GrpcSettings(), listen=grpc_listen))
    if http_listen is not None:
        cfg = replace(cfg, http=replace(cfg.http or HttpSettings(), listen=http_listen))
    if admin_listen is not None:
        cfg = replace(cfg, admin=replace(cfg.admin, listen=admin_listen))
    if log_level is not None:
        cfg = replace(cfg, log_level=log_level)
    if log_format is not None:
        cfg = replace(cfg, log_format=log_format)
    if rules:
        cfg = replace(cfg, rules=tuple(rules))
    return cfg


def describe(cfg: Config) -> dict[str, object]:
    """The effective configuration as plain data (logged at start-up)."""
    return dataclasses.asdict(cfg)
