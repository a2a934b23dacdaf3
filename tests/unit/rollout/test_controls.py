"""Which manual actions make sense in which rollout state (the rule `kubectl recserve` refuses by), and the bounded
history of analyses kept in status for it."""

from __future__ import annotations

import pytest
from recserve_operator.rollout.analysis import Verdict
from recserve_operator.rollout.controls import refusal
from recserve_operator.rollout.machine import Observation, next_step
from recserve_operator.rollout.policy import ManualAction, RolloutPolicy
from recserve_operator.rollout.state import ANALYSIS_HISTORY, Phase, RolloutState

from tests.unit.rollout.helpers import CANARY_SPEC, T0, analysis

RUNNING = RolloutState(phase=Phase.PROGRESSING, stable_revision="s1", revision="c2", weight=10)


@pytest.mark.parametrize("action", [ManualAction.PROMOTE, ManualAction.ABORT, ManualAction.PAUSE])
def test_a_running_rollout_accepts_promote_abort_and_pause(action: ManualAction) -> None:
    assert refusal(RUNNING, action) is None


def test_pause_and_resume_only_toggle() -> None:
    assert refusal(RUNNING, ManualAction.RESUME) == "the rollout of revision c2 is not paused (at 10%)"
    paused = RUNNING.evolve(paused=True)
    assert refusal(paused, ManualAction.RESUME) is None
    assert refusal(paused, ManualAction.PAUSE) == "the rollout of revision c2 is already paused at 10%"
    assert refusal(paused, ManualAction.PROMOTE) is None and refusal(paused, ManualAction.ABORT) is None


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED])
@pytest.mark.parametrize("action", [a for a in ManualAction if a is not ManualAction.NONE])
def test_without_a_rollout_in_progress_every_action_is_refused_and_says_why(phase: Phase, action: ManualAction) -> None:
    why = refusal(RUNNING.evolve(phase=phase), action)
    assert why is not None and why.startswith("no rollout in progress") and f"nothing to {action.value}" in why
    assert f"c2: {phase.value}" in why and "stable revision is s1" in why


def test_every_refused_action_is_one_the_state_machine_ignores() -> None:
    """The CLI's rule and the machine agree: a refused action changes neither phase, weight nor paused."""
    policy = RolloutPolicy.from_spec(CANARY_SPEC)
    for state in (RUNNING.evolve(step_started_at=T0), RUNNING.evolve(step_started_at=T0, paused=True),
                  RUNNING.evolve(phase=Phase.PROMOTED, stable_revision="c2")):  # fmt: skip
        for action in (a for a in ManualAction if a is not ManualAction.NONE):
            if refusal(state, action) is None:
                continue
            obs = Observation(desired_revision=state.revision, candidate_available=True, action=action)
            d = next_step(policy, state, obs, T0)
            assert (d.state.phase, d.state.weight, d.state.paused) == (state.phase, state.weight, state.paused)


def test_status_keeps_the_last_analyses_newest_first_and_a_new_rollout_starts_afresh() -> None:
    policy = RolloutPolicy.from_spec(CANARY_SPEC)
    state = RUNNING.evolve(step_started_at=T0)
    for i in range(ANALYSIS_HISTORY + 2):
        now = T0.replace(second=i + 1)
        obs = Observation(desired_revision="c2", candidate_available=True, analysis=analysis(Verdict.PASS))
        state = next_step(policy, state, obs, now).state
    assert len(state.analyses) == ANALYSIS_HISTORY
    assert state.analyses[0] == state.last_analysis and state.analyses[0]["time"] > state.analyses[-1]["time"]
    assert RolloutState.from_status(state.to_status()).analyses == state.analyses
    restarted = next_step(policy, state, Observation(desired_revision="c3", candidate_available=True), T0).state
    assert restarted.revision == "c3" and restarted.analyses == ()
