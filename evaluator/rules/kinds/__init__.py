"""Rule kinds by name: what the engine calls to turn rules into Samples.

Each kind implements model.RuleKind (`evaluate(rules, ts, cur, cursors)`); later kinds (distribution,
prediction_quality) plug in with `register`. The per-run kinds batch rules of one selector shape into one query
(see evaluator/rules/select.py).
"""

from __future__ import annotations

from evaluator.rules.kinds.absence import AbsenceKind
from evaluator.rules.kinds.baseline import BaselineKind
from evaluator.rules.kinds.distribution import DistributionKind
from evaluator.rules.kinds.prediction_quality import PredictionQualityKind
from evaluator.rules.kinds.sql import SqlKind
from evaluator.rules.kinds.threshold import ThresholdKind
from evaluator.rules.model import RuleKind

KINDS: dict[str, RuleKind] = {}


def register(name: str, kind: RuleKind) -> None:
    """Make `kind` evaluate the rules whose `kind` is `name` (a later registration replaces an earlier one)."""
    KINDS[name] = kind


register("threshold", ThresholdKind())
register("baseline", BaselineKind())
register("absence", AbsenceKind())
register("sql", SqlKind())
register("distribution", DistributionKind())
register("prediction_quality", PredictionQualityKind())

__all__ = ["KINDS", "AbsenceKind", "BaselineKind", "DistributionKind", "PredictionQualityKind", "SqlKind",
           "ThresholdKind", "register"]
