"""The four-rung ladder per dataset: freshness, completeness, distribution, prediction quality, checked top-down.

Computed from the store alone (alert_state, plus the rung and owner each rule recorded in `alerts`), so it reads
the same from the running daemon (admin /ladder) and from a stopped daemon's file (`otel-evaluator ladder --db`).
A rung's status is the worst state among its rules' series for the dataset (firing > pending > nodata > ok), or
`unchecked` when no rule judges that rung for the dataset (nothing is known, which is not "ok"); the first firing
rung from the top is where to start: its owner is who to call.

`service` keeps the datasets whose runs come from that service: those named (attribute `data.dataset` or
`dataset`) by a stored span whose resource `service.name` is the service. It is read from the spans, not from the
rules' selectors, so it works the same on a stopped daemon's file (which has no rules) and covers SQL rules, whose
series carry a dataset label but no selector. A dataset that more than one service emits belongs to each of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb

from evaluator.rules.model import RUNGS

LADDER_RUNGS = ("freshness", "completeness", "distribution", "prediction_quality")
DATASET_LABELS = ("data.dataset", "dataset")
_SEVERITY = {"firing": 3, "pending": 2, "nodata": 1, "ok": 0}
UNCHECKED = "unchecked"


@dataclass
class Rung:
    rung: str
    status: str = UNCHECKED  # unchecked (no rule for this rung) | ok | nodata | pending | firing
    alert: str | None = None
    owner: str | None = None
    value: float | None = None
    since: str | None = None
    summary: str | None = None


@dataclass
class DatasetLadder:
    dataset: str
    rungs: list[Rung] = field(default_factory=list)
    start_here: str | None = None  # the first firing rung from the top

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetLadder:
        """The inverse of as_dict (admin /ladder answers)."""
        return cls(data["dataset"], [Rung(**r) for r in data["rungs"]], data.get("start_here"))


_QUERY = """
SELECT s.rule_id, s.series::VARCHAR, s.state, s.value, epoch_us(coalesce(s.fired_at, s.active_at)),
       m.rung, m.owner, m.alert_name, m.summary
FROM alert_state s
JOIN (SELECT rule_id, rung, owner, alert_name, summary,
             row_number() OVER (PARTITION BY rule_id, series::VARCHAR ORDER BY seq DESC) AS n, series::VARCHAR AS sk
      FROM alerts) m ON m.rule_id = s.rule_id AND m.sk = s.series::VARCHAR AND m.n = 1
"""


_SERVICE_DATASETS = """
SELECT DISTINCT d.value FROM span_strings d JOIN spans s ON s.span_key = d.span_key
WHERE d.key IN ('data.dataset', 'dataset') AND s.service_name = ?
"""


def service_datasets(cur: duckdb.DuckDBPyConnection, service: str) -> set[str]:
    """The datasets named by spans of this service (resource service.name)."""
    return {r[0] for r in cur.execute(_SERVICE_DATASETS, [service]).fetchall()}


def build_ladder(cur: duckdb.DuckDBPyConnection, dataset: str | None = None,
                 service: str | None = None) -> list[DatasetLadder]:
    """Every dataset with alert state, or the one named, or those whose runs come from `service`."""
    rows = cur.execute(_QUERY).fetchall()
    keep = service_datasets(cur, service) if service is not None else None
    by_dataset: dict[str, dict[str, Rung]] = {}
    for _rule_id, series_text, state, value, since_us, rung, owner, alert, summary in rows:
        series = json.loads(series_text)
        name = next((series[k] for k in DATASET_LABELS if series.get(k)), None)
        if name is None or rung not in RUNGS or rung == "custom":
            continue
        if (dataset is not None and name != dataset) or (keep is not None and name not in keep):
            continue
        rungs = by_dataset.setdefault(name, {r: Rung(r) for r in LADDER_RUNGS})
        current = rungs[rung]
        if _SEVERITY.get(state, 0) > _SEVERITY.get(current.status, -1):
            rungs[rung] = Rung(rung, state, alert, owner, value, _iso(since_us), summary)
    out = []
    for name in sorted(by_dataset):
        ordered = [by_dataset[name][r] for r in LADDER_RUNGS]
        start = next((r.rung for r in ordered if r.status == "firing"), None)
        out.append(DatasetLadder(name, ordered, start))
    return out


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_alerts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Pending and firing alerts now, with their rung and owner (admin /alerts)."""
    rows = cur.execute(_QUERY + " WHERE s.state IN ('pending', 'firing') ORDER BY s.rule_id, s.series").fetchall()
    return [{"rule_id": r[0], "series": json.loads(r[1]), "state": r[2], "value": r[3], "since": _iso(r[4]),
             "rung": r[5], "owner": r[6], "alert": r[7], "summary": r[8]} for r in rows]


def render_table(ladders: list[DatasetLadder], empty: str = "no dataset has alert state yet") -> str:
    if not ladders:
        return empty + "\n"
    lines = []
    for lad in ladders:
        lines.append(f"{lad.dataset}")
        for i, r in enumerate(lad.rungs, 1):
            mark = "  <- start here" if r.rung == lad.start_here else ""
            value = "" if r.value is None else f" value {r.value:.4g}"
            quiet = r.status in ("ok", UNCHECKED)
            since = "" if quiet or not r.since else f" since {r.since}"
            owner = "" if quiet or not r.owner else f" ({r.owner})"
            status = "no rule" if r.status == UNCHECKED else r.status
            lines.append(f"  {i}. {r.rung:<18} {status:<8}{owner}{value}{since}{mark}".rstrip())
            if r.summary and r.status in ("firing", "pending"):
                lines.append(f"       {r.summary}")
    return "\n".join(lines) + "\n"
