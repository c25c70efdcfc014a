"""Where the alert exporter sends, from the OpenTelemetry exporter environment variables (protocol/exporter.md).

`from_env(env, signal, base)` resolves one signal's settings ("traces" for alert spans, "metrics" for figures).
Every field is resolved on its own, first match wins:

    OTEL_EXPORTER_OTLP_<SIGNAL>_<X>  >  OTEL_EXPORTER_OTLP_<X>  >  `base` (the daemon's config file)  >  default

An empty variable counts as unset (as the spec says). The variables:

- ENDPOINT. No endpoint anywhere -> `endpoint` None: the exporter is off and nothing is sent (the evaluator
  never guesses a Collector on localhost, unlike the SDKs, because an alert sent nowhere must be visible as
  "not configured", not as a stream of connection errors).
  - http/protobuf: a URL with scheme http or https. The generic variable (and `base.endpoint`, which is one
    Collector address for both signals) is a base URL: `v1/traces` / `v1/metrics` is appended to its path
    (`http://c:4318` -> `http://c:4318/v1/traces`, `http://c/otlp/` -> `http://c/otlp/v1/traces`); a base
    path that already ends in `/v1/<signal>` is kept, so a resolved config can be fed back as `base`. The
    signal-specific variable is used as is, except that an empty path becomes `/`.
  - grpc: `http://host:port`, `https://host:port` or `host:port`. `https` means TLS, `http` means plaintext;
    without a scheme INSECURE decides (default false: TLS). `insecure` in the result is the decision.
- PROTOCOL: `grpc` or `http/protobuf` (`http/json` is not supported). Default **http/protobuf**: it is the
  spec's default, so a Collector address copied from OpenTelemetry docs (`http://collector:4318`) works as is,
  and it needs nothing beyond the standard library on the wire (gzip, TLS, proxies between us and the
  Collector all speak plain HTTP/1.1). Set `grpc` explicitly for a :4317 endpoint.
- HEADERS: `key=value,key2=value2` (W3C baggage format); keys and values are percent-decoded and stripped,
  keys lower-cased (gRPC metadata keys must be lower case; HTTP names are case-insensitive). The
  signal-specific variable replaces the generic one wholly; they are not merged.
- COMPRESSION: `gzip` or `none` (default none).
- TIMEOUT: milliseconds per export, a positive number (default 10000 = `timeout_seconds` 10.0).
- INSECURE: `true` or `false`, case-insensitive (default false). Other values are an error here rather than
  the spec's "false with a warning": a typo must not silently switch TLS on or off.
- CERTIFICATE (CA bundle to trust), CLIENT_KEY and CLIENT_CERTIFICATE (mTLS): PEM file paths. The files are
  read when a transport is built, not here.

Invalid values raise ValueError naming the variable (or `config file` for `base`).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

PROTOCOLS = ("grpc", "http/protobuf")
COMPRESSIONS = ("gzip", "none")
SIGNALS = ("traces", "metrics")
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class OtlpExporterConfig:
    endpoint: str | None = None
    protocol: str = DEFAULT_PROTOCOL  # "grpc" | "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    compression: str = "none"  # "gzip" | "none"
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    insecure: bool = False
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None


def parse_headers(value: str, variable: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` with percent-encoding -> ((k, v), ...); empty entries are skipped."""
    out: list[tuple[str, str]] = []
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        key = urllib.parse.unquote(key).strip().lower()
        if not sep or not key:
            raise ValueError(f"{variable}: header {item.strip()!r} is not key=value")
        out.append((key, urllib.parse.unquote(val).strip()))
    return tuple(out)


def _parse_timeout(value: str, variable: str) -> float:
    try:
        ms = float(value)
    except ValueError:
        raise ValueError(f"{variable}: timeout {value!r} is not a number of milliseconds") from None
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"{variable}: timeout {value!r} must be a positive number of milliseconds")
    return ms / 1000.0


def _parse_bool(value: str, variable: str) -> bool:
    v = value.strip().lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise ValueError(f"{variable}: {value!r} is not true or false")


def _http_url(value: str, variable: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{variable}: {value!r} is not an http:// or https:// URL (protocol http/protobuf)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{variable}: {value!r} has an invalid port") from None
    return parts


def _append_signal_path(value: str, signal: str, variable: str) -> str:
    parts = _http_url(value, variable)
    suffix = f"v1/{signal}"
    path = parts.path
    if not path.rstrip("/").endswith("/" + suffix):
        path = (path if path.endswith("/") else path + "/") + suffix
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _as_is(value: str, variable: str) -> str:
    parts = _http_url(value, variable)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))


def grpc_target(endpoint: str, insecure: bool, variable: str = "endpoint") -> tuple[str, bool]:
    """A gRPC endpoint -> (host:port target, use TLS). The scheme, when present, decides TLS."""
    value = endpoint.strip()
    if "://" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{variable}: {endpoint!r} is not http(s)://host:port or host:port (protocol grpc)")
        return parts.netloc, parts.scheme == "https"
    if not value or "/" in value:
        raise ValueError(f"{variable}: {endpoint!r} is not http(s)://host:port or host:port (protocol grpc)")
    return value, not insecure


def from_env(env: Mapping[str, str], signal: str, base: OtlpExporterConfig | None = None) -> OtlpExporterConfig:
    """One signal's exporter settings: signal-specific env > generic env > `base` (config file) > defaults."""
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r} is not one of {', '.join(SIGNALS)}")
    base = base or OtlpExporterConfig()
    specific_prefix = f"OTEL_EXPORTER_OTLP_{signal.upper()}_"
    generic_prefix = "OTEL_EXPORTER_OTLP_"

    def lookup(name: str) -> tuple[str, str] | None:
        """(variable, value) of the first set variable for `name`, signal-specific first."""
        for variable in (specific_prefix + name, generic_prefix + name):
            value = env.get(variable)
            if value is not None and value.strip() != "":
                return variable, value.strip()
        return None

    # protocol first: the endpoint's meaning depends on it
    found = lookup("PROTOCOL")
    if found:
        variable, protocol = found[0], found[1].lower()
    else:
        variable, protocol = "config file protocol", base.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"{variable}: protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")

    found = lookup("COMPRESSION")
    if found:
        variable, compression = found[0], found[1].lower()
    else:
        variable, compression = "config file compression", base.compression
    if compression not in COMPRESSIONS:
        raise ValueError(f"{variable}: compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")

    found = lookup("TIMEOUT")
    if found:
        timeout = _parse_timeout(found[1], found[0])
    else:
        timeout = base.timeout_seconds
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"config file timeout {timeout!r} must be a positive number of seconds")

    found = lookup("HEADERS")
    headers = parse_headers(found[1], found[0]) if found else tuple(base.headers)

    found = lookup("INSECURE")
    insecure = _parse_bool(found[1], found[0]) if found else base.insecure

    def path_setting(name: str, fallback: str | None) -> str | None:
        got = lookup(name)
        return got[1] if got else fallback

    certificate = path_setting("CERTIFICATE", base.certificate)
    client_key = path_setting("CLIENT_KEY", base.client_key)
    client_certificate = path_setting("CLIENT_CERTIFICATE", base.client_certificate)

    endpoint: str | None = None
    specific = env.get(specific_prefix + "ENDPOINT", "").strip()
    generic = env.get(generic_prefix + "ENDPOINT", "").strip()
    if specific:
        variable, raw, is_specific = specific_prefix + "ENDPOINT", specific, True
    elif generic:
        variable, raw, is_specific = generic_prefix + "ENDPOINT", generic, False
    elif base.endpoint:
        variable, raw, is_specific = "config file endpoint", base.endpoint.strip(), False
    else:
        variable, raw, is_specific = "", "", False
    if raw:
        if protocol == "grpc":
            _, tls = grpc_target(raw, insecure, variable)
            insecure = not tls
            endpoint = raw
        else:
            endpoint = _as_is(raw, variable) if is_specific else _append_signal_path(raw, signal, variable)
            insecure = urllib.parse.urlsplit(endpoint).scheme == "http"

    return OtlpExporterConfig(
        endpoint=endpoint,
        protocol=protocol,
        headers=headers,
        compression=compression,
        timeout_seconds=timeout,
        insecure=insecure,
        certificate=certificate,
        client_key=client_key,
        client_certificate=client_certificate,
    )
