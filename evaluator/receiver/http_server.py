"""OTLP/HTTP receiver: POST /v1/traces with protobuf or JSON bodies, optionally gzip-compressed.

Answers follow the OTLP/HTTP spec: the response body has the request's content type; failures carry a
google.rpc.Status body; 503 comes with Retry-After; 413 for a body over the size limit (not retryable).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import grpc
import structlog
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from evaluator.httpbase import BodyTooLarge, HttpServer, Request, Response
from evaluator.receiver.decode import DecodeError
from evaluator.receiver.errors import Refusal, Refused
from evaluator.receiver.fairness import client_key
from evaluator.receiver.ingest import Ingestor
from evaluator.receiver.otlp_json import parse_json_request
from evaluator.security.auth import Authenticator, bearer_token
from evaluator.security.tls import TlsSettings
from evaluator.telemetry import Telemetry

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@dataclass(frozen=True)
class HttpSettings:
    listen: str = "127.0.0.1:4318"
    max_connections: int = 64
    tls: TlsSettings | None = None


def gunzip_limited(data: bytes, limit: int) -> bytes:
    """Decompress gzip, refusing output over `limit` bytes without inflating it all (zip bombs).

    Every member of a multi-member body (RFC 1952 section 2.2: members concatenated, as `gzip.decompress` and the
    Go and Java readers accept) is decompressed, within the same limit: stopping after the first member would
    drop the rest of the request without a word."""
    parts: list[bytes] = []
    size = 0
    rest = data
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = d.decompress(rest, limit + 1 - size)  # never 0 (which means unlimited): size <= limit here
        except zlib.error as exc:
            raise DecodeError(f"body is not valid gzip: {exc}") from None
        size += len(part)
        if size > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes after decompression")
        parts.append(part)
        if not d.eof:
            raise DecodeError("gzip body is truncated")
        rest = d.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)


class HttpReceiver:
    def __init__(
        self,
        ingestor: Ingestor,
        settings: HttpSettings,
        log: structlog.typing.FilteringBoundLogger | None = None,
        *,
        auth: Authenticator | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """auth: require a bearer token (401 with a google.rpc.Status body otherwise)."""
        self._ingestor = ingestor
        self.settings = settings
        self.server = HttpServer("otlp http receiver", settings.listen, {"/v1/traces": self._traces},
                                 max_connections=settings.max_connections, log=log, tls=settings.tls, auth=auth,
                                 unauthorized=_unauthorized, rejected=self._bad_framing, telemetry=telemetry,
                                 label="http")
        self._auth = auth

    @property
    def port(self) -> int | None:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def shutdown(self, grace: float = 10.0) -> None:
        self.server.shutdown(grace)

    # -- the route -------------------------------------------------------------------------------------------
    def _traces(self, request: Request) -> Response:
        media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        as_json = media == JSON
        try:
            if request.method != "POST":
                return _status_response(405, "use POST", as_json, {"Allow": "POST"})
            if media not in (PROTOBUF, JSON):
                raise self._ingestor.refuse(
                    Refusal.UNSUPPORTED_MEDIA,
                    f"unsupported Content-Type {media or '(none)'!r}: use {PROTOBUF} or {JSON}", "http")
            limit = self._ingestor.settings.max_request_bytes
            encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("identity", "gzip"):
                raise self._ingestor.refuse(
                    Refusal.UNSUPPORTED_MEDIA, f"unsupported Content-Encoding {encoding!r}: use gzip or none",
                    "http")
            try:
                body = request.read_body(limit)
                if encoding == "gzip":
                    body = gunzip_limited(body, limit)
            except BodyTooLarge as exc:
                raise self._ingestor.refuse(Refusal.TOO_LARGE, str(exc), "http") from None
            except DecodeError as exc:
                raise self._ingestor.refuse(Refusal.UNDECODABLE, str(exc), "http") from None
            if as_json:
                try:
                    message = parse_json_request(body)
                except DecodeError as exc:
                    raise self._ingestor.refuse(Refusal.UNDECODABLE, str(exc), "http") from None
                except MemoryError:
                    raise self._ingestor.refuse(Refusal.OUT_OF_MEMORY, f"not enough memory to parse this request "
                                                f"({len(body)} bytes); send smaller requests", "http") from None
                result = self._ingestor.export_message(message, len(body), "http", self._client(request))
            else:
                result = self._ingestor.export_protobuf(body, "http", self._client(request))
        except Refused as refused:
            headers = {}
            if refused.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(refused.retry_after)))
            return _status_response(refused.kind.http_status, refused.message, as_json, headers,
                                    refused.kind.grpc_code.value[0])
        response = ExportTraceServiceResponse()
        if result.rejected:
            response.partial_success.rejected_spans = result.rejected
            response.partial_success.error_message = result.message
        if as_json:
            return Response(200, json_format.MessageToJson(response, indent=None).encode(), JSON)
        return Response(200, response.SerializeToString(), PROTOBUF)

    def _client(self, request: Request) -> str:
        """Who sent the request, for the per-client share of the budget: the client header, else the (checked)
        token, else the address."""
        header = self._ingestor.settings.fairness.client_header
        named = request.headers.get(header) if header else None
        bearer = bearer_token(request.headers.get("Authorization")) if self._auth is not None else None
        return client_key(named, bearer, request.client_host)

    def _bad_framing(self, request: Request, status: int, message: str) -> Response:
        """A request whose HTTP framing is wrong (httpbase): counted as refused, answered with a google.rpc.Status
        like every other failure."""
        refused = self._ingestor.refuse(Refusal.BAD_FRAMING, message, "http")
        media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        code = {408: grpc.StatusCode.DEADLINE_EXCEEDED, 501: grpc.StatusCode.UNIMPLEMENTED}.get(
            status, refused.kind.grpc_code)
        return _status_response(status, refused.message, media == JSON, code=code.value[0])


def _unauthorized(request: Request, message: str) -> Response:
    """401 with a google.rpc.Status (UNAUTHENTICATED) in the request's content type, as for other failures."""
    media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    return _status_response(401, message, media == JSON, code=16)


def _status_response(http_status: int, message: str, as_json: bool, headers: dict[str, str] | None = None,
                     code: int = 3) -> Response:
    status = status_pb2.Status(code=code, message=message)
    if as_json:
        body = json_format.MessageToJson(status, indent=None).encode()
        return Response(http_status, body, JSON, headers or {})
    return Response(http_status, status.SerializeToString(), PROTOBUF, headers or {})
