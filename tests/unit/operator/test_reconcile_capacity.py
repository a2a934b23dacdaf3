"""reconcile() applies the canary's capacity: the candidate's Deployment is built at its share, the stable's is scaled
by a replicas patch alone, and a promotion or an abort hands the scale over before a revision is deleted."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

from operator_samples import minimal_spec, model_body
from recserve_operator.builders.deployment import GPU_RESOURCE
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from test_operator_reconcile import FakeKube, FakeLive

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ACTION = "recserve.dev/rollout-action"


class Cluster(FakeKube):
    """FakeKube whose Deployments keep their status across an apply that changes them, as the API server does
    (FakeKube's fresh status would read as a candidate that lost its pods), and whose pods start on request."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[str] = []
        self.deleted_when: dict[str, dict[str, Any]] = {}  # a deleted Deployment: what else was Ready, what routed

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        before = copy.deepcopy(self.objects.get(key))
        live = super().apply(obj)
        changed = before is None or live["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
        if changed:
            self.applied.append(obj["metadata"]["name"])
        if changed and before is not None and obj["kind"] == "Deployment":
            stored = self.objects[key]
            stored["status"] = before.get("status") or {}
            stored["metadata"]["uid"] = before["metadata"]["uid"]
            stored["metadata"]["generation"] = before["metadata"].get("generation", 1) + 1
            live = copy.deepcopy(stored)
        return live

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        if kind == "Deployment" and (namespace, name) != ("shop", "ctr-dnn-router"):
            ready = {n: (o.get("status") or {}).get("readyReplicas", 0) for (k, _, n), o in self.objects.items()
                     if k == "Deployment" and n not in (name, "ctr-dnn-router")}  # fmt: skip
            router = self.objects[("Deployment", "shop", "ctr-dnn-router")]
            rolled = (router.get("status") or {}).get("observedGeneration") == router["metadata"].get("generation")
            routed = self.plan() if rolled else {}
            self.deleted_when[name] = {"ready beside it": sum(ready.values()), "router serves": routed}
        return super().delete(kind, namespace, name, uid)

    def pods_ready(self) -> None:
        """Every model Deployment's pods are Ready at its replicas."""
        for (kind, _, name), obj in self.objects.items():
            if kind == "Deployment" and not name.endswith("-router"):
                n = obj["spec"].get("replicas", 1)
                obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": n,
                                 "readyReplicas": n, "updatedReplicas": n}  # fmt: skip
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)

    def replicas(self) -> dict[str, int]:
        """spec.replicas of each model Deployment, by revision."""
        return {name.removeprefix("ctr-dnn-"): obj["spec"]["replicas"] for (kind, _, name), obj in self.objects.items()
                if kind == "Deployment" and not name.endswith("-router")}  # fmt: skip

    def gpus(self) -> int:
        """GPUs the model's pods request: replicas times each pod's nvidia.com/gpu."""
        total = 0
        for (kind, _, name), obj in self.objects.items():
            if kind == "Deployment" and not name.endswith("-router"):
                requests = obj["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
                total += obj["spec"]["replicas"] * int(requests.get(GPU_RESOURCE, 0))
        return total

    def plan(self) -> dict[str, int]:
        data = json.loads(self.objects[("ConfigMap", "shop", "ctr-dnn-router")]["data"]["plan.json"])
        return {b["revision"]: b["weight"] for b in data["backends"]}


class Model:
    """A 4-replica model (one GPU a pod) rolled out as a canary by `steps`, reconciled against Cluster."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.kube = Cluster()
        self.rec = Reconciler(self.kube, OperatorDefaults(), FakeLive(self.kube))  # type: ignore[arg-type]
        self.steps = steps
        self.version = 3
        self.action = ""

    def reconcile(self) -> dict[str, int]:
        serving = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G", "replicas": 4}
        model = {"uri": f"pvc://models/ctr-dnn/{self.version}", "format": "keras", "version": self.version}
        spec = minimal_spec(model=model, serving=serving, rollout={"strategy": "canary", "steps": self.steps})
        body = model_body(spec, generation=self.version, status=self.kube.status)
        if self.action:
            body["metadata"]["annotations"] = {ACTION: self.action}
        counts = self.rec.reconcile(body, lambda *e: self.kube.events.append(e), now=T0)
        self.action = ""  # the operator clears a handled action
        return counts

    def round(self) -> None:
        """Reconcile, the router rolls, reconcile, the pods start."""
        self.reconcile()
        self.kube.roll_router()
        self.reconcile()
        self.kube.pods_ready()

    def start(self) -> tuple[str, str]:
        self.round()
        self.round()
        stable = self.kube.status["stable"]["revision"]
        self.version = 4
        for _ in range(3):
            self.round()
        return stable, self.kube.status["latestRevision"]


def test_a_10_percent_canary_applies_4_replicas_to_the_stable_and_1_to_the_candidate() -> None:
    m = Model([{"weight": 10, "pause": "1h"}])
    stable, cand = m.start()
    assert m.kube.status["canary"]["weight"] == m.kube.status["canary"]["servedWeight"] == 10
    assert m.kube.plan() == {stable: 90, cand: 10}
    assert m.kube.replicas() == {stable: 4, cand: 1}
    assert m.kube.gpus() == 5
    assert m.reconcile() == {"applied": 0, "deleted": 0, "status": 0}, "a served split writes nothing more"


def test_promotion_grows_the_candidate_and_shrinks_the_stable_by_patching_its_replicas_only() -> None:
    m = Model([{"weight": 10, "pause": "1h"}])
    old, new = m.start()
    old_name = f"ctr-dnn-{old}"
    m.kube.applied.clear()
    m.action = "promote"
    seen: list[dict[str, int]] = []
    for _ in range(12):
        m.round()
        seen.append(m.kube.replicas())
        assert m.kube.gpus() <= 5, seen
    # The old stable gave up one replica per step of the ratchet (25, 50, 75%), by a patch of its replicas (the
    # spec now describes the candidate, so its Deployment is never applied); the candidate took each place once
    # the pod that held it was gone.
    scales = [(s.get(old), s[new]) for s in seen]  # (old, new) replicas after each round
    assert list(dict.fromkeys(scales)) == [(3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 4), (None, 4)]
    assert m.kube.requests["scale"] == 3 and old_name not in m.kube.applied
    assert m.kube.deleted_when[old_name] == {"ready beside it": 4, "router serves": {new: 100}}
    assert m.kube.replicas() == {new: 4} and m.kube.plan() == {new: 100}
    assert m.kube.status["stable"]["revision"] == new and m.kube.status["canary"].get("retiringRevision") is None


def test_an_abort_at_50_percent_patches_the_stable_back_to_4_before_the_candidate_is_deleted() -> None:
    m = Model([{"weight": 50, "pause": "1h"}])
    stable, cand = m.start()
    m.round()
    assert m.kube.replicas() == {stable: 2, cand: 2}
    m.action = "abort"
    m.reconcile()
    assert m.kube.plan() == {stable: 100}, "traffic back to the stable at once"
    assert m.kube.replicas() == {stable: 4, cand: 2}, "the candidate keeps its pods while the router rolls"
    m.kube.roll_router()
    m.reconcile()
    assert m.kube.replicas() == {stable: 4, cand: 1}, "the stable has 2 of its 4 Ready: the candidate stays"
    m.kube.pods_ready()
    m.reconcile()
    assert m.kube.replicas() == {stable: 4}
    assert m.kube.deleted_when[f"ctr-dnn-{cand}"] == {"ready beside it": 4, "router serves": {stable: 100}}
    assert m.kube.status["canary"]["phase"] == "Aborted"
