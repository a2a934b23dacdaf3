"""spec.rollout.progressDeadline / onProgressDeadline: parsing, the clock kept in status, and status written before."""

from __future__ import annotations

import pytest
import yaml
from recserve_operator.errors import InvalidSpec
from recserve_operator.rollout.analysis import AnalysisResult
from recserve_operator.rollout.machine import Action, Observation, next_step
from recserve_operator.rollout.policy import DeadlineAction, RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState

from .helpers import AB_SPEC, CANARY_SPEC, INCONCLUSIVE, PASS, T0, at, policy, spec


def test_the_deadline_defaults_to_thirty_minutes_and_rollback_like_the_crd() -> None:
    p = policy()
    assert (p.progress_deadline_s, p.on_progress_deadline) == (1800.0, DeadlineAction.ROLLBACK)


def test_the_deadline_and_its_action_parse() -> None:
    p = policy(progressDeadline="1h30m", onProgressDeadline="hold")
    assert (p.progress_deadline_s, p.on_progress_deadline) == (5400.0, DeadlineAction.HOLD)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"progressDeadline": "0s"}, "rollout.progressDeadline: must be > 0"),
        ({"progressDeadline": "soon"}, "rollout.progressDeadline: invalid duration"),
        ({"progressDeadline": "1m"}, "must be longer than rollout.analysis.interval"),
        ({"progressDeadline": "30s"}, "must be longer than rollout.analysis.interval"),
        ({"onProgressDeadline": "promote"}, "rollout.onProgressDeadline: 'promote' is not one of"),
    ],
)
def test_invalid_deadlines_name_the_field(patch: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        RolloutPolicy.from_spec(spec(CANARY_SPEC, **patch))


def test_the_interval_rule_applies_only_where_a_rollout_is_analysed() -> None:
    no_analysis = RolloutPolicy.from_spec(spec(CANARY_SPEC, analysis={}, progressDeadline="10s"))
    assert no_analysis.progress_deadline_s == 10.0
    immediate = RolloutPolicy.from_spec(spec(AB_SPEC, strategy="immediate", analysis__interval="2h"))
    assert immediate.progress_deadline_s == 1800.0
    with pytest.raises(InvalidSpec, match="must be longer"):
        RolloutPolicy.from_spec(spec(AB_SPEC, analysis__interval="2h"))


def test_the_clock_and_the_reason_survive_a_restart() -> None:
    held = next_step(policy(progressDeadline="10m", onProgressDeadline="hold"), _running(), _look(INCONCLUSIVE),
                     at(600)).state  # fmt: skip
    status = yaml.safe_load(yaml.safe_dump(held.to_status()))
    assert status["canary"]["reason"] == "ProgressDeadlineExceeded"
    restored = RolloutState.from_status(status)
    assert restored == held
    passed = next_step(policy(), restored, _look(PASS), at(700)).state.to_status()["canary"]
    assert passed["lastConclusiveAt"] == "2026-11-29T12:11:40Z"


def test_status_from_before_the_deadline_takes_the_clock_from_its_last_conclusive_analysis() -> None:
    """An operator upgrade mid-rollout: a step deep into a long pause whose looks passed is not rolled back."""
    status = _running().to_status()
    status["canary"].pop("lastConclusiveAt")
    status["canary"]["lastAnalysis"] = {"time": "2026-11-29T13:59:30Z", "verdict": "pass", "reason": "passed"}
    state = RolloutState.from_status(status)
    assert state.last_conclusive_at == at(7170)
    long_pause = policy(steps=[{"weight": 10, "pause": "3h"}, {"weight": 50, "pause": "1m"}])
    d = next_step(long_pause, state, _look(None), at(7200))
    assert (d.action, d.state.phase, d.weights.canary) == (Action.WAIT, Phase.PROGRESSING, 10)


def test_an_inconclusive_last_analysis_from_before_the_deadline_starts_no_clock() -> None:
    status = _running().to_status()
    status["canary"].pop("lastConclusiveAt")
    status["canary"]["lastAnalysis"] = {"time": "2026-11-29T12:10:00Z", "verdict": "inconclusive", "reason": "few"}
    assert RolloutState.from_status(status).last_conclusive_at is None


def _running() -> RolloutState:
    return RolloutState(phase=Phase.PROGRESSING, stable_revision="r1", revision="r2", weight=10, step=0,
                        step_started_at=T0, started_at=T0, split_started_at=T0)  # fmt: skip


def _look(analysis: AnalysisResult | None) -> Observation:
    return Observation(desired_revision="r2", candidate_available=True, analysis=analysis)
