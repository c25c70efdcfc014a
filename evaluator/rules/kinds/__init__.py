"""Rule kinds by name: what the engine calls to turn rules into Samples.

Each kind implements model.RuleKind. Kinds keep no state, but each engine still gets its own instances
(`new_kinds()`), so nothing is shared between engines in one process. A later kind plugs in with `register`
(a factory per name). The per-run kinds batch rules of one selector shape into one query (see
evaluator/rules/select.py).
"""

from __future__ import annotations

from collections.abc import Callable

from evaluator.rules.kinds.absence import AbsenceKind
from evaluator.rules.kinds.baseline import BaselineKind
from evaluator.rules.kinds.distribution import DistributionKind
from evaluator.rules.kinds.prediction_quality import PredictionQualityKind
from evaluator.rules.kinds.sql import SqlKind
from evaluator.rules.kinds.threshold import ThresholdKind
from evaluator.rules.model import RuleKind

_FACTORIES: dict[str, Callable[[], RuleKind]] = {
    "threshold": ThresholdKind,
    "baseline": BaselineKind,
    "absence": AbsenceKind,
    "sql": SqlKind,
    "distribution": DistributionKind,
    "prediction_quality": PredictionQualityKind,
}


def register(name: str, factory: Callable[[], RuleKind]) -> None:
    """Make instances from `factory` evaluate the rules whose `kind` is `name` (replaces an earlier one)."""
    _FACTORIES[name] = factory


def kind_names() -> list[str]:
    return sorted(_FACTORIES)


def new_kinds() -> dict[str, RuleKind]:
    """One fresh instance of every kind, for one engine."""
    return {name: factory() for name, factory in _FACTORIES.items()}


__all__ = ["AbsenceKind", "BaselineKind", "DistributionKind", "PredictionQualityKind", "SqlKind", "ThresholdKind",
           "kind_names", "new_kinds", "register"]
