"""The C decoder (receiver._fastdecode via fastdecode.decode_bytes) against the reference.

The reference is `columns_from_batch(decode_request(ExportTraceServiceRequest.FromString(data), prefixes))` (upb
parses, Python flattens, pyarrow converts the lists); `fastdecode.decode_bytes_python` is exactly that plus the
DecodeError wrapping. Every comparison is of the whole Decoded: the schema of each of the four tables, every
cell of every column (value *and* type, so 0.0 vs -0.0 or a NaN payload would fail), the counts and the reasons.
The C tables are also validated in full by Arrow (offsets, UTF-8, bitmaps).
"""

from __future__ import annotations

import contextlib
import gc
import math
import struct
import sys
import tracemalloc
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from wire import fx64, ld, tag, varint, vi

from evaluator.receiver import fastdecode
from evaluator.receiver.columns import ARRAY_SCHEMA, NUMBER_SCHEMA, SPAN_SCHEMA, STRING_SCHEMA, Decoded
from evaluator.receiver.decode import DecodeError, decode_request, rejection_message
from evaluator.receiver.fastdecode import decode_bytes, decode_bytes_python, decode_message

needs_c = pytest.mark.skipif(
    not fastdecode.ACCELERATED,
    reason="the C extension evaluator.receiver._fastdecode did not build (no compiler?); fallback in use",
)

PREFIXES: list[tuple[str, ...] | None] = [None, ("data.", "ml."), (), ("",), ("ml.score",)]
TRACE = bytes(range(1, 17))
SPAN = bytes(range(1, 9))
T0 = 1_700_000_000_123_456_789


# --------------------------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------------------------
def canon(x: Any) -> Any:
    """A structure that compares equal only if values and types are identical (floats by repr: -0.0, nan)."""
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, int):
        return ("int", x)
    if isinstance(x, float):
        return ("float", repr(x))
    if isinstance(x, str):
        return ("str", x)
    if x is None:
        return None
    if isinstance(x, list):
        return [canon(i) for i in x]
    if isinstance(x, dict):
        return {k: canon(v) for k, v in x.items()}
    raise TypeError(type(x))


BOTH_PARAM = pytest.mark.parametrize("decode", [decode_bytes_python, decode_bytes], ids=["reference", "c"])
SCHEMAS = {"spans": SPAN_SCHEMA, "numbers": NUMBER_SCHEMA, "strings": STRING_SCHEMA, "arrays": ARRAY_SCHEMA}


def column_values(col: pa.ChunkedArray) -> list[Any]:
    """The cells of a column as Python values (timestamps as integer microseconds: datetime stops at 9999)."""
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    return col.to_pylist()


def tables_of(r: Decoded) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, schema in SCHEMAS.items():
        table = getattr(r.columns, name)
        assert isinstance(table, pa.Table)
        assert table.schema == schema and table.schema.metadata is None, name
        table.validate(full=True)
        out[name] = {col: column_values(table.column(col)) for col in table.column_names}
    return out


def outcome(fn: Any, data: bytes, prefixes: tuple[str, ...] | None) -> Any:
    try:
        r = fn(data, prefixes)
    except DecodeError:
        return "DecodeError"
    assert type(r) is Decoded
    return canon({"tables": tables_of(r), "received": r.received, "dropped": r.dropped,
                  "rejected": r.rejected, "reasons": r.reasons, "message": r.error_message()})


def same(data: bytes, prefixes: tuple[str, ...] | None = None) -> Any:
    """Asserts the C path and the reference agree; returns the (canonical) outcome."""
    want = outcome(decode_bytes_python, data, prefixes)
    got = outcome(decode_bytes, data, prefixes)
    assert got == want, f"prefixes={prefixes!r} data={data.hex()}"
    return want


def same_all(data: bytes) -> list[Any]:
    return [same(data, p) for p in PREFIXES]


# --------------------------------------------------------------------------------------------------------------
# protobuf builders
# --------------------------------------------------------------------------------------------------------------
def av(**kw: Any) -> AnyValue:
    return AnyValue(**kw)


def arr(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=list(values)))


def kvl(**items: AnyValue) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in items.items()]))


def kv(key: str, value: AnyValue | None = None) -> KeyValue:
    return KeyValue(key=key) if value is None else KeyValue(key=key, value=value)


def span(attrs: list[KeyValue] | None = None, *, trace_id: bytes = TRACE, span_id: bytes = SPAN,
         parent: bytes = b"", name: str = "op", start: int = T0, end: int | None = None, **kw: Any) -> Span:
    sp = Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name, start_time_unix_nano=start,
              end_time_unix_nano=start + 5000 if end is None else end, **kw)
    sp.attributes.extend(attrs if attrs is not None else [kv("ml.score", av(double_value=0.5))])
    return sp


def request(*resources: tuple[list[KeyValue] | None, list[tuple[str | None, list[Span]]]]) -> bytes:
    req = ExportTraceServiceRequest()
    for res_attrs, scopes in resources:
        rs = req.resource_spans.add()
        if res_attrs is not None:
            rs.resource.attributes.extend(res_attrs)
        for scope_name, spans in scopes:
            ss = rs.scope_spans.add()
            if scope_name is not None:
                ss.scope.name = scope_name
            ss.spans.extend(spans)
    return req.SerializeToString()


def one(*spans: Span, res: list[KeyValue] | None = None, scope: str | None = "lib") -> bytes:
    return request((res if res is not None else [kv("service.name", av(string_value="svc"))],
                    [(scope, list(spans))]))


# --------------------------------------------------------------------------------------------------------------
# wire builders (hand-written bytes: any order, duplicates, unknown fields)
# --------------------------------------------------------------------------------------------------------------
def dbl(fn: int, x: float) -> bytes:
    return tag(fn, 1) + struct.pack("<d", x)


def w_span(*fields_: bytes) -> bytes:
    return b"".join(fields_)


def w_req(*spans: bytes, resource: bytes = ld(1, ld(1, "service.name") + ld(2, ld(1, "svc"))),
          scope: bytes = ld(1, "lib")) -> bytes:
    ss = ld(1, scope) + b"".join(ld(2, s) for s in spans)
    return ld(1, ld(1, resource) + ld(2, ss))


def w_kv(key: str, *value_fields: bytes) -> bytes:
    return ld(1, key) + b"".join(ld(2, f) for f in value_fields)


IDS = ld(1, TRACE) + ld(2, SPAN) + fx64(7, T0) + fx64(8, T0 + 1000) + ld(5, "op")


# --------------------------------------------------------------------------------------------------------------
# module basics
# --------------------------------------------------------------------------------------------------------------
def test_accelerated_flag_matches_import() -> None:
    try:
        import evaluator.receiver._fastdecode  # noqa: F401
    except ImportError:
        built = False
    else:
        built = True
    assert fastdecode.ACCELERATED is built


def _c_decode(data: bytes, prefixes: tuple[str, ...] | None = None, *extra: Any) -> Any:
    return fastdecode._c.decode(data, prefixes, fastdecode._resource_from_bytes, fastdecode._value_from_bytes,
                                *extra)


def _walk_column(column: tuple[Any, ...]) -> list[Any]:
    """Every buffer slot of a C column tuple, children included."""
    length, nulls, *rest = column
    assert isinstance(length, int) and isinstance(nulls, int) and 0 <= nulls <= length
    out: list[Any] = []
    for item in rest:
        out.extend(_walk_column(item) if isinstance(item, tuple) else [item])
    return out


@needs_c
def test_c_module_returns_buffers_in_schema_order() -> None:
    tables, received, dropped, rejected, reasons = _c_decode(one(span(), span([])), ("ml.",))
    assert (received, dropped, rejected, reasons) == (2, 1, 0, [])
    assert [len(t) for t in tables] == [len(SPAN_SCHEMA), len(NUMBER_SCHEMA), len(STRING_SCHEMA), len(ARRAY_SCHEMA)]
    for table in tables:
        for column in table:
            for buf in _walk_column(column):
                assert buf is None or type(buf) is fastdecode._c.Buffer
                if buf is not None:
                    view = memoryview(buf)
                    assert view.readonly and view.nbytes == len(buf)
    spans = tables[0]
    assert spans[0][:2] == (1, 0) and bytes(spans[0][4]) == TRACE.hex().encode()  # trace_id: hex written by C
    assert struct.unpack("<2i", bytes(spans[0][3])) == (0, 32)
    assert spans[2][:2] == (1, 1) and bytes(spans[2][2]) == b"\x00"  # parent_span_id: null, in the bitmap
    assert struct.unpack("<q", bytes(spans[5][3])) == (T0 // 1000,)  # start_time: microseconds, int64
    with pytest.raises(TypeError):
        fastdecode._c.Buffer()
    with pytest.raises(TypeError):
        memoryview(spans[0][4])[0] = 0  # read-only


@needs_c
def test_c_decode_creates_no_python_object_per_value() -> None:
    """The common path fills C buffers only: holding the result of 5000 spans costs a few dozen objects."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from bench.payload import make_request

    data = make_request(5000, 3).SerializeToString()
    _c_decode(data, ("ml.", "data."))
    gc.collect()
    gc.disable()
    try:
        blocks = sys.getallocatedblocks()
        out = _c_decode(data, ("ml.", "data."))
        grown = sys.getallocatedblocks() - blocks
    finally:
        gc.enable()
    assert out[1] == 5000 and out[0][0][0][0] == 5000
    assert grown < 300, grown  # ~60 Buffers and tuples; a Python object per value would be 100000+


@needs_c
def test_c_schema_matches_the_installed_protos() -> None:
    """The C validator's schema (which fields are strings, messages, ...) must follow the .proto descriptors."""
    from google.protobuf.descriptor import FieldDescriptor as F

    kinds = {F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_MESSAGE: "message",
             F.TYPE_DOUBLE: "i64", F.TYPE_FIXED64: "i64", F.TYPE_SFIXED64: "i64",
             F.TYPE_FLOAT: "i32", F.TYPE_FIXED32: "i32", F.TYPE_SFIXED32: "i32",
             F.TYPE_INT32: "varint", F.TYPE_INT64: "varint", F.TYPE_UINT32: "varint", F.TYPE_UINT64: "varint",
             F.TYPE_BOOL: "varint", F.TYPE_ENUM: "varint"}
    expected: dict[str, dict[int, tuple[str, str | None]]] = {}

    def walk(desc: Any) -> None:
        if desc.full_name in expected:
            return
        expected[desc.full_name] = {}
        for f in desc.fields:
            sub = f.message_type.full_name if f.message_type else None
            expected[desc.full_name][f.number] = (kinds[f.type], sub)
            if f.message_type:
                walk(f.message_type)

    walk(ExportTraceServiceRequest.DESCRIPTOR)
    assert fastdecode._c._schema() == expected


def test_fallback_wraps_protobuf_errors() -> None:
    with pytest.raises(DecodeError, match=r"\S"):
        decode_bytes_python(b"\x0a\x05\x01", None)
    assert issubclass(DecodeError, ValueError)


def test_fallback_equals_reference() -> None:
    data = one(span(), span(parent=SPAN), span(start=0))
    r = decode_bytes_python(data, None)
    assert r == decode_message(ExportTraceServiceRequest.FromString(data), None)
    ref = decode_request(ExportTraceServiceRequest.FromString(data), None)
    assert (r.received, r.dropped, r.rejected, r.reasons) == (ref.received, ref.dropped, ref.rejected, ref.reasons)
    assert r.error_message() == ref.error_message() != ""
    assert len(r.columns) == len(ref.batch) == 2


@needs_c
def test_c_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="corrupt"):
        decode_bytes(b"\x0a\x05\x01", None)
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_bytes(w_req(w_span(IDS, ld(9, w_kv("k", ld(1, b"\xff"))))), None)


@needs_c
def test_c_rejects_bad_prefixes_type() -> None:
    with pytest.raises(TypeError):
        decode_bytes(one(span()), ["ml."])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_bytes(one(span()), ("ml.", 3))  # type: ignore[arg-type]


@needs_c
def test_c_accepts_buffers() -> None:
    data = one(span())
    assert outcome(decode_bytes, bytearray(data), None) == outcome(decode_bytes, data, None)  # type: ignore[arg-type]
    assert outcome(decode_bytes, memoryview(data), None) == outcome(decode_bytes, data, None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# differential: hand-built requests
# --------------------------------------------------------------------------------------------------------------
VALUES: dict[str, AnyValue] = {
    "str": av(string_value="hello"),
    "str_empty": av(string_value=""),
    "str_unicode": av(string_value="ünïcödé ✓ 𝄞"),
    "bool_t": av(bool_value=True),
    "bool_f": av(bool_value=False),
    "int": av(int_value=-42),
    "int_big": av(int_value=2**63 - 1),
    "int_min": av(int_value=-(2**63)),
    "int_inexact": av(int_value=2**53 + 1),
    "double": av(double_value=3.25),
    "double_negzero": av(double_value=-0.0),
    "double_tiny": av(double_value=5e-324),
    "nan": av(double_value=math.nan),
    "inf": av(double_value=math.inf),
    "ninf": av(double_value=-math.inf),
    "bytes": av(bytes_value=b"\x00\xff\x10"),
    "bytes_empty": av(bytes_value=b""),
    "strindex": av(string_value_strindex=7),
    "strindex_neg": av(string_value_strindex=-3),
    "empty": AnyValue(),
    "arr_nums": arr(av(double_value=1.5), av(int_value=2), av(bool_value=True), av(bool_value=False)),
    "arr_empty": arr(),
    "arr_strs": arr(av(string_value="a"), av(string_value=""), av(string_value="ü")),
    "arr_mixed": arr(av(string_value="a"), av(int_value=1), av(double_value=math.nan), av(bytes_value=b"\x01"),
                     AnyValue(), arr(av(int_value=1)), kvl(x=av(bool_value=True))),
    "arr_nan": arr(av(double_value=1.0), av(double_value=math.nan)),
    "arr_inf": arr(av(double_value=-math.inf)),
    "arr_nested": arr(arr(av(int_value=1)), arr()),
    "arr_empty_elem": arr(AnyValue()),
    "arr_strindex": arr(av(string_value_strindex=1)),
    "arr_double_nonfinite_strings": arr(av(string_value="x"), av(double_value=math.inf)),
    "kvlist": kvl(a=av(string_value="x"), b=av(double_value=math.inf), c=arr(av(int_value=3)),
                  d=av(bytes_value=b"\xab"), e=AnyValue()),
    "kvlist_empty": kvl(),
    "kvlist_unicode": kvl(**{"ключ": av(string_value="значение")}),
}


@needs_c
@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_value_type(name: str) -> None:
    value = VALUES[name]
    for key in ("ml.x", "data.y", "other", ""):
        same_all(one(span([kv(key, value)])))
        same_all(one(span([kv("ml.keep", av(int_value=1)), kv(key, value), kv("z", av(string_value="s"))])))


@needs_c
def test_all_values_in_one_span_and_many_spans() -> None:
    attrs = [kv(f"ml.{n}", v) for n, v in VALUES.items() if n not in {"nan", "inf", "ninf", "arr_nan", "arr_inf"}]
    same_all(one(span(attrs)))
    spans = [span([kv(f"ml.{n}", v)], span_id=(i + 1).to_bytes(8, "big")) for i, (n, v) in enumerate(VALUES.items())]
    outcomes = same_all(one(*spans))
    assert outcomes[1]["rejected"] == ("int", 5)  # nan, inf, -inf, arr_nan, arr_inf


@needs_c
def test_attribute_without_value_and_empty_key() -> None:
    same_all(one(span([kv("ml.k")])))
    same_all(one(span([kv("", av(string_value="v"))])))
    same_all(one(span([])))


@pytest.mark.parametrize(
    "overrides",
    [
        {"trace_id": b""}, {"trace_id": bytes(16)}, {"trace_id": b"\x01" * 15}, {"trace_id": b"\x01" * 17},
        {"span_id": b""}, {"span_id": bytes(8)}, {"span_id": b"\x01" * 7}, {"span_id": b"\x02" * 9},
        {"parent": b"\x03" * 8}, {"parent": b"\x03" * 3}, {"parent": bytes(8)},
        {"start": 0}, {"start": 0, "end": 0}, {"start": 10, "end": 9}, {"start": 1, "end": 1},
        {"start": 999, "end": 1999}, {"start": 2**64 - 1, "end": 2**64 - 1}, {"start": 5, "end": 2**64 - 1},
        {"name": ""}, {"name": "quote'\"\n\t\x00 ✓"}, {"kind": Span.SPAN_KIND_CLIENT}, {"kind": 99},
        {"status": {"code": 2, "message": "boom"}}, {"status": {"message": "m"}}, {"status": {"code": 1}},
        {"trace_state": "a=b"}, {"flags": 0x301},
    ],
)
@needs_c
def test_span_fields_and_validation(overrides: dict[str, Any]) -> None:
    overrides = dict(overrides)
    status = overrides.pop("status", None)
    sp = span(**overrides)
    if status:
        sp.status.code = status.get("code", 0)
        sp.status.message = status.get("message", "")
    same_all(one(sp))
    sp.attributes.append(kv("ml.bad", av(double_value=math.nan)))  # id errors win over attribute errors
    same_all(one(sp))


@needs_c
def test_events_links_and_other_span_fields_are_ignored() -> None:
    sp = span()
    ev = sp.events.add(name="ev", time_unix_nano=5)
    ev.attributes.append(kv("ml.inside_event", av(double_value=math.nan)))
    ln = sp.links.add(trace_id=TRACE, span_id=SPAN, trace_state="x=y")
    ln.attributes.append(kv("ml.link", av(string_value="v")))
    sp.dropped_attributes_count = 3
    sp.dropped_events_count = 4
    sp.dropped_links_count = 5
    same_all(one(sp))


@needs_c
def test_reasons_are_capped_and_counted() -> None:
    spans = [span([kv("ml.x", av(double_value=math.inf))], span_id=(i + 1).to_bytes(8, "big"), name=f"s{i}")
             for i in range(8)]
    spans += [span(span_id=b"")] + [span(trace_id=b"") for _ in range(2)]
    out = same_all(one(*spans))
    assert out[1]["rejected"] == ("int", 11) and len(out[1]["reasons"]) == 5


ROLLBACK_ATTRS = [
    kv("ml.nums", arr(av(double_value=1.5), av(int_value=2))), kv("ml.strs", arr(av(string_value="a"))),
    kv("ml.mixed", arr(av(string_value="b"), av(int_value=3))), kv("ml.s", av(string_value="text")),
    kv("ml.b", av(bytes_value=b"\x01\x02")), kv("ml.kv", kvl(x=av(int_value=1))), kv("ml.n", av(int_value=7)),
]


@pytest.mark.parametrize("bad", ["double", "array"])
@BOTH_PARAM
def test_rejected_span_leaves_nothing_in_any_column(decode: Any, bad: str) -> None:
    """A span rejected for an attribute after others were appended: every attribute column is rolled back, so
    the next span's rows (and list offsets into the child values) are exactly its own."""
    poison = kv("ml.bad", av(double_value=math.nan) if bad == "double" else arr(av(double_value=math.inf)))
    spans_ = [span([*ROLLBACK_ATTRS, poison], span_id=b"\x01" * 8),
              span([*ROLLBACK_ATTRS[::-1], poison, *ROLLBACK_ATTRS], span_id=b"\x02" * 8),
              span([kv("ml.nums", arr(av(int_value=9))), kv("ml.strs", arr(av(string_value="z"))),
                    kv("ml.s", av(string_value="kept"))], span_id=b"\x03" * 8)]
    r = decode(one(*spans_), None)
    assert (r.rejected, len(r.columns)) == (2, 1)
    assert r.columns.arrays.to_pylist() == [
        {"span_idx": 0, "key": "ml.nums", "numbers": [9.0], "strings": None},
        {"span_idx": 0, "key": "ml.strs", "numbers": None, "strings": ["z"]},
    ]
    assert r.columns.strings.to_pylist() == [{"span_idx": 0, "key": "ml.s", "value": "kept"}]
    assert r.columns.numbers.num_rows == 0
    same_all(one(*spans_))


@needs_c
def test_dropped_spans_are_not_validated() -> None:
    spans = [span([kv("other", av(double_value=math.nan))], trace_id=b""),
             span([kv("ml.a", av(int_value=1))]), span([]), span([kv("x", arr(av(double_value=math.inf)))])]
    out = same_all(one(*spans))
    assert out[1]["dropped"] == ("int", 3)


@needs_c
def test_multiple_resources_and_scopes() -> None:
    r1 = [kv("service.name", av(string_value="a")), kv("host", av(int_value=3)), kv("f", av(double_value=math.nan)),
          kv("l", arr(av(int_value=1), av(string_value="x"))), kv("k", kvl(z=av(bytes_value=b"\x01"))),
          kv("service.name", av(string_value="b"))]
    r2 = [kv("service.name", av(int_value=5))]
    data = request(
        (r1, [("s1", [span(), span([kv("drop", av(int_value=1))])]), (None, [span(name="b")]), ("", [])]),
        (r2, [("s2", [span(trace_id=b"")]), ("s3", [span()])]),
        (None, [("s4", [span()])]),
        ([], []),
        ([kv("service.name", av(string_value="only-dropped"))], [("s5", [span([])])]),
        ([kv("ünï", av(string_value="✓")), kv("service.name", AnyValue())], [("ü", [span()])]),
    )
    same_all(data)


@needs_c
def test_empty_and_tiny_requests() -> None:
    same_all(b"")
    same_all(ExportTraceServiceRequest().SerializeToString())
    same_all(request((None, [])))
    same_all(request((None, [(None, [])])))
    same_all(request((None, [(None, [Span()])])))


@needs_c
def test_large_request_like_the_bench() -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from bench.payload import make_request

    data = make_request(5000, 3).SerializeToString()  # enough spans/attributes to grow the C column buffers
    out = same_all(data)
    assert out[1]["received"] == ("int", 5000) and len(out[1]["tables"]["spans"]["trace_id"]) == 5000


# --------------------------------------------------------------------------------------------------------------
# field order, duplicates, merges, unknown fields (hand-written wire bytes)
# --------------------------------------------------------------------------------------------------------------
WIRE_CASES: dict[str, bytes] = {
    "plain": w_req(w_span(IDS, ld(9, w_kv("ml.a", dbl(4, 1.5))))),
    "attrs_before_ids": w_req(w_span(ld(9, w_kv("ml.a", vi(3, 7))), ld(9, w_kv("x", ld(1, "s"))), IDS)),
    "reversed_span_fields": w_req(w_span(ld(5, "op"), fx64(8, T0 + 1), fx64(7, T0), ld(2, SPAN), ld(1, TRACE),
                                         ld(9, w_kv("ml.a", vi(2, 1))))),
    "dup_scalars_last_wins": w_req(w_span(ld(1, b"x"), ld(2, b""), IDS, ld(5, "first"), ld(5, "second"),
                                          vi(6, 1), vi(6, 3), fx64(7, 1), fx64(7, T0 + 2),
                                          ld(9, w_kv("ml.a", dbl(4, 1))))),
    "dup_ids_last_invalid": w_req(w_span(IDS, ld(1, b"short"), ld(9, w_kv("ml.a", dbl(4, 1))))),
    "status_merge": w_req(w_span(IDS, ld(15, vi(3, 2) + ld(2, "first")), ld(15, ld(2, "second")),
                                 ld(9, w_kv("ml.a", dbl(4, 1))))),
    "status_merge_code_zeroed": w_req(w_span(IDS, ld(15, vi(3, 2) + ld(2, "m")), ld(15, vi(3, 0) + ld(2, "")),
                                             ld(9, w_kv("ml.a", dbl(4, 1))))),
    "status_code_negative_and_huge": w_req(w_span(IDS, ld(15, vi(3, -5)), vi(6, 2**40 + 3),
                                                  ld(9, w_kv("ml.a", dbl(4, 1))))),
    "kind_negative": w_req(w_span(IDS, vi(6, -1), ld(9, w_kv("ml.a", dbl(4, 1))))),
    "kv_value_before_key": w_req(w_span(IDS, ld(9, ld(2, ld(1, "v")) + ld(1, "ml.k")))),
    "kv_two_keys": w_req(w_span(IDS, ld(9, ld(1, "ml.first") + ld(2, vi(3, 1)) + ld(1, "other")))),
    "kv_two_keys_keep_by_last": w_req(w_span(IDS, ld(9, ld(1, "other") + ld(2, vi(3, 1)) + ld(1, "ml.k")))),
    "kv_two_values_scalar": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(1, "s"), vi(3, 9))))),
    "kv_two_values_arrays_merge": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, vi(3, 1))),
                                                               ld(5, ld(1, dbl(4, 2.5))))))),
    "kv_two_values_arrays_strings": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, ld(1, "a"))),
                                                                 ld(5, ld(1, ld(1, "b"))))))),
    "kv_values_array_string_array": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, vi(3, 1))), ld(1, "s"),
                                                                 ld(5, ld(1, vi(3, 2))))))),
    "kv_values_array_then_nan_array": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, dbl(4, math.nan))),
                                                                   ld(5, ld(1, vi(2, 1))))))),
    "kv_values_kvlist_merge": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(6, ld(1, w_kv("a", vi(3, 1)))),
                                                           ld(6, ld(1, w_kv("b", vi(3, 2)))))))),
    "kv_values_array_then_kvlist": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, vi(3, 1))),
                                                                ld(6, ld(1, w_kv("b", vi(3, 2)))))))),
    "kv_values_string_then_empty": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(1, "s"), b"")))),
    "anyvalue_two_members": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(1, "s") + dbl(4, 2.0))))),
    "anyvalue_member_then_unknown": w_req(w_span(IDS, ld(9, w_kv("ml.k", dbl(4, 2.0) + vi(99, 1))))),
    "anyvalue_array_run": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, vi(3, 1))) + ld(1, "s") +
                                                       ld(5, ld(1, vi(3, 2))) + vi(50, 0) + ld(5, ld(1, vi(3, 3))))))),
    "anyvalue_array_wrong_wiretype_not_member": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, vi(3, 1))) +
                                                                           vi(5, 3) + fx64(1, 0))))),
    "anyvalue_bool_big": w_req(w_span(IDS, ld(9, w_kv("ml.k", vi(2, 256))))),
    "anyvalue_int_10_bytes": w_req(w_span(IDS, ld(9, w_kv("ml.k", tag(3, 0) + b"\xff" * 9 + b"\x7f")))),
    "anyvalue_double_as_varint_unknown": w_req(w_span(IDS, ld(9, w_kv("ml.k", vi(4, 5))))),
    "anyvalue_string_as_fixed_unknown": w_req(w_span(IDS, ld(9, w_kv("ml.k", fx64(1, 5))))),
    "anyvalue_strindex_last": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(1, "s") + vi(8, 12))))),
    "array_element_two_members": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, ld(1, ld(1, "s") + vi(3, 4)) +
                                                                     ld(1, vi(3, 4) + ld(1, "t"))))))),
    "array_element_unknown_fields": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, vi(7, 1) + ld(1, vi(3, 4)) +
                                                                         ld(2, b"zz") + ld(1, b"")))))),
    "array_elements_as_wrong_wiretype": w_req(w_span(IDS, ld(9, w_kv("ml.k", ld(5, vi(1, 4) + ld(1, vi(3, 1))))))),
    "span_ids_wrong_wiretype": w_req(w_span(vi(1, 5), ld(2, SPAN), ld(1, TRACE), fx64(7, T0), vi(8, T0),
                                            ld(9, w_kv("ml.a", vi(3, 1))))),
    "span_start_as_varint_is_unknown": w_req(w_span(ld(1, TRACE), ld(2, SPAN), vi(7, T0),
                                                    ld(9, w_kv("ml.a", vi(3, 1))))),
    "attributes_as_varint_unknown": w_req(w_span(IDS, vi(9, 1), ld(9, w_kv("ml.a", vi(3, 1))))),
    "unknown_fields_everywhere": (
        vi(5, 1) + ld(1, vi(9, 2) + ld(1, vi(7, 3) + ld(1, vi(4, 4) + ld(1, "service.name") + ld(2, ld(1, "svc"))))
                     + ld(2, fx64(6, 9) + ld(1, ld(1, "lib") + vi(20, 1)) + ld(2, w_span(
                         IDS, ld(100, b"junk"), tag(536870911, 5) + b"abcd", tag(17, 1) + b"12345678",
                         ld(9, w_kv("ml.a", vi(3, 1)) + vi(12, 3)))))) + ld(2000, b"\xff\xfe")
    ),
    "unknown_groups": w_req(w_span(IDS, tag(20, 3) + vi(1, 5) + ld(2, b"\xff") + tag(3, 3) + fx64(4, 1) + tag(3, 4)
                                   + tag(20, 4), ld(9, w_kv("ml.a", vi(3, 1) + tag(9, 3) + tag(9, 4))))),
    # upb as shipped with protobuf 7.36 accepts field number 0 inside an unknown group (only at message level is it
    # an error); newer upb sources reject it everywhere. If this case fails after a protobuf upgrade, make
    # skip_group() in _fastdecode.c reject fn == 0 too.
    "group_with_field_0_inside": w_req(w_span(IDS, tag(20, 3) + tag(0, 0) + b"\x01" + tag(0, 3) + tag(0, 4)
                                              + tag(20, 4), ld(9, w_kv("ml.a", vi(3, 1))))),
    "group_with_known_field_number": w_req(w_span(IDS, tag(1, 3) + tag(1, 4), ld(9, w_kv("ml.a", vi(3, 1))))),
    "resource_after_scope_spans": ld(1, ld(2, ld(1, ld(1, "lib")) + ld(2, w_span(IDS, ld(9, w_kv("ml.a", vi(3, 1))))))
                                     + ld(1, ld(1, w_kv("service.name", ld(1, "late"))))),
    "two_resources_merge": ld(1, ld(1, ld(1, w_kv("service.name", ld(1, "a"))) + ld(1, w_kv("x", vi(3, 1))))
                              + ld(2, ld(2, w_span(IDS, ld(9, w_kv("ml.a", vi(3, 1))))))
                              + ld(1, ld(1, w_kv("service.name", ld(1, "b"))) + vi(2, 3))),
    "scope_after_spans_and_merged": ld(1, ld(2, ld(2, w_span(IDS, ld(9, w_kv("ml.a", vi(3, 1)))))
                                           + ld(1, ld(1, "s1") + ld(2, "v")) + ld(1, ld(2, "v2"))
                                           + ld(1, ld(1, "s2")))),
    "scope_name_cleared": ld(1, ld(2, ld(1, ld(1, "s1")) + ld(1, ld(1, ""))
                                   + ld(2, w_span(IDS, ld(9, w_kv("ml.a", vi(3, 1))))))),
    "non_minimal_varints": w_req(w_span(IDS, ld(9, b"\x0a\x84\x80\x00ml.a" + b"\x12\x82\x00\x18\x01"))),
    "tag_5_bytes": w_req(w_span(IDS, b"\xf8\xff\xff\xff\x0f\x00", ld(9, w_kv("ml.a", vi(3, 1))))),
    "invalid_utf8_in_bytes_fields_ok": w_req(w_span(ld(1, b"\xff" * 16), ld(2, b"\xfe" * 8), fx64(7, T0),
                                                    fx64(8, T0), ld(9, w_kv("ml.b", ld(7, b"\xff\x00"))))),
    "invalid_utf8_in_unknown_field_ok": w_req(w_span(IDS, ld(33, b"\xff"), ld(9, w_kv("ml.a", ld(9, b"\xff"))))),
}

INVALID_WIRE: dict[str, bytes] = {
    "field_0": w_req(w_span(IDS, vi(0, 1))),
    "field_0_top": vi(0, 1),
    "field_0_in_event": w_req(w_span(IDS, ld(11, vi(0, 1)))),
    "field_0_in_link_attr": w_req(w_span(IDS, ld(13, ld(4, vi(0, 1))))),
    "field_0_in_scope": w_req(w_span(IDS), scope=ld(0, b"")),
    "wiretype_6": w_req(w_span(IDS, tag(30, 6))),
    "wiretype_7": w_req(w_span(IDS, tag(30, 7))),
    "end_group_alone": w_req(w_span(IDS, tag(30, 4))),
    "end_group_top": tag(3, 4),
    "group_mismatch": w_req(w_span(IDS, tag(30, 3) + tag(31, 4))),
    "group_unterminated": w_req(w_span(IDS, tag(30, 3) + vi(1, 1))),
    "group_at_end": w_req(w_span(IDS, tag(30, 3))),
    "group_wiretype_7_inside": w_req(w_span(IDS, tag(30, 3) + tag(1, 7) + tag(30, 4))),
    "truncated_varint": w_req(w_span(IDS)) + b"\x08\x80",
    "varint_11_bytes": w_req(w_span(IDS, tag(6, 0) + b"\xff" * 10 + b"\x01")),
    "tag_6_bytes": w_req(w_span(IDS, b"\x88\x80\x80\x80\x80\x00\x00")),
    "tag_over_32_bits": w_req(w_span(IDS, b"\xf8\xff\xff\xff\x1f\x00")),
    "length_past_end": b"\x0a\x05\x01",
    "length_past_submessage": ld(1, b"\x12\x05\x01") + b"\x00\x00\x00\x00",
    "length_huge": b"\x0a\xff\xff\xff\xff\x07",
    "fixed64_truncated": w_req(w_span(IDS)) + b"\x09\x00",
    "fixed32_truncated": w_req(w_span(IDS, tag(16, 5) + b"\x00")),
    "fixed_crosses_submessage": ld(1, ld(2, ld(2, tag(7, 1) + b"\x00\x00"))) + b"\x00" * 8,
    "utf8_key": w_req(w_span(IDS, ld(9, w_kv("ml.a", vi(3, 1)) + ld(1, b"ml.\xff")))),
    "utf8_string_value": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(1, b"\xc3"))))),
    "utf8_surrogate": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(1, b"\xed\xa0\x80"))))),
    "utf8_overlong": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(1, b"\xc0\xaf"))))),
    "utf8_above_max": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(1, b"\xf4\x90\x80\x80"))))),
    "utf8_overwritten_string": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(1, b"\xff") + vi(3, 1))))),
    "utf8_span_name": w_req(w_span(IDS, ld(5, b"\xff"))),
    "utf8_trace_state": w_req(w_span(IDS, ld(3, b"\xff"))),
    "utf8_dropped_span": w_req(w_span(ld(5, b"\xff"))),
    "utf8_status": w_req(w_span(IDS, ld(15, ld(2, b"\xff")))),
    "utf8_event_name": w_req(w_span(IDS, ld(11, ld(2, b"\xff")))),
    "utf8_event_attr": w_req(w_span(IDS, ld(11, ld(3, w_kv("k", ld(1, b"\xff")))))),
    "utf8_link_state": w_req(w_span(IDS, ld(13, ld(3, b"\xff")))),
    "utf8_scope_version": w_req(w_span(IDS), scope=ld(2, b"\xff")),
    "utf8_scope_attr": w_req(w_span(IDS), scope=ld(3, ld(1, b"\xff"))),
    "utf8_resource_key": w_req(w_span(IDS), resource=ld(1, ld(1, b"\xff"))),
    "utf8_entity_ref": w_req(w_span(IDS), resource=ld(3, ld(3, "ok") + ld(4, b"\xff"))),
    "utf8_schema_url": ld(1, ld(3, b"\xff")),
    "utf8_kvlist_key": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(6, ld(1, ld(1, b"\xff"))))))),
    "utf8_array_string": w_req(w_span(IDS, ld(9, w_kv("ml.a", ld(5, ld(1, ld(1, b"\xff"))))))),
    "bad_wire_in_event": w_req(w_span(IDS, ld(11, tag(3, 7)))),
    "bad_wire_in_dropped_span": w_req(w_span(tag(3, 6))),
}


@needs_c
@pytest.mark.parametrize("name", sorted(WIRE_CASES))
def test_wire_cases(name: str) -> None:
    results = same_all(WIRE_CASES[name])
    assert results[0] != "DecodeError", "the case is meant to be valid protobuf"


@needs_c
@pytest.mark.parametrize("name", sorted(INVALID_WIRE))
def test_invalid_wire(name: str) -> None:
    assert same_all(INVALID_WIRE[name]) == ["DecodeError"] * len(PREFIXES)


def _nested_array(levels: int) -> bytes:
    value = vi(3, 1)
    for _ in range(levels):
        value = ld(5, ld(1, value))
    return value


@needs_c
def test_nesting_limit_matches_upb() -> None:
    verdicts = []
    for levels in range(44, 52):  # AnyValue/ArrayValue pairs under request/resource/scope/span/kv
        out = same_all(w_req(w_span(IDS, ld(9, w_kv("ml.deep", _nested_array(levels))))))
        verdicts.append(out[0] == "DecodeError")
    assert verdicts[0] is False and verdicts[-1] is True  # the limit lies inside the range
    for depth in range(95, 103):  # unknown groups count as nesting too
        same_all(w_req(w_span(IDS, tag(21, 3) * depth + tag(21, 4) * depth)))
        same_all(tag(21, 3) * depth + tag(21, 4) * depth)


@needs_c
def test_prefix_matching() -> None:
    sp = span([kv("ml", av(int_value=1)), kv("ml.", av(int_value=2)), kv("ünï.ml", av(int_value=3))])
    data = one(sp)
    for prefixes in [("ml.",), ("ml",), ("ü",), ("ünï.",), ("ünï.mlx",), ("x", "y"), ("\ud800",), ("", "ml.")]:
        same(data, prefixes)


@needs_c
def test_nan_key_reason_formatting() -> None:
    sp = span([kv("ml.ü'\"", av(double_value=-math.inf)), kv("ml.b", arr(av(int_value=1), av(double_value=math.nan)))],
              name="ü\n'\"")
    same_all(one(sp))
    sp2 = span([kv("ml.b", arr(av(double_value=math.nan))), kv("ml.a", av(double_value=math.inf)),
                kv("ml.c", arr(av(double_value=1.0)))])
    same_all(one(sp2))


# --------------------------------------------------------------------------------------------------------------
# property tests (hypothesis)
# --------------------------------------------------------------------------------------------------------------
KEYS = st.one_of(st.sampled_from(["ml.score", "data.rows", "ml.", "data.", "ml", "mlx", "", "service.name",
                                  "ünï.ml", "ml.ü"]), st.text(max_size=6))
TEXT = st.text(max_size=8)
LONG_TEXT = st.text(min_size=97, max_size=103)  # around the 100 characters a quoted name is cut to
I64 = st.integers(-(2**63), 2**63 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
U64 = st.integers(0, 2**64 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)

scalar_values = st.one_of(
    TEXT.map(lambda s: av(string_value=s)),
    st.booleans().map(lambda b: av(bool_value=b)),
    I64.map(lambda i: av(int_value=i)),
    DOUBLES.map(lambda d: av(double_value=d)),
    st.binary(max_size=6).map(lambda b: av(bytes_value=b)),
    I32.map(lambda i: av(string_value_strindex=i)),
    st.just(AnyValue()),
)
numeric_values = st.one_of(
    st.booleans().map(lambda b: av(bool_value=b)),
    I64.map(lambda i: av(int_value=i)),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda d: av(double_value=d)),
    DOUBLES.map(lambda d: av(double_value=d)),
)
any_values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: arr(*xs)),
        st.lists(numeric_values, max_size=5).map(lambda xs: arr(*xs)),
        st.lists(TEXT, max_size=4).map(lambda xs: arr(*[av(string_value=s) for s in xs])),
        st.lists(st.tuples(KEYS, inner), max_size=3).map(
            lambda items: AnyValue(kvlist_value=KeyValueList(values=[kv(k, v) for k, v in items]))),
    ),
    max_leaves=8,
)
key_values = st.builds(lambda k, v, has: kv(k, v if has else None), KEYS, any_values, st.booleans())
IDS16 = st.one_of(st.binary(min_size=16, max_size=16), st.just(bytes(16)), st.binary(max_size=18), st.just(TRACE))
IDS8 = st.one_of(st.binary(min_size=8, max_size=8), st.just(bytes(8)), st.binary(max_size=10))
TIMES = st.one_of(st.sampled_from([0, 1, 999, 1000, T0, 2**64 - 1]), U64)


@st.composite
def spans(draw: Any) -> Span:
    start = draw(TIMES)
    end = draw(st.one_of(TIMES, st.integers(0, 10**6).map(lambda d: min(start + d, 2**64 - 1))))
    sp = Span(trace_id=draw(IDS16), span_id=draw(IDS8), parent_span_id=draw(st.one_of(st.just(b""), IDS8)),
              name=draw(st.one_of(TEXT, LONG_TEXT)), kind=draw(st.one_of(st.integers(0, 5), I32)),
              start_time_unix_nano=start, end_time_unix_nano=end, trace_state=draw(TEXT))
    sp.attributes.extend(draw(st.lists(key_values, max_size=6)))
    if draw(st.booleans()):
        sp.status.code = draw(st.one_of(st.integers(0, 2), I32))
        sp.status.message = draw(TEXT)
    if draw(st.integers(0, 4)) == 0:
        ev = sp.events.add(name=draw(TEXT), time_unix_nano=draw(U64))
        ev.attributes.extend(draw(st.lists(key_values, max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        ln = sp.links.add(trace_id=draw(IDS16), span_id=draw(IDS8), trace_state=draw(TEXT))
        ln.attributes.extend(draw(st.lists(key_values, max_size=2)))
    return sp


@st.composite
def requests(draw: Any) -> bytes:
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add()
        if draw(st.booleans()):
            rs.resource.attributes.extend(draw(st.lists(key_values, max_size=3)))
            if draw(st.booleans()):
                rs.resource.attributes.append(kv("service.name", draw(any_values)))
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            if draw(st.booleans()):
                ss.scope.name = draw(TEXT)
                ss.scope.version = draw(TEXT)
            ss.spans.extend(draw(st.lists(spans(), max_size=4)))
    return req.SerializeToString()


@st.composite
def mutated(draw: Any) -> bytes:
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "splice", "dup"]))
        n = len(data)
        pos = draw(st.integers(0, n))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and n:
            i = min(pos, n - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[min(pos, n - 1)] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "splice":
            other = draw(requests())
            data = data[:pos] + other[draw(st.integers(0, len(other))):]
        elif op == "dup":
            j = draw(st.integers(pos, n))
            data[j:j] = data[pos:j]
    return bytes(data)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])


@needs_c
@PROPERTY
@given(requests(), st.sampled_from(PREFIXES))
def test_random_valid_requests(data: bytes, prefixes: tuple[str, ...] | None) -> None:
    assert same(data, prefixes) != "DecodeError"


@needs_c
@PROPERTY
@given(mutated(), st.sampled_from(PREFIXES))
def test_random_mutations(data: bytes, prefixes: tuple[str, ...] | None) -> None:
    same(data, prefixes)


@needs_c
@PROPERTY
@given(st.binary(max_size=64), st.sampled_from(PREFIXES))
def test_random_bytes(data: bytes, prefixes: tuple[str, ...] | None) -> None:
    same(data, prefixes)


@needs_c
@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 7), st.binary(max_size=12)), max_size=12),
       st.sampled_from(PREFIXES))
def test_random_span_fields(parts: list[tuple[int, int, bytes]], prefixes: tuple[str, ...] | None) -> None:
    """Random fields (any number, any wire type) inside a span, next to a valid id set and one attribute."""
    fields_ = []
    for fn, wt, payload in parts:
        if wt == 2:
            fields_.append(ld(fn, payload))
        elif wt == 0:
            fields_.append(tag(fn, 0) + varint(int.from_bytes(payload[:9] or b"\x00", "little")))
        elif wt == 1:
            fields_.append(tag(fn, 1) + payload[:8].ljust(8, b"\x00"))
        elif wt == 5:
            fields_.append(tag(fn, 5) + payload[:4].ljust(4, b"\x00"))
        else:
            fields_.append(tag(fn, wt) + payload)
    data = w_req(w_span(IDS, *fields_, ld(9, w_kv("ml.a", vi(3, 1)))))
    assume(len(data) < 4096)
    same(data, prefixes)


UTF8_EDGE_BYTES = st.lists(st.sampled_from([0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
                                             0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF]), max_size=6).map(bytes)


@needs_c
@PROPERTY
@given(st.one_of(UTF8_EDGE_BYTES, st.binary(max_size=8)), st.sampled_from(["key", "value", "name", "status", "array"]))
def test_random_utf8_in_string_fields(raw: bytes, where: str) -> None:
    """Strings are validated exactly like upb (overlongs, surrogates, > U+10FFFF, truncated sequences)."""
    key = raw if where == "key" else b"ml.k"
    value = ld(1, raw) if where == "value" else ld(5, ld(1, ld(1, raw))) if where == "array" else vi(3, 1)
    extra = ld(5, raw) if where == "name" else ld(15, ld(2, raw)) if where == "status" else b""
    data = w_req(w_span(IDS, extra, ld(9, ld(1, key) + ld(2, value)), ld(9, w_kv("ml.other", vi(3, 2)))))
    same(data, ("ml.",))
    same(data, None)


# --------------------------------------------------------------------------------------------------------------
# robustness: helper failures, reference counts, memory
# --------------------------------------------------------------------------------------------------------------
@needs_c
def test_helper_exceptions_propagate_without_leaks() -> None:
    c = fastdecode._c

    def boom(raw: bytes) -> Any:
        raise RuntimeError("boom")

    kv_data = one(span([kv("ml.k", kvl(a=av(int_value=1)))]))
    with pytest.raises(RuntimeError):
        c.decode(kv_data, None, fastdecode._resource_from_bytes, boom)
    with pytest.raises(RuntimeError):
        c.decode(kv_data, None, boom, fastdecode._value_from_bytes)
    with pytest.raises(TypeError):
        c.decode(kv_data, None, fastdecode._resource_from_bytes, lambda raw: 3)
    with pytest.raises(TypeError):
        c.decode(kv_data, None, lambda raw: ("svc",), fastdecode._value_from_bytes)
    with pytest.raises(TypeError):
        c.decode(kv_data, None, 1, 2)
    with pytest.raises(TypeError, match="resource helper"):
        c.decode(kv_data, None, lambda raw: (3, "{}"), fastdecode._value_from_bytes)
    with pytest.raises(TypeError, match="resource helper"):
        c.decode(kv_data, None, lambda raw: (None, b"{}"), fastdecode._value_from_bytes)
    with pytest.raises(UnicodeEncodeError):
        c.decode(kv_data, None, lambda raw: ("\ud800", "{}"), fastdecode._value_from_bytes)
    mixed = one(span([kv("ml.k", arr(av(int_value=1), av(string_value="x")))]))
    assert c.decode(mixed, None, fastdecode._resource_from_bytes, lambda raw: ["a", "b"])[1:4] == (1, 0, 0)
    with pytest.raises(TypeError):
        c.decode(mixed, None, fastdecode._resource_from_bytes, lambda raw: ["a", 3])
    with pytest.raises(TypeError):
        c.decode(mixed, None, fastdecode._resource_from_bytes, lambda raw: "a")
    with pytest.raises(ValueError):
        c.decode(kv_data, None, fastdecode._resource_from_bytes, fastdecode._value_from_bytes, -1)


@needs_c
def test_no_reference_or_memory_leaks() -> None:
    c = fastdecode._c
    payloads = [one(span([kv(f"ml.{n}", v)])) for n, v in VALUES.items()]
    payloads += list(WIRE_CASES.values()) + list(INVALID_WIRE.values())
    prefixes = ("data.", "ml.")

    def boom(raw: bytes) -> Any:
        raise RuntimeError("boom")

    def run_all() -> None:
        for data in payloads:
            for res_fn, val_fn in ((fastdecode._resource_from_bytes, fastdecode._value_from_bytes),
                                   (boom, fastdecode._value_from_bytes), (fastdecode._resource_from_bytes, boom)):
                with contextlib.suppress(DecodeError, RuntimeError):
                    c.decode(data, prefixes, res_fn, val_fn)
            for limit in (0, 40):  # a column over the text limit, at different points of the decode
                with contextlib.suppress(DecodeError):
                    c.decode(data, prefixes, fastdecode._resource_from_bytes, fastdecode._value_from_bytes, limit)
            with contextlib.suppress(DecodeError):
                fastdecode.decode_bytes(data, prefixes)  # and the Arrow wrapping

    run_all()
    gc.collect()
    refs = (sys.getrefcount(prefixes), sys.getrefcount(boom), sys.getrefcount(fastdecode._value_from_bytes))
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    try:
        run_all()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            run_all()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - traced  # also sees PyMem buffers, not only objects
    finally:
        tracemalloc.stop()
    assert (sys.getrefcount(prefixes), sys.getrefcount(boom), sys.getrefcount(fastdecode._value_from_bytes)) == refs
    assert sys.getallocatedblocks() - blocks < 200
    assert grown < 64 * 1024


# --------------------------------------------------------------------------------------------------------------
# the text limit of a string column (Arrow's int32 offsets)
# --------------------------------------------------------------------------------------------------------------
@needs_c
def test_text_limit_per_column() -> None:
    data = one(span())  # the longest text is the trace id's 32 hex digits
    _c_decode(data, None, 32)
    with pytest.raises(DecodeError, match="too large to store: the trace_id column"):
        _c_decode(data, None, 31)
    res = [kv("service.name", av(string_value="s" * 200))]
    resource_json = decode_bytes_python(one(span(), res=res), None).columns.spans.column("resource_attributes")
    longest = len(resource_json[0].as_py())
    _c_decode(one(span(), res=res), None, longest)  # the limit is inclusive
    with pytest.raises(DecodeError, match="the resource_attributes column would hold more than"):
        _c_decode(one(span(), res=res), None, longest - 1)
    many = one(*[span(span_id=(i + 1).to_bytes(8, "big")) for i in range(40)])
    with pytest.raises(DecodeError, match="more than 1000 bytes"):
        _c_decode(many, None, 1000)
    assert _c_decode(many, None, 2**31 - 1)[1] == 40
    with pytest.raises(ValueError):
        _c_decode(many, None, 2**31)


# --------------------------------------------------------------------------------------------------------------
# behaviours (both paths, and the C path equal to the reference)
# --------------------------------------------------------------------------------------------------------------
def spans_column(r: Decoded, name: str) -> list[Any]:
    return column_values(r.columns.spans.column(name))


@BOTH_PARAM
def test_all_zero_parent_is_no_parent(decode: Any) -> None:
    data = one(span(parent=bytes(8), span_id=b"\x01" * 8), span(parent=b"", span_id=b"\x02" * 8),
               span(parent=b"\x00" * 7 + b"\x01", span_id=b"\x03" * 8))
    r = decode(data, None)
    assert spans_column(r, "parent_span_id") == [None, None, "0000000000000001"]
    assert r.columns.spans.column("parent_span_id").null_count == 2
    same_all(data)


@BOTH_PARAM
def test_end_time_missing_is_rejected(decode: Any) -> None:
    cases = [
        (span(start=T0, end=0), "end_time_unix_nano is missing"),
        (span(start=0, end=0), "start_time_unix_nano is missing"),  # start is checked first
        (span(start=0, end=T0), "start_time_unix_nano is missing"),
        (span(start=T0, end=T0 - 1), "end_time_unix_nano is before start_time_unix_nano"),
        (span(start=T0, end=0, trace_id=b""), "trace_id must be 16 bytes and not all zero (got 0 bytes)"),
    ]
    for sp, reason in cases:
        r = decode(one(sp), None)
        assert (len(r.columns), r.rejected, r.reasons) == (0, 1, [f"span {SPAN.hex()} ('op'): {reason}"])
        same_all(one(sp))
    assert len(decode(one(span(start=1, end=1)), None).columns) == 1


NAMES = ["x" * 99, "x" * 100, "x" * 101, "x" * 5000, "ü" * 100, "ü" * 101, "𝄞" * 150, "a'\"\n" * 40,
         "ü" * 99 + "𝄞" + "tail", "", "✓" * 100 + "\x00"]


@BOTH_PARAM
@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_span_names_in_reasons_are_cut(decode: Any, name: str) -> None:
    r = decode(one(span(name=name, trace_id=b"")), None)
    shown = name if len(name) <= 100 else name[:100] + "…"
    assert r.reasons == [f"span {SPAN.hex()} ({shown!r}): trace_id must be 16 bytes and not all zero (got 0 bytes)"]
    r = decode(one(span([kv("ml.x", av(double_value=math.inf))], name=name)), None)
    assert r.reasons == [f"span {SPAN.hex()} ({shown!r}): attribute ml.x is not a finite number (inf)"]
    same_all(one(span(name=name, trace_id=b""), span(name=name, start=0)))


@BOTH_PARAM
def test_partial_success_message_is_capped(decode: Any) -> None:
    key = "ml." + "k" * 3000
    spans_ = [span([kv(key, av(double_value=math.nan))], span_id=(i + 1).to_bytes(8, "big"), name="n" * 500)
              for i in range(7)]
    r = decode(one(*spans_), None)
    msg = r.error_message()
    assert r.rejected == 7 and len(r.reasons) == 5
    assert len(msg) == 4096 and msg.startswith("rejected 7 of 7 spans: span 0000000000000001 ('" + "n" * 100 + "…')")
    assert msg.endswith("…; and 2 more")
    same_all(one(*spans_))
    small = decode(one(span(start=0)), None).error_message()
    assert small == f"rejected 1 of 1 spans: span {SPAN.hex()} ('op'): start_time_unix_nano is missing"


def test_rejection_message() -> None:
    assert rejection_message(3, 0, []) == ""
    assert rejection_message(3, 1, ["a"]) == "rejected 1 of 3 spans: a"
    assert rejection_message(9, 7, list("abcde")) == "rejected 7 of 9 spans: a; b; c; d; e; and 2 more"
    for n in (4000, 4070, 4071, 4072, 4073, 10_000):
        msg = rejection_message(1, 1, ["r" * n])
        assert len(msg) == min(len("rejected 1 of 1 spans: ") + n, 4096)
        assert msg.endswith("…") == (len("rejected 1 of 1 spans: ") + n > 4096)


def low32(v: int) -> int:
    """What upb stores for an int32 (enum) field decoded from the varint of v: its low 32 bits, signed."""
    v &= 0xFFFF_FFFF
    return v - 2**32 if v >= 2**31 else v


ENUM_VARINTS = [0, 1, 5, 99, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**63, 2**64 - 1, -1, -5,
                -(2**31), -(2**31) - 1, -(2**63)]


@BOTH_PARAM
def test_kind_and_status_code_are_int32_as_upb_decodes_them(decode: Any) -> None:
    payloads = []
    for v in ENUM_VARINTS:
        sp = Span.FromString(vi(6, v) + ld(15, vi(3, v)))
        assert sp.kind == sp.status.code == low32(v)  # upb: int32 from the low bits, open enum (no range check)
        payloads.append(w_span(IDS, vi(6, v), ld(15, vi(3, v)), ld(9, w_kv("ml.a", vi(3, 1)))))
    r = decode(w_req(*payloads), None)
    want = [low32(v) for v in ENUM_VARINTS]
    assert spans_column(r, "kind") == want and spans_column(r, "status_code") == want
    assert r.columns.spans.schema.field("kind").type == pa.int32()
    assert r.columns.spans.schema.field("status_code").type == pa.int32()
    same_all(w_req(*payloads))
    # the last occurrence wins, also when it is huge; a 5-byte tag-sized varint too
    r = decode(w_req(w_span(IDS, vi(6, 3), vi(6, 2**35 + 7), tag(6, 0) + b"\xff\xff\xff\xff\x7f",
                            ld(9, w_kv("ml.a", vi(3, 1))))), None)
    assert spans_column(r, "kind") == [-1]


def test_json_path_uses_the_reference() -> None:
    req = ExportTraceServiceRequest.FromString(one(span(parent=bytes(8), kind=99), span(end=0)))
    r = decode_message(req, ("ml.",))
    assert (r.received, r.rejected, len(r.columns)) == (2, 1, 1)
    assert spans_column(r, "parent_span_id") == [None] and spans_column(r, "kind") == [99]
    assert "end_time_unix_nano is missing" in r.error_message()
