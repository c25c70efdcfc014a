"""The four-rung ladder per dataset: freshness, completeness, distribution, prediction quality, checked top-down.

Computed from the store alone (alert_state, plus the rung and owner each rule recorded in `alerts`), so it reads
the same from the running daemon (admin /ladder) and from a stopped daemon's file (`otel-evaluator ladder --db`).
A rung's status is the worst state among its rules' series for the dataset (firing > pending > nodata > ok); the
first firing rung from the top is where to start: its owner is who to call.
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
_SEVERITY = {"firing": 3, "pending": 2, "nodata": 1}


@dataclass
class Rung:
    rung: str
    status: str = "ok"  # ok | nodata | pending | firing
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


_QUERY = """
SELECT s.rule_id, s.series::VARCHAR, s.state, s.value, epoch_us(coalesce(s.fired_at, s.active_at)),
       m.rung, m.owner, m.alert_name, m.summary
FROM alert_state s
JOIN (SELECT rule_id, rung, owner, alert_name, summary,
             row_number() OVER (PARTITION BY rule_id, series::VARCHAR ORDER BY seq DESC) AS n, series::VARCHAR AS sk
      FROM alerts) m ON m.rule_id = s.rule_id AND m.sk = s.series::VARCHAR AND m.n = 1
"""


def build_ladder(cur: duckdb.DuckDBPyConnection, dataset: str | None = None) -> list[DatasetLadder]:
    rows = cur.execute(_QUERY).fetchall()
    by_dataset: dict[str, dict[str, Rung]] = {}
    for _rule_id, series_text, state, value, since_us, rung, owner, alert, summary in rows:
        series = json.loads(series_text)
        name = next((series[k] for k in DATASET_LABELS if series.get(k)), None)
        if name is None or rung not in RUNGS or rung == "custom":
            continue
        if dataset is not None and name != dataset:
            continue
        rungs = by_dataset.setdefault(name, {r: Rung(r) for r in LADDER_RUNGS})
        current = rungs[rung]
        if _SEVERITY.get(state, 0) > _SEVERITY.get(current.status, 0):
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


def render_table(ladders: list[DatasetLadder]) -> str:
    if not ladders:
        return "no dataset has alert state yet\n"
    lines = []
    for lad in ladders:
        lines.append(f"{lad.dataset}")
        for i, r in enumerate(lad.rungs, 1):
            mark = "  <- start here" if r.rung == lad.start_here else ""
            value = "" if r.value is None else f" value {r.value:.4g}"
            since = f" since {r.since}" if r.since and r.status != "ok" else ""
            owner = f" ({r.owner})" if r.owner and r.status != "ok" else ""
            lines.append(f"  {i}. {r.rung:<18} {r.status:<8}{owner}{value}{since}{mark}")
            if r.summary and r.status in ("firing", "pending"):
                lines.append(f"       {r.summary}")
    return "\n".join(lines) + "\n"
