"""A candidate whose Triton container keeps failing mid-canary is rolled back: the machine's decision
(rollout.machine.next_step), and the strategy handing it the revision's observed crash loop (observe ->
strategies.Progressive)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from operator_samples import minimal_spec
from recserve_operator.builders.common import Ids
from recserve_operator.lifecycle import RouterObservation
from recserve_operator.metrics.base import MetricsProvider
from recserve_operator.observe import RevisionObservation, observe_revision
from recserve_operator.rollout.analysis import AnalysisResult, Verdict
from recserve_operator.rollout.machine import Action, Observation, next_step
from recserve_operator.rollout.policy import ManualAction, RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.spec import parse_spec, revision_of
from recserve_operator.strategies import Measured, Progressive
from recserve_operator.strategy import Context

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CRASH = "triton container CrashLoopBackOff: model load failed"
ROLLOUT: dict[str, Any] = {
    "strategy": "canary",
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "5m"}],
}
POLICY = RolloutPolicy.from_spec(ROLLOUT)
PASS = AnalysisResult(Verdict.PASS, "pass (test)", 1000.0, 0.0, 5.0, ())


def _mid_canary(weight: int, step: int = 0, revision: str = "r2") -> RolloutState:
    return RolloutState(phase=Phase.PROGRESSING, stable_revision="r1", revision=revision, weight=weight, step=step,
                        step_started_at=T0, started_at=T0, split_started_at=T0)  # fmt: skip


def _obs(available: bool, failing: str | None, action: ManualAction = ManualAction.NONE) -> Observation:
    return Observation(desired_revision="r2", candidate_available=available, candidate_failing=failing, analysis=PASS,
                       action=action)  # fmt: skip


def test_a_crash_looping_candidate_mid_canary_is_rolled_back_and_the_reason_names_the_crash() -> None:
    # At its step's weight (still counted Available, or not), or already drained to 0% by the unavailability.
    for state, available in ((_mid_canary(10), False), (_mid_canary(50, step=1), True), (_mid_canary(0), False)):
        d = next_step(POLICY, state, _obs(available, CRASH), T0 + timedelta(seconds=30))
        assert d.action is Action.ROLL_BACK, (state, d)
        assert d.state.phase is Phase.ROLLED_BACK and d.state.stable_revision == "r1"
        assert (d.weights.stable, d.weights.canary, d.weights.canary_routable) == (100, 0, False)
        assert d.event is not None and d.event.reason == "RolledBack" and CRASH in d.event.message
        assert CRASH in d.state.message and d.state.reason == "RolledBack"


def test_a_failing_candidate_that_never_carried_traffic_is_waited_for_not_rolled_back() -> None:
    fresh = _mid_canary(0).evolve(step_started_at=None, split_started_at=None)
    d = next_step(POLICY, fresh, _obs(False, CRASH), T0 + timedelta(seconds=30))
    assert d.action is Action.WAIT and d.state.phase is Phase.PROGRESSING


def test_a_running_candidate_is_not_rolled_back_a_finished_rollout_ignores_a_crash_and_abort_wins() -> None:
    d = next_step(POLICY, _mid_canary(10), _obs(True, None), T0 + timedelta(seconds=30))
    assert d.action is Action.WAIT and d.state.phase is Phase.PROGRESSING
    done = RolloutState(phase=Phase.ROLLED_BACK, stable_revision="r1", revision="r2")
    d = next_step(POLICY, done, _obs(False, CRASH), T0 + timedelta(seconds=30))
    assert d.action is Action.COMPLETE and d.state.phase is Phase.ROLLED_BACK
    d = next_step(POLICY, _mid_canary(10), _obs(False, CRASH, ManualAction.ABORT), T0 + timedelta(seconds=30))
    assert d.state.phase is Phase.ABORTED


def _crashing_pod() -> dict[str, Any]:
    triton = {"name": "triton", "ready": False, "restartCount": 3,
              "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
              "lastState": {"terminated": {"exitCode": 1, "message": "model load failed"}}}  # fmt: skip
    return {"metadata": {"labels": {}}, "status": {"containerStatuses": [triton]}}


def _no_metrics(url: str) -> MetricsProvider:
    raise AssertionError("this rollout has no analysis")


def test_the_strategy_rolls_back_a_candidate_whose_pods_crash_loop_and_routes_all_traffic_to_stable() -> None:
    spec = parse_spec(minimal_spec(rollout=ROLLOUT))
    latest = revision_of(spec)
    deployment = {"metadata": {"generation": 1}, "spec": {"replicas": 1},
                  "status": {"observedGeneration": 1, "readyReplicas": 0, "updatedReplicas": 1}}  # fmt: skip
    cand = observe_revision(latest, deployment, [_crashing_pod()])
    assert cand.container_failing == CRASH
    observations = {
        "r1": RevisionObservation("r1", exists=True, desired_replicas=1, ready_replicas=1, available=True),
        latest: cand,
    }
    status = {"canary": _mid_canary(10, revision=latest).to_status()["canary"], "stable": {"revision": "r1"}}
    ctx = Context(spec, Ids("ctr-dnn", "shop", "uid-1", latest), status, {}, observations, RouterObservation(None, ()),
                  T0 + timedelta(seconds=30))  # fmt: skip
    plan = Progressive(_no_metrics).decide(ctx, Measured())
    assert plan.outcome == "rolled_back"
    assert plan.status["canary"]["phase"] == "RolledBack" and CRASH in plan.status["canary"]["message"]
    assert dict(plan.traffic.weights) == {"r1": 100}
    assert [e[1] for e in plan.events] == ["RolledBack"]
    # The same candidate running again: no rollback.
    running = RevisionObservation(latest, exists=True, desired_replicas=1, ready_replicas=1, available=True)
    ctx = Context(spec, ctx.ids, status, {}, {**observations, latest: running}, RouterObservation(None, ()), ctx.now)
    assert Progressive(_no_metrics).decide(ctx, Measured()).outcome is None
