"""Which revisions run and which one is stable: the seam where rollout strategies decide traffic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from recserve_operator.observe import RevisionObservation


@dataclass(frozen=True)
class TrafficDecision:
    stable: str  # revision the front Service selects
    keep: frozenset[str]  # revisions whose objects stay; every other revision is deleted
    weights: Mapping[str, int] = field(default_factory=dict)  # percent per revision (routers)
    promoted: str | None = None  # set when this decision made a new revision stable
    reason: str = ""


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
