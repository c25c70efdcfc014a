"""The alert lifecycle as pure functions: time is stepped, never slept."""

from __future__ import annotations

import random
from dataclasses import replace

from evaluator.rules.model import FIRING, INACTIVE, NODATA, PENDING, RESOLVED, Condition, Rule, Sample, ThresholdSpec
from evaluator.rules.state import SeriesState, Transition, evaluate_series

DAY = 86400.0
BASE = 1_760_000_000.0
RULE = Rule(name="Lag", group="g", kind="threshold", rung="freshness", owner="data-platform", severity="page",
            spec=ThresholdSpec("data.freshness_lag_hours"), condition=Condition(">", 0.5))


def run(i: int, value: float | None, *, violated: bool | None = None, still: bool | None = None) -> Sample:
    v = violated if violated is not None or value is None else RULE.condition.violated(value)  # type: ignore
    return Sample(series=(), at=BASE + i * DAY, value=value, threshold=0.5, violated=v, still_violated=still,
                  run_key=i + 1, spans=((f"t{i}", f"s{i}"),))


def drive(rule: Rule, script: list[tuple[float, list[Sample]]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Evaluate at each (ts, samples); returns the state after each tick and all transitions."""
    state = SeriesState()
    states, transitions = [], []
    for ts, samples in script:
        step = evaluate_series(rule, state, samples, ts)
        state = step.state
        states.append(state.state)
        transitions += [(t.from_state, t.to_state) for t in step.transitions]
    return states, transitions


def test_consecutive_violations_count_runs_not_ticks() -> None:
    """A daily batch evaluated every minute: for_runs 2 is met on the second violating run, however many
    ticks pass in between."""
    rule = replace(RULE, for_runs=2)
    script = [(BASE + 0 * DAY + 60, [run(0, 6.0)])]
    script += [(BASE + 0 * DAY + 60 * (k + 2), []) for k in range(50)]  # 50 more ticks, no new run
    script += [(BASE + 1 * DAY + 60, [run(1, 6.0)])]
    states, transitions = drive(rule, script)
    assert states[0] == PENDING
    assert set(states[1:51]) == {PENDING}
    assert states[-1] == FIRING
    assert transitions == [(INACTIVE, PENDING), (PENDING, FIRING)]


def test_two_runs_in_one_tick_both_count() -> None:
    rule = replace(RULE, for_runs=2)
    states, transitions = drive(rule, [(BASE + 2 * DAY, [run(0, 6.0), run(1, 7.0)])])
    assert states == [FIRING]
    assert transitions == [(INACTIVE, PENDING), (PENDING, FIRING)]


def test_a_good_run_resets_the_count_and_pending_goes_back_to_inactive() -> None:
    rule = replace(RULE, for_runs=2)
    states, transitions = drive(rule, [(BASE + 60, [run(0, 6.0)]), (BASE + DAY + 60, [run(1, 0.1)]),
                                       (BASE + 2 * DAY + 60, [run(2, 6.0)])])
    assert states == [PENDING, INACTIVE, PENDING]
    assert transitions == [(INACTIVE, PENDING), (PENDING, INACTIVE), (INACTIVE, PENDING)]


def test_for_duration_fires_on_a_later_tick_without_a_new_run() -> None:
    rule = replace(RULE, for_seconds=3600)
    script = [(BASE + 60, [run(0, 6.0)]), (BASE + 1800, []), (BASE + 3599, []), (BASE + 3600, [])]  # run at BASE
    states, _ = drive(rule, [(ts, [replace(s, at=BASE) for s in samples]) for ts, samples in script])
    assert states == [PENDING, PENDING, PENDING, FIRING]


def test_resolve_and_fire_again() -> None:
    states, transitions = drive(RULE, [(BASE + 60, [run(0, 6.0)]), (BASE + DAY + 60, [run(1, 0.1)]),
                                       (BASE + 2 * DAY + 60, [run(2, 0.1)]), (BASE + 3 * DAY + 60, [run(3, 9.0)])])
    assert states == [FIRING, RESOLVED, INACTIVE, FIRING]
    assert transitions == [(INACTIVE, FIRING), (FIRING, RESOLVED), (INACTIVE, FIRING)]  # resolved -> inactive is
    # bookkeeping, not a transition


def test_no_data_never_resolves_a_firing_alert() -> None:
    states, transitions = drive(RULE, [(BASE + 60, [run(0, 6.0)]), (BASE + DAY + 60, [run(1, None)]),
                                       (BASE + 2 * DAY + 60, [run(2, None)]), (BASE + 3 * DAY + 60, [run(3, 0.1)])])
    assert states == [FIRING, FIRING, FIRING, RESOLVED]
    assert transitions == [(INACTIVE, FIRING), (FIRING, RESOLVED)]


def test_no_data_is_its_own_state_when_not_firing() -> None:
    states, transitions = drive(RULE, [(BASE + 60, [run(0, None)]), (BASE + DAY + 60, [run(1, 0.1)])])
    assert states == [NODATA, INACTIVE]
    assert transitions == [(INACTIVE, NODATA), (NODATA, INACTIVE)]


def test_hysteresis_keeps_firing_until_the_resolve_threshold() -> None:
    """Fire above 0.5 h, resolve only at or below 0.4 h: 0.45 keeps it firing."""
    rule = replace(RULE, resolve=Condition(">", 0.4))

    def r(i: int, v: float) -> Sample:
        return run(i, v, violated=v > 0.5, still=v > 0.4)

    states, _ = drive(rule, [(BASE + 60, [r(0, 0.6)]), (BASE + DAY + 60, [r(1, 0.45)]),
                             (BASE + 2 * DAY + 60, [r(2, 0.45)]), (BASE + 3 * DAY + 60, [r(3, 0.3)]),
                             (BASE + 4 * DAY + 60, [r(4, 0.45)])])
    assert states == [FIRING, FIRING, FIRING, RESOLVED, INACTIVE]


def test_keep_firing_for_holds_then_resolves_on_a_tick() -> None:
    rule = replace(RULE, keep_firing_for=2 * 3600)
    script = [(BASE + 60, [run(0, 6.0)]), (BASE + 3600, [replace(run(1, 0.1), at=BASE + 3600)]),
              (BASE + 7199, []), (BASE + 7260, [])]
    states, transitions = drive(rule, script)
    assert states == [FIRING, FIRING, FIRING, RESOLVED]
    assert transitions == [(INACTIVE, FIRING), (FIRING, RESOLVED)]


def test_violating_span_links_accumulate_over_the_episode() -> None:
    rule = replace(RULE, for_runs=3)
    state = SeriesState()
    for i in range(3):
        state = evaluate_series(rule, state, [run(i, 6.0)], BASE + i * DAY + 60).state
    assert state.state == FIRING
    assert state.violating_spans == (("t0", "s0"), ("t1", "s1"), ("t2", "s2"))
    assert state.consecutive == 3 and state.last_run_key == 3


def test_a_re_fired_alert_links_only_its_own_episode() -> None:
    state = SeriesState()
    for i, v in enumerate([6.0, 0.1, 0.1, 9.0]):
        state = evaluate_series(RULE, state, [run(i, v)], BASE + i * DAY + 60).state
    assert state.state == FIRING
    assert state.violating_spans == (("t3", "s3"),)
    assert state.active_at == BASE + 3 * DAY


def test_firing_and_resolved_carry_the_episode_start() -> None:
    rule = replace(RULE, for_runs=2)
    step = evaluate_series(rule, SeriesState(), [run(0, 6.0), run(1, 6.0), run(2, 0.1)], BASE + 3 * DAY)
    firing = next(t for t in step.transitions if t.to_state == FIRING)
    resolved = next(t for t in step.transitions if t.to_state == RESOLVED)
    assert firing.started_at == resolved.started_at == BASE
    assert (firing.at, resolved.at) == (BASE + DAY, BASE + 2 * DAY)
    assert all(t.evaluated_at == BASE + 3 * DAY for t in step.transitions)


def test_for_runs_1_goes_straight_to_firing() -> None:
    _, transitions = drive(RULE, [(BASE + 60, [run(0, 6.0)])])
    assert transitions == [(INACTIVE, FIRING)]


def test_catch_up_gives_the_transitions_of_judging_on_time() -> None:
    """After downtime, a short violation judged in one evaluation is not a firing -> resolved flash:
    `for` fires it at active_at + for and keep_firing_for holds it, exactly as evaluations on time would."""
    rule = replace(RULE, for_seconds=3600, keep_firing_for=2 * 3600)
    hour = 3600.0
    samples = [replace(run(i, v), at=BASE + i * hour / 2) for i, v in enumerate([6.0, 6.0, 6.0, 0.1, 0.1])]
    late = evaluate_series(rule, SeriesState(), samples, BASE + 5 * hour)
    state = SeriesState()
    on_time: list[Transition] = []
    for k in range(11):  # every half hour
        ts = BASE + k * hour / 2
        step = evaluate_series(rule, state, [s for s in samples if s.at == ts], ts)
        state, on_time = step.state, on_time + step.transitions
    key = [(t.from_state, t.to_state, t.at) for t in late.transitions]
    assert key == [(t.from_state, t.to_state, t.at) for t in on_time]
    assert key == [(INACTIVE, PENDING, BASE), (PENDING, FIRING, BASE + hour), (FIRING, RESOLVED, BASE + 3 * hour)]


def test_any_stepping_of_the_same_judgements_gives_the_same_states_and_transitions() -> None:
    """Random judgements (violating, ok, no data; for, for_runs, keep_firing_for, hysteresis) folded all at once,
    one by one, or in random chunks: identical transitions (from, to, at) and final state."""
    rng = random.Random(7)
    for _ in range(300):
        rule = replace(RULE, for_runs=rng.choice([1, 2, 3]), for_seconds=rng.choice([0.0, 1800.0, 7200.0]),
                       keep_firing_for=rng.choice([0.0, 3600.0]),
                       resolve=rng.choice([None, Condition(">", 0.4)]))
        samples = []
        t = BASE
        for i in range(rng.randint(1, 15)):
            t += rng.choice([600.0, 1800.0, 3600.0, 3 * 3600.0])
            v = rng.choice([None, 0.1, 0.45, 0.5, 0.51, 6.0])
            violated = None if v is None else v > 0.5
            still = None if v is None or rule.resolve is None else v > 0.4
            samples.append(Sample((), t, v, 0.5, violated, still, i + 1, ((f"t{i}", f"s{i}"),)))
        end = t + 4 * 3600
        whole = evaluate_series(rule, SeriesState(), samples, end)
        state, stepped = SeriesState(), []
        cut = 0
        while cut < len(samples):
            nxt = min(len(samples), cut + rng.randint(1, 4))
            ts = samples[nxt - 1].at + rng.choice([0.0, 60.0])
            step = evaluate_series(rule, state, samples[cut:nxt], ts)
            state, stepped, cut = step.state, stepped + step.transitions, nxt
        step = evaluate_series(rule, state, [], end)
        state, stepped = step.state, stepped + step.transitions
        assert [(x.from_state, x.to_state, x.at) for x in whole.transitions] == \
            [(x.from_state, x.to_state, x.at) for x in stepped]
        assert whole.state == state
