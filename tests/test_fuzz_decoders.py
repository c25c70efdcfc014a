"""Adversarial input for every decoder: a request is decoded or refused with DecodeError, nothing else, ever.

tests/test_fastdecode.py already checks that the C decoder and the reference agree on valid requests and on
random mutations of them. This file goes after structures built to hurt: AnyValue nesting thousands deep, lengths
that promise gigabytes, varints past 64 bits, known fields with the wrong wire type, every truncation point,
random bytes; and for OTLP/JSON wrong types at any node, huge numbers, bad hex ids, deep nesting, invalid UTF-8
and non-object roots. Every decoded result also goes through the per-span limits, and its counts must add up.
The last test sends such bodies to a running daemon over gRPC and HTTP and checks that each gets an answer and
the daemon still works afterwards.

CI (CI=true) runs fewer examples, derandomized, to stay well under 20 s (about 5 s on two cores).
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import TRACE_EXPORT, RunningDaemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from spans import request, span
from wire import fx64, ld, tag, varint

from evaluator.receiver.columns import Decoded
from evaluator.receiver.decode import DecodeError
from evaluator.receiver.fastdecode import decode_bytes, decode_bytes_python, decode_message
from evaluator.receiver.limits import SpanLimits, apply_limits
from evaluator.receiver.otlp_json import parse_json_request

CI = os.environ.get("CI") == "true"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150" if CI else "400"))  # FUZZ_EXAMPLES=20000: a long hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=CI,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PREFIXES = (("data.", "ml."), None)
T0 = 1_760_000_000_000_000_000


# -- wire-format builders (exact bytes, so the structure can be anything protobuf would never write) ------------
def kv(key: str, value: bytes) -> bytes:
    return ld(1, key) + ld(2, value)


def wire_span(*fields: bytes) -> bytes:
    ids = ld(1, b"\x01" * 16) + ld(2, b"\x02" * 8) + fx64(7, T0) + fx64(8, T0 + 1000)
    return ids + b"".join(fields)


def wire_request(*span_bodies: bytes) -> bytes:
    resource = ld(1, kv("service.name", ld(1, "svc")))
    scope_spans = ld(1, ld(1, "lib")) + b"".join(ld(2, s) for s in span_bodies)
    return ld(1, ld(1, resource) + ld(2, scope_spans))


def nested(kinds: list[str], leaf: bytes) -> bytes:
    """An AnyValue nested through the given kinds (array or kvlist), innermost last."""
    value = leaf
    for kind in reversed(kinds):
        value = ld(5, ld(1, value)) if kind == "array" else ld(6, ld(1, kv("k", value)))
    return value


# -- the property -------------------------------------------------------------------------------------------------
def _check(decoded: Decoded) -> None:
    """A decoded result is consistent, and the per-span limits apply to it without error."""
    cols = decoded.columns
    n = len(cols)
    assert n + decoded.dropped + decoded.rejected == decoded.received
    for table in (cols.numbers, cols.strings, cols.arrays):
        if table.num_rows:
            idx = table.column("span_idx").to_numpy()
            assert idx.min() >= 0 and idx.max() < n
            assert (np.diff(idx) >= 0).all()  # rows of a span are contiguous, spans in order
    for action in ("truncate", "reject"):
        out = apply_limits(decoded, SpanLimits(max_attributes=2, max_value_length=3, action=action),
                           ExportTraceServiceRequest)  # the wire order of an empty request: table order
        limited = out.decoded.columns
        assert len(limited) + out.decoded.rejected + out.decoded.dropped == decoded.received
        counts = np.zeros(len(limited), dtype=np.int64)
        for table in (limited.numbers, limited.strings, limited.arrays):
            if table.num_rows:
                counts += np.bincount(table.column("span_idx").to_numpy(), minlength=len(limited))
        assert counts.max(initial=0) <= 2
        if limited.strings.num_rows:
            assert pc.max(pc.utf8_length(limited.strings.column("value"))).as_py() <= 3


def decodes_or_refuses(data: bytes) -> list[str]:
    """Every protobuf decoder on data: each either decodes (consistently) or raises DecodeError."""
    verdicts = []
    for fn in (decode_bytes, decode_bytes_python):
        for prefixes in PREFIXES:
            try:
                result = fn(data, prefixes)
            except DecodeError:
                verdicts.append("refused")
                continue
            _check(result)
            verdicts.append("decoded")
    assert len(set(verdicts[0::2])) == 1 and len(set(verdicts[1::2])) == 1, verdicts  # C and reference agree
    return verdicts


def json_decodes_or_refuses(body: bytes) -> str:
    try:
        req = parse_json_request(body)
    except DecodeError:
        return "refused"
    for prefixes in PREFIXES:
        _check(decode_message(req, prefixes))
    return "decoded"


# -- protobuf strategies ----------------------------------------------------------------------------------------
KINDS = st.lists(st.sampled_from(["array", "kvlist"]), min_size=1, max_size=400)
LEAVES = st.sampled_from([tag(3, 0) + b"\x01", ld(1, "x" * 10), fx64(4, 0x7FF8000000000000), ld(7, b"\xff"), b""])
HUGE = st.one_of(st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1]),
                 st.integers(0, 2**64 - 1))


@FUZZ
@given(KINDS, LEAVES)
def test_deeply_nested_any_values(kinds: list[str], leaf: bytes) -> None:
    data = wire_request(wire_span(ld(9, kv("data.deep", nested(kinds, leaf)))))
    verdicts = decodes_or_refuses(data)
    if len(kinds) <= 30:  # well within protobuf's nesting limit: this is a valid request
        assert set(verdicts) == {"decoded"}


@pytest.mark.parametrize("depth", [98, 99, 100, 101, 1_000, 5_000])
@pytest.mark.parametrize("kind", ["array", "kvlist", "mixed"])
def test_nesting_far_past_the_limit(kind: str, depth: int) -> None:
    kinds = ["array", "kvlist"] * (depth // 2) if kind == "mixed" else [kind] * depth
    assert set(decodes_or_refuses(wire_request(wire_span(ld(9, kv("data.deep", nested(kinds, b""))))))) == {
        "refused"}


def _lie_at(level: int, declared: int, tail: bytes) -> bytes:
    """A request in which a length-delimited field 1 claims `declared` bytes but is followed by only `tail`: as the
    content of an AnyValue (level 0, string_value), KeyValue (key), Span (trace_id), ScopeSpans (scope),
    ResourceSpans (resource) or the request itself (level 5, resource_spans). Every enclosing length is true."""
    content = tag(1, 2) + varint(declared) + tail
    wrappers: list[Callable[[bytes], bytes]] = [
        lambda c: ld(1, "data.k") + ld(2, c),  # AnyValue -> KeyValue
        lambda c: wire_span() + ld(9, c),  # KeyValue -> Span
        lambda c: ld(2, c),  # Span -> ScopeSpans
        lambda c: ld(2, c),  # ScopeSpans -> ResourceSpans
        lambda c: ld(1, c),  # ResourceSpans -> request
    ]
    for wrap in wrappers[level:]:
        content = wrap(content)
    return content


@FUZZ
@given(st.integers(0, 5), HUGE, st.binary(max_size=16))
def test_declared_lengths_past_the_data(level: int, declared: int, tail: bytes) -> None:
    verdicts = decodes_or_refuses(_lie_at(level, declared, tail))
    if declared > len(tail):
        assert set(verdicts) == {"refused"}


VARINTS = st.one_of(
    st.integers(0, 2**64 - 1).map(varint),
    st.integers(1, 14).map(lambda k: b"\xff" * k + b"\x01"),  # 64 bits and past them
    st.integers(1, 14).map(lambda k: b"\x80" * k + b"\x00"),  # non-minimal
    st.integers(1, 14).map(lambda k: b"\xff" * k),  # never ends
)


@FUZZ
@given(st.sampled_from([(6, "span.kind"), (7, "span.start"), (8, "span.end"), (1, "span.trace_id"),
                        (9, "span.attributes"), (15, "span.status"), (99, "unknown")]),
       st.integers(0, 7), VARINTS, st.binary(max_size=12))
def test_wrong_wire_types_and_varint_overflow(field: tuple[int, str], wire_type: int, number: bytes,
                                              payload: bytes) -> None:
    """A known span field (or an unknown one) with any wire type, followed by a varint of any shape."""
    body = tag(field[0], wire_type) + number + payload
    decodes_or_refuses(wire_request(wire_span(body, ld(9, kv("data.x", tag(3, 0) + number)))))
    decodes_or_refuses(wire_request(wire_span(ld(9, kv("data.x", body)))))  # the same inside an AnyValue
    decodes_or_refuses(body)  # and at the top level


def _valid_wire() -> bytes:
    attrs = b"".join(ld(9, kv(k, v)) for k, v in (
        ("data.n", tag(3, 0) + varint(7)), ("data.s", ld(1, "é" * 5)), ("data.d", fx64(4, 0x3FF0000000000000)),
        ("data.arr", ld(5, ld(1, tag(3, 0) + b"\x01") + ld(1, ld(1, "x")))),
        ("data.kv", nested(["kvlist", "array"], ld(1, "deep"))), ("data.b", ld(7, b"\x00\xff"))))
    return wire_request(wire_span(attrs, ld(5, "name"), ld(15, ld(2, "msg") + tag(3, 0) + b"\x02")),
                        wire_span(ld(9, kv("other", tag(3, 0) + b"\x01"))))


VALID_WIRE = _valid_wire()


def test_every_truncation_point() -> None:
    assert set(decodes_or_refuses(VALID_WIRE)) == {"decoded"}
    for cut in range(len(VALID_WIRE)):
        decodes_or_refuses(VALID_WIRE[:cut])


@FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(st.integers(0, len(VALID_WIRE)), st.binary(min_size=1, max_size=64))
def test_random_bytes_inside_a_valid_request(pos: int, junk: bytes) -> None:
    decodes_or_refuses(VALID_WIRE[:pos] + junk + VALID_WIRE[pos:])
    decodes_or_refuses(VALID_WIRE[:pos] + junk)


# -- OTLP/JSON strategies ---------------------------------------------------------------------------------------
HEX = "0123456789abcdef"


def _skeleton() -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{"scope": {"name": "lib"}, "spans": [{
            "traceId": "01" * 16, "spanId": "02" * 8, "parentSpanId": "", "name": "run", "kind": 1,
            "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 1000),
            "status": {"code": 1, "message": ""},
            "attributes": [
                {"key": "data.n", "value": {"intValue": "7"}},
                {"key": "data.d", "value": {"doubleValue": 1.5}},
                {"key": "data.s", "value": {"stringValue": "x"}},
                {"key": "data.a", "value": {"arrayValue": {"values": [{"intValue": 1}, {"stringValue": "y"}]}}},
                {"key": "data.kv", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"boolValue": True}}]}}},
                {"key": "data.b", "value": {"bytesValue": "AAE="}}]}]}]}]}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


SKELETON_PATHS = _paths(_skeleton())[1:]
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.sampled_from([2**64, 2**63, -1, 1e308, -0.0]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.text(alphabet=HEX + "xyzXYZ-", max_size=40),  # ids that are almost hex
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 30, "0x10", "", "AAE=", "\ud800"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["key", "value", "values", "stringValue", "intValue", "arrayValue", "kvlistValue", "x", "\ud800"]), inner,
        max_size=4)),
    max_leaves=12)


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SKELETON_PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_json_wrong_types_anywhere(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = _skeleton()
    for path, value in changes:
        try:
            _replace(doc, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier change removed the path
            continue
    json_decodes_or_refuses(json.dumps(doc).encode())


@FUZZ
@given(JSON_VALUES)
def test_json_any_root(value: Any) -> None:
    assert json_decodes_or_refuses(json.dumps(value).encode()) == "refused" or isinstance(value, dict)


@FUZZ
@given(st.integers(1, 60_000), st.sampled_from(["[", '{"a":', '{"kvlistValue":{"values":[{"key":"k","value":',
                                                  '{"arrayValue":{"values":[']),
       st.booleans())
def test_json_deep_nesting(depth: int, opener: str, inside: bool) -> None:
    closer = {"[": "]", '{"a":': "}", '{"arrayValue":{"values":[': "]}}"}.get(opener, "}]}}")
    value = opener * depth + '{"intValue":1}' + closer * depth
    # alone, or as the value of an attribute
    body = json.dumps(_skeleton()).replace('{"intValue": "7"}', value) if inside else value
    json_decodes_or_refuses(body.encode())


@FUZZ
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_json_invalid_utf8_and_bytes(pos: int, junk: bytes) -> None:
    text = json.dumps(_skeleton()).encode()
    json_decodes_or_refuses(text[:pos] + junk + text[pos:])
    json_decodes_or_refuses(text[:pos])


def test_json_known_hard_cases() -> None:
    doc = json.dumps(_skeleton())
    for body in (b"", b"\xff\xfe", b"\xef\xbb\xbf{}", b"1e99999", b"[" * 200_000,
                 b'{"resourceSpans": 1' + b"9" * 5000 + b"}",
                 doc.replace('"7"', "9" * 5000).encode(), doc.replace('"01010101', '"zz010101').encode(),
                 doc.replace('"kind": 1', '"kind": 1e400').encode(), b'{"resourceSpans": [null, 1, "x", []]}',
                 b'{"resourceSpans": ["\\ud800"]}', b'{"\\udfff": 1}', doc.replace('"name"', '"na\\ud800me"').encode()):
        json_decodes_or_refuses(body)
    assert json_decodes_or_refuses(doc.encode()) == "decoded"


# -- a running daemon under fuzzed bodies ------------------------------------------------------------------------
def _fuzzed_protobuf(rng: random.Random, n: int) -> list[bytes]:
    base = VALID_WIRE
    out = []
    for i in range(n):
        pick = i % 6
        if pick == 0:
            out.append(rng.randbytes(rng.randint(1, 512)))
        elif pick == 1:
            out.append(base[:rng.randint(0, len(base) - 1)])
        elif pick == 2:
            data = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            out.append(bytes(data))
        elif pick == 3:
            kinds = [rng.choice(["array", "kvlist"]) for _ in range(rng.choice([5, 60, 99, 150, 2000]))]
            out.append(wire_request(wire_span(ld(9, kv("data.deep", nested(kinds, b""))))))
        elif pick == 4:
            out.append(_lie_at(rng.randint(0, 5), rng.choice([2**31, 2**32, 2**64 - 1, rng.randrange(2**40)]),
                               rng.randbytes(8)))
        else:
            field = rng.choice([6, 7, 8, 9, 15])
            out.append(wire_request(wire_span(tag(field, rng.randrange(8)) + b"\xff" * rng.randint(1, 12))))
    return out


def _fuzzed_json(rng: random.Random, n: int) -> list[bytes]:
    doc = json.dumps(_skeleton()).encode()
    out = []
    for i in range(n):
        pick = i % 5
        if pick == 0:
            out.append(doc[:rng.randint(0, len(doc) - 1)])
        elif pick == 1:
            pos = rng.randrange(len(doc))
            out.append(doc[:pos] + rng.randbytes(rng.randint(1, 4)) + doc[pos:])
        elif pick == 2:
            out.append(b"[" * rng.choice([10, 1000, 100_000]))
        elif pick == 3:
            skeleton = _skeleton()
            path = rng.choice(SKELETON_PATHS)
            _replace(skeleton, path, rng.choice([None, [], {}, 2**70, -1, "zz", 1e308, "9" * 40, [[[]]]]))
            out.append(json.dumps(skeleton).encode())
        else:
            out.append(json.dumps(rng.choice([1, "x", None, [], [{}], True])).encode())
    return out


def _post(url: str, body: bytes, content_type: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.read()
        return int(err.code)


def _answered(call: Callable[[bytes], Any], body: bytes) -> str:
    try:
        call(body, timeout=30)
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, body[:64])
        return "invalid"
    return "ok"


def test_daemon_answers_every_fuzzed_body_and_keeps_working(daemon: RunningDaemon) -> None:
    rng = random.Random(8)
    n = 60 if CI else 150
    grpc_answers = []
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        call = channel.unary_unary(TRACE_EXPORT, request_serializer=None,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        for body in _fuzzed_protobuf(rng, n):
            grpc_answers.append(_answered(call, body))
    assert "invalid" in grpc_answers
    url = daemon.http_url + "/v1/traces"
    for body in _fuzzed_protobuf(rng, n):
        assert _post(url, body, "application/x-protobuf") in (200, 400)
    json_codes = [_post(url, body, "application/json") for body in _fuzzed_json(rng, n)]
    assert set(json_codes) <= {200, 400} and 400 in json_codes

    # still fine: a valid export is stored, and the daemon is ready
    good = span(attrs={"data.after_fuzz": 1})
    response = daemon.export(request(good))
    assert not response.HasField("partial_success")
    assert daemon.sql("SELECT count(*) FROM spans WHERE span_id = ?", [good.span_id.hex()]) == [(1,)]
    with urllib.request.urlopen(daemon.admin_url + "/readyz", timeout=10) as resp:
        assert resp.status == 200
    refused = daemon.daemon.telemetry.get("requests_refused_total")
    assert refused.value(transport="grpc", reason="undecodable") == grpc_answers.count("invalid")


@pytest.mark.parametrize("size_bytes", [5, 6, 7, 10, 11])
@pytest.mark.parametrize("field", [5, 6, 99])  # a string field, a varint field with the wrong wire type, unknown
def test_lengths_take_at_most_five_bytes(field: int, size_bytes: int) -> None:
    """Found by test_wrong_wire_types_and_varint_overflow: the C decoder read a length (of 0) written in 6+ bytes,
    which upb refuses; and an AnyValue the C decoder hands to Python raised protobuf's own DecodeError."""
    length = b"\x80" * (size_bytes - 1) + b"\x00"
    verdicts = decodes_or_refuses(wire_request(wire_span(tag(field, 2) + length, ld(9, kv("data.x", b"")))))
    assert set(verdicts) == {"decoded" if size_bytes <= 5 else "refused"}
    decodes_or_refuses(wire_request(wire_span(ld(9, kv("data.x", ld(6, b"") + tag(field, 2) + length)))))
