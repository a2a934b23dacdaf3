"""Which revisions run and which one is stable: the seam where rollout strategies decide traffic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from recserve_operator.names import ROUTER_CONFIG_HASH_ANNOTATION
from recserve_operator.observe import RevisionObservation


@dataclass(frozen=True)
class TrafficDecision:
    stable: str  # revision the front Service selects
    keep: frozenset[str]  # revisions whose objects stay; every other revision is deleted
    weights: Mapping[str, int] = field(default_factory=dict)  # percent per revision (routers)
    promoted: str | None = None  # set when this decision made a new revision stable
    reason: str = ""
    # The scale of each kept revision this decision sets (progressive strategies: the split's capacity, or the
    # spec's scale between rollouts); a revision absent here keeps its scale (the spec's, for the spec's own
    # revision). `replicas` applies without autoscaling, `hpa_bounds` (minReplicas, maxReplicas) with it.
    replicas: Mapping[str, int] = field(default_factory=dict)
    hpa_bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def decide_immediate(
    stable: str | None, latest: str, observations: Mapping[str, RevisionObservation]
) -> TrafficDecision:
    """First revision goes straight to stable; a new one replaces stable once Available, never before."""
    if stable is None or stable == latest:
        return TrafficDecision(stable=latest, keep=frozenset({latest}), weights={latest: 100})
    old = observations.get(stable)
    new = observations.get(latest)
    if new is not None and new.available:
        return TrafficDecision(
            stable=latest,
            keep=frozenset({latest}),
            weights={latest: 100},
            promoted=latest,
            reason=f"revision {latest} is Available; replaced {stable}",
        )
    if old is None or not old.exists:
        # Nothing left to protect (the old Deployment is gone): serve the new revision as soon as it can.
        return TrafficDecision(
            stable=latest,
            keep=frozenset({latest}),
            weights={latest: 100},
            promoted=latest,
            reason=f"previous revision {stable} no longer exists",
        )
    return TrafficDecision(
        stable=stable,
        keep=frozenset({stable, latest}),
        weights={stable: 100, latest: 0},
        reason=f"waiting for revision {latest} to become Available",
    )


@dataclass(frozen=True)
class RouterObservation:
    """The builtin router as the watch caches show it before a reconcile applies anything."""

    deployment: Mapping[str, Any] | None = None
    pods: tuple[Mapping[str, Any], ...] = ()

    def serves(self, desired: Mapping[str, Any] | None) -> bool:
        """Whether every router pod already routes by the plan `desired` (a router Deployment) renders."""
        return router_serves(desired, self.deployment, self.pods)


def router_serves(desired: Mapping[str, Any] | None, live: Mapping[str, Any] | None,
                  pods: Iterable[Mapping[str, Any]]) -> bool:  # fmt: skip
    """Whether every router pod now routes by the desired plan, so revisions the old plan named may go.

    The router rolls its pods to apply a new plan (the config hash is in the pod template). Until that
    rollout has finished and no old pod is left, not even one draining its connections, an old pod may
    still send a request to a revision the new plan dropped: deleting that revision then fails requests.
    """
    if desired is None:
        return True  # no builtin router: nothing routes by a plan
    if live is None:
        return False

    def template_hash(obj: Mapping[str, Any]) -> str | None:
        tpl = (obj.get("spec") or {}).get("template") or {}
        return ((tpl.get("metadata") or {}).get("annotations") or {}).get(ROUTER_CONFIG_HASH_ANNOTATION)

    if template_hash(live) != template_hash(desired):
        return False
    meta, spec, status = live.get("metadata") or {}, live.get("spec") or {}, live.get("status") or {}
    replicas = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration", 0)) < int(meta.get("generation", 1)):
        return False
    if not (int(status.get("updatedReplicas", 0)) == int(status.get("replicas", 0)) == replicas
            and int(status.get("availableReplicas", 0)) >= replicas):  # fmt: skip
        return False
    return not any((p.get("metadata") or {}).get("deletionTimestamp") for p in pods)
