"""The progressive traffic decision with capacity: replicas follow the split, within the stable's scale plus the surge.

The progressive strategy decides against a small model of the cluster that does what it is asked (Deployments take their
replicas, pods become Ready within the GPUs there are, the router rolls its pods to the plan when told), so each
test reads as the sequence of splits an operator would apply. At every step the model checks the rule the
sequence must keep: no revision is sent more traffic than its Ready replicas carry, by the plan the router pods
run or the one they roll to (a rollback excepted, which takes the traffic back at once), and no revision is
deleted while the router may still send it anything.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_samples import minimal_spec
from recserve_operator.builders.common import Ids
from recserve_operator.lifecycle import RouterObservation
from recserve_operator.metrics.base import MetricsProvider
from recserve_operator.observe import RevisionObservation
from recserve_operator.rollout.capacity import share_replicas
from recserve_operator.routers.builtin import PLAN_KEY
from recserve_operator.routers.plan import TrafficPlan
from recserve_operator.spec import parse_spec, revision_of
from recserve_operator.strategies import Progressive
from recserve_operator.strategy import Context, Plan

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
HOUR = [{"weight": 10, "pause": "1h"}]


def _no_metrics(url: str) -> MetricsProvider:
    raise AssertionError("these rollouts have no analysis")


@dataclass
class Round:
    """What one reconcile decided, and the cluster right after it applied that."""

    weights: dict[str, int]  # the plan the decision renders
    desired: dict[str, int]  # replicas each existing revision's Deployment asks for
    ready: dict[str, int]
    stable: str  # the front Service's revision
    keep: frozenset[str]

    @property
    def pods(self) -> int:
        """GPU pods the model holds (one GPU each): every non-terminating pod, Pending ones included."""
        return sum(self.desired.values())


@dataclass
class Cluster:
    """A model's Deployments, router and status, as the operator's reconciles change them."""

    rollout: dict[str, Any]
    replicas: int = 4
    autoscaling: dict[str, Any] | None = None
    gpus: int | None = None  # GPUs for the model's pods; None: enough for anything asked
    version: int = 3
    status: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, int] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    router: dict[str, Any] | None = None  # the live router Deployment
    served: TrafficPlan | None = None  # the plan its pods run
    rendered: tuple[dict[str, Any], TrafficPlan] | None = None  # the router Deployment and plan last applied
    checking: bool = False  # check every plan against the Ready replicas (once the stable first was up)
    rounds: list[Round] = field(default_factory=list)
    deleted: list[tuple[str, int]] = field(default_factory=list)  # (revision, round) in deletion order
    seconds: float = 0.0  # the clock; it moves only when a test moves it

    def spec_body(self) -> dict[str, Any]:
        serving: dict[str, Any] = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "replicas": self.replicas}
        if self.autoscaling is not None:
            serving["autoscaling"] = self.autoscaling
        model = {"uri": f"pvc://models/ctr-dnn/{self.version}", "format": "keras", "version": self.version}
        return minimal_spec(model=model, serving=serving, rollout=self.rollout)

    @property
    def latest(self) -> str:
        return revision_of(parse_spec(self.spec_body()))

    @property
    def canary(self) -> dict[str, Any]:
        return dict(self.status.get("canary") or {})

    def reconcile(self, *, falling: bool = False) -> Plan:
        """One reconcile at `seconds`: decide, then apply (scale, router objects, deletions past the drain gate)."""
        spec = parse_spec(self.spec_body())
        latest = revision_of(spec)
        observations = {
            rev: RevisionObservation(rev, exists=True, desired_replicas=n, ready_replicas=self.ready.get(rev, 0),
                                     available=self.ready.get(rev, 0) >= n)
            for rev, n in self.desired.items()
        }  # fmt: skip
        ctx = Context(spec, Ids("ctr-dnn", "shop", "uid-1", latest), self.status, self.annotations, observations,
                      RouterObservation(self.router, ()), T0 + timedelta(seconds=self.seconds))  # fmt: skip
        strategy = Progressive(_no_metrics)
        d = strategy.decide(ctx, strategy.measure(ctx))
        if d.handled_action:
            self.annotations.clear()
        self.status.update(copy.deepcopy(dict(d.status)))
        self.status["stable"] = {"revision": d.traffic.stable}
        for rev in d.traffic.keep:
            default = self.replicas if self.autoscaling is None else self.autoscaling["minReplicas"]
            n = d.traffic.replicas.get(rev, default)
            if self.autoscaling is not None:
                low, high = d.traffic.hpa_bounds.get(rev, (n, n))
                n = min(max(self.desired.get(rev, low), low), high)  # what the autoscaler settles on, no metrics
            self.desired[rev] = n
            self.ready[rev] = min(self.ready.get(rev, 0), n)  # a scale-down takes Ready pods away at once
        dep = next((o for o in d.router_objects if o["kind"] == "Deployment"), None)
        cm = next((o for o in d.router_objects if o["kind"] == "ConfigMap"), None)
        if dep is not None and cm is not None:  # the builtin router; a Gateway API route has no pods to roll
            self.rendered = (dep, TrafficPlan.from_dict(json.loads(cm["data"][PLAN_KEY])))
            if self.checking:
                self._check_carried(self.rendered[1], falling)
            self._drain(d.traffic.keep)
        self.rounds.append(Round(dict(d.traffic.weights), dict(self.desired), dict(self.ready), d.traffic.stable,
                                 d.traffic.keep))  # fmt: skip
        return d

    def roll_router(self) -> None:
        """The router's pods finish rolling to the plan last applied."""
        if self.rendered is None:
            return
        dep, plan = self.rendered
        live = copy.deepcopy(dep)
        n = live["spec"]["replicas"]
        live["metadata"]["generation"] = 1
        live["status"] = {"observedGeneration": 1, "replicas": n, "updatedReplicas": n, "availableReplicas": n}
        self.router, self.served = live, plan

    def pods_ready(self) -> None:
        """Pending pods become Ready, as far as the GPUs go (Ready pods keep theirs)."""
        for rev in sorted(self.desired):
            free = (self.gpus if self.gpus is not None else 10**6) - sum(self.ready.values())
            self.ready[rev] += max(0, min(self.desired[rev] - self.ready[rev], free))

    def converge(self, rounds: int = 12, *, falling: bool = False) -> None:
        """Reconcile, let the router roll and the pods start, until nothing changes."""
        for _ in range(rounds):
            before = (copy.deepcopy(self.status), dict(self.desired), dict(self.ready), self.served)
            self.reconcile(falling=falling)
            self.roll_router()
            self.reconcile(falling=falling)
            self.pods_ready()
            if (self.status, self.desired, self.ready, self.served) == before:
                return

    def _drain(self, keep: frozenset[str]) -> None:
        """reconcile's drain gate: a dropped revision goes once the router pods run the plan just rendered."""
        assert self.rendered is not None
        if not RouterObservation(self.router, ()).serves(self.rendered[0]):
            return
        for rev in sorted(set(self.desired) - keep):
            assert self.served is not None and rev not in self._weights(self.served), "deleted while routed"
            del self.desired[rev], self.ready[rev]
            self.deleted.append((rev, len(self.rounds)))

    def _check_carried(self, applied: TrafficPlan, falling: bool) -> None:
        """Every plan a router pod may run (the one served, the one it rolls to) is carried by Ready replicas."""
        base = int(self.canary.get("baseReplicas") or self.replicas)
        for plan in (self.served, applied):
            for b in plan.backends if plan is not None else ():
                if falling and b.variant == "stable":
                    continue  # a rollback sends the stable everything at once, by design
                ready = self.ready.get(b.revision, 0)
                assert b.weight == 0 or 100 * ready > base * (b.weight - 1), (plan, self.ready)

    @staticmethod
    def _weights(plan: TrafficPlan) -> dict[str, int]:
        return {b.revision: b.weight for b in plan.backends}

    def start(self, version: int = 4) -> tuple[str, str]:
        """The stable Available at its scale, then `version` rolled out until the first step's weight is served."""
        self.up()
        stable = self.status["stable"]["revision"]
        self.version = version
        self.converge()
        return stable, self.latest

    def up(self) -> str:
        """The first revision deployed and Ready: the stable every test starts from."""
        self.converge()
        self.checking = True
        self.rounds.clear()
        return str(self.status["stable"]["revision"])


def test_a_10_percent_canary_of_4_replicas_runs_5_pods_and_the_router_serves_its_10() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": HOUR})
    stable, cand = c.start()
    assert (c.canary["step"], c.canary["weight"], c.canary["servedWeight"]) == (0, 10, 10)
    assert c.served is not None and Cluster._weights(c.served) == {stable: 90, cand: 10}
    assert (c.desired, c.ready) == ({stable: 4, cand: 1}, {stable: 4, cand: 1})
    assert max(r.pods for r in c.rounds) == 5, "today the canary copies spec.serving.replicas: 8"


def test_the_candidate_gets_no_traffic_before_its_first_pod_is_ready() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": HOUR})
    stable = c.up()
    c.version = 4
    c.reconcile()
    assert c.rounds[-1].weights == {stable: 100}
    assert c.desired == {stable: 4, c.latest: 1}


def test_moving_from_10_to_50_percent_ratchets_through_25_and_never_runs_more_than_5_pods() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1h"}]})
    stable, cand = c.start()
    first = len(c.rounds)
    c.seconds += 60
    c.converge()
    moved = c.rounds[first:]
    assert list(dict.fromkeys(r.weights.get(cand, 0) for r in moved)) == [25, 50]
    assert (c.canary["step"], c.canary["weight"], c.canary["servedWeight"]) == (1, 50, 50)
    assert c.desired == c.ready == {stable: 2, cand: 2}
    assert max(r.pods for r in c.rounds) == 5


def test_promotion_keeps_the_old_stable_until_the_candidate_has_4_ready_and_the_router_serves_it_everything() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": HOUR}, gpus=5)
    old, new = c.start()
    first = len(c.rounds)
    c.annotations["recserve.dev/rollout-action"] = "promote"
    c.converge()
    promoting = [r for r in c.rounds[first:] if old in r.keep and new in r.keep and r.stable == old]
    # The old stable serves its share, its split ratcheting toward 100, until the candidate has its 4 Ready pods.
    assert list(dict.fromkeys(r.weights.get(new, 0) for r in promoting)) == [25, 50, 75]
    assert c.canary["phase"] == "Promoted" and all(r.stable == old for r in promoting)
    handover = next(i for i, r in enumerate(c.rounds) if r.weights == {new: 100})
    assert c.rounds[handover].ready[new] == 4 and c.rounds[handover].stable == new
    assert old in c.rounds[handover].desired, "the old revision stays until the router serves the new plan"
    assert [rev for rev, _ in c.deleted] == [old] and c.deleted[0][1] > handover
    assert max(r.pods for r in c.rounds) == 5
    assert c.desired == c.ready == {new: 4}
    assert (c.canary["phase"], c.canary["stableRevision"], c.canary.get("retiringRevision")) == ("Promoted", new, None)


@pytest.mark.parametrize(
    ("case", "steps", "stable_at_abort"),
    [("at 10%, the stable still runs its 4", HOUR, 4),
     ("at 50%, the stable runs 2 and has to grow back", [{"weight": 50, "pause": "1h"}], 2)],
)  # fmt: skip
def test_a_rollback_restores_the_stable_to_4_ready_before_the_candidate_is_dropped(
    case: str, steps: list[dict[str, Any]], stable_at_abort: int
) -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": steps}, gpus=5)
    stable, cand = c.start()
    assert c.ready[stable] == stable_at_abort, case
    c.annotations["recserve.dev/rollout-action"] = "abort"
    first = len(c.rounds)
    c.reconcile(falling=True)
    # Traffic goes back to the stable at once, and the stable is asked for its full scale at once.
    assert c.rounds[first].weights == {stable: 100}
    assert c.desired[stable] == 4 and cand in c.desired
    c.converge(falling=True)
    gone = next(i for rev, i in c.deleted if rev == cand)
    assert c.rounds[gone].ready[stable] == 4, "the stable had its 4 Ready before the candidate went"
    assert all(cand in r.keep for r in c.rounds[first:] if r.ready[stable] < 4)
    assert [rev for rev, _ in c.deleted] == [cand]
    assert c.desired == c.ready == {stable: 4}
    assert max(sum(r.ready.values()) for r in c.rounds) <= 5
    assert (c.canary["phase"], c.canary["servedWeight"]) == ("Aborted", 0)


def test_a_rollback_keeps_the_candidates_pods_until_the_router_stops_sending_it_traffic() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 50, "pause": "1h"}]}, gpus=5)
    _, cand = c.start()
    c.annotations["recserve.dev/rollout-action"] = "abort"
    c.reconcile(falling=True)
    assert c.desired[cand] == 2, "the router pods still send it 50% until they roll"
    c.roll_router()
    c.reconcile(falling=True)
    assert c.desired[cand] == 1


def test_a_surge_of_2_lets_the_canary_start_both_its_pods_before_the_stable_gives_one_up() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 50, "pause": "1h"}], "surge": 2})
    stable = c.up()
    c.version = 4
    c.reconcile()
    assert c.desired == {stable: 4, c.latest: 1}, "no weight before its first pod is Ready: one pod"
    c.pods_ready()
    c.reconcile()
    assert c.desired == {stable: 4, c.latest: 2}
    c.converge()
    assert c.desired == {stable: 2, c.latest: 2}
    assert max(r.pods for r in c.rounds) == 6


@pytest.mark.parametrize(
    ("case", "running", "base"),
    [("the autoscaler runs 5 of 2..8", 5, 5), ("it runs 1, below minReplicas 2", 1, 2)],
)  # fmt: skip
def test_an_autoscaled_stable_takes_what_it_runs_at_the_start_as_its_scale_and_both_autoscalers_are_pinned(
    case: str, running: int, base: int
) -> None:
    autoscaling = {"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilization": 70}
    c = Cluster(rollout={"strategy": "canary", "steps": HOUR}, autoscaling=autoscaling)
    stable = c.up()
    c.desired[stable] = c.ready[stable] = running  # the autoscaler scaled it (this model has no autoscaler)
    c.checking = False
    c.version = 4
    d = c.reconcile()
    assert c.canary["baseReplicas"] == base, case
    assert d.traffic.hpa_bounds == {stable: (base, base), c.latest: (1, 1)}
    c.annotations["recserve.dev/rollout-action"] = "promote"
    c.converge()
    d = c.reconcile()
    # Promoted: the new stable took the old one's scale, and its autoscaler is back at the spec's bounds.
    assert c.desired == {c.latest: base}
    assert d.traffic.hpa_bounds == {c.latest: (2, 8)}


def test_between_rollouts_the_stable_is_back_at_the_specs_scale() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 50, "pause": "1h"}]})
    stable, _ = c.start()
    c.annotations["recserve.dev/rollout-action"] = "abort"
    c.converge(falling=True)
    d = c.reconcile()
    assert (d.traffic.keep, d.traffic.replicas, d.traffic.hpa_bounds) == (frozenset({stable}), {stable: 4}, {})
    c.replicas, c.checking = 6, False  # scaling in place reaches the stable, though the spec names another revision
    assert c.reconcile().traffic.replicas == {stable: 6}


def test_a_gateway_api_route_counts_as_served_once_it_is_applied() -> None:
    routing = {"provider": "gatewayAPI", "parentRef": {"name": "shop-gw"}}
    c = Cluster(rollout={"strategy": "canary", "steps": HOUR, "routing": routing})
    stable = c.up()
    c.version = 4
    c.reconcile()
    c.ready[c.latest] = 1
    d = c.reconcile()
    route = d.router_objects[0]
    weights = {ref["name"]: ref["weight"] for rule in route["spec"]["rules"] for ref in rule.get("backendRefs", [])}
    assert weights[f"ctr-dnn-{c.latest}"] == 10 and c.canary["servedWeight"] == 10
    assert d.traffic.replicas == {stable: 4, c.latest: 1}


def test_the_canary_a_pod_short_of_its_served_share_is_not_available_and_its_traffic_goes_back() -> None:
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 50, "pause": "1h"}]})
    stable, cand = c.start()
    c.ready[cand], c.checking = 1, False  # one of its two pods crashed; 50% needs both
    d = c.reconcile()
    assert d.traffic.weights == {stable: 100} and c.canary["weight"] == 0
    assert share_replicas(4, 50) == 2 and d.traffic.replicas[stable] == 4


def test_a_revision_superseding_a_canary_in_flight_inherits_the_stables_scale_and_drops_the_old_candidate() -> None:
    autoscaling = {"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilization": 70}
    c = Cluster(rollout={"strategy": "canary", "steps": [{"weight": 50, "pause": "1h"}]}, autoscaling=autoscaling)
    stable = c.up()
    c.desired[stable] = c.ready[stable] = 4  # the autoscaler runs 4 when the rollout starts
    c.version = 4
    c.converge()
    superseded = c.latest
    assert c.desired == {stable: 2, superseded: 2}
    c.version, c.checking = 5, False  # the superseded candidate's share goes back to the stable at once
    d = c.reconcile(falling=True)
    # The stable runs 2 of its 4 now: measuring it would halve the model; the rollout it supersedes set N = 4.
    assert c.canary["baseReplicas"] == 4 and d.traffic.hpa_bounds == {stable: (4, 4), c.latest: (1, 1)}
    assert d.traffic.keep == {stable, c.latest} and d.traffic.weights == {stable: 100}
    c.converge()
    assert [rev for rev, _ in c.deleted] == [superseded]
    assert c.desired == {stable: 2, c.latest: 2}
