"""Self-monitoring: the daemon's own failures as alerts, through the same outputs as the user's rules.

`self_monitoring` (docs/configuration.md) builds one rule group, `otel-evaluator`, of rules of kind "self"
(evaluator/rules/kinds/selfcheck.py), one per check, on rung custom with the configured owner and severity. The
daemon loads it beside the rule files' groups at start and on every reload and schedules it like them, so its alerts
go through the engine's state machine, the evaluation's transaction, the outbox, the OTLP and Alertmanager encoders
and the ladder. docs/alerts.md ("The evaluator's own alerts") is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluator.rules.kinds.selfcheck import SELF_KIND, SelfCheckSpec
from evaluator.rules.model import Rule, RuleGroup, RuleSet
from evaluator.yamlsrc import InvalidConfig, Problem

GROUP = "otel-evaluator"
WATCHDOG = "Watchdog"

# check -> (alert name, summary template)
ALERTS: dict[str, tuple[str, str]] = {
    "watchdog": (WATCHDOG, "otel-evaluator is running: this alert always fires, so page when it stops arriving"),
    "rule_health": ("EvaluatorRuleUnhealthy", "{{ alert }} {{ state }}: {{ detail }}"),
    "outbox": ("EvaluatorAlertsUndelivered", "{{ alert }} {{ state }}: {{ detail }}"),
    "retention": ("EvaluatorRetentionConflict", "{{ alert }} {{ state }}: {{ detail }}"),
    "ingest": ("EvaluatorIngestRefused", "{{ alert }} {{ state }}: {{ detail }}"),
    "workers": ("EvaluatorWorkerFailing", "{{ alert }} {{ state }}: {{ detail }}"),
}


@dataclass(frozen=True)
class SelfMonitoringSettings:
    enabled: bool = True
    interval_seconds: float = 60.0  # how often the checks run (the group's interval)
    owner: str = "otel-evaluator-operators"  # who runs this daemon
    severity: str = "warning"
    outbox_max_age_seconds: float = 600.0  # an alert waiting longer than this to be sent is a problem
    watchdog: bool = True
    watchdog_severity: str = "none"  # the always-firing alert must not page by itself
    source: str = "self_monitoring"  # where the section was written (file:line), the rules' source


def self_group(settings: SelfMonitoringSettings) -> RuleGroup | None:
    """The `otel-evaluator` rule group of the configured checks; None when self-monitoring is off."""
    if not settings.enabled:
        return None
    rules = []
    for check, (name, summary) in ALERTS.items():
        if check == "watchdog" and not settings.watchdog:
            continue
        severity = settings.watchdog_severity if check == "watchdog" else settings.severity
        rules.append(Rule(name=name, group=GROUP, kind=SELF_KIND, rung="custom", owner=settings.owner,
                          severity=severity, spec=SelfCheckSpec(check), annotations=(("summary", summary),),
                          source=settings.source))
    return RuleGroup(GROUP, settings.interval_seconds, tuple(rules), source=settings.source)


def with_self_group(ruleset: RuleSet, group: RuleGroup | None) -> RuleSet:
    """The rule files' groups and then the self group. InvalidConfig when a rule file uses the group's name (its
    rule ids would be the self checks')."""
    if group is None:
        return ruleset
    clash = [g for g in ruleset.groups if g.name == group.name]
    if clash:
        raise InvalidConfig([Problem.at(g.source, f"groups.{g.name}", f"the group name {group.name} is the "
                                        "daemon's own (self_monitoring); rename the group") for g in clash])
    return RuleSet((*ruleset.groups, group))


def ladder_rules(rules: list[Rule]) -> list[Rule]:
    """The rules the ladder places: all but the Watchdog, which always fires and tells nothing about the data or
    the daemon's health to someone walking the ladder."""
    return [r for r in rules if not (r.group == GROUP and r.kind == SELF_KIND and r.name == WATCHDOG)]
