"""Progressive strategies (canary, abTest) at the traffic seam: rollout state machine + metrics + router objects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recserve_operator.lifecycle import TrafficDecision
from recserve_operator.metrics.base import MetricsProvider, collect_ab_counts, collect_measurements
from recserve_operator.observe import RevisionObservation
from recserve_operator.rollout.analysis import evaluate
from recserve_operator.rollout.machine import Action, Decision, Observation, next_step
from recserve_operator.rollout.policy import ManualAction, PolicyError, RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState, parse_time
from recserve_operator.rollout.statistics import ab_verdict
from recserve_operator.routers.base import get_router, router_name
from recserve_operator.routers.plan import CANARY, STABLE, build_traffic_plan
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec

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
    """Ask the rollout state machine what to run and how to split traffic, measuring the candidate when due."""
    policy = policy_of(spec, default_prometheus)
    state = RolloutState.from_status(status)
    stable_rev = (status.get("stable") or {}).get("revision")
    if state.stable_revision is None and stable_rev:
        # The model ran under `immediate` before: its stable revision seeds the machine.
        state = state.evolve(stable_revision=stable_rev)
    action_raw = annotations.get(ROLLOUT_ACTION_ANNOTATION, "")
    try:
        action = ManualAction(action_raw)
    except ValueError:
        action = ManualAction.NONE
    candidate = state.revision if state.phase is Phase.PROGRESSING else None
    cand_obs = observations.get(latest)
    available = cand_obs is not None and cand_obs.available
    analysis = ab = None
    if (
        candidate == latest
        and available
        and policy.analysis.enabled
        and state.stable_revision
        and _analysis_due(state, policy, now)
    ):
        provider = metrics(policy.analysis.prometheus or default_prometheus)
        measured = collect_measurements(provider, policy.analysis, variant=CANARY, revision=latest)
        analysis = evaluate(policy.analysis, measured)
        elapsed = state.ab_elapsed_s(now)
        if policy.analysis.ab_test is not None and elapsed is not None:
            # A/B counts are totals since the split went live ({{elapsed}}): the sequential test accumulates
            # evidence, and a sliding window would void its guarantee.
            s = collect_ab_counts(
                provider, policy.analysis.ab_test, variant=STABLE, revision=state.stable_revision, elapsed_s=elapsed
            )
            c = collect_ab_counts(provider, policy.analysis.ab_test, variant=CANARY, revision=latest, elapsed_s=elapsed)
            ab = ab_verdict(s, c, policy.analysis.ab_test, previous=state.ab)
    obs = Observation(desired_revision=latest, candidate_available=available, analysis=analysis, ab=ab, action=action)
    decision: Decision = next_step(policy, state, obs, now)
    new = decision.state
    stable = new.stable_revision or latest
    keep = {stable}
    if new.phase is Phase.PROGRESSING and new.revision:
        keep.add(new.revision)
    weights = {stable: decision.weights.stable}
    if new.phase is Phase.PROGRESSING and new.revision and new.revision != stable:
        weights[new.revision] = decision.weights.canary
    router = get_router(policy.routing.provider.value, policy.routing, image=router_image, placement=router_placement)
    plan = build_traffic_plan(name, new.evolve(stable_revision=stable), decision.weights, policy.routing)
    objects = router.render(plan, router_name(name), namespace, owner_ref)
    events = (decision.event.type, decision.event.reason, decision.event.message) if decision.event else None
    outcome = {Action.PROMOTE: "promoted", Action.ROLL_BACK: "rolled_back"}.get(decision.action)
    return ProgressiveDecision(
        traffic=TrafficDecision(
            stable=stable,
            keep=frozenset(keep),
            weights=weights,
            promoted=stable if decision.action is Action.PROMOTE else None,
            reason=decision.reason,
        ),
        rollout_status=new.to_status(),
        router_objects=objects,
        events=(events,) if events else (),
        outcome=outcome,
        handled_action=decision.handled_action.value if decision.handled_action else None,
    )
