"""A small threaded HTTP/1.1 server component shared by the OTLP/HTTP receiver and the admin server.

Why not a framework: two plain endpoints each, and we need exact control over body limits, keep-alive and a
graceful stop (finish requests in flight, close idle keep-alive connections) more than routing features.

TLS (optional) is negotiated in each connection's own thread, never in the accept loop, so a slow or broken
client cannot hold up the others. Bearer-token auth (optional) is checked here, before any route, for every
path but `open_paths`: a route added later is protected without doing anything.

Message framing follows RFC 9112 strictly, because a lenient parser is how a body gets smuggled past a proxy or
grows without bound: the header section, Content-Length and Transfer-Encoding are checked before any route runs;
chunk-size lines, the CRLF after each chunk and the trailer section as the body is read. A request whose framing
is wrong is answered (400, or 501 for a transfer coding we do not implement) and its connection closed: what
follows it on the connection cannot be trusted to start a request. However the client frames the body, it never
grows past the limit the route reads it with.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
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
    """The request cannot be read as HTTP/1.1 says it must be; `status` is the answer (400, 408 or 501)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Framing:
    """How the request body is delimited (RFC 9112 section 6.3): chunked, or `length` bytes (0: no body)."""

    chunked: bool = False
    length: int = 0
    shown: str = "0"  # the Content-Length as sent, for messages

    @property
    def has_body(self) -> bool:
        return self.chunked or self.length > 0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive .get()
    _handler: _Handler

    def read_body(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes however it is framed (checked against Content-Length
        before reading; for chunked bodies, before each chunk is read). Raises BodyTooLarge, BadRequest."""
        return self._handler.read_body(limit)

    @property
    def client_host(self) -> str:
        """The client's address without its port (for telling clients apart)."""
        return str(self._handler.client_address[0])


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Request], Response]
DISCARD_BODY_BYTES = 64 * 1024
LINGER_SECONDS = 1.0
IDLE_TIMEOUT_SECONDS = 60.0  # an idle keep-alive connection, or a body that stalls, is given up after this
MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions, without the CRLF
MAX_TRAILER_BYTES = 16 * 1024  # the whole trailer section, CRLFs included
READ_PIECE_BYTES = 1024 * 1024  # a chunk is read in pieces of this size, so a short one allocates little
Unauthorized = Callable[[Request, str], Response]  # (request, message) -> the 401 answer, in the route's format
# (request, status, message) -> the answer to a request whose framing is wrong, in the route's format
Rejected = Callable[[Request, int, str], Response]

# RFC 9112 section 7.1: chunk = chunk-size [ chunk-ext ] CRLF, chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS
# value ] ), value = token / quoted-string. The size is bare hex: no sign, no 0x, no whitespace before it.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|"
                         + _QUOTED + rb"))?)*")
_FIELD_LINE = re.compile(_TOKEN + rb":[^\r\n]*")
_DIGITS = re.compile(r"[0-9]+")
_MAX_LENGTH_DIGITS = 19  # more is over any limit; int() would refuse past 4300 digits


def text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode(), headers=dict(headers))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = IDLE_TIMEOUT_SECONDS  # the class default; setup() puts the owner's idle_timeout on the socket

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.owner.idle_timeout)
        self.busy = False
        self.body_read = False
        self.framing: Framing | None = None  # None: not known yet, or the framing is wrong
        self.server.track(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: the counters say what happened

    # -- framing (RFC 9112 sections 6 and 7) -----------------------------------------------------------------
    def _parse_framing(self) -> Framing:
        """How the body is delimited, from the header section; raises BadRequest when that cannot be trusted."""
        headers = self.headers
        if headers.defects or headers.get_payload() or any("\n" in value for value in headers.values()):
            # http.server silently drops every field after a line like "Transfer-Encoding : chunked" (space
            # before the colon) and keeps obs-fold continuation lines: RFC 9112 section 5 says reject both.
            raise BadRequest("malformed header section: a line that is not name:value (no whitespace before the "
                             "colon) or a folded line")
        codings = headers.get_all("Transfer-Encoding")
        lengths = headers.get_all("Content-Length")
        if codings is not None:
            return self._transfer_coding(codings, lengths is not None)
        if lengths is None:
            return Framing()  # a request without either has no body (RFC 9112 section 6.3)
        if len(lengths) > 1 or "," in lengths[0]:
            raise BadRequest(f"Content-Length sent more than once ({_quote(', '.join(lengths))}): send it once")
        raw = lengths[0].strip(" \t")
        if not _DIGITS.fullmatch(raw):
            raise BadRequest(f"bad Content-Length {_quote(raw)}: a number of bytes (digits only) expected")
        digits = raw.lstrip("0") or "0"
        if len(digits) > _MAX_LENGTH_DIGITS:
            return Framing(length=10**_MAX_LENGTH_DIGITS, shown=f"a {len(digits)}-digit number of")
        return Framing(length=int(digits), shown=digits)

    def _transfer_coding(self, values: list[str], with_length: bool) -> Framing:
        if self.request_version == "HTTP/1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request: its framing cannot be trusted "
                             "(RFC 9112 section 6.1)")
        if with_length:
            # RFC 9112 section 6.1 lets a server reject this or let Transfer-Encoding win. It is the shape of a
            # request-smuggling attempt (a proxy in front may have used the other length) and no OTLP client
            # or admin client sends it, so it is refused rather than guessed at.
            raise BadRequest("both Content-Length and Transfer-Encoding: the body length is ambiguous "
                             "(RFC 9112 section 6.1); send one of them")
        codings = [c.strip(" \t").lower() for value in values for c in value.split(",")]
        codings = [c for c in codings if c]
        if not codings or codings[-1] != "chunked":
            raise BadRequest(f"Transfer-Encoding {_quote(', '.join(values))} does not end in chunked: the body "
                             "length cannot be determined (RFC 9112 section 6.3)")
        if "chunked" in codings[:-1]:
            raise BadRequest("Transfer-Encoding applies chunked more than once")
        if len(codings) > 1:
            raise BadRequest(f"transfer coding {_quote(codings[0])} is not implemented: send Transfer-Encoding: "
                             "chunked alone (compress the content with Content-Encoding: gzip)", 501)
        return Framing(chunked=True)

    # -- the body ----------------------------------------------------------------------------------------------
    def read_body(self, limit: int) -> bytes:
        self.body_read = True
        framing = self.framing or Framing()
        try:
            if framing.chunked:
                return self._read_chunked(limit)
            if framing.length > limit:
                raise BodyTooLarge(f"body is {framing.shown} bytes, over the limit of {limit} bytes")
            data = self.rfile.read(framing.length)
            if len(data) != framing.length:
                raise BadRequest(f"body ended after {len(data)} of its {framing.length} bytes (Content-Length)")
            return data
        except (BodyTooLarge, BadRequest):
            self.close_connection = True  # the rest of the body must not be parsed as the next request
            raise
        except TimeoutError:
            self.close_connection = True
            raise BadRequest(f"the body stalled: nothing came for {self.server.owner.idle_timeout:g} s",
                             408) from None
        except OSError:
            self.close_connection = True
            raise BadRequest("the connection failed while the body was read") from None

    def _read_chunked(self, limit: int) -> bytes:
        """Each chunk is checked against the limit before it is read, and read in pieces (a chunk that ends
        early allocates only what came); extensions and trailers are read and dropped."""
        body = io.BytesIO()
        while size := self._chunk_size():
            if body.tell() + size > limit:
                raise BodyTooLarge(f"chunked body is over the limit of {limit} bytes")
            left = size
            while left:
                piece = self.rfile.read(min(left, READ_PIECE_BYTES))
                if not piece:
                    raise BadRequest(f"body ended inside a chunk ({left} of its {size} bytes missing)")
                body.write(piece)
                left -= len(piece)
            if self.rfile.read(2) != b"\r\n":
                raise BadRequest(f"chunk data is not followed by CRLF: the chunk is longer than its size ({size}) "
                                 "or ends in a bare LF")
        self._read_trailers()
        return body.getvalue()

    def _chunk_size(self) -> int:
        line = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 2)
        if not line.endswith(b"\n"):
            if len(line) >= MAX_CHUNK_LINE_BYTES + 2:
                raise BadRequest(f"chunk-size line is over {MAX_CHUNK_LINE_BYTES} bytes")
            raise BadRequest("body ended before its last chunk (a chunk of size 0)")
        if not line.endswith(b"\r\n"):
            raise BadRequest("chunk-size line ends in a bare LF: HTTP lines end in CRLF")
        match = _CHUNK_LINE.fullmatch(line, 0, len(line) - 2)
        if match is None:
            raise BadRequest(f"bad chunk-size line {_quote(line[:-2])}: a chunk size is hexadecimal digits only "
                             "(no sign, 0x or spaces), optionally followed by ;name=value extensions")
        return int(match.group(1), 16)

    def _read_trailers(self) -> None:
        """The trailer section (RFC 9112 section 7.1.2): field lines up to an empty line, MAX_TRAILER_BYTES in all.
        None of our routes uses a trailer field, so they are checked and dropped."""
        used = 0
        while True:
            line = self.rfile.readline(MAX_TRAILER_BYTES - used + 1)
            used += len(line)
            if used > MAX_TRAILER_BYTES:
                raise BadRequest(f"trailer section is over {MAX_TRAILER_BYTES} bytes")
            if not line.endswith(b"\n"):
                raise BadRequest("body ended in the trailer section: an empty line must follow the last chunk")
            if not line.endswith(b"\r\n"):
                raise BadRequest("trailer line ends in a bare LF: HTTP lines end in CRLF")
            if line == b"\r\n":
                return
            if not _FIELD_LINE.fullmatch(line, 0, len(line) - 2):
                raise BadRequest(f"bad trailer line {_quote(line[:-2])}: name:value expected")

    def _dispatch(self) -> None:
        self.busy = True
        self.body_read = False
        self.framing = None
        try:
            self.framing = self._parse_framing()
            response = self.server.handle(self)
        except BodyTooLarge as exc:
            response = text(413, str(exc))
        except BadRequest as exc:
            self.close_connection = True
            response = self.server.bad_request(self, exc)
        except Exception as exc:  # a bug in a route must not kill the connection thread silently
            self.server.log.exception("http handler failed", path=self.path)
            response = text(500, f"internal error: {type(exc).__name__}")
            self.close_connection = True  # where the route left the body unread is not known
        if not self.body_read and self.framing is not None and self.framing.has_body:
            # The route did not read the body (a 401, 404, 405): a small one is read and dropped so the connection
            # stays usable and closing it cannot reset the answer away; a large one closes the connection.
            try:
                self.read_body(DISCARD_BODY_BYTES)
            except (BodyTooLarge, BadRequest):
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
        request = _request(handler)
        owner = self.owner
        if owner.auth is not None and request.path not in owner.open_paths:
            reason = owner.auth.check(handler.headers.get("Authorization"), owner.label,
                                      peer=str(handler.client_address[0]))
            if reason is not None:
                message = f"bearer token {reason}: send the header 'Authorization: Bearer <token>'"
                response = owner.unauthorized(request, message) if owner.unauthorized else text(401, message)
                response.headers.setdefault("WWW-Authenticate", 'Bearer realm="otel-evaluator"'
                                            + ("" if reason == "missing" else ', error="invalid_token"'))
                return response
        route = owner.routes.get(request.path)
        if route is None:
            return text(404, f"no such path {request.path}")
        return route(request)

    def bad_request(self, handler: _Handler, exc: BadRequest) -> Response:
        """The answer to a request whose framing is wrong, in the owner's format (and counted) when it says."""
        if self.owner.rejected is None:
            return text(exc.status, str(exc))
        return self.owner.rejected(_request(handler), exc.status, str(exc))

    def close_idle(self, wait: float) -> None:
        """Close keep-alive connections between requests; wait up to `wait` s for busy ones to finish."""
        with self._conn_lock:
            for h in list(self._conns):
                if not h.busy:
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)
            self._idle.wait_for(lambda: not self._conns, timeout=wait)


def _request(handler: _Handler) -> Request:
    split = urlsplit(handler.path)
    return Request(handler.command, split.path, parse_qs(split.query), handler.headers, handler)


def _quote(raw: bytes | str, keep: int = 40) -> str:
    """Client bytes for an error message: quoted, escaped, cut to `keep` characters."""
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return json.dumps(value[:keep] + ("..." if len(value) > keep else ""))


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
        rejected: Rejected | None = None,
        telemetry: Telemetry | None = None,
        label: str | None = None,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        """tls: serve HTTPS (mTLS with client_ca_file). auth: require a bearer token on every path but
        open_paths; unauthorized(request, message) makes the 401 body (default text). rejected(request, status,
        message) makes (and counts) the answer to a request with wrong framing (default text). label: the
        `server` label of the auth and TLS counters (default: name). idle_timeout: seconds an idle keep-alive
        connection, or a stalled body (408), is waited for. start() raises OSError for unusable TLS files."""
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
        self.rejected = rejected
        self.idle_timeout = idle_timeout
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
