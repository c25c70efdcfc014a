"""Per-span limits on the decoded Arrow columns: attributes per span and the length of attribute values.

This runs on every request in the receiving thread, so it is columnar: a few pyarrow/numpy kernels over whole
columns decide whether anything exceeds a limit (when nothing does, that is all it costs), and only then are
rows filtered or values cut, again by column. The only per-attribute Python work is for the rare span that has
more attributes than allowed under the truncate action: "the first N in wire order" needs the order of its
attributes across the three typed tables, which the decoded columns do not keep, so that span's attribute
types are read back from the request.

What counts:
- attributes per span: the stored attributes (an attribute whose value is empty is not stored and not counted),
  whatever their type.
- value length: strings (also bytes as hex and key-value lists as JSON text) in characters (Unicode code
  points); arrays in elements, and every string element of an array in characters, as the OpenTelemetry SDKs
  limit array elements.

truncate keeps the first `max_attributes` attributes in wire order and cuts every over-long string at a
character boundary (and over-long arrays to their first elements); reject refuses the whole span (reported in
partial_success like any invalid span).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from evaluator.receiver.columns import Decoded, SpanColumns
from evaluator.receiver.decode import _MAX_REASONS, quote_name

ACTIONS = ("truncate", "reject")
TOO_MANY = "too_many_attributes"
TOO_LONG = "value_too_long"
_NUMBER_KINDS = frozenset(("int_value", "double_value", "bool_value"))


@dataclass(frozen=True)
class SpanLimits:
    max_attributes: int | None = 128  # stored attributes per span; None: no limit
    max_value_length: int | None = 4096  # characters per string, elements per array; None: no limit
    action: str = "truncate"  # or "reject"


@dataclass
class LimitOutcome:
    """What the limits did to one request: the (possibly changed) result and the counts for the counters."""

    decoded: Decoded
    dropped_attributes: int = 0  # truncate: attributes beyond max_attributes, not stored
    cut_values: int = 0  # truncate: values cut to max_value_length
    rejected: dict[str, int] = field(default_factory=dict)  # reject: spans refused, by reason


# -- small column helpers ----------------------------------------------------------------------------------------
def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _max(arr: pa.Array) -> int:
    if not len(arr):
        return 0
    m = pc.max(arr).as_py()
    return int(m) if m is not None else 0


def _list_parts(lists: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets rebased to 0, the values they index) of a list array, null entries included."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values


def _max_bytes(values: pa.Array) -> int:
    """The longest value in bytes (an upper bound of its length in characters), from the offsets."""
    if not len(values):
        return 0
    if values.type == pa.string():
        buf = values.buffers()[1]
        off = np.frombuffer(buf, dtype=np.int32, count=values.offset + len(values) + 1)[values.offset:]
        return int((off[1:] - off[:-1]).max())
    return _max(pc.binary_length(values))


def _run_longer_than(span_idx: np.ndarray, k: int) -> bool:
    """Whether a span has more than k rows in this table (a span's rows are contiguous and in span order)."""
    m = len(span_idx)
    return m > k and bool(np.any(span_idx[k:] == span_idx[: m - k]))


def _over_count(columns: SpanColumns, max_attrs: int) -> np.ndarray | None:
    """Attributes per span, when some span has more than max_attrs; else None (the common case, kept cheap: no
    span has more than a third of the limit in any one table)."""
    tables = [t for t in (columns.numbers, columns.strings, columns.arrays) if t.num_rows]
    if sum(t.num_rows for t in tables) <= max_attrs:
        return None
    idx = [_array(t, "span_idx").to_numpy() for t in tables]
    share = max_attrs // len(tables)
    if not any(_run_longer_than(a, share) for a in idx):
        return None
    counts = np.zeros(len(columns), dtype=np.int64)
    for a in idx:
        counts += np.bincount(a, minlength=len(columns))
    return counts if counts.max() > max_attrs else None


def _occurrence(span_idx: np.ndarray) -> np.ndarray:
    """Each row's position among its span's rows (rows of a span are contiguous, spans in order)."""
    first = np.searchsorted(span_idx, span_idx, side="left")
    return np.arange(len(span_idx)) - first


# -- value lengths -----------------------------------------------------------------------------------------------
def _long_strings(values: pa.Array, limit: int) -> pa.Array | None:
    """Boolean mask of strings over `limit` characters, or None when none is (cheap: bytes >= characters)."""
    if not len(values) or _max_bytes(values) <= limit:
        return None
    mask = pc.fill_null(pc.greater(pc.utf8_length(values), limit), False)
    return mask if pc.any(mask).as_py() else None


def _long_arrays(table: pa.Table, limit: int) -> pa.Array | None:
    """Boolean mask of array rows with more than `limit` elements or a string element over `limit` characters."""
    if not table.num_rows:
        return None
    masks = []
    for name in ("numbers", "strings"):
        lists = _array(table, name)
        lengths = pc.list_value_length(lists)
        if _max(lengths) > limit:
            masks.append(pc.fill_null(pc.greater(lengths, limit), False))
    strings = _array(table, "strings")
    offsets, values = _list_parts(strings)
    long_elems = _long_strings(values, limit)
    if long_elems is not None:
        row_of_element = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        per_row = np.zeros(len(offsets) - 1, dtype=bool)
        per_row[row_of_element[long_elems.to_numpy(zero_copy_only=False)]] = True
        masks.append(pa.array(per_row))
    if not masks:
        return None
    mask = masks[0]
    for m in masks[1:]:
        mask = pc.or_(mask, m)
    return mask


def _cut_strings(values: pa.Array, mask: pa.Array, limit: int) -> pa.Array:
    return pc.if_else(mask, pc.utf8_slice_codeunits(values, 0, limit), values)


def _cut_arrays(table: pa.Table, limit: int) -> pa.Table:
    numbers = pc.list_slice(_array(table, "numbers"), 0, limit)
    strings = pc.list_slice(_array(table, "strings"), 0, limit)
    offsets, values = _list_parts(strings)
    long_elems = _long_strings(values, limit)
    if long_elems is not None:
        values = _cut_strings(values, long_elems, limit)
        strings = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pc.is_null(strings))
    table = table.set_column(table.schema.get_field_index("numbers"), "numbers", numbers)
    return table.set_column(table.schema.get_field_index("strings"), "strings", strings)


# -- the entry point ---------------------------------------------------------------------------------------------
def apply_limits(decoded: Decoded, limits: SpanLimits,
                 wire: Callable[[], ExportTraceServiceRequest]) -> LimitOutcome:
    """Apply `limits` to a decoded request. `wire` returns the parsed request; it is called only when a span has
    more attributes than allowed and the action is truncate (to find its first N attributes in wire order)."""
    outcome = LimitOutcome(decoded)
    columns = decoded.columns
    n = len(columns)
    if not n:
        return outcome
    max_attrs, max_len = limits.max_attributes, limits.max_value_length
    over_count = _over_count(columns, max_attrs) if max_attrs is not None else None
    long_str = long_arr = None
    if max_len is not None:
        long_str = _long_strings(_array(columns.strings, "value"), max_len)
        long_arr = _long_arrays(columns.arrays, max_len)
    if over_count is None and long_str is None and long_arr is None:
        return outcome  # the common case: nothing over a limit
    if limits.action == "reject":
        return _reject(outcome, max_attrs, max_len, over_count, long_str, long_arr)
    numbers, strings, arrays = columns.numbers, columns.strings, columns.arrays
    if over_count is not None:
        assert max_attrs is not None
        allowed = _allowed_per_type(columns, over_count, max_attrs, wire)
        kept = []
        for t, table in enumerate((numbers, strings, arrays)):
            if table.num_rows:
                idx = _array(table, "span_idx").to_numpy()
                keep = _occurrence(idx) < allowed[t][idx]
                if not keep.all():
                    table = table.filter(pa.array(keep))
            kept.append(table)
        numbers, strings, arrays = kept
        outcome.dropped_attributes = int((over_count - max_attrs).clip(min=0).sum())
        if max_len is not None:  # the masks were computed before rows were dropped
            long_str = _long_strings(_array(strings, "value"), max_len)
            long_arr = _long_arrays(arrays, max_len)
    if max_len is not None and long_str is not None:
        cut = _cut_strings(_array(strings, "value"), long_str, max_len)
        strings = strings.set_column(strings.schema.get_field_index("value"), "value", cut)
        outcome.cut_values += int(pc.sum(long_str).as_py() or 0)
    if max_len is not None and long_arr is not None:
        arrays = _cut_arrays(arrays, max_len)
        outcome.cut_values += int(pc.sum(long_arr).as_py() or 0)
    outcome.decoded = replace(decoded, columns=SpanColumns(columns.spans, numbers, strings, arrays))
    return outcome


def _allowed_per_type(columns: SpanColumns, counts: np.ndarray, max_attrs: int,
                      wire: Callable[[], ExportTraceServiceRequest]) -> list[np.ndarray]:
    """Per table (numbers, strings, arrays) and span: how many of the span's rows are among its first
    `max_attrs` attributes in wire order. Spans within the limit may keep all their rows."""
    n = len(columns)
    big = np.iinfo(np.int64).max
    allowed = [np.full(n, big, dtype=np.int64) for _ in range(3)]
    over = np.flatnonzero(counts > max_attrs)
    trace_ids = _array(columns.spans, "trace_id").take(pa.array(over)).to_pylist()
    span_ids = _array(columns.spans, "span_id").take(pa.array(over)).to_pylist()
    wanted: dict[tuple[bytes, bytes], list[int]] = {}
    for i, tid, sid in zip(over.tolist(), trace_ids, span_ids, strict=True):
        wanted.setdefault((bytes.fromhex(tid), bytes.fromhex(sid)), []).append(i)
    try:
        request = wire()
    except Exception:  # cannot happen (the request was decoded already); keep by table order below
        request = ExportTraceServiceRequest()
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                rows = wanted.get((sp.trace_id, sp.span_id))
                if not rows:
                    continue
                kinds = [kv.value.WhichOneof("value") for kv in sp.attributes]
                types = [0 if k in _NUMBER_KINDS else 2 if k == "array_value" else 1 for k in kinds if k is not None]
                if len(types) != counts[rows[0]]:  # a copy of the same ids that was not stored as this row
                    continue
                i = rows.pop(0)
                first = np.bincount(np.array(types[:max_attrs], dtype=np.int64), minlength=3)
                for t in range(3):
                    allowed[t][i] = first[t]
    for i in (i for rows in wanted.values() for i in rows):  # not found: keep by table order
        left = max_attrs
        for t, table in enumerate((columns.numbers, columns.strings, columns.arrays)):
            have = int(np.count_nonzero(_array(table, "span_idx").to_numpy() == i)) if table.num_rows else 0
            allowed[t][i] = min(have, left)
            left -= allowed[t][i]
    return allowed


def _reject(outcome: LimitOutcome, max_attrs: int | None, max_len: int | None, over_count: np.ndarray | None,
            long_str: pa.Array | None, long_arr: pa.Array | None) -> LimitOutcome:
    decoded = outcome.decoded
    columns = decoded.columns
    n = len(columns)
    why: dict[int, str] = {}  # span row -> reason text (the first found per span)
    reason_of: dict[int, str] = {}
    if over_count is not None:
        for i in np.flatnonzero(over_count > (max_attrs or 0)).tolist():
            why[i] = f"{int(over_count[i])} attributes, over the limit of {max_attrs}"
            reason_of[i] = TOO_MANY
    for table, mask, what in ((columns.strings, long_str, "string"), (columns.arrays, long_arr, "array")):
        if mask is None:
            continue
        rows = pa.array(np.flatnonzero(mask.to_numpy(zero_copy_only=False)))
        idx = _array(table, "span_idx").take(rows).to_pylist()
        keys = _array(table, "key").take(rows).to_pylist()
        if what == "string":
            lengths = pc.utf8_length(_array(table, "value").take(rows)).to_pylist()
            texts = [f"attribute {key} is {n} characters long, over the limit of {max_len}"
                     for key, n in zip(keys, lengths, strict=True)]
        else:
            numbers = pc.list_value_length(_array(table, "numbers").take(rows)).to_pylist()
            strings = pc.list_value_length(_array(table, "strings").take(rows)).to_pylist()
            elements = [a if a is not None else (b or 0) for a, b in zip(numbers, strings, strict=True)]
            texts = [f"array attribute {key} has {n} elements, over the limit of {max_len}" if n > (max_len or 0)
                     else f"array attribute {key} has an element over the limit of {max_len} characters"
                     for key, n in zip(keys, elements, strict=True)]
        for i, text in zip(idx, texts, strict=True):
            if i not in why:
                why[i] = text
                reason_of[i] = TOO_LONG
    bad = np.zeros(n, dtype=bool)
    bad[list(why)] = True
    keep = ~bad
    new_idx = np.cumsum(keep) - 1  # old span row -> new span row (for kept ones)
    keep_arr = pa.array(keep)

    def rows_of(table: pa.Table) -> pa.Table:
        if not table.num_rows:
            return table
        idx = _array(table, "span_idx").to_numpy()
        table = table.filter(pa.array(keep[idx]))
        if table.num_rows:
            remapped = pa.array(new_idx[_array(table, "span_idx").to_numpy()].astype(np.int32))
            table = table.set_column(0, "span_idx", remapped)
        return table

    span_ids = _array(columns.spans, "span_id")
    names = _array(columns.spans, "name")
    reasons = list(decoded.reasons)
    for i in sorted(why):
        if len(reasons) >= _MAX_REASONS:
            break
        reasons.append(f"span {span_ids[i].as_py()} ({quote_name(names[i].as_py())}): {why[i]}")
    for r in reason_of.values():
        outcome.rejected[r] = outcome.rejected.get(r, 0) + 1
    spans = columns.spans.filter(keep_arr)
    outcome.decoded = replace(
        decoded,
        columns=SpanColumns(spans, rows_of(columns.numbers), rows_of(columns.strings), rows_of(columns.arrays)),
        rejected=decoded.rejected + len(why),
        reasons=reasons,
    )
    return outcome
