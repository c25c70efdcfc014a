"""OTLP ExportTraceServiceRequest -> SpanBatch: pure translation, no I/O.

This is the ingest hot path. It walks the protobuf once, keeps spans that carry at least one attribute under the
configured prefixes, validates them, and appends their fields to flat column lists that become Arrow arrays in
the store. Everything per attribute is a handful of C-level calls; nothing allocates a dict per span.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class DecodeError(ValueError):
    """The request bytes are not a valid ExportTraceServiceRequest (the whole request is refused)."""


_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_MAX_REASONS = 5  # how many rejected spans the partial_success message names
_MAX_NAME = 100  # span names quoted in a reason are cut to this many characters (then "…")
_MAX_MESSAGE = 4096  # the whole partial_success message, in characters

# What this module assumes of OTLP. It reads requests through the generated classes, so the field numbers and wire
# types are those of the installed opentelemetry-proto descriptors (tests/test_proto.py holds them to the .proto
# files in proto/). What it states itself is how it tells the members of the AnyValue oneof apart: by name, each
# read as the .proto type given here. tests/test_proto.py checks these names and types against proto/ as well; a
# renamed member would otherwise just stop matching. string_value_strindex, not named here, is kept as text
# through _any_to_json like any member without a branch of its own.
_ANY_ONEOF: Final = "value"
_STRING: Final = "string_value"
_BOOL: Final = "bool_value"
_INT: Final = "int_value"
_DOUBLE: Final = "double_value"
_ARRAY: Final = "array_value"
_KVLIST: Final = "kvlist_value"
_BYTES: Final = "bytes_value"
ANY_VALUE_MEMBERS: Final[Mapping[str, str]] = MappingProxyType({
    _STRING: "string",
    _BOOL: "bool",
    _INT: "int64",
    _DOUBLE: "double",
    _ARRAY: "opentelemetry.proto.common.v1.ArrayValue",
    _KVLIST: "opentelemetry.proto.common.v1.KeyValueList",
    _BYTES: "bytes",
})
_NUMERIC: Final = frozenset({_DOUBLE, _INT, _BOOL})  # stored as numbers (bool as 0/1)


@dataclass
class SpanBatch:
    """Columns of the spans and their attributes, ready for a columnar insert.

    `*_span` columns index into the span columns (0..len-1); the store turns them into span keys.
    Times are microseconds since the Unix epoch (UTC).
    """

    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    parent_span_id: list[str | None] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    start_us: list[int] = field(default_factory=list)
    end_us: list[int] = field(default_factory=list)
    status_code: list[int] = field(default_factory=list)
    status_message: list[str | None] = field(default_factory=list)
    service_name: list[str | None] = field(default_factory=list)
    scope_name: list[str | None] = field(default_factory=list)
    resource_attributes: list[str] = field(default_factory=list)
    # numeric attributes (int, double, bool as 0/1)
    num_span: list[int] = field(default_factory=list)
    num_key: list[str] = field(default_factory=list)
    num_value: list[float] = field(default_factory=list)
    # string attributes (also bytes as hex and kvlists as JSON text)
    str_span: list[int] = field(default_factory=list)
    str_key: list[str] = field(default_factory=list)
    str_value: list[str] = field(default_factory=list)
    # array attributes: numbers (doubles/ints/bools) or strings
    arr_span: list[int] = field(default_factory=list)
    arr_key: list[str] = field(default_factory=list)
    arr_numbers: list[list[float] | None] = field(default_factory=list)
    arr_strings: list[list[str] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trace_id)


@dataclass
class DecodeResult:
    batch: SpanBatch
    received: int = 0  # spans in the request
    dropped: int = 0  # spans without a signal attribute (not an error; counted)
    rejected: int = 0  # invalid spans, reported through partial_success
    reasons: list[str] = field(default_factory=list)

    def error_message(self) -> str:
        return rejection_message(self.received, self.rejected, self.reasons)


def rejection_message(received: int, rejected: int, reasons: list[str]) -> str:
    """The partial_success message: how many spans were rejected and why (the first few), at most 4096 chars."""
    if not rejected:
        return ""
    head = f"rejected {rejected} of {received} spans: "
    more = f"; and {rejected - _MAX_REASONS} more" if rejected > _MAX_REASONS else ""
    shown = "; ".join(reasons[:_MAX_REASONS])
    room = _MAX_MESSAGE - len(head) - len(more)
    if len(shown) > room:
        shown = shown[: max(room - 1, 0)] + "…"
    return f"{head}{shown}{more}"[:_MAX_MESSAGE]


def quote_name(name: str) -> str:
    """A span name as quoted in a rejection reason: repr() of at most _MAX_NAME characters (+ "…" when cut)."""
    return repr(name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "…")


def _any_to_json(v: Any) -> Any:
    """An AnyValue as plain JSON data (used for the rare kvlist/array-of-mixed values and resources)."""
    which = v.WhichOneof(_ANY_ONEOF)
    if which is None:
        return None
    if which == _ARRAY:
        return [_any_to_json(x) for x in v.array_value.values]
    if which == _KVLIST:
        return {kv.key: _any_to_json(kv.value) for kv in v.kvlist_value.values}
    if which == _BYTES:
        return v.bytes_value.hex()
    if which == _DOUBLE:
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    return getattr(v, which)


def _resource_fields(resource: Any) -> tuple[str | None, str]:
    attrs = {kv.key: _any_to_json(kv.value) for kv in resource.attributes}
    service = attrs.get("service.name")
    return (service if isinstance(service, str) else None), json.dumps(attrs, separators=(",", ":"))


def decode_request(
    request: ExportTraceServiceRequest,
    prefixes: tuple[str, ...] | None,
) -> DecodeResult:
    """Flatten a request into a SpanBatch.

    prefixes: keep spans with at least one attribute key starting with one of these; None keeps every span.
    """
    batch = SpanBatch()
    result = DecodeResult(batch)
    # Local aliases: attribute lookups on the batch would otherwise dominate the loop.
    trace_ids, span_ids, parents, names = batch.trace_id, batch.span_id, batch.parent_span_id, batch.name
    kinds, starts, ends = batch.kind, batch.start_us, batch.end_us
    status_codes, status_msgs = batch.status_code, batch.status_message
    services, scopes, resources = batch.service_name, batch.scope_name, batch.resource_attributes
    num_span, num_key, num_value = batch.num_span, batch.num_key, batch.num_value
    str_span, str_key, str_value = batch.str_span, batch.str_key, batch.str_value
    arr_span, arr_key, arr_numbers, arr_strings = batch.arr_span, batch.arr_key, batch.arr_numbers, batch.arr_strings
    isfinite = math.isfinite
    oneof: Final = _ANY_ONEOF
    string, double, int_, bool_, array = _STRING, _DOUBLE, _INT, _BOOL, _ARRAY
    keep_all = prefixes is None
    pfx = prefixes or ()
    received = dropped = 0
    reasons = result.reasons
    rejected = 0

    for rs in request.resource_spans:
        service: str | None = None
        res_json = "{}"
        res_done = False
        for ss in rs.scope_spans:
            scope = ss.scope.name or None
            for sp in ss.spans:
                received += 1
                idx = len(trace_ids)
                n0, s0, a0 = len(num_key), len(str_key), len(arr_key)
                keep = keep_all
                bad: str | None = None
                for kv in sp.attributes:
                    key = kv.key
                    if not keep and key.startswith(pfx):
                        keep = True
                    v = kv.value
                    which = v.WhichOneof(oneof)
                    if which == string:
                        str_span.append(idx)
                        str_key.append(key)
                        str_value.append(v.string_value)
                    elif which == double:
                        d = v.double_value
                        if not isfinite(d):
                            bad = f"attribute {key} is not a finite number ({d})"
                        num_span.append(idx)
                        num_key.append(key)
                        num_value.append(d)
                    elif which == int_:
                        num_span.append(idx)
                        num_key.append(key)
                        num_value.append(float(v.int_value))
                    elif which == bool_:
                        num_span.append(idx)
                        num_key.append(key)
                        num_value.append(1.0 if v.bool_value else 0.0)
                    elif which == array:
                        bad = _append_array(v.array_value.values, key, idx, arr_span, arr_key, arr_numbers,
                                            arr_strings) or bad
                    elif which is not None:  # bytes or kvlist: kept as text
                        val = _any_to_json(v)
                        str_span.append(idx)
                        str_key.append(key)
                        str_value.append(val if isinstance(val, str) else json.dumps(val, separators=(",", ":")))
                if not keep:
                    dropped += 1
                    del num_span[n0:], num_key[n0:], num_value[n0:]
                    del str_span[s0:], str_key[s0:], str_value[s0:]
                    del arr_span[a0:], arr_key[a0:], arr_numbers[a0:], arr_strings[a0:]
                    continue
                tid, sid, pid = sp.trace_id, sp.span_id, sp.parent_span_id
                start, end = sp.start_time_unix_nano, sp.end_time_unix_nano
                if len(tid) != 16 or tid == _ZERO_TRACE:
                    bad = f"trace_id must be 16 bytes and not all zero (got {len(tid)} bytes)"
                elif len(sid) != 8 or sid == _ZERO_SPAN:
                    bad = f"span_id must be 8 bytes and not all zero (got {len(sid)} bytes)"
                elif pid and len(pid) != 8:
                    bad = f"parent_span_id must be empty or 8 bytes (got {len(pid)} bytes)"
                elif start == 0:
                    bad = "start_time_unix_nano is missing"
                elif end == 0:
                    bad = "end_time_unix_nano is missing"
                elif end < start:
                    bad = "end_time_unix_nano is before start_time_unix_nano"
                if bad is not None:
                    rejected += 1
                    if len(reasons) < _MAX_REASONS:
                        reasons.append(f"span {sid.hex() or '<empty>'} ({quote_name(sp.name)}): {bad}")
                    del num_span[n0:], num_key[n0:], num_value[n0:]
                    del str_span[s0:], str_key[s0:], str_value[s0:]
                    del arr_span[a0:], arr_key[a0:], arr_numbers[a0:], arr_strings[a0:]
                    continue
                if not res_done:
                    service, res_json = _resource_fields(rs.resource)
                    res_done = True
                trace_ids.append(tid.hex())
                span_ids.append(sid.hex())
                parents.append(pid.hex() if pid and pid != _ZERO_SPAN else None)  # all-zero: no parent
                names.append(sp.name)
                kinds.append(sp.kind)
                starts.append(start // 1000)
                ends.append(end // 1000)
                st = sp.status
                status_codes.append(st.code)
                status_msgs.append(st.message or None)
                services.append(service)
                scopes.append(scope)
                resources.append(res_json)
    result.received = received
    result.dropped = dropped
    result.rejected = rejected
    return result


def _append_array(
    values: Any,
    key: str,
    idx: int,
    arr_span: list[int],
    arr_key: list[str],
    arr_numbers: list[list[float] | None],
    arr_strings: list[list[str] | None],
) -> str | None:
    """Append one array attribute; returns why the span is invalid, or None."""
    kinds = {x.WhichOneof(_ANY_ONEOF) for x in values}
    arr_span.append(idx)
    arr_key.append(key)
    if kinds <= _NUMERIC:
        nums = [float(getattr(x, x.WhichOneof(_ANY_ONEOF))) for x in values]
        arr_numbers.append(nums)
        arr_strings.append(None)
        if not all(math.isfinite(n) for n in nums):
            return f"attribute {key} holds a non-finite number"
        return None
    arr_numbers.append(None)
    arr_strings.append([
        x.string_value if x.WhichOneof(_ANY_ONEOF) == _STRING else json.dumps(_any_to_json(x))
        for x in values
    ])
    return None
