"""TLS, mTLS and bearer-token auth on the three servers (OTLP/gRPC, OTLP/HTTP, admin), with real clients on
loopback ports and certificates made with the openssl CLI."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from certs import Pki, make_pki
from conftest import TRACE_EXPORT
from google.protobuf import json_format
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from evaluator.admin.server import AdminSettings
from evaluator.config import describe, load_config
from evaluator.daemon import Daemon
from evaluator.receiver.grpc_server import GrpcSettings
from evaluator.receiver.http_server import HttpSettings
from evaluator.security.auth import Authenticator, AuthSettings, TokenError, TokenSource, bearer_token
from evaluator.security.tls import GrpcTls, ServerTls, TlsSettings
from evaluator.testing import daemon_process, loopback_config, wait_for
from evaluator.yamlsrc import InvalidConfig

TOKEN = "s3cr3t-token-7f1c9a"
OLD_TOKEN = "old-token-d41d8cd9"
WRONG = "not-the-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    try:
        return make_pki(tmp_path_factory.mktemp("pki"))
    except (OSError, Exception) as exc:  # no openssl on the machine
        pytest.skip(f"openssl cannot make test certificates: {exc}")


def _tls(pki: Pki, mtls: bool = False) -> TlsSettings:
    return TlsSettings(str(pki.server_cert), str(pki.server_key), str(pki.ca) if mtls else None)


class Secured:
    """A started Daemon with TLS on all three servers and, optionally, auth."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def ports(self) -> dict[str, int]:
        d = self.daemon
        assert d.grpc is not None and d.http is not None and d.grpc.port and d.http.port and d.admin.port
        return {"grpc": d.grpc.port, "http": d.http.port, "admin": d.admin.port}

    def counter(self, name: str, **labels: str) -> float:
        return self.daemon.telemetry.get(name).value(**labels)

    def stored(self) -> int:
        cur = self.daemon.store.cursor()
        try:
            row = cur.execute("SELECT count(*) FROM spans").fetchone()
            assert row is not None
            return int(row[0])
        finally:
            cur.close()


@pytest.fixture
def start(tmp_path: Path, pki: Pki) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(mtls: bool = False, auth: AuthSettings | None = None, tls: bool = True, **env: str) -> Secured:
        settings = _tls(pki, mtls) if tls else None
        cfg = loopback_config(tmp_path / "evaluator.duckdb",
                              grpc=GrpcSettings(listen="127.0.0.1:0", tls=settings),
                              http=HttpSettings(listen="127.0.0.1:0", tls=settings),
                              admin=AdminSettings(listen="127.0.0.1:0", tls=settings),
                              auth=auth)
        daemon = Daemon(cfg, env=env or None)
        started.append(daemon)
        daemon.start()
        return Secured(daemon)

    yield make
    for d in started:
        d.shutdown()


@pytest.fixture
def no_requests_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's verify=: the SDK's HTTP exporter's
    certificate_file would be ignored (psf/requests#3829)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"\n  {TOKEN}  \n\n")
    return path


# ----------------------------------------------------------------------------------------------- clients


def _client_context(pki: Pki, cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def _https(port: int, path: str, context: ssl.SSLContext, method: str = "GET", body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _grpc_creds(pki: Pki, cert: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    if cert is None:
        return grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), cert[1].read_bytes(), cert[0].read_bytes())


def _grpc_export(port: int, creds: grpc.ChannelCredentials, token: str | None,
                 request: trace_service_pb2.ExportTraceServiceRequest | None = None) -> Any:
    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                   response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
        data = (request or trace_service_pb2.ExportTraceServiceRequest()).SerializeToString()
        return call(data, timeout=10, metadata=metadata)


def _grpc_health(port: int, creds: grpc.ChannelCredentials) -> Any:
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _grpc_reflection(port: int, creds: grpc.ChannelCredentials, token: str | None) -> list[str]:
    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10, metadata=metadata)
        return [s.name for r in responses for s in r.list_services_response.service]


def _provider(exporter: Any) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "secure-pipeline"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _emit(provider: TracerProvider, n: int = 1) -> None:
    tracer = provider.get_tracer("pipeline")
    for i in range(n):
        with tracer.start_as_current_span("features.daily.run") as span:
            span.set_attribute("data.dataset", "payments")
            span.set_attribute("data.row_count", 1000 + i)
    provider.shutdown()


# ------------------------------------------------------------------------------------- the SDK exporters


def test_python_sdk_grpc_exporter_over_tls_with_a_token(start: Any, pki: Pki, token_file: Path) -> None:
    d = start(auth=AuthSettings(token_file=str(token_file)))
    exporter = GrpcExporter(endpoint=f"https://localhost:{d.ports['grpc']}", credentials=_grpc_creds(pki),
                            headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    _emit(_provider(exporter), 2)
    assert d.stored() == 2
    assert d.counter("auth_failures_total", server="grpc", reason="missing") == 0


@pytest.mark.usefixtures("no_requests_ca_env")
def test_python_sdk_http_exporter_over_tls_with_a_token(start: Any, pki: Pki, token_file: Path) -> None:
    d = start(auth=AuthSettings(token_file=str(token_file)))
    exporter = HttpExporter(endpoint=f"https://localhost:{d.ports['http']}/v1/traces", certificate_file=str(pki.ca),
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    _emit(_provider(exporter), 3)
    assert d.stored() == 3


@pytest.mark.usefixtures("no_requests_ca_env")
def test_python_sdk_exporters_with_mtls_client_certificates(start: Any, pki: Pki) -> None:
    d = start(mtls=True)
    grpc_exporter = GrpcExporter(endpoint=f"https://localhost:{d.ports['grpc']}", timeout=10,
                                 credentials=_grpc_creds(pki, (pki.client_cert, pki.client_key)))
    _emit(_provider(grpc_exporter))
    http_exporter = HttpExporter(endpoint=f"https://localhost:{d.ports['http']}/v1/traces",
                                 certificate_file=str(pki.ca), client_certificate_file=str(pki.client_cert),
                                 client_key_file=str(pki.client_key), timeout=10)
    _emit(_provider(http_exporter))
    assert d.stored() == 2


# ------------------------------------------------------------------------------------------------ mTLS


def test_mtls_refuses_clients_without_a_certificate_or_with_another_cas(start: Any, pki: Pki) -> None:
    d = start(mtls=True)
    ports = d.ports
    good = (pki.client_cert, pki.client_key)
    rogue = (pki.other_client_cert, pki.other_client_key)
    for server in ("http", "admin"):
        path = "/v1/traces" if server == "http" else "/metrics"
        for cert in (None, rogue):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                _https(ports[server], path, _client_context(pki, cert))
        status, _, _ = _https(ports[server], "/metrics" if server == "admin" else "/v1/traces",
                              _client_context(pki, good), method="POST" if server == "http" else "GET",
                              body=b"" if server == "http" else None,
                              headers={"Content-Type": "application/x-protobuf"} if server == "http" else None)
        assert status == 200, server
        assert wait_for(lambda s=server: d.counter("tls_handshake_failures_total", server=s) >= 2, 5)
    for cert in (None, rogue):
        with pytest.raises(grpc.RpcError) as err:
            _grpc_export(ports["grpc"], _grpc_creds(pki, cert), None)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    _grpc_export(ports["grpc"], _grpc_creds(pki, good), None)
    assert _grpc_health(ports["grpc"], _grpc_creds(pki, good)) == health_pb2.HealthCheckResponse.SERVING


def test_plain_text_clients_against_tls_ports_are_refused_and_the_servers_keep_answering(start: Any,
                                                                                          pki: Pki) -> None:
    d = start()
    ports = d.ports
    for server in ("http", "admin"):
        conn = http.client.HTTPConnection("127.0.0.1", ports[server], timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        conn.close()
        # a client that connects and sends nothing does not hold up the others: the handshake is not in accept
        idle = socket.create_connection(("127.0.0.1", ports[server]), timeout=10)
        try:
            status, _, body = _https(ports[server], "/healthz" if server == "admin" else "/v1/traces",
                                     _client_context(pki))
            assert status == (200 if server == "admin" else 405), body
        finally:
            idle.close()
        assert wait_for(lambda s=server: d.counter("tls_handshake_failures_total", server=s) >= 1, 5)
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    _grpc_export(ports["grpc"], _grpc_creds(pki), None)
    assert d.daemon._not_ready_reason() is None


# ------------------------------------------------------------------------------------------------ auth


def test_every_endpoint_but_the_probes_needs_the_token(start: Any, pki: Pki, token_file: Path) -> None:
    d = start(auth=AuthSettings(token_file=str(token_file)))
    ports, ctx = d.ports, _client_context(pki)
    # admin: probes open; everything else, including paths that do not exist (yet), needs the token
    for path in ("/healthz", "/readyz"):
        assert _https(ports["admin"], path, ctx)[0] == 200
        assert _https(ports["admin"], path, ctx, headers=_auth(WRONG))[0] == 200
    for method, path in (("GET", "/metrics"), ("GET", "/ladder"), ("GET", "/alerts"), ("POST", "/query"),
                         ("POST", "/evaluate"), ("GET", "/no-such-path")):
        body = b"{}" if method == "POST" else None
        for token, reason in ((None, "missing"), (WRONG, "invalid")):
            status, headers, text = _https(ports["admin"], path, ctx, method, body, _auth(token))
            assert status == 401, (path, status, text)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert (reason == "invalid") == ("invalid_token" in headers["WWW-Authenticate"])
        status, _, _ = _https(ports["admin"], path, ctx, method, body, _auth(TOKEN))
        assert status != 401, path
    assert _https(ports["admin"], "/metrics", ctx, headers={"Authorization": f"bearer   {TOKEN}"})[0] == 200
    assert _https(ports["admin"], "/metrics", ctx, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert d.counter("auth_failures_total", server="admin", reason="missing") == 6
    assert d.counter("auth_failures_total", server="admin", reason="invalid") == 7

    # OTLP/HTTP: 401 with a google.rpc.Status in the request's content type
    for token in (None, WRONG):
        status, headers, body = _https(ports["http"], "/v1/traces", ctx, "POST", b"",
                                       {"Content-Type": "application/x-protobuf", **_auth(token)})
        assert (status, headers["Content-Type"]) == (401, "application/x-protobuf")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert status_pb2.Status.FromString(body).code == 16
        status, headers, body = _https(ports["http"], "/v1/traces", ctx, "POST", b"{}",
                                       {"Content-Type": "application/json", **_auth(token)})
        assert (status, headers["Content-Type"]) == (401, "application/json")
        parsed = json_format.Parse(body, status_pb2.Status())
        assert parsed.code == 16 and "bearer token" in parsed.message
    status, _, _ = _https(ports["http"], "/v1/traces", ctx, "POST", b"{}",
                          {"Content-Type": "application/json", **_auth(TOKEN)})
    assert status == 200
    assert d.counter("auth_failures_total", server="http", reason="missing") == 2
    assert d.counter("auth_failures_total", server="http", reason="invalid") == 2

    # OTLP/gRPC: UNAUTHENTICATED for Export and reflection; health open
    creds = _grpc_creds(pki)
    for token in (None, WRONG):
        with pytest.raises(grpc.RpcError) as err:
            _grpc_export(ports["grpc"], creds, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            _grpc_reflection(ports["grpc"], creds, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _grpc_export(ports["grpc"], creds, TOKEN)
    assert "opentelemetry.proto.collector.trace.v1.TraceService" in _grpc_reflection(ports["grpc"], creds, TOKEN)
    assert _grpc_health(ports["grpc"], creds) == health_pb2.HealthCheckResponse.SERVING
    assert d.counter("auth_failures_total", server="grpc", reason="missing") == 2
    assert d.counter("auth_failures_total", server="grpc", reason="invalid") == 2
    status, _, metrics = _https(ports["admin"], "/metrics", ctx, headers=_auth(TOKEN))
    assert 'otel_evaluator_auth_failures_total{server="grpc",reason="invalid"} 2' in metrics.decode()


def test_auth_without_tls_and_from_an_environment_variable(start: Any) -> None:
    d = start(tls=False, auth=AuthSettings(token_env="EVALUATOR_TOKEN"), EVALUATOR_TOKEN=TOKEN)
    ports = d.ports
    conn = http.client.HTTPConnection("127.0.0.1", ports["admin"], timeout=10)
    try:
        for token, status in ((None, 401), (WRONG, 401), (TOKEN, 200)):
            conn.request("GET", "/metrics", headers=_auth(token))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status  # a 401 keeps the connection usable
    finally:
        conn.close()
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call(b"", timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")])


def test_the_token_never_appears_in_logs(tmp_path: Path, pki: Pki, token_file: Path) -> None:
    cfg = loopback_config(tmp_path / "evaluator.duckdb", auth=AuthSettings(token_file=str(token_file)),
                          http=HttpSettings(listen="127.0.0.1:0", tls=_tls(pki)))
    with structlog.testing.capture_logs() as logs:
        daemon = Daemon(cfg)
        daemon.start()
        try:
            assert daemon.http is not None and daemon.grpc is not None
            ctx = _client_context(pki)
            for token in (TOKEN, WRONG, TOKEN + "x", None):
                _https(daemon.http.port or 0, "/v1/traces", ctx, "POST", b"not protobuf",
                       {"Content-Type": "application/x-protobuf", **_auth(token)})
                conn = http.client.HTTPConnection("127.0.0.1", daemon.admin.port or 0, timeout=10)
                conn.request("GET", "/metrics", headers=_auth(token))
                conn.getresponse().read()
                conn.close()
                with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc.port}") as channel:
                    call = channel.unary_unary(TRACE_EXPORT, request_serializer=None, response_deserializer=None)
                    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
                    try:
                        call(b"\xff\xff", timeout=5, metadata=metadata)
                    except grpc.RpcError as exc:
                        assert TOKEN not in (exc.details() or "")
            token_file.write_text(f"{TOKEN}\n{OLD_TOKEN}\n")  # a reload is logged too
            os.utime(token_file, ns=(time.time_ns(), time.time_ns() + 10**9))
            assert daemon.auth is not None
            wait_for(lambda: daemon.auth is not None and daemon.auth.source.tokens() and daemon.auth.source.reloads,
                     5)
        finally:
            daemon.shutdown()
    assert any(e.get("event") == "request refused: bearer token invalid" for e in logs)
    assert any("token file reloaded" in str(e.get("event")) for e in logs)
    text = json.dumps(logs, default=str)
    assert TOKEN not in text and OLD_TOKEN not in text and WRONG not in text


def test_a_rotated_token_file_is_picked_up_without_a_restart(start: Any, pki: Pki, token_file: Path) -> None:
    d = start(tls=False, auth=AuthSettings(token_file=str(token_file)))
    port = d.ports["admin"]

    def status(token: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers=_auth(token))
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    assert (status(TOKEN), status(OLD_TOKEN)) == (200, 401)
    # step 1: the new token joins the old one; step 2: the old one goes; an empty file meanwhile is ignored
    new = "new-token-0a1b2c"
    token_file.write_text(f"{TOKEN}\n{new}\n")
    wait_for(lambda: status(new) == 200, 5)
    assert status(TOKEN) == 200
    token_file.write_text("")
    time.sleep(1.2)
    assert (status(TOKEN), status(new)) == (200, 200)  # an empty (half-written) file keeps the previous tokens
    token_file.write_text(f"{new}\n")
    wait_for(lambda: status(TOKEN) == 401, 5)
    assert status(new) == 200


def test_token_source_and_bearer_parsing(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text(" a \n\n b\n")
    source = TokenSource(AuthSettings(token_file=str(path)), interval=0)
    assert source.tokens() == (b"a", b"b")
    auth = Authenticator(source)
    assert [auth.check(h, "x") for h in (None, "", "Bearer a", "Bearer b", "Bearer c", "Bearer", "Basic a")] == [
        "missing", "missing", None, None, "invalid", "invalid", "invalid"]
    assert bearer_token("BEARER  tok ") == b"tok"
    path.write_text("\n  \n")
    with pytest.raises(TokenError, match="holds no token"):
        TokenSource(AuthSettings(token_file=str(path)))
    with pytest.raises(TokenError, match="not set"):
        TokenSource(AuthSettings(token_env="NOPE_NOT_SET"), environ={})
    path.write_text("has space\n")
    with pytest.raises(TokenError) as err:
        TokenSource(AuthSettings(token_file=str(path)))
    assert "has space" not in str(err.value)


def test_the_cli_daemon_with_tls_and_auth_from_its_config_file(tmp_path: Path, pki: Pki, token_file: Path) -> None:
    """`otel-evaluator serve --config` end to end: probes open over HTTPS, the rest needs the token, clean stop."""
    config = tmp_path / "evaluator.yaml"
    config.write_text(f"admin:\n  tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n"
                      f"receivers:\n  http:\n    tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n"
                      f"auth:\n  token_file: {token_file.name}\n")
    args = ["--config", str(config), "--db", str(tmp_path / "ev.duckdb"), "--grpc-listen", "127.0.0.1:0",
            "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-level", "debug"]
    with daemon_process(args, cwd=str(tmp_path)) as proc:
        ctx = _client_context(pki)
        assert _https(proc.ports["admin"], "/readyz", ctx)[0] == 200
        assert _https(proc.ports["admin"], "/metrics", ctx, headers=_auth(WRONG))[0] == 401
        status, _, body = _https(proc.ports["admin"], "/metrics", ctx, headers=_auth(TOKEN))
        assert status == 200
        assert 'otel_evaluator_auth_failures_total{server="admin",reason="invalid"} 1' in body.decode()
        status, _, _ = _https(proc.ports["http"], "/v1/traces", ctx, "POST", b"{}",
                              {"Content-Type": "application/json", **_auth(TOKEN)})
        assert status == 200
        assert proc.stop() == 0
    output = "\n".join(proc.lines)
    assert "request refused: bearer token invalid" in output
    assert TOKEN not in output and WRONG not in output


# ------------------------------------------------------------------------------------------ TLS reload


def _swap_certificate(pki: Pki, to_other: bool) -> None:
    cert, key = (pki.other_server_cert, pki.other_server_key) if to_other else (pki.server_cert, pki.server_key)
    shutil.copy(cert, pki.dir / "live.pem")
    shutil.copy(key, pki.dir / "live.key")
    later = time.time_ns() + 2 * 10**9
    for p in ("live.pem", "live.key"):
        os.utime(pki.dir / p, ns=(later, later))


def test_renewed_certificates_are_used_for_new_connections(tmp_path: Path, pki: Pki) -> None:
    _swap_certificate(pki, to_other=False)
    live = TlsSettings(str(pki.dir / "live.pem"), str(pki.dir / "live.key"))
    cfg = loopback_config(tmp_path / "evaluator.duckdb", grpc=GrpcSettings(listen="127.0.0.1:0", tls=live),
                          http=HttpSettings(listen="127.0.0.1:0", tls=live))
    daemon = Daemon(cfg)
    daemon.start()
    try:
        assert daemon.http is not None and daemon.grpc is not None
        http_port, grpc_port = daemon.http.port or 0, daemon.grpc.port or 0
        other_ctx = _client_context(pki, ca=pki.other_ca)
        other_creds = grpc.ssl_channel_credentials(pki.other_ca.read_bytes())

        def http_trusts(ctx: ssl.SSLContext) -> bool:
            try:
                return _https(http_port, "/v1/traces", ctx)[0] == 405
            except (ssl.SSLError, OSError):
                return False

        def grpc_trusts(creds: grpc.ChannelCredentials) -> bool:
            try:
                return bool(_grpc_health(grpc_port, creds))
            except grpc.RpcError:
                return False

        assert http_trusts(_client_context(pki)) and grpc_trusts(_grpc_creds(pki))
        assert not http_trusts(other_ctx)
        _swap_certificate(pki, to_other=True)
        wait_for(lambda: http_trusts(other_ctx), 5, 0.2)
        wait_for(lambda: grpc_trusts(other_creds), 5, 0.2)
        assert not http_trusts(_client_context(pki))
        # a broken renewal (key not matching) keeps the working certificate
        shutil.copy(pki.server_key, pki.dir / "live.key")
        later = time.time_ns() + 4 * 10**9
        os.utime(pki.dir / "live.key", ns=(later, later))
        time.sleep(1.2)
        assert http_trusts(other_ctx) and grpc_trusts(other_creds)
    finally:
        daemon.shutdown()


def test_server_tls_and_grpc_tls_reload_checks_are_rate_limited(pki: Pki) -> None:
    _swap_certificate(pki, to_other=False)
    live = TlsSettings(str(pki.dir / "live.pem"), str(pki.dir / "live.key"))
    server = ServerTls(live, "test", interval=3600)
    first = server.context()
    _swap_certificate(pki, to_other=True)
    assert server.context() is first and server.reloads == 0  # not checked again within the interval
    fetcher = GrpcTls(live, interval=0)
    fetcher.credentials()
    assert fetcher._fetch() is None  # nothing changed since the start
    _swap_certificate(pki, to_other=False)
    assert fetcher._fetch() is not None and fetcher.reloads == 1


# ---------------------------------------------------------------------------------------------- config


def test_tls_and_auth_config_blocks(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki.dir / name, tmp_path / name)
    path = tmp_path / "c.yaml"
    path.write_text(
        "receivers:\n  grpc:\n    tls: {cert_file: server.pem, key_file: server.key, client_ca_file: ca.pem}\n"
        f"  http:\n    tls: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n"
        "admin:\n  tls:\n    cert_file: server.pem\n    key_file: server.key\n"
        "auth:\n  token_file: tokens\n")
    cfg = load_config(str(path))
    assert cfg.grpc is not None and cfg.http is not None
    assert cfg.grpc.tls == TlsSettings(str(tmp_path / "server.pem"), str(tmp_path / "server.key"),
                                       str(tmp_path / "ca.pem"))
    assert cfg.http.tls == TlsSettings(str(pki.server_cert), str(pki.server_key))
    assert cfg.admin.tls == TlsSettings(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    assert cfg.auth == AuthSettings(token_file=str(tmp_path / "tokens"))
    assert TOKEN not in json.dumps(describe(cfg), default=str)
    path.write_text("receivers:\n  grpc: {tls: null}\n  http: {tls: null}\nadmin: {tls: null}\nauth: null\n")
    cfg = load_config(str(path))
    assert cfg.grpc is not None and cfg.http is not None
    assert (cfg.grpc.tls, cfg.http.tls, cfg.admin.tls, cfg.auth) == (None, None, None, None)


def test_tls_and_auth_config_errors_are_positioned(tmp_path: Path, pki: Pki, monkeypatch: Any) -> None:
    (tmp_path / "empty").write_text("\n \n")
    monkeypatch.delenv("EVALUATOR_TEST_UNSET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        "receivers:\n"
        "  grpc:\n"
        "    tls:\n"  # 3
        "      cert_file: missing.pem\n"  # 4
        "      key_file: missing.key\n"  # 5
        "  http:\n"
        "    tls:\n"
        f"      cert_file: {pki.server_cert}\n"  # 8: no key_file
        "admin:\n"
        "  tls:\n"
        f"    cert_file: {pki.server_cert}\n"
        f"    key_file: {pki.other_server_key}\n"  # 12: does not match the certificate
        f"    client_ca_file: {pki.server_key}\n"  # 13: not a CA bundle (only reported once the pair is fine)
        "    verify: yes\n"  # 14: unknown key
        "auth:\n"
        "  token_file: empty\n"  # 16: no token
    )
    with pytest.raises(InvalidConfig) as err:
        load_config(str(path))
    text = str(err.value)
    for line, key, why in ((4, "receivers.grpc.tls.cert_file", "does not exist"),
                           (5, "receivers.grpc.tls.key_file", "does not exist"),
                           (8, "receivers.http.tls", "needs both cert_file and key_file"),
                           (11, "admin.tls.cert_file", "key values mismatch"),
                           (14, "admin.tls.verify", ""),
                           (16, "auth.token_file", "holds no token")):
        lines = [x for x in text.splitlines() if x.startswith(f"{path}:{line}: {key}: ")]
        assert len(lines) == 1 and why in lines[0], (line, text)

    path.write_text("auth:\n  token_file: x\n  token_env: Y\n")
    with pytest.raises(InvalidConfig, match=r":2: auth: needs exactly one of token_file and token_env"):
        load_config(str(path))
    path.write_text("auth:\n  token_env: EVALUATOR_TEST_UNSET\n")
    with pytest.raises(InvalidConfig, match=r":2: auth.token_env: environment variable EVALUATOR_TEST_UNSET is not"):
        load_config(str(path))
    path.write_text("auth:\n  token_env: 'not a name'\n")
    with pytest.raises(InvalidConfig, match=r":2: auth.token_env: 'not a name' is not an environment variable"):
        load_config(str(path))
    monkeypatch.setenv("EVALUATOR_TEST_SET", TOKEN)
    path.write_text("auth:\n  token_env: EVALUATOR_TEST_SET\n")
    assert load_config(str(path)).auth == AuthSettings(token_env="EVALUATOR_TEST_SET")
    path.write_text(f"admin:\n  tls:\n    cert_file: {pki.server_cert}\n    key_file: {pki.server_key}\n"
                    f"    client_ca_file: {pki.server_key}\n")
    with pytest.raises(InvalidConfig, match=r":5: admin.tls.client_ca_file: .* is not a PEM CA bundle"):
        load_config(str(path))
