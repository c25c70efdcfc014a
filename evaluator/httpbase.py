"""A small threaded HTTP/1.1 server component shared by the OTLP/HTTP receiver and the admin server.

Why not a framework: two plain endpoints each, and we need exact control over body limits, keep-alive and a
graceful stop (finish requests in flight, close idle keep-alive connections) more than routing features.

TLS (optional) is negotiated in each connection's own thread, never in the accept loop, so a slow or broken
client cannot hold up the others. Bearer-token auth (optional) is checked here, before any route, for every
path but `open_paths`: a route added later is protected without doing anything.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from evaluator.security.auth import Authenticator
from evaluator.security.tls import HANDSHAKE_TIMEOUT_SECONDS, ServerTls, TlsSettings
from evaluator.telemetry import Telemetry


class BodyTooLarge(Exception):
    pass


class BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive .get()
    _handler: _Handler

    def read_body(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes (checked against Content-Length before reading)."""
        return self._handler.read_body(limit)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Request], Response]
DISCARD_BODY_BYTES = 64 * 1024
LINGER_SECONDS = 1.0
Unauthorized = Callable[[Request, str], Response]  # (request, message) -> the 401 answer, in the route's format


def text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode(), headers=dict(headers))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60  # an idle keep-alive connection is closed after this many seconds

    def setup(self) -> None:
        super().setup()
        self.busy = False
        self.body_read = False
        self.server.track(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: the counters say what happened

    def read_body(self, limit: int) -> bytes:
        self.body_read = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(limit)
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise BadRequest(f"bad Content-Length {raw!r}") from None
        if length < 0:
            raise BadRequest(f"bad Content-Length {raw!r}")
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise BodyTooLarge(f"body is {length} bytes, over the limit of {limit} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise BadRequest("body ended before Content-Length bytes")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("bad chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            if len(out) + size > limit:
                self.close_connection = True
                raise BodyTooLarge(f"body is over the limit of {limit} bytes")
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    def _dispatch(self) -> None:
        self.busy = True
        self.body_read = False
        try:
            response = self.server.handle(self)
        except BodyTooLarge as exc:
            response = text(413, str(exc))
        except BadRequest as exc:
            response = text(400, str(exc))
            self.close_connection = True
        except Exception as exc:  # a bug in a route must not kill the connection thread silently
            self.server.log.exception("http handler failed", path=self.path)
            response = text(500, f"internal error: {type(exc).__name__}")
        if not self.body_read and (self.headers.get("Content-Length") not in (None, "0")
                                   or self.headers.get("Transfer-Encoding")):
            # The route did not read the body (a 401, 404, 405): a small one is read and dropped so the connection
            # stays usable and closing it cannot reset the answer away; a large one closes the connection.
            try:
                self.read_body(DISCARD_BODY_BYTES)
            except (BodyTooLarge, BadRequest, OSError):
                self.close_connection = True
        if self.server.closing:
            self.close_connection = True
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for k, v in response.headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except OSError:
            self.close_connection = True
        finally:
            self.busy = False

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], owner: HttpServer) -> None:
        self.owner = owner
        self.log = owner.log
        self.closing = False
        self._conns: set[_Handler] = set()
        self._conn_lock = threading.Lock()
        self._idle = threading.Condition(self._conn_lock)
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, _Handler)

    def track(self, handler: _Handler, opened: bool) -> None:
        with self._conn_lock:
            if opened:
                self._conns.add(handler)
            else:
                self._conns.discard(handler)
                self._idle.notify_all()

    def connection_count(self) -> int:
        with self._conn_lock:
            return len(self._conns)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (when configured), then the HTTP exchanges."""
        tls = self.owner.tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            conn = tls.context().wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            return  # the client went away before we started
        try:
            try:
                conn.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a timeout too
                self.owner.handshake_failed(client_address, exc)
                return
            super().finish_request(conn, client_address)
        finally:
            _linger_close(conn)

    def shutdown_request(self, request: Any) -> None:
        _linger_close(request)  # a plain connection; a TLS one was closed in finish_request (this one is detached)

    def handle(self, handler: _Handler) -> Response:
        if self.connection_count() > self.owner.max_connections:
            handler.close_connection = True
            return text(503, "too many connections; retry later", **{"Retry-After": "1"})
        split = urlsplit(handler.path)
        request = Request(handler.command, split.path, parse_qs(split.query), handler.headers, handler)
        owner = self.owner
        if owner.auth is not None and split.path not in owner.open_paths:
            reason = owner.auth.check(handler.headers.get("Authorization"), owner.label,
                                      peer=str(handler.client_address[0]))
            if reason is not None:
                message = f"bearer token {reason}: send the header 'Authorization: Bearer <token>'"
                response = owner.unauthorized(request, message) if owner.unauthorized else text(401, message)
                response.headers.setdefault("WWW-Authenticate", 'Bearer realm="otel-evaluator"'
                                            + ("" if reason == "missing" else ', error="invalid_token"'))
                return response
        route = owner.routes.get(split.path)
        if route is None:
            return text(404, f"no such path {split.path}")
        return route(request)

    def close_idle(self, wait: float) -> None:
        """Close keep-alive connections between requests; wait up to `wait` s for busy ones to finish."""
        with self._conn_lock:
            for h in list(self._conns):
                if not h.busy:
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)
            self._idle.wait_for(lambda: not self._conns, timeout=wait)


def _linger_close(sock: socket.socket) -> None:
    """Send FIN, then drop what the client still sends (briefly) before closing: closing with unread bytes makes
    the kernel answer RST, which can destroy the answer the client has not read yet."""
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS state here and becomes a plain socket
        deadline = time.monotonic() + LINGER_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    with contextlib.suppress(OSError):
        sock.close()


class HttpServer:
    def __init__(
        self,
        name: str,
        listen: str,
        routes: dict[str, Route],
        *,
        max_connections: int = 64,
        log: structlog.typing.FilteringBoundLogger | None = None,
        tls: TlsSettings | None = None,
        auth: Authenticator | None = None,
        open_paths: Iterable[str] = (),
        unauthorized: Unauthorized | None = None,
        telemetry: Telemetry | None = None,
        label: str | None = None,
    ) -> None:
        """tls: serve HTTPS (mTLS with client_ca_file). auth: require a bearer token on every path but
        open_paths; unauthorized(request, message) makes the 401 body (default text). label: the `server` label
        of the auth and TLS counters (default: name). start() raises OSError for unusable TLS files."""
        self.name = name
        self.label = label or name
        self.listen = listen
        self.routes = routes
        self.max_connections = max_connections
        self.log = log or structlog.get_logger(name)
        self.tls_settings = tls
        self.tls: ServerTls | None = None  # made at start (an unusable file is a start-up failure, an OSError)
        self.auth = auth
        self.open_paths = frozenset(open_paths)
        self.unauthorized = unauthorized
        self.handshake_failures = (telemetry or Telemetry()).counter(
            "tls_handshake_failures_total", "TLS handshakes that failed (plain-text client, untrusted or missing "
            "client certificate, timeout).", ("server",))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.port: int | None = None

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            host, port = split_hostport(self.listen)
            if self.tls_settings is not None and self.tls is None:
                try:
                    self.tls = ServerTls(self.tls_settings, self.name, log=self.log)
                except OSError as exc:  # ssl.SSLError included
                    raise OSError(f"cannot use the TLS files of {self.name}: {exc}") from None
            try:
                server = _Server((host, port), self)
            except OSError as exc:
                raise OSError(f"cannot listen for {self.name} on {self.listen}: {exc.strerror or exc}") from None
            self.port = server.server_address[1]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"{self.name}-http", daemon=True)
            thread.start()
            self._server, self._thread = server, thread
            self.log.info(f"{self.name} listening", address=host, port=self.port,
                          tls="mtls" if self.tls and self.tls.settings.client_ca_file else bool(self.tls),
                          auth=self.auth is not None)

    def handshake_failed(self, client_address: Any, exc: BaseException) -> None:
        self.handshake_failures.inc(server=self.label)
        why = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
        self.log.debug("tls handshake failed", peer=str(client_address[0]), error=str(why))

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, finish requests in flight (up to `grace` s), close keep-alive connections."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.closing = True
        server.shutdown()
        thread.join()
        server.close_idle(grace)
        server.server_close()
        self.log.info(f"{self.name} stopped")


def split_hostport(listen: str) -> tuple[str, int]:
    """'127.0.0.1:4318' / '[::1]:4318' / ':4318' -> (host, port). Raises ValueError."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{listen!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{listen!r}: port {number} is out of range")
    return host, number
