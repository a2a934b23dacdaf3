"""The pure rollout state machine: (policy, state, observation, now) -> Decision."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from recserve_operator.conditions import PROGRESS_DEADLINE_EXCEEDED
from recserve_operator.rollout.analysis import AnalysisResult, Verdict
from recserve_operator.rollout.policy import DeadlineAction, ManualAction, RolloutPolicy, Strategy
from recserve_operator.rollout.state import AbStatus, ControlRecord, Phase, RolloutState, VariantStats, format_time
from recserve_operator.rollout.statistics import AbDecision, AbVerdict

__all__ = ["Action", "Decision", "Event", "Observation", "TrafficWeights", "next_step", "spec_action"]

# How often to look again while waiting for the candidate Deployment to become Available.
READINESS_POLL_S = 10.0
MIN_REQUEUE_S = 1.0


class Action(StrEnum):
    NONE = "None"  # nothing to roll out; stable serves everything
    WAIT = "Wait"  # keep the current weights and look again after requeue_after
    SET_WEIGHT = "SetWeight"  # apply the new weights
    PAUSE = "Pause"  # manual pause; weights are held
    RESUME = "Resume"  # manual resume
    PROMOTE = "Promote"  # candidate becomes stable and takes all traffic
    ROLL_BACK = "RollBack"  # all traffic back to stable; candidate may be scaled down
    COMPLETE = "Complete"  # a finished rollout (promoted / rolled back / aborted) stays as is


@dataclass(frozen=True)
class Observation:
    """What the operator saw this reconcile.

    desired_revision: the revision in the spec; a revision that differs from both the stable and the one in
    state starts (or supersedes) a rollout. candidate_available: the candidate Deployment is Available and
    Triton reports the model READY. analysis / ab: results over the last interval (None when not measured).
    candidate_failing: why the candidate's Triton container cannot run (CrashLoopBackOff, image pull), None
    while it runs.
    """

    desired_revision: str | None
    candidate_available: bool = False
    candidate_failing: str | None = None
    analysis: AnalysisResult | None = None
    ab: AbVerdict | None = None
    action: ManualAction = ManualAction.NONE


@dataclass(frozen=True)
class TrafficWeights:
    stable: int
    canary: int
    canary_routable: bool  # False: the candidate gets no traffic at all, not even forced-variant requests
    mirror: int = 0  # percent of live requests mirrored to the candidate (shadow phase); users get stable's answer

    @classmethod
    def stable_only(cls) -> TrafficWeights:
        return cls(stable=100, canary=0, canary_routable=False)


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    weights: TrafficWeights
    action: Action
    reason: str
    event: Event | None = None
    requeue_after: float | None = None
    handled_action: ManualAction | None = None  # the manual action this decision consumed (clear the annotation)

    @property
    def superseded(self) -> bool:
        return self.event is not None and self.event.reason == "Superseded"


def _weights(state: RolloutState, available: bool, policy: RolloutPolicy | None = None) -> TrafficWeights:
    if state.shadowing:
        # Shadow: no user request reaches the candidate (not even a forced variant); a share is mirrored to it.
        live = state.phase is Phase.PROGRESSING and available and state.revision is not None
        percent = policy.shadow.percent if policy is not None and policy.shadow is not None else 0
        return TrafficWeights(stable=100, canary=0, canary_routable=False, mirror=percent if live else 0)
    if state.phase is Phase.PROGRESSING and available and state.revision is not None:
        return TrafficWeights(stable=100 - state.weight, canary=state.weight, canary_routable=True)
    return TrafficWeights.stable_only()


def _seconds_since(then: datetime | None, now: datetime) -> float:
    return 0.0 if then is None else max(0.0, (now - then).total_seconds())


def spec_action(
    action: ManualAction, record: ControlRecord | None, desired: str | None
) -> tuple[ManualAction, ControlRecord | None]:
    """The spec's `rollout.control.action` as it applies now, and the record to keep in status.

    An action belongs to the revision the spec named when the operator first saw that action, and applies once:
    left in the spec, it neither repeats (a resumed rollout is not paused again) nor reaches the next revision's
    rollout. Setting a different action, or clearing and setting it again, gives it to the current revision.
    """
    if action is ManualAction.NONE:
        return ManualAction.NONE, None
    if record is None or record.action is not action:
        record = ControlRecord(action, desired)
    if record.handled or record.revision != desired:
        return ManualAction.NONE, record
    return action, record


def next_step(policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime) -> Decision:
    """Decide the next rollout move. Pure: same inputs, same Decision; `now` is passed in.

    A manual action from the annotation wins over the spec's; the spec's applies once per `spec_action`.
    """
    from_spec, record = spec_action(policy.action, state.control, obs.desired_revision)
    action = obs.action or from_spec
    d = _decide(policy, state, obs, now, action)
    if record is not None and obs.action is ManualAction.NONE and d.handled_action is from_spec:
        record = replace(record, handled=True)
    return replace(d, state=d.state.evolve(control=record))


def _decide(
    policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime, action: ManualAction
) -> Decision:
    desired = obs.desired_revision
    if state.stable_revision is None and desired is not None and state.phase is Phase.IDLE:
        # First deployment of the model: there is nothing to canary against.
        new = state.evolve(stable_revision=desired, message=f"initial revision {desired}")
        return Decision(new, TrafficWeights.stable_only(), Action.NONE, new.message)
    if desired is None or desired == state.stable_revision:
        if state.phase is Phase.PROGRESSING:
            return _end(state, Phase.ABORTED, "spec reverted to the stable revision; candidate dropped", now)
        return _steady(state, obs.action)
    if state.phase is not Phase.PROGRESSING:
        if desired == state.revision and state.phase in (Phase.ROLLED_BACK, Phase.ABORTED):
            return _steady(state, obs.action)  # a failed revision is not retried until the spec names a new one
        return _start(policy, state, obs, now, superseded=None)
    if desired != state.revision:
        return _start(policy, state, obs, now, superseded=state.revision)
    return _progress(policy, state, obs, now, action)


def _steady(state: RolloutState, manual: ManualAction) -> Decision:
    action = Action.NONE if state.phase is Phase.IDLE else Action.COMPLETE
    reason = state.message or "no rollout in progress"
    # A manual action with no rollout to act on is consumed, so the operator clears the annotation.
    handled = manual if manual is not ManualAction.NONE else None
    if handled is not None:
        reason = f"{reason} ({handled.value} ignored: no rollout in progress)"
    return Decision(state, TrafficWeights.stable_only(), action, reason, handled_action=handled)


def _start(
    policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime, superseded: str | None
) -> Decision:
    new = RolloutState(
        phase=Phase.PROGRESSING,
        stable_revision=state.stable_revision,
        revision=obs.desired_revision,
        weight=0,
        step=0,
        step_started_at=None,
        started_at=now,
        extra=state.extra,
    )
    if superseded is not None:
        msg = f"revision {obs.desired_revision} supersedes {superseded}; restarting {policy.strategy.value} at step 0"
        event = Event("Normal", "Superseded", msg)
    else:
        msg = f"starting {policy.strategy.value} of {obs.desired_revision} (stable {state.stable_revision})"
        event = Event("Normal", "RolloutStarted", msg)
    if not obs.candidate_available:
        new = new.evolve(message=f"{msg}; waiting for the candidate to be Available")
        return Decision(new, TrafficWeights.stable_only(), Action.WAIT, new.message, event, READINESS_POLL_S)
    return _enter_rollout(policy, new, now, event)


def _enter_rollout(policy: RolloutPolicy, state: RolloutState, now: datetime, event: Event | None) -> Decision:
    """The first move of a rollout whose candidate is Available: the shadow phase when the spec has one."""
    if policy.shadow is not None and policy.strategy is not Strategy.IMMEDIATE:
        return _enter_shadow(policy, state, now, event)
    return _enter_first_step(policy, state, now, event)


def _enter_shadow(policy: RolloutPolicy, state: RolloutState, now: datetime, event: Event | None) -> Decision:
    assert policy.shadow is not None
    new = state.evolve(shadowing=True, weight=0, step=0, step_started_at=now, failed_checks=0)
    reason = (f"candidate Available; shadow: {policy.shadow.percent}% of live requests mirrored to {state.revision},"
              " users get the stable's answers")  # fmt: skip
    new = new.evolve(message=reason)
    event = event or Event("Normal", "ShadowStarted", reason)
    return Decision(new, _weights(new, True, policy), Action.SET_WEIGHT, reason, event, _requeue(policy, new, now))


def _enter_first_step(policy: RolloutPolicy, state: RolloutState, now: datetime, event: Event | None) -> Decision:
    if policy.strategy is Strategy.IMMEDIATE:
        return _promote(state, "immediate strategy: candidate is Available", now)
    weight = _step_weight(policy, 0)
    new = state.evolve(weight=weight, step=0, step_started_at=now, failed_checks=0, split_started_at=now)
    reason = f"candidate Available; {_stage(policy, new)} at {weight}%"
    new = new.evolve(message=reason)
    return Decision(new, _weights(new, True), Action.SET_WEIGHT, reason, event, _requeue(policy, new, now))


def _step_weight(policy: RolloutPolicy, step: int) -> int:
    if policy.strategy is Strategy.AB_TEST:
        ab = policy.analysis.ab_test
        return ab.split if ab is not None else 50
    return policy.steps[step].weight


def _stage(policy: RolloutPolicy, state: RolloutState) -> str:
    if state.shadowing:
        return "shadow"
    if policy.strategy is Strategy.AB_TEST:
        return "A/B test"
    return f"step {state.step + 1}/{len(policy.steps)}"


def _requeue(policy: RolloutPolicy, state: RolloutState, now: datetime) -> float:
    interval = policy.analysis.interval_s if policy.analysis.enabled else READINESS_POLL_S
    if state.shadowing and policy.shadow is not None:
        remaining = policy.shadow.duration_s - _seconds_since(state.step_started_at, now)
        if remaining > 0:
            interval = min(interval, remaining)
    elif policy.strategy is Strategy.CANARY and state.step < len(policy.steps):
        remaining = policy.steps[state.step].pause_s - _seconds_since(state.step_started_at, now)
        if remaining > 0:
            interval = min(interval, remaining)
    return max(MIN_REQUEUE_S, interval)


def _promote(state: RolloutState, why: str, now: datetime) -> Decision:
    rev = state.revision
    msg = f"promoted {rev} (was {state.stable_revision}): {why}"
    ab = state.ab
    if ab is not None and ab.decided_at is None:
        ab = replace(ab, decided_at=now)
    new = state.evolve(
        phase=Phase.PROMOTED, stable_revision=rev, weight=0, step_started_at=None, paused=False, message=msg, ab=ab,
        reason="", shadowing=False,
    )  # fmt: skip
    return Decision(new, TrafficWeights.stable_only(), Action.PROMOTE, msg, Event("Normal", "Promoted", msg))


def _end(state: RolloutState, phase: Phase, why: str, now: datetime, reason: str | None = None) -> Decision:
    """Roll back or abort; `reason` (default RolledBack / Aborted) names the condition reason and the event."""
    msg = f"{'aborted' if phase is Phase.ABORTED else 'rolled back'} {state.revision}: {why}"
    ab = state.ab
    if ab is not None and ab.decided_at is None:
        ab = replace(ab, decided_at=now)
    reason = reason or ("Aborted" if phase is Phase.ABORTED else "RolledBack")
    new = state.evolve(phase=phase, weight=0, step_started_at=None, paused=False, message=msg, ab=ab, reason=reason,
                       shadowing=False)  # fmt: skip
    return Decision(new, TrafficWeights.stable_only(), Action.ROLL_BACK, msg, Event("Warning", reason, msg))


def _record_analysis(state: RolloutState, obs: Observation, now: datetime, decision: str) -> RolloutState:
    if obs.analysis is None:
        return state
    record = obs.analysis.to_status(now, decision)
    new = state.with_analysis(record)
    # A shadow look is also kept as status.canary.shadow: its measured values outlive the phase.
    return new.evolve(shadow=record) if state.shadowing else new


def _note_evidence(state: RolloutState, obs: Observation, now: datetime) -> RolloutState:
    """Restart the progressDeadline clock on a conclusive look: the guardrail analysis passed or failed, or the A/B
    test counted impressions of both variants (its undecided looks are progress; maxDuration bounds those)."""
    analysis, ab = obs.analysis, obs.ab
    decided = analysis is not None and analysis.verdict in (Verdict.PASS, Verdict.FAIL)
    counted = ab is not None and min(ab.stable.impressions, ab.candidate.impressions) > 0
    return state.evolve(last_conclusive_at=now) if decided or counted else state


def _record_ab(state: RolloutState, verdict: AbVerdict | None, winner: str | None, now: datetime) -> RolloutState:
    if verdict is None:
        # No look in this reconcile: keep the last look's evidence, and still record a verdict given now.
        if winner is None or state.ab is None:
            return state
        return state.evolve(ab=replace(state.ab, winner=winner, decided_at=now))
    stable_rev, cand_rev = state.stable_revision or "", state.revision or ""
    ab = AbStatus(
        variants=(
            VariantStats("stable", stable_rev, verdict.stable.impressions, verdict.stable.clicks, verdict.stable.ctr,
                         verdict.stable_ci95),
            VariantStats("canary", cand_rev, verdict.candidate.impressions, verdict.candidate.clicks,
                         verdict.candidate.ctr, verdict.candidate_ci95),
        ),
        p_value=verdict.p_value,
        sequential_p_value=verdict.sequential_p_value,
        lift=verdict.lift,
        lift_ci95=verdict.lift_ci95,
        winner=winner,
        decided_at=now if winner is not None else None,
        mixing_variance=verdict.mixing_variance,
    )  # fmt: skip
    return state.evolve(ab=ab)


def _progress(
    policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime, action: ManualAction
) -> Decision:
    if policy.strategy is Strategy.CANARY and state.step >= len(policy.steps):
        # The spec lost steps mid-rollout: continue from its last step rather than index past the end.
        state = state.evolve(step=len(policy.steps) - 1)
    if action is ManualAction.ABORT:
        d = _end(state, Phase.ABORTED, "manual abort", now)
        return Decision(d.state, d.weights, d.action, d.reason, d.event, None, ManualAction.ABORT)
    if obs.candidate_failing and state.split_started_at is not None:
        # Mid-rollout (it has carried traffic) a candidate whose container keeps failing is rolled back, not
        # waited for: held at 0% it would never recover on its own, and no deadline would end the wait.
        return _end(state, Phase.ROLLED_BACK, f"candidate failing: {obs.candidate_failing}", now)
    if not obs.candidate_available:
        # Traffic never goes to a candidate that is not Available. The step restarts when it is back.
        msg = f"candidate {state.revision} is not Available; all traffic on stable"
        new = state.evolve(weight=0, step_started_at=None, message=msg, reason="")
        event = Event("Warning", "CandidateUnavailable", msg) if state.weight > 0 else None
        action_out = Action.SET_WEIGHT if state.weight > 0 else Action.WAIT
        return Decision(new, TrafficWeights.stable_only(), action_out, msg, event, READINESS_POLL_S)
    if action is ManualAction.PROMOTE:
        d = _promote(state, "manual promote", now)
        return Decision(d.state, d.weights, d.action, d.reason, d.event, None, ManualAction.PROMOTE)
    if state.shadowing:
        return _shadow_phase(policy, state, obs, now, action)
    if policy.shadow is not None and state.split_started_at is None and state.step == 0:
        # Available for the first time (no user was ever sent to it, splitStartedAt is unset): the shadow phase first.
        return _enter_shadow(policy, state, now, None)
    if state.weight == 0 or state.step_started_at is None:
        # Became Available (first time, or again after an outage): (re-)enter the current step.
        return _reenter_step(policy, state, now)
    if action is ManualAction.PAUSE and not state.paused:
        msg = f"paused at {state.weight}% by request"
        new = state.evolve(paused=True, message=msg)
        return Decision(new, _weights(new, True), Action.PAUSE, msg, Event("Normal", "Paused", msg), None, action)
    if action is ManualAction.RESUME and state.paused:
        msg = f"resumed at {state.weight}%; {_stage(policy, state)} restarts its pause"
        new = state.evolve(paused=False, step_started_at=now, message=msg, reason="")  # the step and its clock restart
        return Decision(
            new, _weights(new, True), Action.RESUME, msg, Event("Normal", "Resumed", msg), _requeue(policy, new, now),
            action,
        )  # fmt: skip
    state = _note_evidence(state, obs, now)
    # A pause stops progress, not protection: failed checks still roll back while paused.
    decision = _guardrails(policy, state, obs, now)
    if decision is not None:
        return decision
    handled = action if action in (ManualAction.PAUSE, ManualAction.RESUME) else None
    if state.paused:
        msg = f"paused at {state.weight}%"
        new = _record_analysis(state.evolve(message=msg), obs, now, "paused")
        requeue = policy.analysis.interval_s if policy.analysis.enabled else None
        return Decision(new, _weights(new, True), Action.WAIT, msg, None, requeue, handled)
    passed = not policy.analysis.enabled or (obs.analysis is not None and obs.analysis.verdict is Verdict.PASS)
    state = state.evolve(failed_checks=0) if passed else state
    stalled = _deadline(policy, state, obs, now)
    if stalled is not None:
        return stalled
    state = state.evolve(reason="")  # within the deadline again: a hold, if there was one, is over
    if policy.strategy is Strategy.AB_TEST:
        return _ab_step(policy, state, obs, now)
    return _canary_step(policy, state, obs, now, passed)


def _reenter_step(policy: RolloutPolicy, state: RolloutState, now: datetime) -> Decision:
    if policy.strategy is Strategy.IMMEDIATE:
        return _promote(state, "immediate strategy: candidate is Available", now)
    weight = _step_weight(policy, state.step)
    # The experiment began when traffic was first split; an outage of the candidate does not restart it.
    split = state.split_started_at or now
    new = state.evolve(weight=weight, step_started_at=now, failed_checks=0, split_started_at=split)
    reason = f"candidate Available; {_stage(policy, new)} at {weight}%"
    new = new.evolve(message=reason)
    event = Event("Normal", "StepStarted", reason)
    return Decision(new, _weights(new, True), Action.SET_WEIGHT, reason, event, _requeue(policy, new, now))


def _guardrails(policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime) -> Decision | None:
    """Threshold analysis applies to canaries and A/B tests alike; failureLimit consecutive failures roll back."""
    if not policy.analysis.enabled or obs.analysis is None or obs.analysis.verdict is not Verdict.FAIL:
        return None
    failed = state.failed_checks + 1
    limit = policy.analysis.failure_limit
    if failed >= limit:
        new = _record_analysis(state.evolve(failed_checks=failed), obs, now, "rollback")
        return _end(new, Phase.ROLLED_BACK, f"analysis {obs.analysis.reason} ({failed}/{limit} consecutive)", now)
    msg = f"analysis failed ({failed}/{limit} consecutive): {obs.analysis.reason}"
    new = _record_analysis(state.evolve(failed_checks=failed, message=msg), obs, now, "wait")
    return Decision(new, _weights(new, True), Action.WAIT, msg, Event("Warning", "AnalysisFailed", msg),
                    _requeue(policy, new, now))  # fmt: skip


def _deadline(policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime) -> Decision | None:
    """progressDeadline: a step whose every analysis was inconclusive (too few requests, no data, metrics
    unavailable) for that long ends as onProgressDeadline says.

    The clock starts when the step starts and again at each conclusive look (`_note_evidence`): it measures time
    without evidence, so a long pause with passing looks never runs out, and a pause does not hide a step nobody can
    judge. A manual pause stops it (checked before); a resume restarts the step and with it the clock.
    """
    if not policy.analysis.enabled or _ab_expired(policy, state, now):
        return None  # an A/B test at maxDuration ends as its own rule says
    starts = [t for t in (state.step_started_at, state.last_conclusive_at) if t is not None]
    since = max(starts) if starts else now
    if _seconds_since(since, now) < policy.progress_deadline_s:
        return None
    last = obs.analysis.reason if obs.analysis is not None else (state.last_analysis or {}).get("reason")
    # Stated with a timestamp, not a running count, so a held step does not rewrite its status every resync.
    why = (f"no conclusive analysis since {format_time(since)} (progressDeadline {policy.progress_deadline_s:g}s);"
           f" last: {last or 'no analysis result'}")  # fmt: skip
    if policy.on_progress_deadline is DeadlineAction.ROLLBACK:
        new = _record_analysis(state, obs, now, "rollback")
        return _end(new, Phase.ROLLED_BACK, why, now, reason=PROGRESS_DEADLINE_EXCEEDED)
    msg = f"{_stage(policy, state)} at {state.weight}%: held, {why}"
    first = state.reason != PROGRESS_DEADLINE_EXCEEDED
    event = Event("Warning", PROGRESS_DEADLINE_EXCEEDED, msg) if first else None
    new = _record_analysis(state.evolve(message=msg, reason=PROGRESS_DEADLINE_EXCEEDED), obs, now, "hold")
    return Decision(new, _weights(new, True, policy), Action.WAIT, msg, event, _requeue(policy, new, now))


def _canary_step(policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime, passed: bool) -> Decision:
    step = policy.steps[state.step]
    elapsed = _seconds_since(state.step_started_at, now)
    stage = _stage(policy, state)
    if elapsed < step.pause_s:
        msg = f"{stage} at {state.weight}%: pausing, {step.pause_s - elapsed:.0f}s left"
        new = _record_analysis(state.evolve(message=msg), obs, now, "wait")
        return Decision(new, _weights(new, True), Action.WAIT, msg, None, _requeue(policy, new, now))
    if not passed:
        # Between looks the last look's reason stands, so the status does not flip at every resync.
        last = (state.last_analysis or {}).get("reason") or "inconclusive: no analysis result yet"
        why = obs.analysis.reason if obs.analysis is not None else last
        msg = f"{stage} at {state.weight}%: pause done, waiting for a passing analysis ({why})"
        new = _record_analysis(state.evolve(message=msg), obs, now, "wait")
        return Decision(new, _weights(new, True), Action.WAIT, msg, None, _requeue(policy, new, now))
    if state.step + 1 >= len(policy.steps):
        new = _record_analysis(state, obs, now, "promote")
        return _promote(new, f"all {len(policy.steps)} steps passed", now)
    nxt = state.step + 1
    weight = policy.steps[nxt].weight
    msg = f"step {nxt + 1}/{len(policy.steps)}: {weight}% to {state.revision}"
    new = _record_analysis(state.evolve(step=nxt, weight=weight, step_started_at=now, message=msg), obs, now, "advance")
    return Decision(new, _weights(new, True), Action.SET_WEIGHT, msg, Event("Normal", "StepAdvanced", msg),
                    _requeue(policy, new, now))  # fmt: skip


def _last_look(state: RolloutState) -> str:
    """The evidence of the last A/B look, for a test that ends at maxDuration between two looks."""
    ab = state.ab
    if ab is None or ab.sequential_p_value is None or not ab.variants:
        return "no A/B measurements"
    fewest = min(v.impressions for v in ab.variants)
    return f"last look: sequential p={ab.sequential_p_value:.3g} with at least {fewest} impressions per variant"


def _ab_expired(policy: RolloutPolicy, state: RolloutState, now: datetime) -> bool:
    if policy.strategy is not Strategy.AB_TEST:
        return False
    ab = policy.analysis.ab_test
    return _seconds_since(state.started_at, now) >= (ab.max_duration_s if ab is not None else 86400.0)


def _ab_step(policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime) -> Decision:
    verdict = obs.ab
    if verdict is not None and verdict.decision is AbDecision.CANDIDATE_WINS:
        new = _record_analysis(_record_ab(state, verdict, "canary", now), obs, now, "promote")
        return _promote(new, f"A/B test: {verdict.reason}", now)
    if verdict is not None and verdict.decision is AbDecision.STABLE_WINS:
        new = _record_analysis(_record_ab(state, verdict, "stable", now), obs, now, "rollback")
        return _end(new, Phase.ROLLED_BACK, f"A/B test: {verdict.reason}; keeping stable", now)
    if _ab_expired(policy, state, now):
        new = _record_analysis(_record_ab(state, verdict, "none", now), obs, now, "rollback")
        why = verdict.reason if verdict is not None else _last_look(state)
        return _end(new, Phase.ROLLED_BACK, f"A/B test: no significant difference after maxDuration ({why}); "
                    "keeping stable", now)  # fmt: skip
    why = verdict.reason if verdict is not None else "no A/B measurements yet"
    msg = f"A/B test at {state.weight}% to {state.revision}: {why}"
    new = _record_analysis(_record_ab(state, verdict, None, now).evolve(message=msg), obs, now, "wait")
    return Decision(new, _weights(new, True), Action.WAIT, msg, None, _requeue(policy, new, now))


def _shadow_phase(
    policy: RolloutPolicy, state: RolloutState, obs: Observation, now: datetime, action: ManualAction
) -> Decision:
    """The shadow phase: mirrored requests only, judged by the shadow analysis; pass -> the first step (or the A/B
    test), fail -> rolled back. Manual controls act as in the steps: pause holds (a failing look still rolls back),
    resume restarts the phase's clock, promote promotes and abort aborts (both handled before)."""
    shadow = policy.shadow
    if shadow is None:
        # The spec dropped its shadow phase mid-way: go on to the first step.
        msg = f"shadow phase removed from the spec; {state.revision} goes on to its first step"
        return _enter_first_step(policy, state.evolve(shadowing=False), now, Event("Normal", "ShadowSkipped", msg))
    if state.step_started_at is None:
        # Available again after an outage: the shadow phase starts over.
        return _enter_shadow(policy, state, now, None)
    if action is ManualAction.PAUSE and not state.paused:
        msg = "shadow paused by request"
        new = state.evolve(paused=True, message=msg)
        return Decision(new, _weights(new, True, policy), Action.PAUSE, msg, Event("Normal", "Paused", msg), None,
                        action)  # fmt: skip
    if action is ManualAction.RESUME and state.paused:
        msg = "shadow resumed; its duration restarts"
        new = state.evolve(paused=False, step_started_at=now, message=msg, reason="")
        return Decision(new, _weights(new, True, policy), Action.RESUME, msg, Event("Normal", "Resumed", msg),
                        _requeue(policy, new, now), action)  # fmt: skip
    state = _note_evidence(state, obs, now)
    analysis = obs.analysis
    if analysis is not None and analysis.verdict is Verdict.FAIL:
        failed, limit = state.failed_checks + 1, policy.analysis.failure_limit
        if failed >= limit:
            new = _record_analysis(state.evolve(failed_checks=failed), obs, now, "rollback")
            return _end(new, Phase.ROLLED_BACK, f"{analysis.reason} ({failed}/{limit} consecutive)", now)
        msg = f"shadow analysis failed ({failed}/{limit} consecutive): {analysis.reason}"
        new = _record_analysis(state.evolve(failed_checks=failed, message=msg), obs, now, "wait")
        return Decision(new, _weights(new, True, policy), Action.WAIT, msg, Event("Warning", "AnalysisFailed", msg),
                        _requeue(policy, new, now))  # fmt: skip
    handled = action if action in (ManualAction.PAUSE, ManualAction.RESUME) else None
    if state.paused:
        msg = "shadow paused"
        new = _record_analysis(state.evolve(message=msg), obs, now, "paused")
        return Decision(new, _weights(new, True, policy), Action.WAIT, msg, None, policy.analysis.interval_s, handled)
    passed = analysis is not None and analysis.verdict is Verdict.PASS
    state = state.evolve(failed_checks=0) if passed else state
    stalled = _deadline(policy, state, obs, now)
    if stalled is not None:
        return stalled
    state = state.evolve(reason="")
    elapsed = _seconds_since(state.step_started_at, now)
    if elapsed < shadow.duration_s or not passed:
        last = (state.last_analysis or {}).get("reason") or "inconclusive: no shadow analysis yet"
        why = analysis.reason if analysis is not None else last
        wait = f"{shadow.duration_s - elapsed:.0f}s left" if elapsed < shadow.duration_s else "waiting for a pass"
        msg = f"shadow at {shadow.percent}% mirrored: {wait} ({why})"
        new = _record_analysis(state.evolve(message=msg), obs, now, "wait")
        return Decision(new, _weights(new, True, policy), Action.WAIT, msg, None, _requeue(policy, new, now), handled)
    new = _record_analysis(state, obs, now, "advance").evolve(shadowing=False)
    msg = f"shadow passed: {analysis.reason if analysis is not None else ''}"
    d = _enter_first_step(policy, new, now, None)
    event = Event("Normal", "ShadowPassed", f"{msg}; {d.reason}")
    return replace(d, event=event, handled_action=handled)
