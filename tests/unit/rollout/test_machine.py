"""The rollout state machine, table-driven: each case is a sentence about one reconcile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from recserve_operator.rollout.machine import Action, Observation, next_step
from recserve_operator.rollout.policy import DeadlineAction, ManualAction, RolloutPolicy, Strategy
from recserve_operator.rollout.state import ControlRecord, Phase, RolloutState
from recserve_operator.rollout.statistics import AbDecision, AbVerdict, Counts

from .helpers import AB_SPEC, CANARY_SPEC, FAIL, INCONCLUSIVE, PASS, T0, UNAVAILABLE, at, policy, spec

CANARY = policy()
CANARY_LIMIT_2 = policy(analysis__failureLimit=2)
NO_ANALYSIS = RolloutPolicy.from_spec(spec(CANARY_SPEC, analysis={}))
IMMEDIATE = RolloutPolicy.from_spec({"strategy": "immediate"})
AB = policy(AB_SPEC)
DEADLINE = policy(progressDeadline="10m")
HOLD = policy(progressDeadline="10m", onProgressDeadline="hold")
AB_DEADLINE = policy(AB_SPEC, progressDeadline="10m")
PDE = "ProgressDeadlineExceeded"


def idle() -> RolloutState:
    return RolloutState(phase=Phase.IDLE, stable_revision="r1")


def at_step(step: int, weight: int, started: float = 0.0, **kw: Any) -> RolloutState:
    return RolloutState(
        phase=Phase.PROGRESSING, stable_revision="r1", revision="r2", weight=weight, step=step,
        step_started_at=at(started), started_at=T0, **kw,
    )  # fmt: skip


def verdict(decision: AbDecision) -> AbVerdict:
    s, c = Counts(1000, 20000), Counts(1150, 20000)
    return AbVerdict(decision, f"{decision.value} (test)", s, c, None, None, 0.001, 0.01, 0.0075, None, 0.15, None,
                     None, None)  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    policy: RolloutPolicy
    state: RolloutState
    obs: Observation
    now: float
    action: Action
    canary_weight: int
    phase: Phase
    expect: dict[str, Any] = field(default_factory=dict)  # extra attributes of the new state
    event: str | None = None


def obs(
    available: bool = True,
    analysis: Any = PASS,
    action: ManualAction = ManualAction.NONE,
    desired: str | None = "r2",
    ab: AbVerdict | None = None,
) -> Observation:
    return Observation(desired_revision=desired, candidate_available=available, analysis=analysis, ab=ab, action=action)


CASES = [
    Case("the first revision of a model becomes stable without a rollout",
         CANARY, RolloutState(), obs(desired="r1"), 0, Action.NONE, 0, Phase.IDLE, {"stable_revision": "r1"}),
    Case("nothing to do when the spec names the stable revision",
         CANARY, idle(), obs(desired="r1"), 0, Action.NONE, 0, Phase.IDLE),
    Case("a new revision that is not yet Available waits with all traffic on stable",
         CANARY, idle(), obs(available=False), 0, Action.WAIT, 0, Phase.PROGRESSING, {"revision": "r2"},
         "RolloutStarted"),
    Case("a new revision that is Available gets the first step's weight",
         CANARY, idle(), obs(), 0, Action.SET_WEIGHT, 10, Phase.PROGRESSING, {"step": 0, "step_started_at": T0},
         "RolloutStarted"),
    Case("a started rollout whose candidate became Available enters its first step",
         CANARY, at_step(0, 0, started=0).evolve(step_started_at=None), obs(), 30, Action.SET_WEIGHT, 10,
         Phase.PROGRESSING, {"step_started_at": at(30)}),
    Case("a step waits out its pause even when analysis passes",
         CANARY, at_step(0, 10), obs(), 120, Action.WAIT, 10, Phase.PROGRESSING, {"step": 0}),
    Case("after its pause a step with passing analysis advances to the next weight",
         CANARY, at_step(0, 10), obs(), 300, Action.SET_WEIGHT, 50, Phase.PROGRESSING,
         {"step": 1, "step_started_at": at(300)}, "StepAdvanced"),
    Case("after its pause a step with inconclusive analysis holds its weight",
         CANARY, at_step(0, 10), obs(analysis=INCONCLUSIVE), 300, Action.WAIT, 10, Phase.PROGRESSING, {"step": 0}),
    Case("after its pause a step without any analysis result holds its weight",
         CANARY, at_step(0, 10), obs(analysis=None), 300, Action.WAIT, 10, Phase.PROGRESSING, {"step": 0}),
    Case("without analysis configured steps advance on time alone",
         NO_ANALYSIS, at_step(0, 10), obs(analysis=None), 300, Action.SET_WEIGHT, 50, Phase.PROGRESSING, {"step": 1}),
    Case("the last step passing after its pause promotes the candidate",
         CANARY, at_step(1, 50), obs(), 600, Action.PROMOTE, 0, Phase.PROMOTED, {"stable_revision": "r2"},
         "Promoted"),
    Case("a failed check rolls back at once with failureLimit 1, even during a pause",
         CANARY, at_step(0, 10), obs(analysis=FAIL), 10, Action.ROLL_BACK, 0, Phase.ROLLED_BACK,
         {"stable_revision": "r1", "failed_checks": 1}, "RolledBack"),
    Case("a failed check below failureLimit waits and counts the failure",
         CANARY_LIMIT_2, at_step(0, 10), obs(analysis=FAIL), 10, Action.WAIT, 10, Phase.PROGRESSING,
         {"failed_checks": 1}, "AnalysisFailed"),
    Case("the failureLimit-th consecutive failure rolls back",
         CANARY_LIMIT_2, at_step(0, 10, failed_checks=1), obs(analysis=FAIL), 70, Action.ROLL_BACK, 0,
         Phase.ROLLED_BACK, {"failed_checks": 2}),
    Case("a passing analysis resets the consecutive failures",
         CANARY_LIMIT_2, at_step(0, 10, failed_checks=1), obs(), 70, Action.WAIT, 10, Phase.PROGRESSING,
         {"failed_checks": 0}),
    Case("an inconclusive analysis keeps the consecutive failures",
         CANARY_LIMIT_2, at_step(0, 10, failed_checks=1), obs(analysis=INCONCLUSIVE), 70, Action.WAIT, 10,
         Phase.PROGRESSING, {"failed_checks": 1}),
    Case("a candidate that stops being Available mid-rollout loses all traffic",
         CANARY, at_step(1, 50), obs(available=False), 100, Action.SET_WEIGHT, 0, Phase.PROGRESSING,
         {"weight": 0, "step": 1, "step_started_at": None}, "CandidateUnavailable"),
    Case("a candidate Available again re-enters its step and restarts the pause",
         CANARY, at_step(1, 0).evolve(step_started_at=None), obs(), 200, Action.SET_WEIGHT, 50, Phase.PROGRESSING,
         {"step": 1, "step_started_at": at(200)}, "StepStarted"),
    Case("the immediate strategy promotes as soon as the candidate is Available",
         IMMEDIATE, idle(), obs(analysis=None), 0, Action.PROMOTE, 0, Phase.PROMOTED, {"stable_revision": "r2"}),
    Case("the immediate strategy waits while the candidate is not Available",
         IMMEDIATE, idle(), obs(available=False, analysis=None), 0, Action.WAIT, 0, Phase.PROGRESSING),
    Case("the immediate strategy promotes once a waiting candidate becomes Available",
         IMMEDIATE, at_step(0, 0).evolve(step_started_at=None), obs(analysis=None), 20, Action.PROMOTE, 0,
         Phase.PROMOTED, {"stable_revision": "r2"}),
    Case("a manual pause holds the current weight",
         CANARY, at_step(0, 10), obs(action=ManualAction.PAUSE), 400, Action.PAUSE, 10, Phase.PROGRESSING,
         {"paused": True}, "Paused"),
    Case("a paused rollout does not advance after its pause",
         CANARY, at_step(0, 10, paused=True), obs(), 900, Action.WAIT, 10, Phase.PROGRESSING,
         {"paused": True, "step": 0}),
    Case("a paused rollout still rolls back on a failed check",
         CANARY, at_step(0, 10, paused=True), obs(analysis=FAIL), 900, Action.ROLL_BACK, 0, Phase.ROLLED_BACK),
    Case("a resume restarts the step's pause",
         CANARY, at_step(0, 10, paused=True), obs(action=ManualAction.RESUME), 900, Action.RESUME, 10,
         Phase.PROGRESSING, {"paused": False, "step_started_at": at(900)}, "Resumed"),
    Case("a manual promote promotes an Available candidate at once",
         CANARY, at_step(0, 10), obs(action=ManualAction.PROMOTE, analysis=INCONCLUSIVE), 5, Action.PROMOTE, 0,
         Phase.PROMOTED, {"stable_revision": "r2"}, "Promoted"),
    Case("a manual promote of a candidate that is not Available waits",
         CANARY, at_step(0, 0).evolve(step_started_at=None), obs(available=False, action=ManualAction.PROMOTE), 5,
         Action.WAIT, 0, Phase.PROGRESSING),
    Case("a manual abort rolls back and keeps stable",
         CANARY, at_step(1, 50), obs(action=ManualAction.ABORT), 5, Action.ROLL_BACK, 0, Phase.ABORTED,
         {"stable_revision": "r1"}, "Aborted"),
    Case("a new revision mid-rollout supersedes the candidate and restarts at step 0",
         CANARY, at_step(1, 50), obs(desired="r3"), 100, Action.SET_WEIGHT, 10, Phase.PROGRESSING,
         {"revision": "r3", "step": 0, "step_started_at": at(100), "started_at": at(100)}, "Superseded"),
    Case("a superseding revision that is not Available drops the old candidate's traffic",
         CANARY, at_step(1, 50), obs(desired="r3", available=False), 100, Action.WAIT, 0, Phase.PROGRESSING,
         {"revision": "r3", "weight": 0}, "Superseded"),
    Case("reverting the spec to the stable revision mid-rollout aborts the candidate",
         CANARY, at_step(1, 50), obs(desired="r1"), 100, Action.ROLL_BACK, 0, Phase.ABORTED),
    Case("a rolled-back revision is not retried while the spec still names it",
         CANARY, at_step(0, 0).evolve(phase=Phase.ROLLED_BACK), obs(), 1000, Action.COMPLETE, 0, Phase.ROLLED_BACK),
    Case("a new revision after a rollback starts a fresh rollout",
         CANARY, at_step(0, 0).evolve(phase=Phase.ROLLED_BACK), obs(desired="r3"), 1000, Action.SET_WEIGHT, 10,
         Phase.PROGRESSING, {"revision": "r3"}),
    Case("a new revision after a promotion canaries against the promoted one",
         CANARY, RolloutState(phase=Phase.PROMOTED, stable_revision="r2", revision="r2"), obs(desired="r3"), 0,
         Action.SET_WEIGHT, 10, Phase.PROGRESSING, {"stable_revision": "r2", "revision": "r3"}),
    Case("an A/B test starts at the configured split",
         AB, idle(), obs(analysis=None), 0, Action.SET_WEIGHT, 50, Phase.PROGRESSING),
    Case("an A/B test without a decision keeps its split",
         AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.CONTINUE)), 3600, Action.WAIT, 50,
         Phase.PROGRESSING, {"weight": 50}),
    Case("an A/B test the candidate wins promotes it and records the winner",
         AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.CANDIDATE_WINS)), 3600, Action.PROMOTE, 0,
         Phase.PROMOTED, {"stable_revision": "r2"}, "Promoted"),
    Case("an A/B test stable wins rolls the candidate back and keeps stable",
         AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.STABLE_WINS)), 3600, Action.ROLL_BACK, 0,
         Phase.ROLLED_BACK, {"stable_revision": "r1"}, "RolledBack"),
    Case("an A/B test without a difference at maxDuration keeps stable",
         AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.CONTINUE)), 86400, Action.ROLL_BACK, 0,
         Phase.ROLLED_BACK, {"stable_revision": "r1"}),
    Case("an A/B test whose candidate fails a guardrail check rolls back",
         AB, at_step(0, 50), obs(analysis=FAIL, ab=verdict(AbDecision.CONTINUE)), 600, Action.ROLL_BACK, 0,
         Phase.ROLLED_BACK),
    # progressDeadline: time without a conclusive analysis.
    Case("an inconclusive analysis within progressDeadline waits at the step's weight",
         DEADLINE, at_step(0, 10), obs(analysis=INCONCLUSIVE), 599, Action.WAIT, 10, Phase.PROGRESSING,
         {"reason": ""}),
    Case("a step whose analyses stay inconclusive past progressDeadline rolls back with ProgressDeadlineExceeded",
         DEADLINE, at_step(0, 10), obs(analysis=INCONCLUSIVE), 600, Action.ROLL_BACK, 0, Phase.ROLLED_BACK,
         {"reason": PDE, "stable_revision": "r1"}, PDE),
    Case("a metrics outage past progressDeadline rolls back like any inconclusive analysis",
         DEADLINE, at_step(0, 10), obs(analysis=UNAVAILABLE), 600, Action.ROLL_BACK, 0, Phase.ROLLED_BACK,
         {"reason": PDE}, PDE),
    Case("a reconcile without a look past progressDeadline rolls back when no look was conclusive",
         DEADLINE, at_step(0, 10), obs(analysis=None), 601, Action.ROLL_BACK, 0, Phase.ROLLED_BACK, {"reason": PDE},
         PDE),
    Case("the progressDeadline clock restarts at the last conclusive analysis",
         DEADLINE, at_step(0, 10, last_conclusive_at=at(300)), obs(analysis=INCONCLUSIVE), 899, Action.WAIT, 10,
         Phase.PROGRESSING),
    Case("the progressDeadline clock restarts when a step starts",
         DEADLINE, at_step(1, 50, started=400), obs(analysis=INCONCLUSIVE), 999, Action.WAIT, 50, Phase.PROGRESSING),
    Case("a passing analysis past progressDeadline advances the step and restarts the clock",
         DEADLINE, at_step(0, 10), obs(), 900, Action.SET_WEIGHT, 50, Phase.PROGRESSING,
         {"step": 1, "last_conclusive_at": at(900)}, "StepAdvanced"),
    Case("a failed check below failureLimit is conclusive and restarts the clock",
         policy(progressDeadline="10m", analysis__failureLimit=3), at_step(0, 10), obs(analysis=FAIL), 900,
         Action.WAIT, 10, Phase.PROGRESSING, {"failed_checks": 1, "last_conclusive_at": at(900)}, "AnalysisFailed"),
    Case("the progressDeadline also runs during a step's pause",
         policy(progressDeadline="10m", steps=[{"weight": 10, "pause": "1h"}]), at_step(0, 10),
         obs(analysis=INCONCLUSIVE), 600, Action.ROLL_BACK, 0, Phase.ROLLED_BACK, {"reason": PDE}, PDE),
    Case("a manually paused step does not run out its progressDeadline",
         DEADLINE, at_step(0, 10, paused=True), obs(analysis=INCONCLUSIVE), 3600, Action.WAIT, 10, Phase.PROGRESSING,
         {"paused": True, "reason": ""}),
    Case("without analysis the progressDeadline does not apply and steps advance on time",
         NO_ANALYSIS, at_step(0, 10), obs(analysis=None), 7200, Action.SET_WEIGHT, 50, Phase.PROGRESSING),
    Case("with onProgressDeadline hold a step past its deadline keeps its weight and says why",
         HOLD, at_step(0, 10), obs(analysis=UNAVAILABLE), 600, Action.WAIT, 10, Phase.PROGRESSING,
         {"reason": PDE, "step": 0}, PDE),
    Case("a held step carries on when an analysis passes again",
         HOLD, at_step(0, 10, reason=PDE), obs(), 1200, Action.SET_WEIGHT, 50, Phase.PROGRESSING,
         {"reason": "", "step": 1}, "StepAdvanced"),
    Case("a held step stops being held when a resume restarts it",
         HOLD, at_step(0, 10, reason=PDE, paused=True), obs(action=ManualAction.RESUME, analysis=INCONCLUSIVE), 1200,
         Action.RESUME, 10, Phase.PROGRESSING, {"step_started_at": at(1200), "reason": ""}, "Resumed"),
    Case("a manual promote of a held step promotes and clears the hold",
         HOLD, at_step(0, 10, reason=PDE), obs(action=ManualAction.PROMOTE, analysis=INCONCLUSIVE), 1200,
         Action.PROMOTE, 0, Phase.PROMOTED, {"reason": ""}, "Promoted"),
    Case("an A/B test that counts impressions of both variants is making progress past progressDeadline",
         AB_DEADLINE, at_step(0, 50), obs(analysis=INCONCLUSIVE, ab=verdict(AbDecision.CONTINUE)), 3600,
         Action.WAIT, 50, Phase.PROGRESSING, {"last_conclusive_at": at(3600)}),
    Case("an A/B test that cannot measure anything past progressDeadline rolls back",
         AB_DEADLINE, at_step(0, 50), obs(analysis=UNAVAILABLE), 600, Action.ROLL_BACK, 0, Phase.ROLLED_BACK,
         {"reason": PDE}, PDE),
    Case("an A/B test at maxDuration ends by its own rule even when nothing was measured",
         AB_DEADLINE, at_step(0, 50), obs(analysis=UNAVAILABLE), 86400, Action.ROLL_BACK, 0, Phase.ROLLED_BACK,
         {"reason": "RolledBack"}, "RolledBack"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_state_machine(case: Case) -> None:
    d = next_step(case.policy, case.state, case.obs, at(case.now))
    assert d.action is case.action, d.reason
    assert d.weights.canary == case.canary_weight, d.reason
    assert d.weights.stable == 100 - case.canary_weight
    assert d.state.phase is case.phase, d.reason
    for attr, value in case.expect.items():
        assert getattr(d.state, attr) == value, (attr, d.reason)
    assert (d.event.reason if d.event else None) == case.event or case.event is None, d.event
    assert d.reason
    if not case.obs.candidate_available:
        assert d.weights.canary == 0
        assert not d.weights.canary_routable


def test_ab_outcome_is_recorded_in_status() -> None:
    d = next_step(AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.STABLE_WINS)), at(3600))
    status = d.state.to_status()["abTest"]
    assert status["winner"] == "stable"
    assert status["decidedAt"] == "2026-11-29T13:00:00Z"
    assert [v["name"] for v in status["variants"]] == ["stable", "canary"]
    assert "keeping stable" in d.reason


def test_no_difference_at_max_duration_says_so() -> None:
    d = next_step(AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.CONTINUE)), at(86400))
    assert "no significant difference" in d.reason
    assert d.state.to_status()["abTest"]["winner"] == "none"


def test_a_test_ending_at_max_duration_between_looks_reports_the_last_look() -> None:
    """maxDuration may pass in a reconcile that takes no measurement: the reason then carries the evidence of
    the last look, not "no A/B measurements" (which a real A/A run on pods showed)."""
    looked = next_step(AB, at_step(0, 50), obs(analysis=None, ab=verdict(AbDecision.CONTINUE)), at(3600)).state
    assert looked.ab is not None and looked.ab.sequential_p_value is not None
    d = next_step(AB, looked, obs(analysis=None, ab=None), at(86400))
    assert d.action is Action.ROLL_BACK and d.state.to_status()["abTest"]["winner"] == "none"
    assert "last look: sequential p=" in d.reason and "no A/B measurements" not in d.reason, d.reason
    never = next_step(AB, at_step(0, 50), obs(analysis=None, ab=None), at(86400))
    assert "no A/B measurements" in never.reason


def test_manual_actions_report_that_they_were_handled() -> None:
    d = next_step(CANARY, at_step(0, 10), obs(action=ManualAction.ABORT), at(1))
    assert d.handled_action is ManualAction.ABORT


def test_policy_control_action_applies_when_no_annotation() -> None:
    paused = policy(control__action="pause")
    d = next_step(paused, at_step(0, 10), obs(), at(400))
    assert d.action is Action.PAUSE


def test_operator_restart_resumes_the_same_step_without_moving_traffic() -> None:
    """Round-trip the state through the status subresource (as YAML) and decide again at the same moment."""
    first = next_step(CANARY, idle(), obs(), at(0))
    second = next_step(CANARY, first.state, obs(), at(300))
    assert (second.action, second.weights.canary) == (Action.SET_WEIGHT, 50)
    stored = yaml.safe_load(yaml.safe_dump(second.state.to_status()))
    restored = RolloutState.from_status(stored)
    assert restored == second.state.evolve(last_analysis=stored["canary"]["lastAnalysis"])
    again = next_step(CANARY, restored, obs(), at(301))
    assert again.action is Action.WAIT
    assert again.weights == second.weights
    assert again.state.step == 1
    assert again.state.step_started_at == at(300)


def test_status_round_trip_preserves_unknown_keys() -> None:
    status = {"canary": {"phase": "Progressing", "revision": "r2", "weight": 10, "futureField": {"x": 1}}}
    state = RolloutState.from_status(status)
    assert state.to_status()["canary"]["futureField"] == {"x": 1}


def test_a_full_canary_walks_every_step_then_promotes() -> None:
    state, t = idle(), 0.0
    actions = []
    for _ in range(20):
        d = next_step(CANARY, state, obs(), at(t))
        actions.append((d.action, d.weights.canary))
        state = d.state
        if d.action is Action.PROMOTE:
            break
        t += d.requeue_after or 1.0
    assert actions[0] == (Action.SET_WEIGHT, 10)
    assert (Action.SET_WEIGHT, 50) in actions
    assert actions[-1] == (Action.PROMOTE, 0)
    assert state.stable_revision == "r2"
    assert t == pytest.approx(900.0)


def test_steps_removed_mid_rollout_continue_from_the_last_remaining_step() -> None:
    one_step = policy(steps=[{"weight": 20, "pause": "1m"}])
    d = next_step(one_step, at_step(1, 50), obs(), at(600))
    assert d.action is Action.PROMOTE


observations = st.builds(
    Observation,
    desired_revision=st.sampled_from(["r1", "r2", "r3"]),
    candidate_available=st.booleans(),
    analysis=st.sampled_from([PASS, FAIL, INCONCLUSIVE, UNAVAILABLE, None]),
    action=st.sampled_from(list(ManualAction)),
)
DEADLINE_2M = policy(progressDeadline="2m")
HOLD_2M = policy(progressDeadline="2m", onProgressDeadline="hold")


@settings(max_examples=200, deadline=None)
@given(
    pol=st.sampled_from([CANARY, CANARY_LIMIT_2, NO_ANALYSIS, IMMEDIATE, DEADLINE_2M, HOLD_2M]),
    seq=st.lists(st.tuples(observations, st.floats(0, 900)), min_size=1, max_size=25),
)
def test_invariants_hold_for_any_sequence_of_observations(
    pol: RolloutPolicy, seq: list[tuple[Observation, float]]
) -> None:
    """Whatever happens: no traffic to an unavailable candidate, weights add up, status round-trips (restarts)."""
    state, t = idle(), 0.0
    allowed = {0} | {s.weight for s in pol.steps}
    for o, dt in seq:
        t += dt
        d = next_step(pol, state, o, at(t))
        assert d.weights.stable + d.weights.canary == 100
        assert d.weights.canary in allowed
        if not o.candidate_available:
            assert d.weights.canary == 0 and not d.weights.canary_routable
        if d.weights.canary > 0:
            assert d.state.phase is Phase.PROGRESSING and d.state.revision == o.desired_revision
        assert d.state.stable_revision is not None
        _assert_progress_needs_evidence(pol, o, d)
        # An operator restart between any two reconciles sees the same state.
        restored = RolloutState.from_status(yaml.safe_load(yaml.safe_dump(d.state.to_status())))
        assert restored.to_status() == d.state.to_status()
        state = restored


def _assert_progress_needs_evidence(pol: RolloutPolicy, o: Observation, d: Any) -> None:
    """Nothing advances or promotes on missing evidence (an outage is an inconclusive look); a deadline says so."""
    event = d.event.reason if d.event else None
    if pol.analysis.enabled and pol.strategy is Strategy.CANARY:
        advanced = event == "StepAdvanced" or (d.action is Action.PROMOTE and o.action is not ManualAction.PROMOTE)
        assert not advanced or o.analysis is PASS, (d.reason, o)
    if event == PDE:
        assert d.state.reason == PDE
    if d.state.phase is Phase.PROGRESSING and d.state.reason:
        assert d.state.reason == PDE and pol.on_progress_deadline is DeadlineAction.HOLD


def test_a_held_step_posts_its_event_once() -> None:
    first = next_step(HOLD, at_step(0, 10), obs(analysis=INCONCLUSIVE), at(600))
    again = next_step(HOLD, first.state, obs(analysis=INCONCLUSIVE), at(660))
    assert first.event is not None and first.event.reason == PDE
    assert again.event is None and again.state.reason == PDE and again.weights.canary == 10
    assert again.state.message == first.state.message, "a held step must not rewrite its status every resync"


def test_a_deadline_rollback_names_the_last_analysis_and_the_deadline() -> None:
    d = next_step(DEADLINE, at_step(0, 10), obs(analysis=UNAVAILABLE), at(600))
    assert "progressDeadline 600s" in d.reason and "metrics unavailable" in d.reason
    assert d.state.to_status()["canary"]["reason"] == PDE


def test_an_annotation_action_without_a_rollout_is_consumed() -> None:
    d = next_step(CANARY, idle(), obs(desired="r1", action=ManualAction.PROMOTE), at(0))
    assert d.action is Action.NONE
    assert d.handled_action is ManualAction.PROMOTE
    assert "ignored" in d.reason


# ---------------------------------------------------------------- spec.rollout.control.action applies once

PROMOTE_IN_SPEC = policy(control__action="promote")
ABORT_IN_SPEC = policy(control__action="abort")
PAUSE_IN_SPEC = policy(control__action="pause")


def next_rollout(**kw: Any) -> RolloutState:
    """r2 was promoted by the spec's action; r3 is now rolling out at its first step."""
    return RolloutState(phase=Phase.PROGRESSING, stable_revision="r2", revision="r3", weight=10, step=0,
                        step_started_at=at(0), started_at=at(0), split_started_at=at(0), **kw)  # fmt: skip


@dataclass(frozen=True)
class ControlCase:
    name: str
    policy: RolloutPolicy
    state: RolloutState
    obs: Observation
    action: Action
    control: ControlRecord | None


CONSUMED_BY_R2 = ControlRecord(ManualAction.PROMOTE, "r2", handled=True)
CONTROL_CASES = [
    ControlCase("a spec action applies to the rollout in progress",
                PROMOTE_IN_SPEC, at_step(0, 10), obs(), Action.PROMOTE,
                ControlRecord(ManualAction.PROMOTE, "r2", True)),
    ControlCase("a spec action consumed by one rollout does not apply to the next revision's rollout",
                PROMOTE_IN_SPEC, next_rollout(control=CONSUMED_BY_R2), obs(desired="r3"), Action.WAIT, CONSUMED_BY_R2),
    ControlCase("a newly set action on the new rollout applies to it",
                ABORT_IN_SPEC, next_rollout(control=CONSUMED_BY_R2), obs(desired="r3"), Action.ROLL_BACK,
                ControlRecord(ManualAction.ABORT, "r3", True)),
    ControlCase("a spec action set again after being cleared applies to the new rollout",
                PROMOTE_IN_SPEC, next_rollout(), obs(desired="r3"), Action.PROMOTE,
                ControlRecord(ManualAction.PROMOTE, "r3", True)),
    ControlCase("a spec action given for one revision is not applied after the spec moves to another",
                PROMOTE_IN_SPEC, next_rollout(control=ControlRecord(ManualAction.PROMOTE, "r2")), obs(desired="r3"),
                Action.WAIT, ControlRecord(ManualAction.PROMOTE, "r2")),
    ControlCase("a spec action that cannot act yet stays pending for its rollout",
                PROMOTE_IN_SPEC, at_step(0, 10), obs(available=False), Action.SET_WEIGHT,
                ControlRecord(ManualAction.PROMOTE, "r2")),
    ControlCase("a spec pause already acted on does not pause again after a resume",
                PAUSE_IN_SPEC, at_step(0, 10, control=ControlRecord(ManualAction.PAUSE, "r2", True)), obs(),
                Action.WAIT, ControlRecord(ManualAction.PAUSE, "r2", True)),
    ControlCase("clearing the spec action forgets which rollout used it",
                CANARY, at_step(0, 10, control=ControlRecord(ManualAction.PAUSE, "r2", True)), obs(), Action.WAIT,
                None),
    ControlCase("a spec action set while no rollout runs is kept from the next revision's rollout",
                PROMOTE_IN_SPEC, idle(), obs(desired="r1"), Action.NONE, ControlRecord(ManualAction.PROMOTE, "r1")),
    ControlCase("an annotation action does not use up the spec's action",
                PAUSE_IN_SPEC, at_step(0, 10), obs(action=ManualAction.ABORT), Action.ROLL_BACK,
                ControlRecord(ManualAction.PAUSE, "r2")),
]  # fmt: skip


@pytest.mark.parametrize("case", CONTROL_CASES, ids=[c.name for c in CONTROL_CASES])
def test_spec_control_action(case: ControlCase) -> None:
    d = next_step(case.policy, case.state, case.obs, at(60))
    assert d.action is case.action, d.reason
    assert d.state.control == case.control
    restored = RolloutState.from_status(yaml.safe_load(yaml.safe_dump(d.state.to_status())))
    assert restored.control == case.control


def test_a_promote_left_in_the_spec_does_not_promote_the_next_revision() -> None:
    state, t = at_step(0, 10), 60.0
    first = next_step(PROMOTE_IN_SPEC, state, obs(), at(t))
    assert first.action is Action.PROMOTE
    state = first.state
    actions = []
    for _ in range(6):
        t += 30
        d = next_step(PROMOTE_IN_SPEC, state, obs(desired="r3"), at(t))
        actions.append(d.action)
        state = d.state
    assert Action.PROMOTE not in actions, actions
    assert state.phase is Phase.PROGRESSING and state.revision == "r3"


# ---------------------------------------------------------------- the A/B experiment's start

AB_CASES = [
    ("entering the A/B split records when the experiment started",
     at_step(0, 0).evolve(step_started_at=None), obs(analysis=None), 90, at(90)),
    ("a candidate outage and its recovery keep the experiment's start",
     at_step(0, 0, split_started_at=at(30)).evolve(step_started_at=None), obs(analysis=None), 600, at(30)),
    ("a candidate that is not Available yet has no experiment running",
     idle(), obs(available=False, analysis=None), 10, None),
    ("a new revision starts a new experiment",
     at_step(0, 50, split_started_at=at(30)), obs(available=False, analysis=None, desired="r3"), 600, None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "state", "o", "now", "started"), AB_CASES, ids=[c[0] for c in AB_CASES])
def test_ab_experiment_start(name: str, state: RolloutState, o: Observation, now: float, started: Any) -> None:
    d = next_step(AB, state, o, at(now))
    assert d.state.split_started_at == started, d.reason


def test_ab_evidence_accumulates_from_the_split_not_from_the_rollout_start() -> None:
    started = next_step(AB, idle(), obs(available=False, analysis=None), at(0)).state
    assert started.ab_elapsed_s(at(100)) is None
    split = next_step(AB, started, obs(analysis=None), at(100)).state
    assert [split.ab_elapsed_s(at(t)) for t in (100, 400, 3700)] == [0.0, 300.0, 3600.0]
