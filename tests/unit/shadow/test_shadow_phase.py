"""spec.rollout.shadow: parsing, the shadow analysis, and the machine's shadow phase (pure, table-free cases)."""

from __future__ import annotations

from typing import Any

import pytest
from recserve_operator.errors import InvalidSpec
from recserve_operator.rollout.analysis import AnalysisResult, ShadowMeasurements, Verdict, evaluate_shadow
from recserve_operator.rollout.controls import refusal
from recserve_operator.rollout.machine import Action, Observation, next_step
from recserve_operator.rollout.policy import ManualAction, RolloutPolicy, ShadowPolicy
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.rollout.statistics import AbDecision

from tests.unit.rollout.helpers import AB_SPEC, CANARY_SPEC, T0, UNAVAILABLE, at, spec

SHADOW = {"percent": 20, "minRequests": 100, "duration": "2m", "minTopKOverlap": 0.9, "maxP99LatencyMs": 50}
CANARY = RolloutPolicy.from_spec(spec(CANARY_SPEC, shadow=SHADOW))
AB = RolloutPolicy.from_spec(spec(AB_SPEC, shadow=SHADOW))
LIMIT_2 = RolloutPolicy.from_spec(spec(CANARY_SPEC, shadow=SHADOW, analysis__failureLimit=2))

GOOD = ShadowMeasurements(mirrored=500, compared=500, dropped=0, error_rate=0.0, p99_ms=12.0, top_k_overlap=0.99,
                          rank_correlation=0.97, mean_abs_score_diff=1e-6, max_abs_score_diff=1e-5)  # fmt: skip
SHUFFLED = ShadowMeasurements(mirrored=500, compared=500, dropped=0, error_rate=0.0, p99_ms=12.0,
                              top_k_overlap=0.04, rank_correlation=-0.6)  # fmt: skip


def look(m: ShadowMeasurements, policy: RolloutPolicy = CANARY) -> AnalysisResult:
    assert policy.shadow is not None
    return evaluate_shadow(policy.shadow, m)


def start() -> RolloutState:
    return RolloutState(phase=Phase.IDLE, stable_revision="r1")


def shadowing(started: float = 0.0, **kw: Any) -> RolloutState:
    return RolloutState(phase=Phase.PROGRESSING, stable_revision="r1", revision="r2", weight=0, step=0,
                        step_started_at=at(started), started_at=T0, shadowing=True, **kw)  # fmt: skip


def obs(analysis: AnalysisResult | None = None, available: bool = True, **kw: Any) -> Observation:
    return Observation(desired_revision="r2", candidate_available=available, analysis=analysis, **kw)


# ---------------------------------------------------------------- spec


def test_shadow_defaults() -> None:
    p = RolloutPolicy.from_spec(spec(CANARY_SPEC, shadow={}))
    assert p.shadow == ShadowPolicy()
    assert RolloutPolicy.from_spec(CANARY_SPEC).shadow is None


def test_shadow_fields_are_parsed() -> None:
    assert CANARY.shadow == ShadowPolicy(percent=20, top_k=10, min_requests=100, duration_s=120.0,
                                         min_top_k_overlap=0.9, max_p99_latency_ms=50.0)  # fmt: skip


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"strategy": "immediate", "analysis": {"prometheus": "http://p:9090"}, "shadow": {}}, "strategy immediate"),
        (spec(CANARY_SPEC, analysis=None, shadow={}), "set spec.rollout.analysis"),
        (spec(CANARY_SPEC, shadow={"percent": 0}), "spec.rollout.shadow.percent"),
        (spec(CANARY_SPEC, shadow={"percent": 101}), "spec.rollout.shadow.percent"),
        (spec(CANARY_SPEC, shadow={"topK": 0}), "spec.rollout.shadow.topK"),
        (spec(CANARY_SPEC, shadow={"minTopKOverlap": 1.5}), "spec.rollout.shadow.minTopKOverlap"),
        (spec(CANARY_SPEC, shadow={"minRankCorrelation": -2}), "spec.rollout.shadow.minRankCorrelation"),
        (spec(CANARY_SPEC, shadow={"duration": "soon"}), "spec.rollout.shadow.duration"),
        (spec(CANARY_SPEC, shadow="yes"), "spec.rollout.shadow: expected an object"),
        (spec(CANARY_SPEC, routing={"provider": "gatewayAPI", "parentRef": {"name": "gw"}},
              shadow={"minTopKOverlap": 0.9}), "set minTopKOverlap to null"),
    ],
)  # fmt: skip
def test_invalid_shadow_specs_name_the_field(rollout: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        RolloutPolicy.from_spec(rollout)


def test_gateway_api_shadow_has_no_comparison_threshold_by_default() -> None:
    p = RolloutPolicy.from_spec(spec(CANARY_SPEC, routing={"provider": "gatewayAPI", "parentRef": {"name": "gw"}},
                                     shadow={"maxP99LatencyMs": 30}))  # fmt: skip
    assert p.shadow is not None and p.shadow.min_top_k_overlap is None and p.shadow.max_p99_latency_ms == 30


# ---------------------------------------------------------------- shadow analysis


def test_an_equal_candidate_passes() -> None:
    r = look(GOOD)
    assert r.verdict is Verdict.PASS and r.stage == "shadow"
    assert r.measured["topKOverlap"] == 0.99 and r.measured["compared"] == 500


def test_a_shuffled_ranking_fails_on_overlap_although_errors_and_latency_are_fine() -> None:
    r = look(SHUFFLED)
    assert r.verdict is Verdict.FAIL
    assert [c.name for c in r.failed_checks] == ["topKOverlap"]
    assert "topKOverlap=0.04 (min 0.9)" in r.reason


def test_too_few_compared_requests_are_inconclusive_even_when_they_disagree() -> None:
    r = look(ShadowMeasurements(mirrored=20, compared=20, top_k_overlap=0.0, error_rate=0.0, p99_ms=5.0))
    assert r.verdict is Verdict.INCONCLUSIVE and "waiting for 100 compared requests, got 20" in r.reason


def test_a_candidate_that_fails_every_mirrored_request_fails_on_errors() -> None:
    r = look(ShadowMeasurements(mirrored=300, compared=0, error_rate=1.0))
    assert r.verdict is Verdict.FAIL and [c.name for c in r.failed_checks] == ["errorRate"]


def test_slow_candidate_fails_on_p99() -> None:
    r = look(ShadowMeasurements(**{**GOOD.__dict__, "p99_ms": 80.0}))
    assert r.verdict is Verdict.FAIL and [c.name for c in r.failed_checks] == ["p99LatencyMs"]


def test_missing_series_is_inconclusive() -> None:
    r = look(ShadowMeasurements(**{**GOOD.__dict__, "p99_ms": None}))
    assert r.verdict is Verdict.INCONCLUSIVE and "no data for p99LatencyMs" in r.reason


def test_every_threshold_is_checked() -> None:
    policy = ShadowPolicy(min_requests=1, min_top_k_overlap=0.5, min_rank_correlation=0.5,
                          max_mean_abs_score_diff=0.01, max_abs_score_diff=0.1, max_p99_latency_ms=10,
                          max_error_rate=0.1)  # fmt: skip
    bad = ShadowMeasurements(mirrored=10, compared=10, error_rate=0.5, p99_ms=20, top_k_overlap=0.1,
                             rank_correlation=0.0, mean_abs_score_diff=0.5, max_abs_score_diff=0.9)  # fmt: skip
    r = evaluate_shadow(policy, bad)
    assert {c.name for c in r.failed_checks} == {"topKOverlap", "rankCorrelation", "meanAbsScoreDiff",
                                                 "maxAbsScoreDiff", "p99LatencyMs", "errorRate"}  # fmt: skip


# ---------------------------------------------------------------- machine


def test_a_new_revision_starts_in_shadow_mirroring_without_routing() -> None:
    d = next_step(CANARY, start(), obs(), T0)
    assert d.action is Action.SET_WEIGHT and d.state.shadowing and d.state.weight == 0
    assert (d.weights.stable, d.weights.canary, d.weights.canary_routable, d.weights.mirror) == (100, 0, False, 20)
    assert d.event is not None and d.event.reason == "RolloutStarted"


def test_shadow_waits_for_its_duration_even_when_passing() -> None:
    d = next_step(CANARY, shadowing(), obs(look(GOOD)), at(60))
    assert d.action is Action.WAIT and d.state.shadowing and d.weights.mirror == 20
    assert "60s left" in d.reason
    assert d.state.shadow is not None and d.state.shadow["verdict"] == "pass"


def test_shadow_pass_enters_the_first_canary_step() -> None:
    d = next_step(CANARY, shadowing(), obs(look(GOOD)), at(130))
    assert d.action is Action.SET_WEIGHT and not d.state.shadowing
    assert (d.state.weight, d.weights.canary, d.weights.canary_routable, d.weights.mirror) == (10, 10, True, 0)
    assert d.state.split_started_at == at(130) and d.state.step_started_at == at(130)
    assert d.event is not None and d.event.reason == "ShadowPassed"
    assert d.state.shadow is not None and d.state.shadow["decision"] == "advance"
    assert d.state.shadow["measured"]["topKOverlap"] == 0.99


def test_shadow_pass_starts_the_ab_test() -> None:
    d = next_step(AB, shadowing(), obs(look(GOOD)), at(130))
    assert not d.state.shadowing and d.state.weight == 50 and d.weights.canary_routable
    assert d.state.split_started_at == at(130)


def test_shadow_fail_rolls_back_with_the_measured_values() -> None:
    d = next_step(CANARY, shadowing(), obs(look(SHUFFLED)), at(30))
    assert d.action is Action.ROLL_BACK and d.state.phase is Phase.ROLLED_BACK and not d.state.shadowing
    assert d.weights.mirror == 0 and not d.weights.canary_routable
    assert d.event is not None and d.event.type == "Warning" and "topKOverlap=0.04 (min 0.9)" in d.event.message
    assert d.state.shadow is not None
    assert d.state.shadow["verdict"] == "fail" and d.state.shadow["measured"]["topKOverlap"] == 0.04
    # The measured values survive a status round trip.
    again = RolloutState.from_status(d.state.to_status())
    assert again.shadow == d.state.shadow and not again.shadowing


def test_shadow_failure_limit_counts_consecutive_fails() -> None:
    d = next_step(LIMIT_2, shadowing(), obs(look(SHUFFLED)), at(30))
    assert d.action is Action.WAIT and d.state.failed_checks == 1 and d.event is not None
    d2 = next_step(LIMIT_2, d.state, obs(look(SHUFFLED)), at(90))
    assert d2.action is Action.ROLL_BACK


def test_inconclusive_shadow_keeps_mirroring() -> None:
    few = look(ShadowMeasurements(mirrored=5, compared=5, top_k_overlap=1.0, error_rate=0.0, p99_ms=1.0))
    d = next_step(CANARY, shadowing(), obs(few), at(200))
    assert d.action is Action.WAIT and d.state.shadowing and d.weights.mirror == 20
    assert "waiting for 100 compared requests" in d.reason


def test_prometheus_outage_never_passes_the_shadow() -> None:
    d = next_step(CANARY, shadowing(), obs(UNAVAILABLE), at(200))
    assert d.action is Action.WAIT and d.state.shadowing and "metrics unavailable" in d.reason


def test_shadow_stuck_past_the_progress_deadline_rolls_back() -> None:
    policy = RolloutPolicy.from_spec(spec(CANARY_SPEC, shadow=SHADOW, progressDeadline="10m"))
    d = next_step(policy, shadowing(), obs(UNAVAILABLE), at(601))
    assert d.action is Action.ROLL_BACK and d.state.reason == "ProgressDeadlineExceeded"


def test_pause_holds_the_shadow_and_resume_restarts_its_clock() -> None:
    d = next_step(CANARY, shadowing(), obs(action=ManualAction.PAUSE), at(10))
    assert d.action is Action.PAUSE and d.state.paused and d.weights.mirror == 20
    assert d.handled_action is ManualAction.PAUSE
    held = next_step(CANARY, d.state, obs(look(GOOD)), at(500))
    assert held.action is Action.WAIT and held.state.shadowing  # a pass does not advance while paused
    r = next_step(CANARY, held.state, obs(action=ManualAction.RESUME), at(600))
    assert r.action is Action.RESUME and not r.state.paused and r.state.step_started_at == at(600)


def test_a_failing_look_rolls_back_a_paused_shadow() -> None:
    d = next_step(CANARY, shadowing(paused=True), obs(look(SHUFFLED)), at(10))
    assert d.action is Action.ROLL_BACK


def test_abort_and_promote_act_in_the_shadow_phase() -> None:
    a = next_step(CANARY, shadowing(), obs(action=ManualAction.ABORT), at(10))
    assert a.action is Action.ROLL_BACK and a.state.phase is Phase.ABORTED and not a.state.shadowing
    p = next_step(CANARY, shadowing(), obs(action=ManualAction.PROMOTE), at(10))
    assert p.action is Action.PROMOTE and p.state.stable_revision == "r2" and not p.state.shadowing


def test_manual_controls_are_offered_as_in_other_phases() -> None:
    s = shadowing()
    assert refusal(s, ManualAction.PAUSE) is None and refusal(s, ManualAction.PROMOTE) is None
    assert refusal(s, ManualAction.RESUME) is not None


def test_an_unavailable_candidate_stops_the_mirror_and_the_shadow_restarts() -> None:
    d = next_step(CANARY, shadowing(), obs(available=False), at(30))
    assert d.weights.mirror == 0 and d.state.shadowing and d.state.step_started_at is None
    back = next_step(CANARY, d.state, obs(), at(60))
    assert back.state.shadowing and back.state.step_started_at == at(60) and back.weights.mirror == 20


def test_removing_the_shadow_from_the_spec_goes_on_to_the_first_step() -> None:
    plain = RolloutPolicy.from_spec(CANARY_SPEC)
    d = next_step(plain, shadowing(), obs(), at(30))
    assert not d.state.shadowing and d.state.weight == 10 and d.event is not None
    assert d.event.reason == "ShadowSkipped"


def test_without_shadow_the_first_step_starts_at_once() -> None:
    d = next_step(RolloutPolicy.from_spec(CANARY_SPEC), start(), obs(), T0)
    assert not d.state.shadowing and d.state.weight == 10 and d.weights.mirror == 0


def test_ab_verdicts_are_ignored_during_shadow() -> None:
    from tests.unit.rollout.test_machine import verdict

    d = next_step(AB, shadowing(), obs(look(GOOD), ab=verdict(AbDecision.CANDIDATE_WINS)), at(60))
    assert d.action is Action.WAIT and d.state.shadowing


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LOOKS = st.sampled_from([None, "good", "shuffled", "few", "outage"])
ACTIONS = st.sampled_from(list(ManualAction))


def _look(kind: str | None) -> AnalysisResult | None:
    few = ShadowMeasurements(mirrored=5, compared=5, top_k_overlap=1.0, error_rate=0.0, p99_ms=1.0)
    return {None: None, "good": look(GOOD), "shuffled": look(SHUFFLED), "few": look(few), "outage": UNAVAILABLE}[kind]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(LOOKS, ACTIONS, st.booleans(), st.integers(1, 120)), min_size=1, max_size=25))
def test_no_user_request_reaches_a_candidate_before_it_passed_its_shadow(
    steps: list[tuple[str | None, ManualAction, bool, int]],
) -> None:
    """Whatever the looks, manual actions and availability: while the candidate has not passed a shadow look (or
    been promoted by hand), every decision routes users to stable only; it leaves the shadow only by a pass, a
    manual promote/abort, a rollback on a failing look, or the deadline."""
    state, now = start(), 0.0
    passed_once = False
    for kind, action, available, dt in steps:
        now += dt
        d = next_step(CANARY, state, obs(_look(kind), available=available, action=action), at(now))
        if state.shadowing and not d.state.shadowing and d.state.phase is Phase.PROGRESSING:
            assert kind == "good", (kind, d.reason)  # left the shadow to the first step: only on a pass
            passed_once = True
        if d.weights.canary_routable:
            assert passed_once or d.action is Action.PROMOTE, d
        if d.state.shadowing:
            assert not d.weights.canary_routable and d.weights.canary == 0
            assert d.weights.mirror in (0, 20)
        state = d.state
        if state.phase is not Phase.PROGRESSING:
            break


def test_a_candidate_available_only_after_the_rollout_started_still_shadows_first() -> None:
    """The usual order on a cluster: the new revision builds, the rollout waits, then the candidate is Available."""
    waiting = next_step(CANARY, start(), obs(available=False), T0)
    assert waiting.action is Action.WAIT and not waiting.state.shadowing
    d = next_step(CANARY, waiting.state, obs(), at(30))
    assert d.state.shadowing and d.weights.mirror == 20 and not d.weights.canary_routable
    assert d.event is not None and d.event.reason == "ShadowStarted"
