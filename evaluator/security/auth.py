"""Bearer-token authentication for the OTLP/gRPC, OTLP/HTTP and admin servers.

Clients send `Authorization: Bearer <token>` (gRPC: metadata key `authorization`). The accepted tokens come from
a file (one per line: several lines let a new token be rolled out before the old one is removed; the file is
re-read when it changes, so rotation needs no restart) or from one environment variable. Every comparison is
constant-time (hmac.compare_digest) against every accepted token. Tokens never appear in logs or answers.

Probe endpoints stay open so that Kubernetes probes need no secret: admin /healthz and /readyz, and the gRPC
health service (grpc.health.v1.Health). Everything else requires a token once `auth:` is configured.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from evaluator.telemetry import Counter, Telemetry

RELOAD_CHECK_SECONDS = 1.0
MISSING = "missing"
INVALID = "invalid"
GRPC_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class AuthSettings:
    """Exactly one of token_file and token_env. Holds where the tokens are, never the tokens."""

    token_file: str | None = None
    token_env: str | None = None


class TokenError(ValueError):
    """A token source that yields no usable token. The message never contains a token."""


def parse_tokens(text: str, where: str) -> tuple[bytes, ...]:
    """One token per line; blank lines and surrounding whitespace ignored. Raises TokenError."""
    tokens: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token:
            continue
        if not all(0x21 <= ord(c) <= 0x7E for c in token):
            raise TokenError(f"{where} line {number}: a token must be printable ASCII without spaces "
                             "(it travels in an HTTP header)")
        tokens.append(token.encode("ascii"))
    if not tokens:
        raise TokenError(f"{where} holds no token")
    return tuple(tokens)


def read_token_file(path: str) -> tuple[bytes, ...]:
    """Raises TokenError (empty, bad characters) or OSError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_tokens(f.read(), path)


def read_token_env(name: str, environ: Mapping[str, str]) -> tuple[bytes, ...]:
    value = environ.get(name)
    if value is None:
        raise TokenError(f"environment variable {name} is not set")
    return parse_tokens(value, f"environment variable {name}")


def check_auth(settings: AuthSettings, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Problems as (field, why), for the config loader."""
    environ = os.environ if environ is None else environ
    try:
        if settings.token_file is not None:
            read_token_file(settings.token_file)
        elif settings.token_env is not None:
            read_token_env(settings.token_env, environ)
    except TokenError as exc:
        return [("token_file" if settings.token_file is not None else "token_env", str(exc))]
    except OSError as exc:
        return [("token_file", f"cannot read {settings.token_file}: {exc.strerror or exc}")]
    return []


class TokenSource:
    """The accepted tokens; a token file is re-read when its stat changes (checked at most every `interval` s).
    A changed file that cannot be used (empty while being rewritten, unreadable) keeps the previous tokens."""

    def __init__(self, settings: AuthSettings, *, environ: Mapping[str, str] | None = None,
                 interval: float = RELOAD_CHECK_SECONDS, log: structlog.typing.FilteringBoundLogger | None = None
                 ) -> None:
        """Raises TokenError or OSError when there is no usable token."""
        if (settings.token_file is None) == (settings.token_env is None):
            raise TokenError("auth needs exactly one of token_file and token_env")
        self.settings = settings
        self.interval = interval
        self.log = log or structlog.get_logger("auth")
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self.reloads = 0
        if settings.token_file is not None:
            self._stat = self._file_stat()
            self._tokens = read_token_file(settings.token_file)
        else:
            assert settings.token_env is not None
            self._stat = None
            self._tokens = read_token_env(settings.token_env, os.environ if environ is None else environ)

    def _file_stat(self) -> tuple[int, int, int] | None:
        assert self.settings.token_file is not None
        try:
            st = os.stat(self.settings.token_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def tokens(self) -> tuple[bytes, ...]:
        path = self.settings.token_file
        if path is None:
            return self._tokens
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.interval:
                return self._tokens
            self._checked = now
            stat = self._file_stat()
            if stat == self._stat:
                return self._tokens
            self._stat = stat
            try:
                self._tokens = read_token_file(path)
            except (TokenError, OSError) as exc:
                self.log.error("token file changed but cannot be used; keeping the previous tokens",
                               token_file=path, error=str(exc) if isinstance(exc, TokenError) else exc.strerror)
            else:
                self.reloads += 1
                self.log.info("token file reloaded", token_file=path, tokens=len(self._tokens))
            return self._tokens


def bearer_token(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` value; b"" for another scheme; None when absent."""
    if header is None or not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return token.strip().encode("utf-8", "replace")


class Authenticator:
    """Checks Authorization values against the TokenSource and counts failures per server and reason."""

    def __init__(self, source: TokenSource, telemetry: Telemetry | None = None,
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.source = source
        self.log = log or structlog.get_logger("auth")
        self.failures: Counter = (telemetry or Telemetry()).counter(
            "auth_failures_total", "Requests refused for a missing or invalid bearer token.", ("server", "reason"))

    @classmethod
    def from_settings(cls, settings: AuthSettings, telemetry: Telemetry | None = None, *,
                      environ: Mapping[str, str] | None = None,
                      log: structlog.typing.FilteringBoundLogger | None = None) -> Authenticator:
        return cls(TokenSource(settings, environ=environ, log=log), telemetry, log)

    def valid(self, token: bytes) -> bool:
        ok = False
        for accepted in self.source.tokens():  # no early exit: the time taken does not tell which token matched
            ok |= hmac.compare_digest(accepted, token)
        return ok and bool(token)

    def check(self, authorization: str | None, server: str, peer: str = "") -> str | None:
        """None when authorized, else the reason (missing or invalid), counted and logged at debug level."""
        token = bearer_token(authorization)
        reason = MISSING if token is None else None if self.valid(token) else INVALID
        if reason is not None:
            self.failures.inc(server=server, reason=reason)
            self.log.debug("request refused: bearer token " + reason, server=server, peer=peer)
        return reason


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        k, v = item
        if k.lower() == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


class GrpcAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call but the health service's with UNAUTHENTICATED unless it carries a valid token."""

    def __init__(self, auth: Authenticator, server: str = "grpc",
                 open_prefixes: tuple[str, ...] = GRPC_OPEN_PREFIXES) -> None:
        self.auth = auth
        self.server = server
        self.open_prefixes = open_prefixes

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(self.open_prefixes):
            return continuation(handler_call_details)
        reason = self.auth.check(_metadata_value(handler_call_details.invocation_metadata, "authorization"),
                                 self.server)
        if reason is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without auth: the method does not exist
        return _refusing_handler(handler, f"bearer token {reason}: send metadata 'authorization: Bearer <token>'")


def _refusing_handler(handler: Any, message: str) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
