"""Server-side TLS and mTLS for the OTLP/gRPC, OTLP/HTTP and admin servers, with certificate reload.

The certificate, key and client CA files are watched by their stat (mtime, size, inode), checked at most once a
second when a connection arrives: a renewed certificate (cert-manager, certbot) is used for new connections
without a restart. A half-written or mismatched set is refused with a log line and the previous one stays.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

# At most one stat of the files per this many seconds.
RELOAD_CHECK_SECONDS = 1.0
HANDSHAKE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: mTLS, clients must present a certificate signed by this CA

    @property
    def files(self) -> tuple[str, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())


def check_readable(path: str) -> str | None:
    """Why `path` cannot be used as an input file, or None."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    return None


def check_tls(settings: TlsSettings) -> list[tuple[str, str]]:
    """Problems with the files as (field, why): missing or unreadable, not PEM, key not matching the certificate."""
    problems = []
    for name in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(settings, name)
        if path is not None and (why := check_readable(path)) is not None:
            problems.append((name, why))
    if problems:
        return problems
    try:
        server_context(TlsSettings(settings.cert_file, settings.key_file))
    except ssl.SSLError as exc:
        problems.append(("cert_file", f"cannot use {settings.cert_file} with {settings.key_file}: {_ssl_why(exc)}"))
    except OSError as exc:
        problems.append(("cert_file", f"cannot read the certificate files: {exc}"))
    if settings.client_ca_file and not problems:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cafile=settings.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            problems.append(("client_ca_file", f"{settings.client_ca_file} is not a PEM CA bundle: {_ssl_why(exc)}"))
    return problems


def _ssl_why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc)


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """An SSLContext for a server socket: TLS 1.2 or later; with client_ca_file, client certificates required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_ca_file:
        context.load_verify_locations(cafile=settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def _stat_key(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class _Watched:
    """Rebuilds a value from the TLS files when their stat changes (checked at most every `interval` s)."""

    def __init__(self, settings: TlsSettings, what: str, interval: float,
                 log: structlog.typing.FilteringBoundLogger | None) -> None:
        self.settings = settings
        self.what = what
        self.interval = interval
        self.log = log or structlog.get_logger("tls")
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._key = _stat_key(settings.files)
        self.reloads = 0

    def _changed(self) -> bool:
        """True once per change of the files (the caller then rebuilds)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.interval:
                return False
            self._checked = now
            key = _stat_key(self.settings.files)
            if key == self._key:
                return False
            self._key = key
            return True

    def _failed(self, exc: BaseException) -> None:
        self.log.error(f"{self.what}: the changed certificate files cannot be used; keeping the previous ones",
                       cert_file=self.settings.cert_file, error=_ssl_why(exc))

    def _reloaded(self) -> None:
        self.reloads += 1
        self.log.info(f"{self.what}: certificate files reloaded", cert_file=self.settings.cert_file)


class ServerTls(_Watched):
    """The SSLContext for an HTTP server; `context()` returns a fresh one after the files change."""

    def __init__(self, settings: TlsSettings, what: str, *, interval: float = RELOAD_CHECK_SECONDS,
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        super().__init__(settings, what, interval, log)
        self._context = server_context(settings)

    def context(self) -> ssl.SSLContext:
        if self._changed():
            try:
                self._context = server_context(self.settings)
            except (ssl.SSLError, OSError) as exc:
                self._failed(exc)
            else:
                self._reloaded()
        return self._context


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def grpc_certificate_configuration(settings: TlsSettings) -> Any:
    """A grpc ServerCertificateConfiguration from the files. Raises OSError, ValueError."""
    root = _read(settings.client_ca_file) if settings.client_ca_file else None
    return grpc.ssl_server_certificate_configuration([(_read(settings.key_file), _read(settings.cert_file))],
                                                     root_certificates=root)


class GrpcTls(_Watched):
    """grpc dynamic SSL credentials whose fetcher (called by gRPC before every new connection's handshake)
    returns a new certificate configuration after the files change."""

    def __init__(self, settings: TlsSettings, what: str = "otlp grpc receiver", *,
                 interval: float = RELOAD_CHECK_SECONDS, log: structlog.typing.FilteringBoundLogger | None = None
                 ) -> None:
        super().__init__(settings, what, interval, log)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(grpc_certificate_configuration(self.settings), self._fetch,
                                                   require_client_authentication=bool(self.settings.client_ca_file))

    def _fetch(self) -> Any:
        try:
            if not self._changed():
                return None
            # gRPC core does not check that the key matches the certificate: do it with Python's ssl first.
            server_context(self.settings)
            config = grpc_certificate_configuration(self.settings)
        except Exception as exc:  # called from gRPC core: never raise
            self._failed(exc)
            return None
        self._reloaded()
        return config
