"""The rollout strategy interface (immediate, canary, abTest): measure (I/O) split from decide (pure).

A reconcile observes its model into a `Context`, asks its strategy to `measure` (the one step that may query a
metrics backend) and then to `decide` a `Plan`: which revisions run at which scale and weight, the router objects
that carry the split, what the strategy adds to status, the events to post. Everything after that (apply, drain,
delete, report) is the same for every strategy. `immediate` lives here; canary and abTest share the progressive
implementation (recserve_operator.strategies, imported on first use: its statistics stack is heavy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from recserve_operator.builders.common import Ids
from recserve_operator.lifecycle import RouterObservation, TrafficDecision, decide_immediate
from recserve_operator.observe import RevisionObservation
from recserve_operator.spec import RecommenderModelSpec
from recserve_operator.status import FOREIGN_KEYS, RolloutReport

Event = tuple[str, str, str]  # (type "Normal"|"Warning", reason, message)
M = TypeVar("M")


@dataclass(frozen=True)
class Context:
    """What a strategy reads: the parsed spec, the model's status and annotations, and the owned objects as the
    watch caches show them before this reconcile applies anything."""

    spec: RecommenderModelSpec
    ids: Ids  # the spec's (latest) revision
    status: Mapping[str, Any]
    annotations: Mapping[str, str]
    observations: Mapping[str, RevisionObservation]
    router: RouterObservation
    now: datetime
    cluster_domain: str = "cluster.local"

    @property
    def stable(self) -> str | None:
        return (self.status.get("stable") or {}).get("revision")


@dataclass(frozen=True)
class Plan:
    """What a strategy decided for one reconcile."""

    traffic: TrafficDecision
    router_objects: tuple[dict[str, Any], ...] = ()  # every router object the model needs; the rest are deleted
    status: Mapping[str, Any] = field(default_factory=dict)  # status keys the strategy owns (canary, abTest…)
    foreign: tuple[str, ...] = FOREIGN_KEYS  # status keys the core report leaves as they are
    report: RolloutReport = field(default_factory=RolloutReport)  # what the rollout adds to status.conditions
    events: tuple[Event, ...] = ()
    outcome: str | None = None  # "promoted" | "rolled_back" when this decision ended a rollout
    handled_action: str | None = None  # a manual action consumed (its annotation is then removed)

    @property
    def router_deployment(self) -> dict[str, Any] | None:
        """The builtin router's Deployment in this plan (the drain gate waits for its pods), if any."""
        return next((o for o in self.router_objects if o.get("kind") == "Deployment"), None)


class Strategy(Protocol, Generic[M]):
    def measure(self, ctx: Context) -> M:
        """Look at what the decision needs from outside the cluster (metrics), when a look is due."""
        ...

    def decide(self, ctx: Context, measured: M) -> Plan:
        """Pure: same context and measurement, same plan."""
        ...


@dataclass(frozen=True)
class Immediate:
    """The first revision goes straight to stable; a new one replaces it once Available (lifecycle.decide_immediate).
    No router: the stable front Service carries all traffic."""

    def measure(self, ctx: Context) -> None:
        return None

    def decide(self, ctx: Context, measured: None) -> Plan:
        stable = ctx.stable
        traffic = decide_immediate(stable, ctx.ids.revision, ctx.observations)
        if not (traffic.promoted and stable and traffic.promoted != stable):
            return Plan(traffic)
        event = ("Normal", "Promoted", f"Revision {traffic.promoted} replaced {stable}: {traffic.reason}")
        return Plan(traffic, events=(event,), outcome="promoted")
