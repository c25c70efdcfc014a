"""`otel-evaluator test`: rule unit tests in the spirit of `promtool test rules`.

A test file names rule files, describes input runs in a concise series notation, and lists the alerts expected
at given evaluation times. Each test gets a fresh DuckDB file in a temp folder; its runs go in through the real
ingest path (OTLP protobuf -> decoder -> group-commit writer); the rules are evaluated every
`evaluation_interval` from `start` with the real engine and DuckDB state. The format is in docs/rules.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from evaluator.receiver.ingest import Ingestor, IngestSettings
from evaluator.rules.backends import DuckDBState, state_from_row
from evaluator.rules.engine import RuleEngine
from evaluator.rules.kinds import new_kinds
from evaluator.rules.model import FIRING, PENDING, Rule, RuleSet
from evaluator.rules.shape import iso
from evaluator.store.store import Store, StoreSettings
from evaluator.store.writer import SpanWriter
from evaluator.telemetry import Telemetry
from evaluator.testing import FakeClock
from evaluator.timeparse import parse_time
from evaluator.yamlsrc import (
    InvalidConfig,
    Node,
    Problems,
    check_keys,
    load_yaml_file,
    read_duration,
    read_map,
    read_str,
    read_str_list,
    read_str_map,
)

_TOKEN = re.compile(r"^(?P<a>-?[\d.eE+-]+?)(?:(?P<op>[+-])(?P<b>[\d.eE+-]+))?x(?P<n>\d+)$")


def expand_series(text: str) -> list[float | None]:
    """'1 2 _ 3x2 10+5x3' -> [1, 2, None, 3, 3, 10, 15, 20]. `_` is a missing value.

    `axN` is N values of a; `a+bxN` is N values a, a+b, ... (unlike promtool, N counts values, not steps).
    """
    out: list[float | None] = []
    for tok in str(text).split():
        if tok == "_":
            out.append(None)
            continue
        m = _TOKEN.match(tok)
        if m:
            a, n = float(m.group("a")), int(m.group("n"))
            b = float(m.group("b")) if m.group("b") else 0.0
            if m.group("op") == "-":
                b = -b
            out.extend(a + i * b for i in range(n))
            continue
        try:
            out.append(float(tok))
        except ValueError:
            raise ValueError(f"bad series value {tok!r}: use numbers, _, axN or a+bxN") from None
    return out


@dataclass(frozen=True)
class InputRuns:
    span: str
    service: str
    every: float
    offset: float
    attributes: dict[str, str]
    values: dict[str, list[float | None]]
    arrays: dict[str, list[list[float] | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Expectation:
    at: float  # offset from start, seconds
    alert: str
    alerts: tuple[tuple[tuple[tuple[str, str], ...], str], ...]  # (series labels, state)
    line: int


@dataclass(frozen=True)
class RuleTest:
    name: str
    start: float
    inputs: tuple[InputRuns, ...]
    expectations: tuple[Expectation, ...]


@dataclass
class TestFile:
    path: str
    rule_files: list[str]
    interval: float
    tests: list[RuleTest] = field(default_factory=list)


def parse_test_file(path: str) -> TestFile:
    """Read and check a test file; InvalidConfig lists every problem with its position."""
    problems = Problems()
    root = load_yaml_file(path)
    base = os.path.dirname(os.path.abspath(path))
    if not root.is_map():
        raise InvalidConfig(_one(root, "", "a test file must be a mapping"))
    check_keys(root, {"rule_files", "evaluation_interval", "tests"}, problems, "")
    files = read_str_list(root.get("rule_files"), "rule_files", problems) or []
    if not files:
        problems.add(root, "rule_files", "name at least one rule file")
    interval = read_duration(root.get("evaluation_interval"), "evaluation_interval", problems) or 60.0
    tf = TestFile(path, [os.path.join(base, f) for f in files], interval)
    tests = root.get("tests")
    if tests is None or not tests.is_list():
        problems.add(tests or root, "tests", "must be a list of tests")
        raise InvalidConfig(problems)
    for i, t in enumerate(tests.value):
        test = _parse_test(t, f"tests[{i}]", problems)
        if test is not None:
            tf.tests.append(test)
    if problems:
        raise InvalidConfig(problems)
    return tf


def _one(node: Node, key: str, why: str) -> Problems:
    p = Problems()
    p.add(node, key, why)
    return p


def _parse_test(t: Node, where: str, problems: Problems) -> RuleTest | None:
    if read_map(t, where, problems) is None:
        return None
    check_keys(t, {"name", "start", "input_runs", "alert_rule_test"}, problems, where)
    name = read_str(t.get("name"), f"{where}.name", problems) or where
    start = 0.0
    start_node = t.get("start")
    if start_node is None:
        problems.add(t, f"{where}.start", "missing (an ISO-8601 time, e.g. 2026-11-01T00:00:00Z)")
    elif isinstance(start_node.value, datetime):  # YAML reads an unquoted ISO time as a timestamp
        value = start_node.value
        start = (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    else:
        try:
            start = parse_time(str(start_node.value))
        except ValueError as exc:
            problems.add(start_node, f"{where}.start", str(exc))
    inputs: list[InputRuns] = []
    runs_node = t.get("input_runs")
    for j, r in enumerate(runs_node.value if runs_node is not None and runs_node.is_list() else []):
        w = f"{where}.input_runs[{j}]"
        if read_map(r, w, problems) is None:
            continue
        check_keys(r, {"span", "service", "every", "offset", "attributes", "values", "arrays"}, problems, w)
        arrays: dict[str, list[list[float] | None]] = {}
        anode = read_map(r.get("arrays"), f"{w}.arrays", problems)
        for key, child in (anode.value.items() if anode is not None else []):
            plain = child.plain()
            ok = isinstance(plain, list) and all(
                x is None or x == "_" or (isinstance(x, list) and all(isinstance(v, int | float) for v in x))
                for x in plain)
            if not ok:
                problems.add(child, f"{w}.arrays.{key}", "must be a list with one list of numbers (or _) per run")
                continue
            arrays[key] = [None if x in (None, "_") else [float(v) for v in x] for x in plain]
        values: dict[str, list[float | None]] = {}
        vnode = read_map(r.get("values"), f"{w}.values", problems)
        if vnode is None:
            problems.add(r, f"{w}.values", "missing: attribute -> series, e.g. data.row_count: '100x6 80'")
        else:
            for key, child in vnode.value.items():
                if isinstance(child.value, list | dict) or child.value is None:
                    problems.add(child, f"{w}.values.{key}",
                                 "must be a series in the notation '1 2 _ 3x2 10+5x3' (a string or a number)")
                    continue
                try:
                    values[key] = expand_series(child.value)
                except ValueError as exc:
                    problems.add(child, f"{w}.values.{key}", str(exc))
        inputs.append(InputRuns(
            span=read_str(r.get("span"), f"{w}.span", problems) or "run",
            service=read_str(r.get("service"), f"{w}.service", problems) or "test-service",
            every=read_duration(r.get("every"), f"{w}.every", problems) or 86400.0,
            offset=read_duration(r.get("offset"), f"{w}.offset", problems) or 0.0,
            attributes=read_str_map(r.get("attributes"), f"{w}.attributes", problems) or {},
            values=values,
            arrays=arrays,
        ))
    expectations: list[Expectation] = []
    exp_node = t.get("alert_rule_test")
    if exp_node is None or not exp_node.is_list():
        problems.add(exp_node or t, f"{where}.alert_rule_test", "must be a list of expected alerts")
    for j, e in enumerate(exp_node.value if exp_node is not None and exp_node.is_list() else []):
        w = f"{where}.alert_rule_test[{j}]"
        if read_map(e, w, problems) is None:
            continue
        check_keys(e, {"eval_time", "alertname", "exp_alerts"}, problems, w)
        at = read_duration(e.get("eval_time"), f"{w}.eval_time", problems)
        alert = read_str(e.get("alertname"), f"{w}.alertname", problems)
        if at is None or alert is None:
            problems.add(e, w, "needs eval_time (an offset from start, e.g. 6d7h) and alertname")
            continue
        alerts: list[tuple[tuple[tuple[str, str], ...], str]] = []
        exp = e.get("exp_alerts")
        for k, a in enumerate(exp.value if exp is not None and exp.is_list() else []):
            aw = f"{w}.exp_alerts[{k}]"
            if read_map(a, aw, problems) is None:
                continue
            check_keys(a, {"labels", "state"}, problems, aw)
            labels = read_str_map(a.get("labels"), f"{aw}.labels", problems) or {}
            state = read_str(a.get("state"), f"{aw}.state", problems) or FIRING
            if state not in (PENDING, FIRING):
                problems.add(a.get("state"), f"{aw}.state", "must be pending or firing")
            alerts.append((tuple(sorted(labels.items())), state))
        expectations.append(Expectation(at, alert, tuple(sorted(alerts)), e.line))
    return RuleTest(name, start, tuple(inputs), tuple(sorted(expectations, key=lambda x: x.at)))


def _request(inputs: tuple[InputRuns, ...], start: float) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for inp in inputs:
        rs = req.resource_spans.add()
        rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=inp.service)))
        ss = rs.scope_spans.add()
        n = max([len(v) for v in inp.values.values()] + [len(v) for v in inp.arrays.values()], default=0)
        for i in range(n):
            numbers = {k: x for k, v in inp.values.items() if i < len(v) and (x := v[i]) is not None}
            arrays = {k: v[i] for k, v in inp.arrays.items() if i < len(v) and v[i] is not None}
            if not numbers and not arrays:
                continue  # no value at all: no run
            end_ns = int((start + inp.offset + i * inp.every) * 1e9)
            sp = ss.spans.add()
            sp.trace_id = os.urandom(16)
            sp.span_id = os.urandom(8)
            sp.name = inp.span
            sp.start_time_unix_nano = end_ns - 1_000_000
            sp.end_time_unix_nano = end_ns
            for k, v in inp.attributes.items():
                sp.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
            for k, x in numbers.items():
                sp.attributes.append(KeyValue(key=k, value=AnyValue(double_value=x)))
            for k, xs in arrays.items():
                arr = AnyValue()
                arr.array_value.values.extend(AnyValue(double_value=v) for v in xs or [])
                sp.attributes.append(KeyValue(key=k, value=arr))
    return req


def run_test(test: RuleTest, ruleset: RuleSet, interval: float, workdir: str) -> list[str]:
    """Run one test; returns its failures (empty when it passes)."""
    by_name = {r.name: r for r in ruleset.rules()}
    unknown = [f"line {e.line}: no rule named {e.alert!r} (rules: {', '.join(sorted(by_name))})"
               for e in test.expectations if e.alert not in by_name]
    if unknown:
        return unknown
    store = Store(StoreSettings(os.path.join(workdir, "test.duckdb")))
    store.start()
    telemetry = Telemetry()
    writer = SpanWriter(store, telemetry)
    writer.start()
    failures: list[str] = []
    try:
        ingest = Ingestor(writer, telemetry, FakeClock(test.start), IngestSettings(keep_prefixes=None))
        result = ingest.export_protobuf(_request(test.inputs, test.start).SerializeToString(), "test")
        if result.rejected:
            return [f"input runs rejected: {result.message}"]
        engine = RuleEngine(store.cursor, new_kinds(), DuckDBState(store.cursor), telemetry)
        # only the groups whose alerts the test checks: a group's state depends on nothing outside it
        wanted = {e.alert for e in test.expectations}
        engine.load(RuleSet(tuple(g for g in ruleset.groups if any(r.name in wanted for r in g.rules))))
        last = max((e.at for e in test.expectations), default=0.0)
        steps = [test.start + k * interval for k in range(int(last // interval) + 1)]
        done = 0
        for exp in test.expectations:  # sorted by time: evaluate up to each expectation, then compare
            upto = [t for t in steps[done:] if t - test.start <= exp.at]
            if upto:
                engine.evaluate_all(upto, slot_interval=interval)
                done += len(upto)
            at = steps[done - 1] if done else test.start
            failures.extend(_compare(exp, by_name[exp.alert], store, at))
        for rule_id, error in engine.health.items():
            if error:
                failures.append(f"rule {rule_id} failed: {error}")
    finally:
        writer.shutdown()
        store.shutdown()
    return failures


def _compare(exp: Expectation, rule: Rule, store: Store, ts: float) -> list[str]:
    cur = store.cursor()
    try:
        res = cur.execute("SELECT * FROM alert_state WHERE rule_id = ? AND fingerprint = ?",
                          [rule.id, rule.fingerprint])
        names = [d[0] for d in res.description]
        states = [state_from_row(dict(zip(names, row, strict=True))) for row in res.fetchall()]
    finally:
        cur.close()
    got = tuple(sorted((tuple((k, str(v)) for k, v in s.series), s.state)
                       for s in states if s.state in (PENDING, FIRING)))
    if got == exp.alerts:
        return []

    def show(items: tuple[tuple[tuple[tuple[str, str], ...], str], ...]) -> str:
        return "[" + ", ".join(f"{st} {dict(labels)}" for labels, st in items) + "]" if items else "none"

    lines = [f"line {exp.line}: {exp.alert} at {iso(ts)}: expected {show(exp.alerts)}, got {show(got)}"]
    for s in sorted(states, key=lambda x: x.series):
        value = "no value" if s.value is None else f"value {s.value:.6g}"
        lines.append(f"    series {dict(s.series) or '{}'} is {s.state}, {value}" +
                     (f": {s.detail}" if s.detail else ""))
    if not states:
        lines.append("    the rule has no series: nothing it selects was in the input runs")
    return ["\n".join(lines)]
