"""The ladder: per subject (a dataset, a model, a series), the rungs top-down (freshness, completeness,
distribution, prediction quality) with every rule that judges each rung, so the first rung that is not ok is where
to start and its owner is who to call.

Read from the store (alert_state, alerts, rule_health) and the loaded rules, so it reads the same from the running
daemon (admin /ladder, with the rules it has loaded) and from a stopped daemon's file (`otel-evaluator ladder
--db`, with the rules of `--rules`, or else the rung and owner each rule recorded with its last transition in
`alerts`). Nothing is left out: every series of every rule is an entry on its rung, healthy ones as ok, and a rule
with no series at all is shown under its own name. Only rule ids that are no longer loaded are dropped (their
state is left over from an earlier rule set); a file read without rules cannot place a rule that never changed
state, and says which ones (`Ladder.unplaced`).

The subject of a series is the first that applies: its `data.dataset` (or `dataset`, the label SQL rules use)
value; its model (`ml.model.name` and/or `ml.model.version`, joined as `name@version`); its labels as
`k=v,k=v` (sorted); for a series without labels (a rule without group_by), the rule's alert name.

A rule entry's status comes from its alert state: inactive and resolved are `ok` (resolved says "resolved at ..."
in its detail), pending, firing and nodata are themselves; a rule whose last evaluation failed (rule_health) is
`error` with its last error, whatever state it had before. A rung's status is the worst of its entries: firing >
pending > nodata > error > ok; `unchecked` when no rule judges that rung for the subject (nothing is known, which
is not ok). `start_here` is the first rung top-down whose status is neither ok nor unchecked.

`service` keeps the subjects that the spans of that service (resource `service.name`) name: a dataset named in
their `data.dataset` or `dataset` attribute, a model or a series whose every label is one of their string
attributes with that value. Subjects named after a rule (no labels) belong to no service.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import duckdb

LADDER_RUNGS = ("freshness", "completeness", "distribution", "prediction_quality")
DATASET_LABELS = ("data.dataset", "dataset")
MODEL_LABELS = ("ml.model.name", "ml.model.version")
SUBJECT_KINDS = ("dataset", "model", "series", "rule")
UNCHECKED = "unchecked"
OK, PENDING, FIRING, NODATA, ERROR = "ok", "pending", "firing", "nodata", "error"
SEVERITY = {FIRING: 5, PENDING: 4, NODATA: 3, ERROR: 2, OK: 1, UNCHECKED: 0}
# alert_state.state -> the ladder's status; an unknown state is shown as nodata (it tells nothing), with the state
_STATUS = {"inactive": OK, "resolved": OK, "pending": PENDING, "firing": FIRING, "nodata": NODATA}


@dataclass(frozen=True)
class RuleInfo:
    """What the ladder needs of a rule. rung and owner are None when unknown (a file read without the rules, for a
    rule that never changed state)."""

    rule_id: str
    alert: str
    rung: str | None
    owner: str | None


def rule_infos(rules: Iterable[Any]) -> list[RuleInfo]:
    """From loaded rules (anything with id, name, rung and owner)."""
    return [RuleInfo(r.id, r.name, r.rung, r.owner) for r in rules]


@dataclass
class RuleEntry:
    """One series of one rule on a rung."""

    rule_id: str
    alert: str
    owner: str | None
    status: str  # ok | pending | firing | nodata | error
    state: str | None  # the alert state as stored; None when the rule has no series
    series: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    threshold: Any = None
    since: str | None = None
    summary: str | None = None  # the summary of the transition into the current state
    detail: str | None = None  # how the value was reached; "resolved at ..."; why there is no series
    error: str | None = None  # the rule's last error, when unhealthy


@dataclass
class Rung:
    rung: str
    status: str = UNCHECKED  # unchecked | ok | error | nodata | pending | firing
    # alert .. summary: those of the first of the worst entries (what the one-line view shows)
    alert: str | None = None
    owner: str | None = None
    value: float | None = None
    since: str | None = None
    summary: str | None = None
    rules: list[RuleEntry] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rung:
        fields = {k: v for k, v in data.items() if k != "rules"}
        return cls(**fields, rules=[RuleEntry(**e) for e in data.get("rules", [])])


@dataclass
class SubjectLadder:
    subject: str
    subject_kind: str  # dataset | model | series | rule
    labels: dict[str, str]  # the series labels that name the subject (none for a rule)
    rungs: list[Rung] = field(default_factory=list)
    start_here: str | None = None  # the first rung from the top that is neither ok nor unchecked

    @property
    def dataset(self) -> str | None:
        return self.subject if self.subject_kind == "dataset" else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dataset"] = self.dataset
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectLadder:
        """The inverse of as_dict (admin /ladder answers)."""
        return cls(data["subject"], data["subject_kind"], dict(data.get("labels") or {}),
                   [Rung.from_dict(r) for r in data["rungs"]], data.get("start_here"))


@dataclass
class Ladder:
    subjects: list[SubjectLadder]
    unplaced: list[str] = field(default_factory=list)  # rule ids whose rung is unknown (a file without rules)


class UnknownSubject(ValueError):
    """--dataset / --model / --subject named nothing on the ladder; `known` lists what is there."""

    def __init__(self, what: str, name: str, known: list[str], scope: str = "") -> None:
        plural = {"dataset": "datasets", "model": "models", "subject": "subjects"}[what]
        listed = f"known {plural}{scope}: {', '.join(known)}" if known else f"no {what}{scope} is on the ladder"
        super().__init__(f"no {what} {name!r} on the ladder{scope}; {listed}")
        self.known = known


_STATES = """
SELECT rule_id, series::VARCHAR, state, value, threshold::VARCHAR, detail,
       epoch_us(active_at), epoch_us(fired_at), epoch_us(resolved_at)
FROM alert_state
"""
_LAST_TRANSITIONS = """
SELECT rule_id, sk, state, summary, epoch_us(evaluated_at) FROM (
    SELECT rule_id, series::VARCHAR AS sk, state, summary, evaluated_at,
           row_number() OVER (PARTITION BY rule_id, series::VARCHAR ORDER BY seq DESC) AS n
    FROM alerts) WHERE n = 1
"""
_HEALTH = "SELECT rule_id, alert_name, health, last_error, epoch_us(last_eval_at) FROM rule_health"
_RECORDED_RULES = """
SELECT rule_id, alert_name, rung, owner FROM (
    SELECT rule_id, alert_name, rung, owner, row_number() OVER (PARTITION BY rule_id ORDER BY seq DESC) AS n
    FROM alerts) WHERE n = 1
"""


def stored_rules(cur: duckdb.DuckDBPyConnection) -> list[RuleInfo]:
    """The rules a file knows of, for reading it without the rule files: every rule id with alert state, health or
    transitions; its rung and owner as its last transition recorded them (unknown if it never changed state)."""
    recorded = {r[0]: RuleInfo(*r) for r in cur.execute(_RECORDED_RULES).fetchall()}
    names = dict(cur.execute("SELECT rule_id, alert_name FROM rule_health").fetchall())
    ids = {r[0] for r in cur.execute("SELECT DISTINCT rule_id FROM alert_state").fetchall()} | set(names)
    for rule_id in ids - set(recorded):
        recorded[rule_id] = RuleInfo(rule_id, names.get(rule_id) or rule_id.rsplit("/", 1)[-1], None, None)
    return sorted(recorded.values(), key=lambda r: r.rule_id)


def subject_of(series: dict[str, str], alert: str) -> tuple[str, str, dict[str, str]]:
    """(subject, kind, the labels that name it) of a series of the rule named `alert` (module docstring)."""
    series = {k: str(v) for k, v in series.items()}
    for key in DATASET_LABELS:
        if series.get(key):
            return series[key], "dataset", {key: series[key]}
    model = {k: series[k] for k in MODEL_LABELS if series.get(k)}
    if model:
        return "@".join(model.values()), "model", model
    if series:
        labels = dict(sorted(series.items()))
        return ",".join(f"{k}={v}" for k, v in labels.items()), "series", labels
    return alert, "rule", {}


@dataclass(frozen=True)
class _Health:
    error: str | None  # the last error when unhealthy
    last_eval_us: int | None


def build_ladder(cur: duckdb.DuckDBPyConnection, rules: Sequence[RuleInfo] | None = None,
                 service: str | None = None) -> Ladder:
    """Every subject with every rule entry. rules: the loaded rules (None: those the store knows of,
    stored_rules)."""
    catalogue = {r.rule_id: r for r in (stored_rules(cur) if rules is None else rules)}
    last = {(r[0], r[1]): r[2:] for r in cur.execute(_LAST_TRANSITIONS).fetchall()}
    health = {r[0]: _Health((r[3] or "the last evaluation failed") if r[2] == "error" else None, r[4])
              for r in cur.execute(_HEALTH).fetchall()}
    placed: list[tuple[RuleInfo, RuleEntry]] = []
    with_series: set[str] = set()
    for row in cur.execute(_STATES).fetchall():
        info = catalogue.get(row[0])
        if info is None:
            continue  # a rule no longer loaded: its state is left over
        with_series.add(info.rule_id)
        placed.append((info, _entry(info, row, last.get((row[0], row[1])), health.get(info.rule_id))))
    for info in catalogue.values():
        if info.rule_id not in with_series:
            placed.append((info, _no_series(info, health.get(info.rule_id))))
    unplaced = sorted({info.rule_id for info, _ in placed if info.rung is None})
    subjects = _assemble([(info, e) for info, e in placed if info.rung is not None])
    if service is not None:
        subjects = _of_service(cur, subjects, service)
    return Ladder(subjects, unplaced)


def _entry(info: RuleInfo, row: tuple[Any, ...], last: tuple[Any, ...] | None, health: _Health | None) -> RuleEntry:
    _, series_text, state, value, threshold_text, detail, active_us, fired_us, resolved_us = row
    status = _STATUS.get(state, NODATA)
    since_us = {FIRING: fired_us or active_us, PENDING: active_us}.get(status)
    if state == "resolved":
        since_us = resolved_us
        detail = f"resolved at {_iso(resolved_us)}" + (f"; {detail}" if detail else "")
    elif state not in _STATUS:
        detail = f"unknown alert state {state!r}" + (f"; {detail}" if detail else "")
    summary = None
    if last is not None and last[0] == state:  # the transition into the current state
        summary = last[1]
        if status == NODATA:
            since_us = last[2]
    entry = RuleEntry(info.rule_id, info.alert, info.owner, status, state, json.loads(series_text), value,
                      json.loads(threshold_text) if threshold_text is not None else None, _iso(since_us), summary,
                      detail or None)
    if health is not None and health.error is not None:
        entry.status, entry.error, entry.since = ERROR, health.error, None
    return entry


def _no_series(info: RuleInfo, health: _Health | None) -> RuleEntry:
    """A rule with no alert state: failing, or nothing judged yet (no run matched, or not evaluated yet)."""
    if health is not None and health.error is not None:
        return RuleEntry(info.rule_id, info.alert, info.owner, ERROR, None, error=health.error)
    why = ("not evaluated yet" if health is None or health.last_eval_us is None
           else f"no series judged yet (last evaluated at {_iso(health.last_eval_us)})")
    return RuleEntry(info.rule_id, info.alert, info.owner, NODATA, None, detail=why)


def _assemble(placed: list[tuple[RuleInfo, RuleEntry]]) -> list[SubjectLadder]:
    by_subject: dict[tuple[str, str], tuple[dict[str, str], dict[str, list[RuleEntry]]]] = {}
    for info, entry in placed:
        name, kind, labels = subject_of(entry.series, info.alert)
        if kind == "dataset":  # named by data.dataset or by dataset (SQL rules): one subject, one way to say it
            labels = {DATASET_LABELS[0]: name}
        _, on_rungs = by_subject.setdefault((kind, name), (labels, {}))
        assert info.rung is not None
        on_rungs.setdefault(info.rung, []).append(entry)
    out = []
    for (kind, name) in sorted(by_subject, key=lambda k: (SUBJECT_KINDS.index(k[0]), k[1])):
        labels, entries = by_subject[(kind, name)]
        # the four rungs in ladder order, then any other (custom) rung a rule names
        names = [*LADDER_RUNGS, *sorted(set(entries) - set(LADDER_RUNGS))]
        rungs = [_rung(r, entries.get(r, [])) for r in names]
        start = next((r.rung for r in rungs if r.status not in (OK, UNCHECKED)), None)
        out.append(SubjectLadder(name, kind, labels, rungs, start))
    return out


def _rung(name: str, entries: list[RuleEntry]) -> Rung:
    if not entries:
        return Rung(name)
    entries = sorted(entries, key=lambda e: (-SEVERITY[e.status], e.alert, json.dumps(e.series, sort_keys=True)))
    worst = entries[0]
    return Rung(name, worst.status, worst.alert, worst.owner, worst.value, worst.since,
                worst.summary or worst.error, entries)


_SERVICE_LABELS = """
SELECT DISTINCT d.key, d.value FROM span_strings d JOIN spans s ON s.span_key = d.span_key
WHERE s.service_name = $service AND d.key IN (SELECT unnest($keys))
"""


def _of_service(cur: duckdb.DuckDBPyConnection, subjects: list[SubjectLadder],
                service: str) -> list[SubjectLadder]:
    keys = sorted({*DATASET_LABELS, *(k for s in subjects for k in s.labels)})
    pairs = set(cur.execute(_SERVICE_LABELS, {"service": service, "keys": keys}).fetchall())

    def named(s: SubjectLadder) -> bool:
        if s.subject_kind == "dataset":
            return any((k, s.subject) in pairs for k in DATASET_LABELS)
        return bool(s.labels) and all(item in pairs for item in s.labels.items())

    return [s for s in subjects if named(s)]


def select_subjects(subjects: list[SubjectLadder], dataset: str | None = None, model: str | None = None,
                    subject: str | None = None, scope: str = "") -> list[SubjectLadder]:
    """The subjects named (all when none is). A model matches by `name@version`, its name or its version.
    Raises UnknownSubject, listing the known ones of that kind, when a name matches nothing."""
    if dataset is not None:
        subjects = _pick(subjects, "dataset", dataset, scope, lambda s: s.subject_kind == "dataset",
                         lambda s: s.subject == dataset)
    if model is not None:
        subjects = _pick(subjects, "model", model, scope, lambda s: s.subject_kind == "model",
                         lambda s: model == s.subject or model in s.labels.values())
    if subject is not None:
        subjects = _pick(subjects, "subject", subject, scope, lambda s: True, lambda s: s.subject == subject)
    return subjects


def _pick(subjects: list[SubjectLadder], what: str, name: str, scope: str,
          of_kind: Callable[[SubjectLadder], bool], matches: Callable[[SubjectLadder], bool]) -> list[SubjectLadder]:
    candidates = [s for s in subjects if of_kind(s)]
    chosen = [s for s in candidates if matches(s)]
    if not chosen:
        raise UnknownSubject(what, name, sorted({s.subject for s in candidates}), scope)
    return chosen


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_QUERY = """
SELECT s.rule_id, s.series::VARCHAR, s.state, s.value, s.threshold::VARCHAR, s.detail, epoch_us(s.active_at),
       epoch_us(s.fired_at), s.consecutive_violations, epoch_us(s.last_run_at),
       m.alert_name, m.group_name, m.kind, m.rung, m.owner, m.severity, m.summary
FROM alert_state s
JOIN (SELECT rule_id, alert_name, group_name, kind, rung, owner, severity, summary,
             row_number() OVER (PARTITION BY rule_id, series::VARCHAR ORDER BY seq DESC) AS n, series::VARCHAR AS sk
      FROM alerts) m ON m.rule_id = s.rule_id AND m.sk = s.series::VARCHAR AND m.n = 1
"""


def current_alerts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Pending and firing alerts now (admin /alerts), in the state shape of `eval` (the alert_state table's names,
    docs/rules.md), with the summary of their latest transition."""
    rows = cur.execute(_QUERY + " WHERE s.state IN ('pending', 'firing') ORDER BY s.rule_id, s.series").fetchall()
    return [{"rule_id": r[0], "alert_name": r[10], "group_name": r[11], "kind": r[12], "rung": r[13],
             "owner": r[14], "severity": r[15], "series": json.loads(r[1]), "state": r[2], "value": r[3],
             "threshold": json.loads(r[4]) if r[4] is not None else None, "detail": r[5], "active_at": _iso(r[6]),
             "fired_at": _iso(r[7]), "consecutive_violations": r[8], "last_run_at": _iso(r[9]), "summary": r[16]}
            for r in rows]


# -- the table ----------------------------------------------------------------------------------------------------

RULE_INDENT = " " * 7
DETAIL_INDENT = " " * 16


def render_table(subjects: list[SubjectLadder], empty: str = "the ladder is empty") -> str:
    """One block per subject (a dataset's header is its name; other subjects say their kind), one line per rung
    with its status and the owners of its worst entries, then one line per rule entry; what to read next (a
    summary, a detail, an error) under the entries that are not plainly ok."""
    if not subjects:
        return empty + "\n"
    lines = []
    for lad in subjects:
        lines.append(lad.subject if lad.subject_kind == "dataset" else f"{lad.subject}  ({lad.subject_kind})")
        for i, r in enumerate(lad.rungs, 1):
            mark = "  <- start here" if r.rung == lad.start_here else ""
            if r.status == UNCHECKED:
                lines.append(f"  {i}. {r.rung:<18} no rule")
                continue
            owners = list(dict.fromkeys(e.owner for e in r.rules if e.status == r.status and e.owner))
            who = f" ({', '.join(owners)})" if owners else ""
            lines.append(f"  {i}. {r.rung:<18} {r.status:<8}{who}{mark}".rstrip())
            for e in r.rules:
                lines.append(_entry_line(e))
                note = _entry_note(e)
                if note:
                    lines.append(DETAIL_INDENT + note)
    return "\n".join(lines) + "\n"


def _entry_line(e: RuleEntry) -> str:
    named_by = subject_of(e.series, e.alert)[2]
    extra = {k: v for k, v in e.series.items() if k not in named_by}
    series = f" [{','.join(f'{k}={v}' for k, v in sorted(extra.items()))}]" if extra else ""
    owner = f" ({e.owner})" if e.owner else ""
    value = "" if e.value is None or e.status == ERROR else f" value {e.value:.4g}"
    since = f" since {e.since}" if e.since and e.status != OK else ""
    return f"{RULE_INDENT}{e.status:<8} {e.alert}{series}{owner}{value}{since}"


def _entry_note(e: RuleEntry) -> str | None:
    if e.status == ERROR:  # the state it had before failing stays visible: a firing alert is still out there
        before = f" (its alert state is still {e.state})" if e.state not in (None, "inactive") else ""
        return f"error: {e.error}{before}"
    if e.status == OK:
        return e.detail if e.state == "resolved" else None
    return e.summary or e.detail


# -- `otel-evaluator ladder` --------------------------------------------------------------------------------------

EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE = 0, 1, 2


def ladder_command(args: Any, out: TextIO, err: TextIO) -> int:
    """Exit 0 ok, 1 --dataset/--model/--subject names nothing on the ladder (the known names are listed), 2 no
    daemon and no readable file, or bad usage. The source is chosen by evaluator.admin.client (ask_daemon)."""
    from evaluator.admin.client import AdminError, admin_url, ask_daemon

    if args.rules and args.db is None:
        err.write("otel-evaluator: --rules goes with --db (a daemon places the rules it has loaded itself)\n")
        return EXIT_USAGE
    query = "?" + urllib.parse.urlencode({"service": args.service}) if args.service else ""
    try:
        data = ask_daemon(args, lambda client: client.get_json("/ladder" + query))
    except (AdminError, ValueError) as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_USAGE
    if data is not None:
        if args.rules:
            err.write(f"otel-evaluator: the daemon at {admin_url(args)} answered; --rules applies only to a file\n")
            return EXIT_USAGE
        ladder = Ladder([SubjectLadder.from_dict(d) for d in data])
        empty = f"the ladder is empty: the daemon at {admin_url(args)} has no rules loaded"
    else:
        read = _from_file(args, err)
        if isinstance(read, int):
            return read
        ladder = read
        empty = f"the ladder is empty: {args.db or './evaluator.duckdb'} holds no rule state"
    scope = f" of service {args.service}" if args.service else ""
    try:
        subjects = select_subjects(ladder.subjects, args.dataset, args.model, args.subject, scope)
    except UnknownSubject as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_UNKNOWN
    if args.format == "json":
        out.write(json.dumps([s.as_dict() for s in subjects], indent=2) + "\n")
    else:
        out.write(render_table(subjects, f"nothing on the ladder{scope}" if scope else empty))
    if ladder.unplaced:
        err.write(f"otel-evaluator: not shown: {len(ladder.unplaced)} rule(s) that never changed state, so the file "
                  f"does not record their rung: {', '.join(ladder.unplaced)}. Pass the rules the daemon ran with "
                  "--rules PATH to place them.\n")
    return EXIT_OK


def _from_file(args: Any, err: TextIO) -> Ladder | int:
    """The ladder of the file (with the rules of --rules, if given), or an exit code."""
    from evaluator.admin.client import open_file_store
    from evaluator.store.store import StoreError

    rules = None
    if args.rules:
        from evaluator.rules.loader import load_rules
        from evaluator.yamlsrc import InvalidConfig

        try:
            rules = rule_infos(load_rules(list(args.rules)).rules())
        except InvalidConfig as exc:
            err.write(f"otel-evaluator: --rules: {len(exc.problems)} problem(s):\n")
            err.writelines(f"  {problem}\n" for problem in exc.problems)
            return EXIT_USAGE
    try:
        store = open_file_store(args, err)
    except StoreError as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_USAGE
    cur = store.cursor()
    try:
        return build_ladder(cur, rules, args.service)
    finally:
        cur.close()
        store.shutdown()
