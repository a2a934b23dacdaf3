"""The progressive strategies (canary, abTest) behind strategy.Strategy: rollout state machine + metrics + router."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recserve_operator import conditions as c
from recserve_operator.builders.common import owner_reference
from recserve_operator.lifecycle import RouterObservation, TrafficDecision
from recserve_operator.metrics.base import (
    MetricsError,
    MetricsProvider,
    collect_ab_counts,
    collect_measurements,
    collect_mirrored,
    collect_shadow,
    redact_url,
)
from recserve_operator.names import ROLLOUT_ACTION_ANNOTATION, router_name
from recserve_operator.observe import RevisionObservation
from recserve_operator.rollout.analysis import AnalysisResult, Verdict, evaluate, evaluate_shadow
from recserve_operator.rollout.capacity import plan_capacity, share_replicas
from recserve_operator.rollout.machine import Action, Decision, Observation, TrafficWeights, next_step
from recserve_operator.rollout.policy import ManualAction, RolloutPolicy, RoutingProvider
from recserve_operator.rollout.state import Phase, RolloutState, parse_time
from recserve_operator.rollout.statistics import AbVerdict, ab_verdict
from recserve_operator.routers.base import get_router
from recserve_operator.routers.builtin import GRPC_SERVICE_PORT as ROUTER_GRPC_PORT
from recserve_operator.routers.builtin import SERVICE_PORT as ROUTER_HTTP_PORT
from recserve_operator.routers.plan import CANARY, STABLE, TrafficPlan, build_traffic_plan
from recserve_operator.spec import RecommenderModelSpec
from recserve_operator.status import Problem, RolloutReport
from recserve_operator.strategy import Context, Plan

ProviderFactory = Callable[[str], MetricsProvider]


@dataclass(frozen=True)
class Measured:
    """One look at the candidate's metrics (the I/O step); `error`: why the metrics backend gave no answer."""

    analysis: AnalysisResult | None = None
    ab: AbVerdict | None = None
    looked: bool = False
    error: str | None = None


def _analysis_due(state: RolloutState, policy: RolloutPolicy, now: datetime) -> bool:
    last = parse_time((state.last_analysis or {}).get("time")) if state.last_analysis else None
    return last is None or (now - last).total_seconds() >= policy.analysis.interval_s


@dataclass(frozen=True)
class Progressive:
    """canary and abTest: the rollout state machine (rollout.machine.next_step) made capacity-aware, its split
    rendered by the spec's router.

    measure: resume the state, and query Prometheus when a look is due. decide (pure): machine -> split (capacity:
    the router weight and each revision's replicas) -> plan (router objects). The router as it runs before this
    reconcile (`Context.router`) is the evidence of the weight it serves.
    """

    metrics: ProviderFactory
    router_image: str | None = None
    router_placement: Mapping[str, Any] = field(default_factory=dict)
    shadow_image: str | None = None  # the shadow comparator's image (RecServe's own)

    def measure(self, ctx: Context) -> Measured:
        policy, latest = ctx.spec.rollout, ctx.ids.revision
        state = _resume_state(ctx.status)
        available = _candidate_carries(state, ctx.observations.get(latest), latest)
        if not _looking(policy, state, latest, available, ctx.now):
            return Measured()
        if state.shadowing and policy.shadow is not None:
            return _measure_shadow(ctx, state, self.metrics)
        return _measure(policy, state, self.metrics, latest, ctx.now)

    def decide(self, ctx: Context, measured: Measured) -> Plan:
        policy, latest, observations = ctx.spec.rollout, ctx.ids.revision, ctx.observations
        state = _resume_state(ctx.status)
        cand = observations.get(latest)
        obs = Observation(
            desired_revision=latest, candidate_available=_candidate_carries(state, cand, latest),
            candidate_failing=cand.container_failing if cand is not None else None,
            analysis=measured.analysis, ab=measured.ab, action=_manual_action(ctx.annotations),
        )  # fmt: skip
        decision: Decision = next_step(policy, state, obs, ctx.now)
        split, router_objects = self._split(ctx, _with_capacity_state(ctx.spec, state, decision, observations),
                                            decision)  # fmt: skip
        new = split.state
        traffic = _traffic(decision, split, latest)
        event = decision.event
        return Plan(
            traffic=traffic,
            router_objects=tuple(router_objects),
            status={**new.to_status(), **_endpoints(ctx)},
            foreign=("kopf",),
            events=((event.type, event.reason, event.message),) if event else (),
            outcome={Action.PROMOTE: "promoted", Action.ROLL_BACK: "rolled_back"}.get(decision.action),
            handled_action=decision.handled_action.value if decision.handled_action else None,
            report=RolloutReport(
                held=_held(new, latest, traffic.keep),
                stalled=_stalled(new),
                metrics=_metrics_condition(policy, measured, ctx.status),
            ),
        )

    def _split(self, ctx: Context, new: RolloutState, decision: Decision) -> tuple[Split, list[dict[str, Any]]]:
        """The capacity-aware split and the router objects that carry it."""
        policy, observations = ctx.spec.rollout, ctx.observations
        scaling = _scaling(ctx.spec, policy, new)
        router = get_router(policy.routing.provider.value, policy.routing, image=self.router_image,
                            placement=self.router_placement, shadow_image=self.shadow_image)  # fmt: skip
        split = split_traffic(scaling, new, decision.weights, observations)
        plan = _plan(ctx.ids.name, split, policy)
        router_objects = router.render(plan, ctx.ids.name, ctx.ids.namespace, owner_reference(ctx.ids))
        if _router_serves(policy, router_objects, ctx.router):
            # The router already runs this plan: what the stable and candidate need follows its weight now. The
            # weight itself is a fixed point of the ratchet (plan_capacity given its own weight as served returns
            # it), so the plan rendered above stays the one to apply.
            split = split_traffic(scaling, split.state.evolve(served_weight=plan.canary_weight), decision.weights,
                                  observations)  # fmt: skip
        return split, router_objects


def _endpoints(ctx: Context) -> dict[str, Any]:
    """With the builtin router, clients talk to the router's Service (the stable front Service bypasses the split)."""
    if ctx.spec.rollout.routing.provider is not RoutingProvider.BUILTIN:
        return {}
    host = f"{router_name(ctx.ids.name)}.{ctx.ids.namespace}.svc.{ctx.cluster_domain}"
    return {"endpoints": {"http": f"http://{host}:{ROUTER_HTTP_PORT}", "grpc": f"{host}:{ROUTER_GRPC_PORT}"}}


# -- capacity: the split's weight and each revision's scale ------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    """What the split scales by: the stable's scale N (status.canary.baseReplicas), the surge, and the spec's own
    scale (replicas, or the autoscaler's bounds) for revisions no rollout is splitting."""

    base: int
    surge: int
    replicas: int
    autoscaling: tuple[int, int] | None = None  # spec (minReplicas, maxReplicas)


@dataclass(frozen=True)
class Split:
    """How one reconcile divides traffic and replicas between the revisions it runs."""

    state: RolloutState  # the rollout state, with what the split learnt (a promotion finished)
    stable: str  # the plan's stable backend, and the revision the front Service selects
    candidate: str | None  # the plan's canary backend; None: a stable-only plan
    weights: TrafficWeights
    keep: frozenset[str]
    replicas: Mapping[str, int]
    hpa_bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def split_traffic(
    scaling: Scaling, state: RolloutState, weights: TrafficWeights, observations: Mapping[str, RevisionObservation]
) -> Split:
    """The machine's decision (state, weights) made capacity-aware (rollout.capacity.plan_capacity).

    Four shapes: a rollout in progress (the candidate's weight ratchets up to the decided one); a promotion
    finishing (the same ratchet toward 100 before the old stable goes); a rollback finishing (traffic back at
    once, the candidate kept until the stable is back at N Ready); and steady (the stable alone, at the spec's
    scale). Pure: same inputs, same split.
    """
    stable, cand = state.stable_revision or "", state.revision
    if state.retiring_revision is not None and state.phase is Phase.PROMOTED:
        return _finishing_promotion(scaling, state, observations)
    if state.phase is Phase.PROGRESSING and cand is not None and cand != stable:
        return _rolling_out(scaling, state, weights, observations)
    if _rolled_back_candidate(state, observations) and _ready(observations, stable) < scaling.base:
        return _finishing_rollback(scaling, state, observations)
    return _steady(scaling, state, stable)


def _rolling_out(
    scaling: Scaling, state: RolloutState, weights: TrafficWeights, observations: Mapping[str, RevisionObservation]
) -> Split:
    stable, cand = state.stable_revision or "", state.revision or ""
    target = weights.canary if weights.canary_routable else 0
    cap = plan_capacity(total=scaling.base, surge=scaling.surge, target_weight=target,
                        served_weight=state.served_weight, canary_ready=_ready(observations, cand),
                        stable_ready=_ready(observations, stable))  # fmt: skip
    routed = TrafficWeights(100 - cap.canary_weight, cap.canary_weight, True) if weights.canary_routable else weights
    targets = {stable: cap.stable_replicas, cand: cap.canary_replicas}
    return Split(state, stable, cand if routed.canary_routable else None, routed, frozenset(targets),
                 *_scaled(scaling, targets))  # fmt: skip


def _finishing_promotion(
    scaling: Scaling, state: RolloutState, observations: Mapping[str, RevisionObservation]
) -> Split:
    """The machine promoted: the candidate is the stable in state, but the one it replaces (`retiring_revision`)
    keeps its share until the candidate serves all traffic with N Ready replicas.

    The split keeps its roles meanwhile (the old stable is the plan's stable backend, the promoted revision its
    canary, so sticky users only ever move to the new revision) and ratchets toward 100 like any step: the
    candidate grows within the surge, the old stable shrinks to the share the router still sends it. Once the
    candidate's Ready replicas cover 100% the plan is the promoted revision alone, and the old stable drops out of
    `keep`: it goes once the router no longer names it (reconcile's drain gate), still at the scale the last
    served split needed. An intermediate {old: 0, new: 100} plan would add a router roll and nothing else: the
    stable-only plan gives the new revision the same 100%, and nothing reaches the old one once it is served.
    """
    old, promoted = state.retiring_revision or "", state.stable_revision or ""
    cap = plan_capacity(total=scaling.base, surge=scaling.surge, target_weight=100,
                        served_weight=state.served_weight, canary_ready=_ready(observations, promoted),
                        stable_ready=_ready(observations, old))  # fmt: skip
    if cap.canary_weight >= 100 or not _exists(observations, old):
        done = state.evolve(retiring_revision=None)
        return _steady(scaling, done, promoted)
    weights = TrafficWeights(100 - cap.canary_weight, cap.canary_weight, True)
    targets = {old: cap.stable_replicas, promoted: cap.canary_replicas}
    return Split(state, old, promoted, weights, frozenset(targets), *_scaled(scaling, targets))


def _finishing_rollback(
    scaling: Scaling, state: RolloutState, observations: Mapping[str, RevisionObservation]
) -> Split:
    """Rolled back or aborted: the router sends everything to the stable at once (safety first) and the stable is
    asked for its full scale N at once; the candidate stays (keeping the pods that carry what the router may still
    send it, then one) until the stable has N Ready replicas. It is deleted after that, once the router serves the
    stable-only plan (reconcile's drain gate)."""
    stable, cand = state.stable_revision or "", state.revision or ""
    cap = plan_capacity(total=scaling.base, surge=scaling.surge, target_weight=0,
                        served_weight=state.served_weight, canary_ready=_ready(observations, cand))  # fmt: skip
    targets = {stable: scaling.base, cand: cap.canary_replicas}
    return Split(state, stable, None, TrafficWeights.stable_only(), frozenset(targets),
                 *_scaled(scaling, targets, growing=stable))  # fmt: skip


def _steady(scaling: Scaling, state: RolloutState, stable: str) -> Split:
    """The stable alone, back at the spec's scale (replicas, or the autoscaler's own bounds)."""
    bounds = {stable: scaling.autoscaling} if scaling.autoscaling is not None else {}
    return Split(state, stable, None, TrafficWeights.stable_only(), frozenset({stable}), {stable: scaling.replicas},
                 bounds)  # fmt: skip


def _scaled(
    scaling: Scaling, targets: Mapping[str, int], growing: str | None = None
) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """Replica targets, and the autoscaler bounds that hold them.

    With autoscaling each revision's HorizontalPodAutoscaler is pinned to its target (minReplicas = maxReplicas)
    while a rollout splits the model: the ratchet rests on knowing what each revision runs, and an autoscaler free
    to keep the stable above its share would hold the GPUs the candidate needs (on a cluster sized for N + surge
    the rollout could never move on; without metrics, never at all). A stable growing back after a rollback
    (`growing`) gets the spec's maxReplicas as its ceiling: it only has to reach N. Autoscaling resumes, within
    the spec's bounds, when the rollout ends. A model scaled to zero stays there: nothing is split.
    """
    if scaling.base <= 0:
        targets = dict.fromkeys(targets, 0)
    if scaling.autoscaling is None:
        return dict(targets), {}
    ceiling = scaling.autoscaling[1]
    bounds = {rev: (n, max(n, ceiling) if rev == growing else n) for rev, n in targets.items()}
    return dict(targets), bounds


def _scaling(spec: RecommenderModelSpec, policy: RolloutPolicy, state: RolloutState) -> Scaling:
    a = spec.serving.autoscaling
    autoscaling = (a.min_replicas, a.max_replicas) if a is not None else None
    return Scaling(base=state.base_replicas, surge=policy.surge, replicas=spec.serving.replicas,
                   autoscaling=autoscaling)  # fmt: skip


def _with_capacity_state(
    spec: RecommenderModelSpec, prev: RolloutState, decision: Decision, observations: Mapping[str, RevisionObservation]
) -> RolloutState:
    """The machine's new state plus what capacity tracks: the stable's scale N, and the stable a promotion retires.

    N is spec.serving.replicas without autoscaling (the spec scales in place, at any time). With autoscaling it is
    what the stable's Deployment runs when the rollout starts, within the spec's bounds; a rollout that supersedes
    one still shaping the stable's scale (a candidate in flight, a promotion or rollback finishing) inherits it,
    since the stable then runs only its share.
    """
    new = decision.state
    if decision.action is Action.PROMOTE and prev.stable_revision and prev.stable_revision != new.stable_revision:
        new = new.evolve(retiring_revision=prev.stable_revision)
    a = spec.serving.autoscaling
    if a is None:
        return new.evolve(base_replicas=spec.serving.replicas)
    started = new.phase is Phase.PROGRESSING and (prev.phase is not Phase.PROGRESSING or prev.revision != new.revision)
    if not started and new.base_replicas > 0:
        return new
    if prev.base_replicas > 0 and _shaping_scale(prev, observations):
        return new.evolve(base_replicas=prev.base_replicas)
    stable = observations.get(new.stable_revision or "")
    running = stable.desired_replicas if stable is not None and stable.exists else a.min_replicas
    return new.evolve(base_replicas=min(max(running, a.min_replicas), a.max_replicas))


def _shaping_scale(state: RolloutState, observations: Mapping[str, RevisionObservation]) -> bool:
    """The state's rollout still sets the stable's scale: a candidate in flight, or a promotion or a rollback that
    has not finished."""
    in_flight = state.phase is Phase.PROGRESSING and state.revision not in (None, state.stable_revision)
    return in_flight or state.retiring_revision is not None or _rolled_back_candidate(state, observations)


def _rolled_back_candidate(state: RolloutState, observations: Mapping[str, RevisionObservation]) -> bool:
    ended = state.phase in (Phase.ROLLED_BACK, Phase.ABORTED)
    return ended and state.revision not in (None, state.stable_revision) and _exists(observations, state.revision)


def _candidate_carries(state: RolloutState, cand: RevisionObservation | None, latest: str) -> bool:
    """Available, as the machine means it: the candidate's Ready replicas carry what the router sends it.

    Its Deployment grows with its weight, so "every desired replica Ready" would turn false at each step of the
    ratchet and send the traffic back; the Ready replicas the served weight needs (at least one) are the measure.
    """
    if cand is None or not cand.exists:
        return False
    served = state.served_weight if state.phase is Phase.PROGRESSING and state.revision == latest else 0
    return cand.ready_replicas >= max(1, share_replicas(state.base_replicas, served))


def _ready(observations: Mapping[str, RevisionObservation], revision: str | None) -> int:
    obs = observations.get(revision or "")
    return obs.ready_replicas if obs is not None else 0


def _exists(observations: Mapping[str, RevisionObservation], revision: str | None) -> bool:
    obs = observations.get(revision or "")
    return obs is not None and obs.exists


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


def _traffic(decision: Decision, split: Split, latest: str) -> TrafficDecision:
    """Which revisions run, which is stable, their weights and their scale."""
    weights = {split.stable: split.weights.stable}
    if split.candidate is not None:
        weights[split.candidate] = split.weights.canary
    promoted = decision.state.stable_revision or latest
    return TrafficDecision(
        stable=split.stable,
        keep=split.keep,
        weights=weights,
        promoted=promoted if decision.action is Action.PROMOTE else None,
        reason=decision.reason,
        replicas=split.replicas,
        hpa_bounds=split.hpa_bounds,
    )


def _plan(name: str, split: Split, policy: RolloutPolicy) -> TrafficPlan:
    # The shadow phase routes no user request to the candidate (split.candidate is None) but mirrors to it.
    shadowed = split.state.revision if split.weights.mirror > 0 and split.candidate is None else None
    view = split.state.evolve(stable_revision=split.stable, revision=split.candidate or shadowed)
    top_k = policy.shadow.top_k if policy.shadow is not None else 10
    return build_traffic_plan(name, view, split.weights, policy.routing, top_k=top_k)


def _router_serves(policy: RolloutPolicy, router_objects: list[dict[str, Any]], live: RouterObservation | None) -> bool:
    """Whether the router serves the rendered plan now. Builtin: every router pod runs it (the drain gate's
    evidence, lifecycle.router_serves). Gateway API: the HTTPRoute this reconcile applies counts as served; how
    fast the gateway programs it is not observable here."""
    if policy.routing.provider is RoutingProvider.GATEWAY_API:
        return True
    desired = next((o for o in router_objects if o.get("kind") == "Deployment"), None)
    return (live or RouterObservation()).serves(desired)


def _looking(policy: RolloutPolicy, state: RolloutState, latest: str, available: bool, now: datetime) -> bool:
    """A look at the metrics is due: the spec's revision is the running candidate, Available, analysed, and has
    traffic (at weight 0 the machine first enters the step; a look then could only be discarded)."""
    live = state.weight > 0 or (state.shadowing and state.step_started_at is not None)
    candidate = state.revision if state.phase is Phase.PROGRESSING and live else None
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


def _measure_shadow(ctx: Context, state: RolloutState, metrics: ProviderFactory) -> Measured:  # fmt: skip
    """One look at the shadow phase: everything the comparator counted since the phase began (the requests
    accumulate towards minRequests; a look never forgets earlier ones)."""
    policy, model, namespace, latest, now = ctx.spec.rollout, ctx.ids.name, ctx.ids.namespace, ctx.ids.revision, ctx.now
    assert policy.shadow is not None
    since = state.step_started_at or now
    window = max(policy.analysis.interval_s, (now - since).total_seconds())
    try:
        provider = metrics(policy.analysis.prometheus)
        if policy.routing.provider is RoutingProvider.GATEWAY_API:
            measured = collect_mirrored(provider, candidate=latest, window_s=window)
        else:
            measured = collect_shadow(provider, model=model, stable=state.stable_revision or "", candidate=latest,
                                      window_s=window, namespace=namespace)  # fmt: skip
        return Measured(evaluate_shadow(policy.shadow, measured), None, True)
    except MetricsError as exc:
        analysis = AnalysisResult(Verdict.INCONCLUSIVE, f"inconclusive: metrics unavailable: {exc}", stage="shadow")
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
    """The spec's revision deliberately does not run (rolled back or aborted; it may still be kept while the
    stable scales back, `_finishing_rollback`): say why, not "rolling out"."""
    winding_down = new.phase in (Phase.ROLLED_BACK, Phase.ABORTED) and new.revision == latest != new.stable_revision
    if latest in keep and not winding_down:
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
