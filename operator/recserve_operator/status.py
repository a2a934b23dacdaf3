"""Pure computation of RecommenderModel status from the spec, the traffic decision and observed revisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recserve_operator import conditions as c
from recserve_operator.builders.common import GRPC_PORT, HTTP_PORT
from recserve_operator.lifecycle import TrafficDecision
from recserve_operator.observe import RevisionObservation
from recserve_operator.spec import RecommenderModelSpec

# Keys owned by others in the same status object (Kopf's progress storage, the rollout engine).
FOREIGN_KEYS = ("kopf", "canary", "abTest")


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


# Reasons of a rollout that ended with the candidate rolled back: Degraded until a new revision is rolled out.
ROLLBACK_REASONS = (c.ROLLED_BACK, c.PROGRESS_DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class RolloutReport:
    """What a progressive rollout adds to the conditions.

    held: the spec's revision is deliberately not running (rolled back or aborted); say so, not "rolling out".
    stalled: a step is held at its weight past progressDeadline. metrics: the MetricsAvailable condition, or None
    for a model whose rollout queries no metrics (the condition is then removed).
    """

    held: Problem | None = None
    stalled: Problem | None = None
    metrics: c.Condition | None = None


def problem_of(obs: RevisionObservation | None) -> Problem | None:
    """The most actionable thing wrong with a revision, if anything."""
    if obs is None:
        return None
    if obs.build_failed:
        return Problem(c.BUILD_FAILED, obs.build_failed)
    if obs.fetch_failed:
        return Problem(c.FETCH_FAILED, obs.fetch_failed)
    if obs.insufficient_gpu:
        return Problem(c.INSUFFICIENT_GPU, f"pods of revision {obs.revision} cannot be scheduled: {obs.unschedulable}")
    if obs.unschedulable:
        return Problem(c.UNSCHEDULABLE, f"pods of revision {obs.revision} cannot be scheduled: {obs.unschedulable}")
    if obs.container_failing:
        return Problem(c.CONTAINER_FAILING, obs.container_failing)
    return None


def endpoints(name: str, namespace: str, domain: str) -> dict[str, str]:
    host = f"{name}.{namespace}.svc.{domain}"
    return {"http": f"http://{host}:{HTTP_PORT}", "grpc": f"{host}:{GRPC_PORT}"}


def _set(conds: list[dict[str, Any]], cond: c.Condition, now: str, gen: int) -> list[dict[str, Any]]:
    return c.set_condition(conds, cond, now, gen)


def invalid_status(
    old: Mapping[str, Any], *, message: str, generation: int, now: str, stable_obs: RevisionObservation | None
) -> dict[str, Any]:
    """An invalid spec changes nothing that runs: the stable revision (if any) keeps serving."""
    conds: list[dict[str, Any]] = [dict(x) for x in old.get("conditions") or []]
    if stable_obs is not None and stable_obs.ready_replicas > 0:
        serving = f"revision {stable_obs.revision} keeps serving; the new spec is invalid"
        ready = c.Condition(c.READY, "True", c.AVAILABLE, serving)
    else:
        ready = c.Condition(c.READY, "False", c.INVALID_SPEC, message)
    conds = _set(conds, ready, now, generation)
    conds = _set(conds, c.Condition(c.PROGRESSING, "False", c.INVALID_SPEC, message), now, generation)
    conds = _set(conds, c.Condition(c.DEGRADED, "True", c.INVALID_SPEC, message), now, generation)
    if c.get_condition(conds, c.MODEL_REPOSITORY_READY) is None:
        conds = _set(conds, c.Condition(c.MODEL_REPOSITORY_READY, "Unknown", c.INVALID_SPEC, message), now, generation)
    status = {k: v for k, v in old.items() if k not in FOREIGN_KEYS}
    status.update({"observedGeneration": generation, "conditions": conds, "phase": c.derive_phase(conds)})
    if stable_obs is not None and "stable" in status:
        status["stable"] = {**status["stable"], "readyReplicas": stable_obs.ready_replicas}
    return status


def compute_status(
    old: Mapping[str, Any],
    *,
    spec: RecommenderModelSpec,
    name: str,
    namespace: str,
    generation: int,
    now: str,
    latest: str,
    decision: TrafficDecision,
    observations: Mapping[str, RevisionObservation],
    cluster_domain: str,
    rollout: RolloutReport = RolloutReport(),
) -> dict[str, Any]:
    """The status after this reconcile; `rollout` carries what a canary/abTest adds (see RolloutReport)."""
    held, stalled = rollout.held, rollout.stalled
    st = observations.get(decision.stable) or RevisionObservation(revision=decision.stable)
    lt = observations.get(latest) or RevisionObservation(revision=latest)
    if held is not None:
        lt = st
    latest_problem = problem_of(lt)
    stable_problem = problem_of(st) if decision.stable != latest else None
    conds: list[dict[str, Any]] = [dict(x) for x in old.get("conditions") or []]
    for cond in (
        _ready(st, decision.stable),
        _repository(spec, lt, latest, decision.stable, held),
        _progressing(lt, latest, decision.stable, held or latest_problem or stalled),
        _degraded(latest_problem or stable_problem, held, stalled),
    ):
        conds = _set(conds, cond, now, generation)
    if rollout.metrics is not None:
        conds = _set(conds, rollout.metrics, now, generation)
    else:
        conds = c.remove_condition(conds, c.METRICS_AVAILABLE)

    old_stable: Mapping[str, Any] = old.get("stable") or {}
    if decision.stable == latest and held is None:
        stable = {"revision": latest, "modelVersion": spec.model.version, "readyReplicas": st.ready_replicas}
        if spec.model.sha256:
            stable["digest"] = spec.model.sha256
    else:
        stable = {**old_stable, "revision": decision.stable, "readyReplicas": st.ready_replicas}

    status = {k: v for k, v in old.items() if k not in FOREIGN_KEYS}
    status.update(
        {
            "observedGeneration": generation,
            "phase": c.derive_phase(conds),
            "latestRevision": latest,
            "conditions": conds,
            "stable": stable,
            "endpoints": endpoints(name, namespace, cluster_domain),
        }
    )
    return status


def _repository(
    spec: RecommenderModelSpec, lt: RevisionObservation, latest: str, stable: str, held: Problem | None
) -> c.Condition:
    """ModelRepositoryReady: the newest revision's build."""
    if lt.build_failed:
        return c.Condition(c.MODEL_REPOSITORY_READY, "False", c.BUILD_FAILED, lt.build_failed)
    if lt.fetch_failed:
        return c.Condition(c.MODEL_REPOSITORY_READY, "False", c.FETCH_FAILED, lt.fetch_failed)
    if lt.built and held is not None:
        return c.Condition(c.MODEL_REPOSITORY_READY, "True", c.BUILT, f"revision {stable} is built and serving")
    if lt.built:
        backend = spec.resolved_backend
        return c.Condition(
            c.MODEL_REPOSITORY_READY, "True", c.BUILT,
            f"model version {spec.model.version} built for {backend}/{spec.optimize.precision} (revision {latest})"
            + _tuning_note(spec, lt),
        )  # fmt: skip
    if lt.building:
        return c.Condition(
            c.MODEL_REPOSITORY_READY, "False", c.BUILDING, f"model-repo-builder is building revision {latest}"
        )
    return c.Condition(c.MODEL_REPOSITORY_READY, "False", c.PENDING, f"waiting for pods of revision {latest}")


def _tuning_note(spec: RecommenderModelSpec, lt: RevisionObservation) -> str:
    if spec.serving.tuning is None:
        return ""
    if lt.tuned:
        return f"; tuned: {lt.tuned}"
    if lt.artifact is None:
        return ("; spec.serving.tuning not applied: it runs in the revision's build Job, which needs a model store "
                "(the chart's modelStore)")  # fmt: skip
    return ""


def _ready(st: RevisionObservation, stable: str) -> c.Condition:
    """Ready: the stable revision serves requests."""
    if st.ready_replicas > 0:
        message = f"{st.ready_replicas}/{st.desired_replicas} replicas of revision {stable} ready"
        return c.Condition(c.READY, "True", c.AVAILABLE, message)
    p = problem_of(st)
    if p is not None:
        return c.Condition(c.READY, "False", p.reason, p.message)
    if st.building or (st.exists and not st.built):
        return c.Condition(c.READY, "False", c.DEPLOYING, f"revision {stable} is starting")
    return c.Condition(c.READY, "False", c.DEPLOYING, f"waiting for revision {stable}")


def _progressing(lt: RevisionObservation, latest: str, stable: str, blocked: Problem | None) -> c.Condition:
    """Progressing: a revision is being rolled out or scaled up. `blocked`: why it is not (held, a problem of the
    spec's revision, a stalled step)."""
    if blocked is not None:
        return c.Condition(c.PROGRESSING, "False", blocked.reason, blocked.message)
    if stable != latest:
        return c.Condition(
            c.PROGRESSING, "True", c.ROLLING_OUT,
            f"revision {latest} is rolling out to replace {stable}: {lt.ready_replicas}/{lt.desired_replicas} "
            "replicas ready",
        )  # fmt: skip
    if not lt.available:
        return c.Condition(
            c.PROGRESSING, "True", c.DEPLOYING,
            f"revision {latest}: {lt.ready_replicas}/{lt.desired_replicas} replicas ready",
        )  # fmt: skip
    return c.Condition(c.PROGRESSING, "False", c.ROLLOUT_COMPLETE, f"revision {latest} is Available")


def _degraded(observed: Problem | None, held: Problem | None, stalled: Problem | None) -> c.Condition:
    """Degraded: a revision's problem, else a rollback's reason, else a stalled step."""
    problem = observed
    if problem is None and held is not None and held.reason in ROLLBACK_REASONS:
        problem = held
    problem = problem or stalled
    if problem is not None:
        return c.Condition(c.DEGRADED, "True", problem.reason, problem.message)
    return c.Condition(c.DEGRADED, "False", c.AS_EXPECTED, "no problems observed")
