"""How far back a rule reads spans, so the daemon can say when retention would cut a baseline short.

The reach is the history one judgement compares with, in seconds before the evaluation time: a baseline's
`history_window`, a distribution's baseline window plus its current window, a prediction-quality window plus its
label delay, a threshold's or absence rule's lookback. None when it is not a time span (a baseline of the last N
runs, an absolute or frozen distribution baseline, a SQL rule): nothing can be said from the rule alone.
"""

from __future__ import annotations

from evaluator.rules.kinds.distribution import DistributionSpec
from evaluator.rules.kinds.prediction_quality import PredictionQualitySpec
from evaluator.rules.model import AbsenceSpec, BaselineSpec, Rule, RuleSet, ThresholdSpec


def history_reach(rule: Rule) -> float | None:
    spec = rule.spec
    if isinstance(spec, BaselineSpec):
        return spec.history_window
    if isinstance(spec, DistributionSpec):
        if spec.baseline_range is not None or spec.frozen or spec.baseline_window is None:
            return None
        return spec.current + spec.baseline_window
    if isinstance(spec, PredictionQualitySpec):
        return spec.window + spec.label_delay
    if isinstance(spec, ThresholdSpec | AbsenceSpec):
        return spec.lookback
    return None


def cut_short(ruleset: RuleSet, span_retention: float | None) -> list[tuple[str, float]]:
    """(rule id, reach) of every rule that reads further back than raw spans are kept."""
    if span_retention is None:
        return []
    return [(r.id, reach) for r in ruleset.rules()
            if (reach := history_reach(r)) is not None and reach > span_retention]
