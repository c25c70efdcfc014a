"""Hostile HTTP/1.1 framing against the real servers (raw sockets): precise 400/413/501 answers, counted, memory
bounded by the route's limit however the body is framed, and the server still serves good requests afterwards."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import RunningDaemon
from google.rpc import status_pb2
from spans import request, span

from evaluator.httpbase import HttpServer, Request, Response, text
from evaluator.receiver.ingest import IngestSettings
from evaluator.testing import daemon_process

PROTOBUF = "application/x-protobuf"
GOOD = request(span(attrs={"data.row_count": 1})).SerializeToString()
LIMIT = 64 * 1024  # max_request_bytes of the daemon under test


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def message(self) -> str:
        """The google.rpc.Status message (receiver) or the text (other routes)."""
        if self.headers.get("Content-Type") == PROTOBUF:
            return str(status_pb2.Status.FromString(self.body).message)
        return self.body.decode()


def _head(path: str, headers: dict[str, str] | list[tuple[str, str]], *, version: str = "HTTP/1.1",
          method: str = "POST") -> bytes:
    pairs = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in pairs)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _exchange(port: int, raw: bytes, *, end_writes: bool = False) -> Answer:
    """Send raw bytes on a new connection and read one response (the server may close before reading it all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(raw)
            if end_writes:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking everything: its answer is still readable
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> Answer:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return Answer(resp.status, resp.headers, resp.read())


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def _refused(d: RunningDaemon, reason: str) -> float:
    return d.daemon.telemetry.get("requests_refused_total").value(transport="http", reason=reason)


def _serves_good_request(port: int) -> bool:
    answer = _exchange(port, _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": str(len(GOOD))})
                       + GOOD)
    return answer.status == 200


@pytest.fixture
def small(make_daemon: Any) -> RunningDaemon:
    """A daemon whose receiver takes requests up to LIMIT bytes."""
    running: RunningDaemon = make_daemon(ingest=replace(IngestSettings(), max_request_bytes=LIMIT))
    return running


def _port(d: RunningDaemon) -> int:
    assert d.daemon.http is not None and d.daemon.http.port is not None
    return d.daemon.http.port


CHUNKED = {"Content-Type": PROTOBUF, "Transfer-Encoding": "chunked"}
HOSTILE: list[tuple[str, list[tuple[str, str]], bytes, int, str]] = [
    # (case, headers, body, status, in the message)
    ("negative chunk size", list(CHUNKED.items()), b"-1\r\n" + GOOD, 400, "bad chunk-size line"),
    ("negative chunk size -10", list(CHUNKED.items()), b"-10\r\n" + GOOD, 400, "bad chunk-size line"),
    ("plus sign", list(CHUNKED.items()), b"+5\r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("0x prefix", list(CHUNKED.items()), b"0x5\r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("leading space", list(CHUNKED.items()), b" 5\r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("trailing space", list(CHUNKED.items()), b"5 \r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("underscore (int() takes it)", list(CHUNKED.items()), b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 400,
     "bad chunk-size line"),
    ("not hex", list(CHUNKED.items()), b"zz\r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("bad extension", list(CHUNKED.items()), b"5;=x\r\nhello\r\n0\r\n\r\n", 400, "bad chunk-size line"),
    ("chunk-size line too long", list(CHUNKED.items()), b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n", 400,
     "chunk-size line is over 4096 bytes"),
    ("bare LF after chunk size", list(CHUNKED.items()), b"5\nhello\r\n0\r\n\r\n", 400, "bare LF"),
    ("no CRLF after chunk data", list(CHUNKED.items()), b"5\r\nhelloXX\r\n0\r\n\r\n", 400,
     "not followed by CRLF"),
    ("trailer section too long", list(CHUNKED.items()),
     b"5\r\nhello\r\n0\r\n" + (b"X-Pad: " + b"p" * 100 + b"\r\n") * 200 + b"\r\n", 400,
     "trailer section is over 16384 bytes"),
    ("trailer line without a colon", list(CHUNKED.items()), b"5\r\nhello\r\n0\r\nnot a field\r\n\r\n", 400,
     "bad trailer line"),
    ("Content-Length and chunked", [("Content-Type", PROTOBUF), ("Content-Length", "5"),
                                    ("Transfer-Encoding", "chunked")], _chunked(b"hello"), 400,
     "both Content-Length and Transfer-Encoding"),
    ("gzip transfer coding alone", [("Content-Type", PROTOBUF), ("Transfer-Encoding", "gzip")], b"hello", 400,
     "does not end in chunked"),
    ("identity transfer coding", [("Content-Type", PROTOBUF), ("Transfer-Encoding", "identity")], b"hello", 400,
     "does not end in chunked"),
    ("chunked then gzip", [("Content-Type", PROTOBUF), ("Transfer-Encoding", "chunked, gzip")], b"hello", 400,
     "does not end in chunked"),
    ("gzip then chunked", [("Content-Type", PROTOBUF), ("Transfer-Encoding", "gzip, chunked")], _chunked(b"x"),
     501, "transfer coding \"gzip\" is not implemented"),
    ("chunked twice", [("Content-Type", PROTOBUF), ("Transfer-Encoding", "chunked"),
                       ("Transfer-Encoding", "chunked")], _chunked(b"x"), 400, "chunked more than once"),
    ("space before the colon", [("Content-Type", PROTOBUF), ("Transfer-Encoding ", "chunked")], _chunked(b"x"),
     400, "malformed header section"),
    ("duplicated Content-Length", [("Content-Type", PROTOBUF), ("Content-Length", "5"), ("Content-Length", "5")],
     b"hello", 400, "Content-Length sent more than once"),
    ("Content-Length list", [("Content-Type", PROTOBUF), ("Content-Length", "5, 5")], b"hello", 400,
     "Content-Length sent more than once"),
    ("negative Content-Length", [("Content-Type", PROTOBUF), ("Content-Length", "-1")], b"hello", 400,
     "bad Content-Length"),
    ("Content-Length with a sign", [("Content-Type", PROTOBUF), ("Content-Length", "+5")], b"hello", 400,
     "bad Content-Length"),
    ("Content-Length with an underscore", [("Content-Type", PROTOBUF), ("Content-Length", "0_5")], b"hello", 400,
     "bad Content-Length"),
    ("hex Content-Length", [("Content-Type", PROTOBUF), ("Content-Length", "0x5")], b"hello", 400,
     "bad Content-Length"),
]


@pytest.mark.parametrize("case,headers,body,status,fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_framing_on_the_receiver(small: RunningDaemon, case: str, headers: list[tuple[str, str]],
                                         body: bytes, status: int, fragment: str) -> None:
    """Each framing error gets its precise status and message (a google.rpc.Status), closes the connection, is
    counted as refused (bad_framing), stores nothing, and the receiver serves a good request afterwards."""
    answer = _exchange(_port(small), _head("/v1/traces", headers) + body)
    assert answer.status == status, answer.message
    assert fragment in answer.message
    assert answer.headers.get("Connection") == "close"
    assert _refused(small, "bad_framing") == 1
    assert _serves_good_request(_port(small))
    assert small.sql("SELECT count(*) FROM spans") == [(1,)]


def test_transfer_encoding_in_http_1_0_is_refused(small: RunningDaemon) -> None:
    answer = _exchange(_port(small), _head("/v1/traces", CHUNKED, version="HTTP/1.0") + _chunked(GOOD))
    assert answer.status == 400 and "HTTP/1.0" in answer.message
    assert _refused(small, "bad_framing") == 1 and small.sql("SELECT count(*) FROM spans") == [(0,)]


def test_body_ending_before_the_last_chunk_is_refused(small: RunningDaemon) -> None:
    """A chunked body cut short (the client ends its side): 400, not a request made of what came."""
    answer = _exchange(_port(small), _head("/v1/traces", CHUNKED) + b"%x\r\n" % len(GOOD) + GOOD + b"\r\n",
                       end_writes=True)
    assert answer.status == 400 and "body ended before its last chunk" in answer.message
    assert _refused(small, "bad_framing") == 1 and small.sql("SELECT count(*) FROM spans") == [(0,)]


def test_framing_errors_on_other_paths_are_refused_before_routing(small: RunningDaemon) -> None:
    """The framing is checked before the route (a 404 path too), so no route answers over an unreadable body."""
    answer = _exchange(_port(small), _head("/nowhere", [("Transfer-Encoding", "gzip")]) + b"hello")
    assert answer.status == 400 and answer.headers.get("Connection") == "close"
    assert _refused(small, "bad_framing") == 1


def test_valid_chunked_framing_is_accepted_and_keeps_the_connection(small: RunningDaemon) -> None:
    """Extensions (token and quoted values, BWS), trailers, mixed-case `Chunked` and several chunks: stored, and
    the connection is left exactly at the next request (two requests on one connection)."""
    half = len(GOOD) // 2
    body = (b"%x;name=value\r\n%s\r\n" % (half, GOOD[:half])
            + b"%X ; ext = \"quoted \\\" value\" ;flag\r\n%s\r\n" % (len(GOOD) - half, GOOD[half:])
            + b"0\r\nX-Checksum: abc\r\nX-Other:\r\n\r\n")
    second = request(span(attrs={"data.row_count": 2})).SerializeToString()
    with socket.create_connection(("127.0.0.1", _port(small)), timeout=30) as sock:
        sock.sendall(_head("/v1/traces", {"Content-Type": PROTOBUF, "Transfer-Encoding": "Chunked"}) + body)
        assert _read_answer(sock).status == 200
        sock.sendall(_head("/v1/traces", CHUNKED) + _chunked(second))
        second_answer = _read_answer(sock)
        assert second_answer.status == 200 and second_answer.headers.get("Connection") != "close"
    assert small.sql("SELECT count(*) FROM spans") == [(2,)]
    assert _refused(small, "bad_framing") == 0


# -- the limit, however the body is framed --------------------------------------------------------------------

def test_body_over_the_limit_is_413_for_every_framing(small: RunningDaemon) -> None:
    """Content-Length, one big chunk, many small chunks, a Content-Length too long for any integer, gzip (one
    member, and many members each under the limit): 413, counted as too_large like any oversize request."""
    big = b"\x00" * (LIMIT + 1)
    member = gzip.compress(b"\x00" * (LIMIT // 2 + 1))
    cases = [
        _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": str(len(big))}) + big,
        _head("/v1/traces", CHUNKED) + _chunked(big),
        _head("/v1/traces", CHUNKED) + _chunked(*[b"\x00" * 1024] * (LIMIT // 1024 + 1)),
        _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": "9" * 30}),
        _head("/v1/traces", {**CHUNKED, "Content-Encoding": "gzip"}) + _chunked(gzip.compress(b"\x00" * LIMIT * 50)),
        _head("/v1/traces", {**CHUNKED, "Content-Encoding": "gzip"}) + _chunked(member * 3),
    ]
    for raw in cases:
        answer = _exchange(_port(small), raw)
        assert answer.status == 413, answer.message
        assert f"over the limit of {LIMIT} bytes" in answer.message
    assert "30-digit" in _exchange(_port(small), cases[3]).message
    assert _refused(small, "too_large") == len(cases) + 1
    assert _refused(small, "bad_framing") == 0
    assert _serves_good_request(_port(small))


def test_every_gzip_member_is_decompressed(small: RunningDaemon) -> None:
    """A multi-member gzip body (two requests' bytes, each compressed on its own) stores the spans of both
    members: stopping after the first would drop the second without a word."""
    first = request(span(attrs={"data.row_count": 1})).SerializeToString()
    second = request(span(attrs={"data.row_count": 2})).SerializeToString()
    body = gzip.compress(first) + gzip.compress(second)  # protobuf: concatenated messages merge
    answer = _exchange(_port(small), _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Encoding": "gzip",
                                                          "Content-Length": str(len(body))}) + body)
    assert answer.status == 200
    assert sorted(small.sql("SELECT value FROM span_numbers")) == [(1.0,), (2.0,)]
    garbage = gzip.compress(first) + b"trailing garbage"
    answer = _exchange(_port(small), _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Encoding": "gzip",
                                                          "Content-Length": str(len(garbage))}) + garbage)
    assert answer.status == 400 and "not valid gzip" in answer.message


# -- the admin server -----------------------------------------------------------------------------------------

def _admin_port(d: RunningDaemon) -> int:
    assert d.daemon.admin.port is not None
    return d.daemon.admin.port


@pytest.mark.parametrize("headers,body,status", [
    ({"Transfer-Encoding": "chunked"}, b"-1\r\n" + b"x" * 1000, 400),
    ({"Transfer-Encoding": "chunked"}, b"-10\r\n" + b"x" * 1000, 400),
    ({"Transfer-Encoding": "chunked", "Content-Length": "5"}, _chunked(b'{"sql": "SELECT 1"}'), 400),
    ({"Transfer-Encoding": "gzip, chunked"}, b"a\r\n0123456789\r\n0\r\n\r\n", 501),
    ({"Transfer-Encoding": "chunked"}, b"100001\r\n" + b"x" * 1000, 413),
])
def test_hostile_framing_on_admin_query(daemon: RunningDaemon, headers: dict[str, str], body: bytes,
                                        status: int) -> None:
    """Admin POST /query shares the framing code: the same answers, and a good query works afterwards."""
    answer = _exchange(_admin_port(daemon), _head("/query", {"Content-Type": "application/json", **headers}) + body)
    assert answer.status == status, answer.body
    good = json.dumps({"sql": "SELECT 42 AS answer"}).encode()
    answer = _exchange(_admin_port(daemon), _head("/query", {"Content-Type": "application/json",
                                                            "Content-Length": str(len(good))}) + good)
    assert answer.status == 200 and json.loads(answer.body)["rows"] == [[42]]


# -- a stalled body ---------------------------------------------------------------------------------------------

@pytest.fixture
def echo_server() -> Iterator[HttpServer]:
    """A bare HttpServer whose route reads the body, with a short idle timeout."""

    def echo(req: Request) -> Response:
        return text(200, f"{len(req.read_body(1024))} bytes")

    server = HttpServer("echo", "127.0.0.1:0", {"/echo": echo}, idle_timeout=0.5)
    server.start()
    yield server
    server.shutdown(1)


def test_stalled_body_is_408_not_500(echo_server: HttpServer) -> None:
    """A body that stops coming (fewer bytes than its Content-Length, the client waiting) gets 408 once the idle
    timeout passes, not an internal error."""
    assert echo_server.port is not None
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=30) as sock:
        sock.sendall(_head("/echo", {"Content-Length": "10"}) + b"abc")
        answer = _read_answer(sock)
    assert answer.status == 408 and "the body stalled" in answer.message
    assert _exchange(echo_server.port, _head("/echo", {"Content-Length": "3"}) + b"abc").message == "3 bytes\n"


# -- the decoder running out of memory ----------------------------------------------------------------------------

def test_decoder_memory_error_is_resource_exhausted_and_413(daemon: RunningDaemon,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError while decoding (an allocation the C decoder, protobuf or Arrow could not make: the allocator
    is the boundary simulated here) is RESOURCE_EXHAUSTED / 413 and counted, never UNKNOWN / 500."""

    def no_memory(*args: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr("evaluator.receiver.ingest.decode_bytes", no_memory)
    monkeypatch.setattr("evaluator.receiver.ingest.decode_message", no_memory)
    with pytest.raises(grpc.RpcError) as err:
        daemon.export(GOOD)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "not enough memory" in err.value.details()
    port = _port(daemon)
    answer = _exchange(port, _head("/v1/traces", {"Content-Type": PROTOBUF, "Content-Length": str(len(GOOD))})
                       + GOOD)
    assert answer.status == 413 and "not enough memory" in answer.message
    body = b'{"resourceSpans": []}'
    answer = _exchange(port, _head("/v1/traces", {"Content-Type": "application/json",
                                                  "Content-Length": str(len(body))}) + body)
    assert answer.status == 413
    monkeypatch.setattr("evaluator.receiver.http_server.parse_json_request", no_memory)
    answer = _exchange(port, _head("/v1/traces", {"Content-Type": "application/json",
                                                  "Content-Length": str(len(body))}) + body)
    assert answer.status == 413
    refused = daemon.daemon.telemetry.get("requests_refused_total")
    assert refused.value(transport="grpc", reason="out_of_memory") == 1
    assert refused.value(transport="http", reason="out_of_memory") == 3


# -- memory: a chunk size of -1 must not read to the end of the connection -----------------------------------------

def _peak_rss(pid: int) -> int:
    """The process's peak RSS (VmHWM) where Linux tells it, else its current RSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.Process(pid).memory_info().rss)


def _rss_growth_while_sending(pid: int, port: int, head: bytes, payload_mib: int) -> tuple[int, int]:
    """Send head + payload_mib MiB (in 1 MiB pieces of one buffer: the client holds 1 MiB) while sampling the
    server's RSS; returns (the largest growth seen, the answer's status)."""
    process = psutil.Process(pid)
    baseline = max(int(process.memory_info().rss), _peak_rss(pid))
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(int(process.memory_info().rss))
            done.wait(0.005)

    def send(sock: socket.socket) -> None:
        piece = b"x" * (1024 * 1024)
        try:
            sock.sendall(head)
            for _ in range(payload_mib):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed: the rest is not needed

    sampler = threading.Thread(target=sample)
    sampler.start()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sender = threading.Thread(target=send, args=(sock,))
        sender.start()
        status = _read_answer(sock).status
        sender.join()
    done.set()
    sampler.join()
    return max([*samples, _peak_rss(pid)]) - baseline, status


@pytest.mark.slow
@pytest.mark.parametrize("server,path", [("http", "/v1/traces"), ("admin", "/query")])
def test_negative_chunk_size_does_not_grow_memory(tmp_path: Path, server: str, path: str) -> None:
    """`-1` as a chunk size used to read to the end of the connection with no limit (a 300 MiB body grew the
    daemon by 298 MiB). Against the real daemon process: 64 MiB sent after `-1` grow it by far less than that."""
    ports = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    with daemon_process(["--db", str(tmp_path / "ev.duckdb"), *ports]) as proc:
        assert proc.proc is not None
        port = proc.ports[server]
        head = _head(path, {"Content-Type": PROTOBUF if server == "http" else "application/json",
                            "Transfer-Encoding": "chunked"}) + b"-1\r\n"
        _rss_growth_while_sending(proc.proc.pid, port, head, 1)  # warm up: first-use allocations
        growth, status = _rss_growth_while_sending(proc.proc.pid, port, head, 64)
        assert status == 400
        assert growth < 16 * 1024 * 1024, f"the daemon grew by {growth / 2**20:.1f} MiB"
        assert _serves_good_request(proc.ports["http"])
