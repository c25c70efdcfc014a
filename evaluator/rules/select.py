"""Runs of a rule: the SQL every per-run kind starts from, batched across rules that read the same way.

A *run* is a span the rule's selector matches (span name, service, attribute equality) that carries the rule's
value attribute; a span without it is not a run for that rule. `select_runs` returns the runs of one rule in a
time range as columns; `fetch_runs` is the batched form the kinds use.

Batching. Rules that differ only in their `where` *values* (1,000 rules, one per dataset, all reading
`data.row_count` of `features.daily.run`) have the same `RunShape` and are answered by one query: the where
values of every rule travel as list parameters, are unnested into a `wanted` table (one row per distinct where
tuple, a "member", with its own time bounds) and joined to the attribute tables. Each returned row names the
member it matched, and the kinds hand it to the rules that share that member.

Pruning. Every attribute table is filtered on its denormalised `time` column (and `spans` on `end_time`) with
the batch's overall bounds, so DuckDB's zone maps skip old row groups: the query touches only the time range
asked for. Members whose ranges differ a lot (a series whose cursor is months old next to ones judged
yesterday) are split into separate queries by the order of magnitude of their range, so one stale member does
not widen the scan for all the others.

Duplicates. A span may carry the same attribute key twice (OTLP forbids it, decoders keep it); the row inserted
last (the highest rowid, i.e. the later occurrence in the span) wins, for the value, where and group_by
attributes alike.

Safety. Attribute keys, names and where values are parameters, never SQL text; only the shape (how many where
and group_by attributes) changes the statement. Times are integer microseconds since the epoch (UTC) and are
converted with `make_timestamp` / `epoch_us`, never through local time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import duckdb
import numpy as np
import numpy.typing as npt

from evaluator.rules.model import KindResult, Rule, RuleError, RulePrior, Sample, Selector, SeriesCursor, SeriesKey

US = 1_000_000
WhereValue = str | float
Results = dict[str, list[Sample] | KindResult | RuleError]
RulePriors = Mapping[str, RulePrior]


# -- shapes and members ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunShape:
    """Everything of a query but the where values and the time bounds: rules with equal shapes share a query."""

    span: str | None
    service: str | None
    where: tuple[tuple[str, bool], ...]  # (attribute, is_number), in the order of a member's where values
    value: str | None  # the numeric attribute that makes a span a run; None: every selected span is a run
    group_by: tuple[str, ...] = ()
    extra: str | None = None  # an optional numeric attribute returned alongside (NaN where a run lacks it)


@dataclass(frozen=True)
class Member:
    """One distinct where tuple of a batch, with the time range (lo, hi] its rules need (microseconds)."""

    where: tuple[WhereValue, ...]
    lo_us: int
    hi_us: int


def _where_value(v: object) -> WhereValue:
    if isinstance(v, str):
        return v
    if isinstance(v, bool | int | float):
        return float(v)
    raise TypeError(f"where value {v!r} is neither a string nor a number")


def shape_of(selector: Selector, value: str | None, group_by: Sequence[str] = (),
             extra: str | None = None) -> tuple[RunShape, tuple[WhereValue, ...]]:
    """The batching key of a selector and its where values (string values match span_strings, numbers
    span_numbers; ints and bools are numbers)."""
    items = sorted(((k, _where_value(v)) for k, v in selector.where),
                   key=lambda kv: (kv[0], not isinstance(kv[1], str), str(kv[1])))
    shape = RunShape(selector.span, selector.service, tuple((k, not isinstance(v, str)) for k, v in items), value,
                     tuple(group_by), extra)
    return shape, tuple(v for _, v in items)


# -- the runs ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runs:
    """Runs as columns, ordered by (member, time, span_key). `groups[i]` is the rendered value of the i-th
    group_by attribute ("" where the run lacks it)."""

    member: npt.NDArray[np.int64]
    span_key: npt.NDArray[np.int64]
    time_us: npt.NDArray[np.int64]
    trace_id: npt.NDArray[np.object_]
    span_id: npt.NDArray[np.object_]
    value: npt.NDArray[np.float64]  # NaN when the shape has no value attribute
    groups: tuple[npt.NDArray[np.object_], ...]
    extra: npt.NDArray[np.float64]  # NaN where the run lacks the extra attribute (or the shape has none)

    def __len__(self) -> int:
        return len(self.span_key)

    @property
    def time(self) -> npt.NDArray[np.float64]:
        """End time of each run in unix seconds."""
        return self.time_us / US

    @staticmethod
    def empty(n_groups: int = 0) -> Runs:
        i, f, o = np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, object)
        return Runs(i, i, i, o, o, f, tuple(o for _ in range(n_groups)), f)

    def take(self, idx: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Runs:
        return Runs(self.member[idx], self.span_key[idx], self.time_us[idx], self.trace_id[idx], self.span_id[idx],
                    self.value[idx], tuple(g[idx] for g in self.groups), self.extra[idx])

    @staticmethod
    def concat(parts: Sequence[Runs], n_groups: int) -> Runs:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Runs.empty(n_groups)
        if len(parts) == 1:
            return parts[0]
        runs = Runs(
            member=np.concatenate([p.member for p in parts]),
            span_key=np.concatenate([p.span_key for p in parts]),
            time_us=np.concatenate([p.time_us for p in parts]),
            trace_id=np.concatenate([p.trace_id for p in parts]),
            span_id=np.concatenate([p.span_id for p in parts]),
            value=np.concatenate([p.value for p in parts]),
            groups=tuple(np.concatenate([p.groups[i] for p in parts]) for i in range(n_groups)),
            extra=np.concatenate([p.extra for p in parts]),
        )
        order = np.lexsort((runs.span_key, runs.time_us, runs.member))
        return runs.take(order)

    def unique(self) -> Runs:
        """Without repeated (member, span_key) rows (runs fetched twice), keeping the (member, time, key) order."""
        if len(self) < 2:
            return self
        pairs = np.stack([self.member, self.span_key], axis=1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        if len(first) == len(self):
            return self
        return self.take(np.sort(first))

    def by_member(self) -> dict[int, npt.NDArray[np.intp]]:
        """Row indices per member, each in (time, span_key) order."""
        if not len(self):
            return {}
        cuts = np.flatnonzero(np.diff(self.member)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(self)]))
        return {int(self.member[s]): np.arange(s, e) for s, e in zip(starts, ends, strict=True)}


def render_number(x: float) -> str:
    """A numeric attribute as a series label: Python's repr of the float, integral values without '.0'."""
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


def series_key(group_by: Sequence[str], values: Sequence[str]) -> SeriesKey:
    """The series of a run: its group_by attributes and their values as sorted (attribute, value) pairs."""
    return tuple(sorted(zip(group_by, values, strict=True)))


class SeriesKeys:
    """Series keys of many runs, built once per distinct combination of group_by values."""

    def __init__(self, group_by: Sequence[str]) -> None:
        self._group_by = tuple(group_by)
        self._cache: dict[tuple[str, ...], SeriesKey] = {}

    def __call__(self, runs: Runs, i: int) -> SeriesKey:
        if not self._group_by:
            return ()
        values = tuple(str(g[i]) for g in runs.groups)
        key = self._cache.get(values)
        if key is None:
            key = self._cache[values] = series_key(self._group_by, values)
        return key


# -- SQL ---------------------------------------------------------------------------------------------------------

_RANGE = "time > make_timestamp($glo) AND time <= make_timestamp($ghi)"
_KEYED = "time <= make_timestamp($ghi) AND span_key > $klo AND span_key <= $khi"


def _attr(name: str, table: str, key_param: str) -> str:
    return (f"{name} AS (SELECT span_key, arg_max(value, rowid) AS value FROM {table} "
            f"WHERE key = ${key_param} AND {_RANGE} GROUP BY span_key)")


def _keyed_attr(name: str, table: str, key_param: str) -> str:
    return (f"{name} AS (SELECT span_key, arg_max(value, rowid) AS value FROM {table} "
            f"WHERE key = ${key_param} AND {_KEYED} GROUP BY span_key)")


def _build_sql(shape: RunShape, newest_only: bool, keyed: bool = False) -> str:
    """The statement for a shape; user values are all parameters ($vk, $k0.., $g0.., $name, $service, ...).

    Only equality joins: the where values of the members are joined by hash; each member's own time range is
    applied afterwards in numpy (an inequality join against the members made DuckDB plan a nested loop)."""
    n_where = len(shape.where)
    ctes = []
    if n_where:
        unnest = ["unnest($m) AS m"] + [f"unnest($w{i}) AS w{i}" for i in range(n_where)]
        ctes.append(f"wanted AS (SELECT {', '.join(unnest)})")
    attr = _keyed_attr if keyed else _attr
    span_filter = (["end_time <= make_timestamp($ghi)", "span_key > $klo", "span_key <= $khi"] if keyed else
                   ["end_time > make_timestamp($glo)", "end_time <= make_timestamp($ghi)"])
    if shape.span is not None:
        span_filter.append("name = $name")
    if shape.service is not None:
        span_filter.append("service_name = $service")
    ctes.append(f"sp AS (SELECT span_key, end_time AS time, trace_id, span_id FROM spans "
                f"WHERE {' AND '.join(span_filter)})")
    if shape.value is not None:
        ctes.append(attr("v", "span_numbers", "vk"))
        joins = ["v JOIN sp ON sp.span_key = v.span_key"]
        value = "v.value"
    else:
        joins = ["sp"]
        value = "CAST(NULL AS DOUBLE)"
    conds = []
    for i, (_, is_number) in enumerate(shape.where):
        ctes.append(attr(f"w{i}", "span_numbers" if is_number else "span_strings", f"k{i}"))
        joins.append(f"JOIN w{i} ON w{i}.span_key = sp.span_key")
        conds.append(f"wanted.w{i} = w{i}.value")
    member = "0"
    if n_where:
        joins.append(f"JOIN wanted ON {' AND '.join(conds)}")
        member = "wanted.m"
    cols = [f"{member} AS m", "sp.span_key AS span_key", "epoch_us(sp.time) AS time_us", "sp.trace_id AS trace_id",
            "sp.span_id AS span_id", f"{value} AS value"]
    partition = [member]
    add_group_by(len(shape.group_by), ctes, joins, cols, attr)
    for i in range(len(shape.group_by)):
        partition += [f"gs{i}.value", f"gn{i}.value"]
    if shape.extra is not None:
        ctes.append(attr("x", "span_numbers", "xk"))
        joins.append("LEFT JOIN x ON x.span_key = sp.span_key")
        cols.append("x.value AS extra")
    else:
        cols.append("CAST(NULL AS DOUBLE) AS extra")
    sql = f"WITH {', '.join(ctes)}\nSELECT {', '.join(cols)}\nFROM {' '.join(joins)}"
    if newest_only:
        # Finer than (or equal to) the series as rendered in Python, so the newest run of each series survives.
        sql += (f"\nQUALIFY row_number() OVER (PARTITION BY {', '.join(partition)} "
                "ORDER BY sp.time DESC, sp.span_key DESC) = 1")
    return sql + "\nORDER BY m, time_us, span_key"


def _params(shape: RunShape, members: Sequence[Member], keys: tuple[int, int] | None = None) -> dict[str, object]:
    p: dict[str, object] = {"ghi": max(m.hi_us for m in members)}
    if keys is None:
        p["glo"] = min(m.lo_us for m in members)
    else:
        p["klo"], p["khi"] = keys
    if shape.where:
        p["m"] = list(range(len(members)))
    for i, (_, is_number) in enumerate(shape.where):
        p[f"k{i}"] = shape.where[i][0]
        p[f"w{i}"] = [float(m.where[i]) if is_number else str(m.where[i]) for m in members]
    if shape.span is not None:
        p["name"] = shape.span
    if shape.service is not None:
        p["service"] = shape.service
    if shape.value is not None:
        p["vk"] = shape.value
    for i, attr in enumerate(shape.group_by):
        p[f"g{i}"] = attr
    if shape.extra is not None:
        p["xk"] = shape.extra
    return p


def _render_group(strings: np.ndarray, numbers: np.ndarray) -> npt.NDArray[np.object_]:
    s_mask = np.ma.getmaskarray(strings)
    n_mask = np.ma.getmaskarray(numbers)
    s_data = np.ma.getdata(strings)
    n_data = np.ma.getdata(numbers)
    out = np.empty(len(s_data), dtype=object)
    for i in range(len(out)):
        if not s_mask[i]:
            out[i] = s_data[i]
        elif not n_mask[i]:
            out[i] = render_number(n_data[i])
        else:
            out[i] = ""
    return out


def _float_column(col: np.ndarray) -> npt.NDArray[np.float64]:
    return np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)


def _query(cur: duckdb.DuckDBPyConnection, shape: RunShape, members: Sequence[Member], index: Sequence[int],
           newest_only: bool, keys: tuple[int, int] | None = None) -> Runs:
    """One query for some members; rows are tagged with index[local member] and cut to each member's range."""
    res = cur.execute(_build_sql(shape, newest_only, keys is not None), _params(shape, members, keys)).fetchnumpy()
    if not len(res["m"]):
        return Runs.empty(len(shape.group_by))
    runs = Runs(
        member=np.asarray(res["m"], dtype=np.int64),
        span_key=np.asarray(res["span_key"], dtype=np.int64),
        time_us=np.asarray(res["time_us"], dtype=np.int64),
        trace_id=np.asarray(res["trace_id"], dtype=object),
        span_id=np.asarray(res["span_id"], dtype=object),
        value=_float_column(res["value"]),
        groups=tuple(_render_group(res[f"gs{i}"], res[f"gn{i}"]) for i in range(len(shape.group_by))),
        extra=_float_column(res["extra"]),
    )
    if not shape.where and len(members) > 1:  # members without where values all see the same rows
        n = len(runs)
        runs = runs.take(np.tile(np.arange(n), len(members)))
        runs = replace(runs, member=np.repeat(np.arange(len(members), dtype=np.int64), n))
    lo = np.array([m.lo_us for m in members], dtype=np.int64)[runs.member]
    hi = np.array([m.hi_us for m in members], dtype=np.int64)[runs.member]
    runs = runs.take((runs.time_us > lo) & (runs.time_us <= hi))
    return replace(runs, member=np.asarray(index, dtype=np.int64)[runs.member])


def _range_class(m: Member) -> tuple[int, int]:
    """Members share a query when their ranges are of similar length (within a factor of two, above two days)
    and end close to each other (within one such length), so the shared scan stays within a few times what
    each member needs."""
    hours = max(m.hi_us - m.lo_us, 0) / (3600 * US)
    size = 0 if hours <= 48 else math.ceil(math.log2(hours / 48))
    return size, m.hi_us // (48 * 3600 * US * 2**size)


def fetch_runs(cur: duckdb.DuckDBPyConnection, shape: RunShape, members: Sequence[Member], *,
               newest_only: bool = False, keys: tuple[int, int] | None = None) -> Runs:
    """The runs of every member in its own range (lo, hi], each row tagged with the member's index.

    newest_only keeps only the newest run per member and series (of the query's overall range, so every member
    must end at the same hi). Members with very different range lengths go to separate queries (see the module
    docstring); the result is one Runs ordered by (member, time, span_key).
    """
    if newest_only and len({m.hi_us for m in members}) > 1:
        raise ValueError("newest_only needs members that end at the same time")
    if keys is not None:  # by ingest order: every member's runs with a span_key in (klo, khi], ending by its hi
        if keys[1] <= keys[0] or not members:
            return Runs.empty(len(shape.group_by))
        return _query(cur, shape, members, range(len(members)), newest_only, keys)
    classes: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, m in enumerate(members):
        if m.hi_us > m.lo_us:
            classes[_range_class(m)].append(i)
    parts = [_query(cur, shape, [members[i] for i in idx], idx, newest_only) for idx in classes.values()]
    return Runs.concat(parts, len(shape.group_by))


def select_runs(cur: duckdb.DuckDBPyConnection, selector: Selector, value: str | None, group_by: Sequence[str],
                lo: float, hi: float) -> Runs:
    """The runs of one selector with end time in (lo, hi] (unix seconds), in (time, span_key) order."""
    shape, where = shape_of(selector, value, group_by)
    return fetch_runs(cur, shape, [Member(where, to_us(lo), to_us(hi))])


def data_start_us(cur: duckdb.DuckDBPyConnection, value: str) -> int | None:
    """The oldest time the value attribute was recorded (microseconds): where a rule's whole history starts."""
    row = cur.execute("SELECT epoch_us(min(time)) FROM span_numbers WHERE key = $vk", {"vk": value}).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def data_start_any(cur: duckdb.DuckDBPyConnection) -> int | None:
    """The oldest span end time in the store (microseconds)."""
    row = cur.execute("SELECT epoch_us(min(end_time)) FROM spans").fetchone()
    return None if row is None or row[0] is None else int(row[0])


# -- helpers shared by the per-run kinds -------------------------------------------------------------------------

def to_us(seconds: float) -> int:
    return round(seconds * US)


def priors_of(prior: Mapping[str, Any] | None) -> dict[str, RulePrior]:
    """The priors a kind was given, per rule id. A plain {series: SeriesCursor} per rule (what tests write) means
    the rule was evaluated at its newest cursor."""
    out: dict[str, RulePrior] = {}
    for rule_id, p in (prior or {}).items():
        if isinstance(p, RulePrior):
            out[rule_id] = p
            continue
        series: dict[SeriesKey, SeriesCursor] = dict(p)
        times = [c.at for c in series.values() if c.at is not None]
        out[rule_id] = RulePrior(max(times) if times else None, series)
    return out


def run_lower_bound(prior: RulePrior | None, needs_memory: bool = False) -> int | None:
    """The oldest end time (exclusive, µs) a per-run rule must read by time, or None for its whole history: a rule
    never evaluated, or (needs_memory) one with a known series whose memory is missing. With the span key seen at
    the previous evaluation known, runs that arrived since are read by key (fetch_new_runs) and by time only those
    ending after the previous evaluation; without it, runs after each series' cursor."""
    if prior is None or prior.since is None:
        return None
    if needs_memory and any(c.memory is None for c in prior.series.values()):
        return None
    lo = to_us(prior.since)
    if prior.seen_key is None:
        for c in prior.series.values():
            if c.at is not None:
                lo = min(lo, to_us(c.at) - 1)  # - 1: a run at the cursor's time with a higher key is new
    return lo


def fetch_new_runs(cur: duckdb.DuckDBPyConnection, shape: RunShape, batch: Batch, priors: RulePriors, ts_us: int,
                   needs_memory: bool = False) -> tuple[Runs, dict[tuple[WhereValue, ...], int]]:
    """The runs a batch of per-run rules must look at, and the member index of each where tuple: for rules never
    evaluated, their whole history; otherwise the runs that arrived since the previous evaluation (by span key, so
    a run that ended before that evaluation but arrived after it is still judged) and those that ended since."""
    los: dict[tuple[WhereValue, ...], int | None] = {}
    seen: dict[tuple[WhereValue, ...], int | None] = {}
    key_hi: int | None = None
    for rule, where in batch:
        p = priors.get(rule.id)
        lo = run_lower_bound(p, needs_memory)
        k = p.seen_key if p is not None and lo is not None else None
        if p is not None and p.key_hi is not None:
            key_hi = p.key_hi
        if where in los:
            prev, prev_k = los[where], seen[where]
            lo = None if prev is None or lo is None else min(prev, lo)
            k = None if prev_k is None or k is None else min(prev_k, k)
        los[where], seen[where] = lo, k
    wheres = list(los)
    index = {w: i for i, w in enumerate(wheres)}
    parts: list[Runs] = []
    whole = [w for w in wheres if los[w] is None]
    if whole:
        start = data_start_us(cur, shape.value) if shape.value is not None else data_start_any(cur)
        if start is not None:
            parts.append(_tagged(fetch_runs(cur, shape, [Member(w, start - 1, ts_us) for w in whole]), whole, index))
    timed = [w for w in wheres if los[w] is not None]
    if timed:
        parts.append(_tagged(fetch_runs(cur, shape, [Member(w, cast(int, los[w]), ts_us) for w in timed]), timed,
                             index))
    keyed = [w for w in timed if seen[w] is not None]
    if keyed and key_hi is not None:
        klo = min(cast(int, seen[w]) for w in keyed)
        runs = fetch_runs(cur, shape, [Member(w, 0, ts_us) for w in keyed], keys=(klo, key_hi))
        parts.append(_tagged(runs, keyed, index))
    return Runs.concat(parts, len(shape.group_by)).unique(), index


def _tagged(runs: Runs, wheres: list[tuple[WhereValue, ...]], index: dict[tuple[WhereValue, ...], int]) -> Runs:
    """Runs fetched for a subset of members, re-tagged with the members' indices in the whole batch."""
    if not len(runs):
        return runs
    return replace(runs, member=np.asarray([index[w] for w in wheres], dtype=np.int64)[runs.member])


def max_span_key(cur: duckdb.DuckDBPyConnection) -> int:
    """The highest span key committed: runs with a higher key arrive after this is read (one writer commits keys
    in order)."""
    row = cur.execute("SELECT coalesce(max(span_key), 0) FROM spans").fetchone()
    return int(row[0]) if row else 0


def is_new(time_us: int, span_key: int, cursor: SeriesCursor | None) -> bool:
    """A run comes after its series' cursor (runs are ordered by (time, span_key))."""
    if cursor is None or cursor.at is None:
        return True
    c_us = to_us(cursor.at)
    return time_us > c_us or (time_us == c_us and span_key > (cursor.run_key or 0))


def is_late(span_key: int, cursor: SeriesCursor | None, seen_key: int | None) -> bool:
    """A run at or before its series' cursor that was not there at the previous evaluation: it arrived after
    later runs of its series were judged (is_new is False for it)."""
    return cursor is not None and seen_key is not None and span_key > seen_key


def rule_error(rule: Rule, exc: BaseException) -> RuleError:
    if isinstance(exc, RuleError):
        return exc
    return RuleError(f"{rule.id}: {type(exc).__name__}: {exc}")


Batch = list[tuple[Rule, tuple[WhereValue, ...]]]


def evaluate_batched(rules: Sequence[Rule], shape: Callable[[Rule], tuple[RunShape, tuple[WhereValue, ...]]],
                     run_batch: Callable[[RunShape, Batch], Results]) -> Results:
    """Group rules by shape and evaluate each group at once; when a group fails, evaluate its rules one by one,
    so the error lands on the rule that caused it and the others still get results."""
    out: Results = {}
    batches: dict[RunShape, Batch] = defaultdict(list)
    for rule in rules:
        try:
            s, where = shape(rule)
        except Exception as exc:
            out[rule.id] = rule_error(rule, exc)
            continue
        batches[s].append((rule, where))
    for s, batch in batches.items():
        try:
            out.update(run_batch(s, batch))
        except Exception as exc:
            if len(batch) == 1:
                out[batch[0][0].id] = rule_error(batch[0][0], exc)
                continue
            for item in batch:
                try:
                    out.update(run_batch(s, [item]))
                except Exception as exc1:
                    out[item[0].id] = rule_error(item[0], exc1)
    return out


def add_group_by(n: int, ctes: list[str], joins: list[str], cols: list[str],
                 attr: Callable[[str, str, str], str] = _attr) -> None:
    """The SQL for n group_by attributes (parameters $g0..): each a string or a number, LEFT JOINed to `sp`,
    selected as gs<i> / gn<i>. `attr` builds an attribute CTE (name, table, key parameter) with the caller's
    time filter."""
    for i in range(n):
        ctes.append(attr(f"gs{i}", "span_strings", f"g{i}"))
        ctes.append(attr(f"gn{i}", "span_numbers", f"g{i}"))
        joins.append(f"LEFT JOIN gs{i} ON gs{i}.span_key = sp.span_key")
        joins.append(f"LEFT JOIN gn{i} ON gn{i}.span_key = sp.span_key")
        cols += [f"gs{i}.value AS gs{i}", f"gn{i}.value AS gn{i}"]


def evaluate_each(rules: list[Rule], judge: Callable[[Rule], list[Sample] | KindResult]) -> Results:
    """For kinds that query rule by rule: one rule's failure is that rule's RuleError only."""
    out: Results = {}
    for rule in rules:
        try:
            out[rule.id] = judge(rule)
        except Exception as exc:
            out[rule.id] = rule_error(rule, exc)
    return out
