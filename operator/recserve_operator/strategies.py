"""Progressive strategies (canary, abTest) at the traffic seam: rollout state machine + metrics + router objects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recserve_operator import conditions as c
from recserve_operator.lifecycle import TrafficDecision
from recserve_operator.metrics.base import (
    MetricsError,
    MetricsProvider,
    collect_ab_counts,
    collect_measurements,
    redact_url,
)
from recserve_operator.observe import RevisionObservation
from recserve_operator.rollout.analysis import AnalysisResult, Verdict, evaluate
from recserve_operator.rollout.machine import Action, Decision, Observation, next_step
from recserve_operator.rollout.policy import ManualAction, PolicyError, RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState, parse_time
from recserve_operator.rollout.statistics import AbVerdict, ab_verdict
from recserve_operator.routers.base import get_router, router_name
from recserve_operator.routers.plan import CANARY, STABLE, build_traffic_plan
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec
from recserve_operator.status import Problem, RolloutReport

ROLLOUT_ACTION_ANNOTATION = "recserve.dev/rollout-action"  # also in reconcile, which imports this module lazily

ProviderFactory = Callable[[str], MetricsProvider]


@dataclass(frozen=True)
class ProgressiveDecision:
    traffic: TrafficDecision
    rollout_status: dict[str, Any]  # status.canary (+ status.abTest)
    router_objects: list[dict[str, Any]]
    events: tuple[tuple[str, str, str], ...] = ()
    outcome: str | None = None  # "promoted" | "rolled_back" when this decision ended a rollout
    handled_action: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    report: RolloutReport = field(default_factory=RolloutReport)  # what the rollout adds to status.conditions


@dataclass(frozen=True)
class Measured:
    """One look at the candidate's metrics (the I/O step); `error`: why the metrics backend gave no answer."""

    analysis: AnalysisResult | None = None
    ab: AbVerdict | None = None
    looked: bool = False
    error: str | None = None


def policy_of(spec: RecommenderModelSpec, default_prometheus: str) -> RolloutPolicy:
    raw = dict(spec.rollout.raw)
    analysis = dict(raw.get("analysis") or {})
    # The operator's configured Prometheus serves models that do not name their own.
    if raw.get("analysis") is not None and not analysis.get("prometheus"):
        analysis["prometheus"] = default_prometheus
        raw["analysis"] = analysis
    try:
        return RolloutPolicy.from_spec(raw)
    except PolicyError as exc:
        raise InvalidSpec(f"spec.rollout: {exc}") from exc


def _analysis_due(state: RolloutState, policy: RolloutPolicy, now: datetime) -> bool:
    last = parse_time((state.last_analysis or {}).get("time")) if state.last_analysis else None
    return last is None or (now - last).total_seconds() >= policy.analysis.interval_s


def decide_progressive(
    spec: RecommenderModelSpec,
    *,
    name: str,
    namespace: str,
    owner_ref: Mapping[str, Any],
    status: Mapping[str, Any],
    annotations: Mapping[str, str],
    latest: str,
    observations: Mapping[str, RevisionObservation],
    now: datetime,
    default_prometheus: str,
    router_image: str | None,
    router_placement: Mapping[str, Any] | None = None,
    metrics: ProviderFactory,
) -> ProgressiveDecision:
    """Ask the rollout state machine what to run and how to split traffic, measuring the candidate when due.

    observe (status, annotation, candidate) -> measure (Prometheus, when due) -> decide (pure) -> plan (router).
    """
    policy = policy_of(spec, default_prometheus)
    state = _resume_state(status)
    cand_obs = observations.get(latest)
    available = cand_obs is not None and cand_obs.available
    due = _looking(policy, state, latest, available, now)
    measured = _measure(policy, state, metrics, latest, now) if due else Measured()
    obs = Observation(
        desired_revision=latest, candidate_available=available, analysis=measured.analysis, ab=measured.ab,
        action=_manual_action(annotations),
    )  # fmt: skip
    decision: Decision = next_step(policy, state, obs, now)
    new = decision.state
    traffic = _traffic(decision, latest)
    router = get_router(policy.routing.provider.value, policy.routing, image=router_image, placement=router_placement)
    plan = build_traffic_plan(name, new.evolve(stable_revision=traffic.stable), decision.weights, policy.routing)
    events = (decision.event.type, decision.event.reason, decision.event.message) if decision.event else None
    return ProgressiveDecision(
        traffic=traffic,
        rollout_status=new.to_status(),
        router_objects=router.render(plan, router_name(name), namespace, owner_ref),
        events=(events,) if events else (),
        outcome={Action.PROMOTE: "promoted", Action.ROLL_BACK: "rolled_back"}.get(decision.action),
        handled_action=decision.handled_action.value if decision.handled_action else None,
        report=RolloutReport(
            held=_held(new, latest, traffic.keep),
            stalled=_stalled(new),
            metrics=_metrics_condition(policy, measured, status),
        ),
    )


def _resume_state(status: Mapping[str, Any]) -> RolloutState:
    state = RolloutState.from_status(status)
    stable_rev = (status.get("stable") or {}).get("revision")
    if state.stable_revision is None and stable_rev:
        # The model ran under `immediate` before: its stable revision seeds the machine.
        state = state.evolve(stable_revision=stable_rev)
    return state


def _manual_action(annotations: Mapping[str, str]) -> ManualAction:
    try:
        return ManualAction(annotations.get(ROLLOUT_ACTION_ANNOTATION, ""))
    except ValueError:
        return ManualAction.NONE


def _traffic(decision: Decision, latest: str) -> TrafficDecision:
    """Which revisions run, which is stable, and their weights."""
    new = decision.state
    stable = new.stable_revision or latest
    keep = {stable}
    weights = {stable: decision.weights.stable}
    if new.phase is Phase.PROGRESSING and new.revision:
        keep.add(new.revision)
        if new.revision != stable:
            weights[new.revision] = decision.weights.canary
    return TrafficDecision(
        stable=stable,
        keep=frozenset(keep),
        weights=weights,
        promoted=stable if decision.action is Action.PROMOTE else None,
        reason=decision.reason,
    )


def _looking(policy: RolloutPolicy, state: RolloutState, latest: str, available: bool, now: datetime) -> bool:
    """A look at the metrics is due: the spec's revision is the running candidate, Available, analysed, and has
    traffic (at weight 0 the machine first enters the step; a look then could only be discarded)."""
    candidate = state.revision if state.phase is Phase.PROGRESSING and state.weight > 0 else None
    enabled = policy.analysis.enabled and bool(state.stable_revision)
    return candidate == latest and available and enabled and _analysis_due(state, policy, now)


def _measure(
    policy: RolloutPolicy, state: RolloutState, metrics: ProviderFactory, latest: str, now: datetime
) -> Measured:
    """Query the candidate's metrics. A backend that cannot answer makes the look inconclusive, never an error
    of the reconcile: objects and router are still applied, and nothing advances on missing evidence."""
    try:
        provider = metrics(policy.analysis.prometheus)
        measured = collect_measurements(provider, policy.analysis, variant=CANARY, revision=latest)
        return Measured(evaluate(policy.analysis, measured), _ab_look(policy, state, provider, latest, now), True)
    except MetricsError as exc:
        analysis = AnalysisResult(Verdict.INCONCLUSIVE, f"inconclusive: metrics unavailable: {exc}")
        return Measured(analysis, None, True, str(exc))


def _ab_look(
    policy: RolloutPolicy, state: RolloutState, provider: MetricsProvider, latest: str, now: datetime
) -> AbVerdict | None:
    ab, elapsed = policy.analysis.ab_test, state.ab_elapsed_s(now)
    if ab is None or elapsed is None or not state.stable_revision:
        return None
    # A/B counts are totals since the split went live ({{elapsed}}): the sequential test accumulates evidence,
    # and a sliding window would void its guarantee.
    s = collect_ab_counts(provider, ab, variant=STABLE, revision=state.stable_revision, elapsed_s=elapsed)
    cand = collect_ab_counts(provider, ab, variant=CANARY, revision=latest, elapsed_s=elapsed)
    return ab_verdict(s, cand, ab, previous=state.ab)


def _held(new: RolloutState, latest: str, keep: frozenset[str]) -> Problem | None:
    """The spec's revision deliberately does not run (rolled back or aborted): say why, not "rolling out"."""
    if latest in keep:
        return None
    ended = new.phase.value if new.phase in (Phase.ROLLED_BACK, Phase.ABORTED) else c.ROLLED_BACK
    reason = new.reason or ended
    return Problem(reason, f"revision {latest} is not serving: {new.message or reason}")


def _stalled(new: RolloutState) -> Problem | None:
    """A step held at its weight past progressDeadline (onProgressDeadline: hold)."""
    if new.phase is Phase.PROGRESSING and new.reason == c.PROGRESS_DEADLINE_EXCEEDED:
        return Problem(new.reason, new.message)
    return None


def _metrics_condition(policy: RolloutPolicy, measured: Measured, status: Mapping[str, Any]) -> c.Condition | None:
    """MetricsAvailable, for models whose analysis queries Prometheus: the last look's answer, kept between looks."""
    if not policy.analysis.enabled:
        return None
    if measured.error is not None:
        return c.Condition(c.METRICS_AVAILABLE, "False", c.METRICS_UNAVAILABLE, measured.error)
    if measured.looked:
        url = redact_url(policy.analysis.prometheus)
        return c.Condition(c.METRICS_AVAILABLE, "True", c.METRICS_AVAILABLE, f"prometheus at {url} answered")
    old = c.get_condition(status.get("conditions") or [], c.METRICS_AVAILABLE)
    if old is not None:
        return c.Condition(c.METRICS_AVAILABLE, str(old.get("status")), str(old.get("reason")), str(old.get("message")))
    return c.Condition(c.METRICS_AVAILABLE, "Unknown", c.NOT_MEASURED, "no analysis has queried prometheus yet")
