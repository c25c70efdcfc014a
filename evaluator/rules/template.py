"""Annotation templates: `{{ value }}`, `{{ threshold }}`, `{{ series.data.dataset }}`, `{{ labels.team }}`, ...

Deliberately not Jinja: a template only substitutes names (checked when the rule file loads), so a rule file
cannot run code, and a missing series attribute renders as an empty string.
"""

from __future__ import annotations

from evaluator.rules.loader import TEMPLATE_RE
from evaluator.rules.model import Rule
from evaluator.rules.state import Transition


def _fmt(value: object) -> str:
    if value is None:
        return "no data"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def render(text: str, rule: Rule, t: Transition) -> str:
    series = dict(t.series)
    labels = dict(rule.labels)
    plain = {
        "value": _fmt(t.value), "threshold": _fmt(t.threshold), "detail": t.detail, "rule": rule.id,
        "alert": rule.name, "owner": rule.owner, "rung": rule.rung, "severity": rule.severity, "state": t.to_state,
    }

    def sub(match: object) -> str:
        name = match.group(1)  # type: ignore[attr-defined]
        head, _, rest = name.partition(".")
        if head == "series" and rest:
            return series.get(rest, "")
        if head == "labels" and rest:
            return labels.get(rest, "")
        return plain.get(name, "")

    return TEMPLATE_RE.sub(sub, text)
