"""The pure traffic plan: which revision's Service gets which share, and the routing headers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from recserve_operator.rollout.machine import TrafficWeights
from recserve_operator.rollout.policy import RoutingPolicy
from recserve_operator.rollout.state import RolloutState

__all__ = ["CANARY", "STABLE", "Backend", "Shadow", "TrafficPlan", "build_traffic_plan", "revision_service_name"]

STABLE = "stable"
CANARY = "canary"


def revision_service_name(model: str, revision: str) -> str:
    """Per-revision Service name, as the operator's builders name it ("<model>-<revision>")."""
    return f"{model}-{revision}"


@dataclass(frozen=True)
class Backend:
    variant: str  # "stable" | "canary": the value of the forced-variant header that selects it
    revision: str
    service: str
    weight: int  # percent of unforced traffic


@dataclass(frozen=True)
class Shadow:
    """A candidate that receives `percent` of live requests as mirrored copies (its answers reach no user)."""

    revision: str
    service: str
    percent: int  # 1-100
    top_k: int = 10  # the depth the comparator compares

    def __post_init__(self) -> None:
        if not 1 <= self.percent <= 100:
            raise ValueError(f"shadow percent must be within 1-100, got {self.percent}")


@dataclass(frozen=True)
class TrafficPlan:
    backends: tuple[Backend, ...]
    sticky_header: str
    variant_header: str
    shadow: Shadow | None = None

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("a traffic plan needs at least one backend")
        if sum(b.weight for b in self.backends) != 100:
            raise ValueError(f"backend weights must add up to 100: {self.backends}")
        if len({b.variant for b in self.backends}) != len(self.backends):
            raise ValueError("variants must be unique")
        if self.shadow is not None and any(b.revision == self.shadow.revision for b in self.backends):
            raise ValueError(f"revision {self.shadow.revision} cannot be both routed and shadowed")

    def backend(self, variant: str) -> Backend | None:
        return next((b for b in self.backends if b.variant == variant), None)

    @property
    def canary_weight(self) -> int:
        b = self.backend(CANARY)
        return b.weight if b is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, published beside the rendered router config so local data planes can follow it."""
        return {
            "backends": [{"variant": b.variant, "revision": b.revision, "service": b.service, "weight": b.weight}
                         for b in self.backends],
            "stickyHeader": self.sticky_header,
            "variantHeader": self.variant_header,
            **({"shadow": {"revision": self.shadow.revision, "service": self.shadow.service,
                           "percent": self.shadow.percent, "topK": self.shadow.top_k}} if self.shadow else {}),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrafficPlan:
        backends = tuple(
            Backend(str(b["variant"]), str(b["revision"]), str(b["service"]), int(b["weight"]))
            for b in data["backends"]
        )
        raw = data.get("shadow")
        shadow = None
        if isinstance(raw, Mapping):
            shadow = Shadow(str(raw["revision"]), str(raw["service"]), int(raw["percent"]), int(raw.get("topK", 10)))
        return cls(backends, str(data["stickyHeader"]), str(data["variantHeader"]), shadow)


def build_traffic_plan(
    model: str,
    state: RolloutState,
    weights: TrafficWeights,
    routing: RoutingPolicy,
    service_name: Callable[[str, str], str] = revision_service_name,
    *,
    top_k: int = 10,
) -> TrafficPlan:
    """Plan from the rollout state and the Decision's weights.

    The candidate appears only while it is routable (Available and rolling out), so neither weighted nor
    forced-variant traffic can reach a candidate that is not ready.
    """
    if state.stable_revision is None:
        raise ValueError("no stable revision yet: nothing to route to")
    stable = state.stable_revision
    backends: tuple[Backend, ...]
    if weights.canary_routable and state.revision is not None and state.revision != stable:
        backends = (
            Backend(STABLE, stable, service_name(model, stable), weights.stable),
            Backend(CANARY, state.revision, service_name(model, state.revision), weights.canary),
        )
    else:
        backends = (Backend(STABLE, stable, service_name(model, stable), 100),)
    shadow = None
    if weights.mirror > 0 and not weights.canary_routable and state.revision not in (None, stable):
        assert state.revision is not None
        shadow = Shadow(state.revision, service_name(model, state.revision), weights.mirror, top_k)
    return TrafficPlan(backends, routing.sticky_header, routing.variant_header, shadow)
