"""kill -9 the operator 20 times at seeded-random moments while 10 models run canaries and spec updates.

Two operator processes run the same scenario side by side, each in its own namespace: a control that is never
interrupted, and the faulted one, killed with SIGKILL and restarted 20 times. Each model goes v1 -> v2 -> v3 by
canary (3 steps, each advanced on a passing analysis from a fake Prometheus); half of them get v3 while v2 is at
its second step (a supersede), the other half once v2 is promoted. Every router ConfigMap write is recorded by a
watch. The faulted namespace must end exactly where the control does: every model promoted to v3 and Ready, the
same owned objects with one owner reference to their model and nothing left of v1 or v2, each model's router
plans the same sequence with every step of the spec once in order, and the same final router configuration.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    FakePrometheus,
    OperatorProcess,
    apply_yaml,
    get_json,
    kwok_model,
    wait_ready,
)

pytestmark = pytest.mark.integration

SEED = 14_2  # issue 14, item 2: the kill moments are the same in every run
MODELS = [f"k{i}" for i in range(10)]
SUPERSEDED = set(MODELS[:5])  # v3 arrives while v2's canary is at its second step
KILLS = 20
STEPS = [{"weight": 20, "pause": "1s"}, {"weight": 50, "pause": "1s"}, {"weight": 80, "pause": "1s"}]
HOLD = [{"weight": 20, "pause": "1s"}, {"weight": 50, "pause": "10m"}]  # v2 of a superseded model waits at 50%
# CPU-only serving on the kwok nodes: twenty models with canaries need more than the simulated GPUs.
CPU = {"resources": {"gpu": 0, "cpu": "10m", "memory": "32Mi"}, "instances": {"kind": "CPU"}, "gpuProduct": None}
KINDS = "deployments,services,configmaps,jobs,pdb,hpa"


def _spec(name: str, version: int, prometheus: str) -> dict[str, Any]:
    steps = HOLD if version == 2 and name in SUPERSEDED else STEPS
    analysis = {"interval": "2s", "prometheus": prometheus, "maxErrorRate": 0.01, "minRequests": 1}
    return kwok_model(name, version, serving=CPU, rollout={"strategy": "canary", "steps": steps, "analysis": analysis})


class RouterWatch:
    """`kubectl get configmaps -w`: every router plan each model's router ConfigMap carried, in order."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.plans: dict[str, list[dict[str, int]]] = {}
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [cluster.kubectl_path, "--kubeconfig", str(cluster.kubeconfig), "get", "configmaps", "-n", ns, "-w",
             "--output-watch-events", "-o", "json", "--request-timeout=0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=cluster.env,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buf += line
            while buf.strip():
                try:
                    event, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        model = ((obj.get("metadata") or {}).get("labels") or {}).get("recserve.dev/model")
        plan = (obj.get("data") or {}).get("plan.json")
        if event.get("type") == "DELETED" or not model or not plan:
            return
        weights = {b["revision"]: int(b["weight"]) for b in json.loads(plan).get("backends", [])}
        with self.lock:
            seq = self.plans.setdefault(model, [])
            if not seq or seq[-1] != weights:
                seq.append(weights)

    def changes(self) -> int:
        """Router plan changes seen so far, over all models (the ConfigMaps' first versions included)."""
        with self.lock:
            return sum(len(seq) for seq in self.plans.values())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(10)


class Scenario:
    """Drives one namespace's models v1 -> v2 -> v3 from their status, one `kubectl get` per poll."""

    def __init__(self, cluster: Cluster, ns: str, prometheus: str) -> None:
        self.cluster, self.ns, self.prometheus = cluster, ns, prometheus
        self.version = dict.fromkeys(MODELS, 1)
        self.revisions: dict[str, dict[int, str]] = {m: {} for m in MODELS}

    def apply(self, name: str, version: int) -> None:
        apply_yaml(self.cluster, self.ns, _spec(name, version, self.prometheus))
        self.version[name] = version

    def step(self) -> int:
        """Apply what each model is ready for; how many models are promoted to v3."""
        items = (get_json(self.cluster, "recommendermodels", "-n", self.ns) or {}).get("items", [])
        done = 0
        for obj in items:
            name, version = obj["metadata"]["name"], self.version[obj["metadata"]["name"]]
            status, gen = obj.get("status") or {}, obj["metadata"]["generation"]
            if status.get("observedGeneration") != gen or not status.get("latestRevision"):
                continue
            latest, canary = status["latestRevision"], status.get("canary") or {}
            self.revisions[name][version] = latest
            promoted = (status.get("stable") or {}).get("revision") == latest and status.get("phase") == "Ready"
            promoted = promoted and (version == 1 or canary.get("phase") == "Promoted")
            if version == 2 and name in SUPERSEDED:
                at_second = canary.get("revision") == latest and canary.get("step") == 1
                if at_second and canary.get("phase") == "Progressing" and canary.get("weight") == 50:
                    self.apply(name, 3)
            elif promoted and version < 3:
                self.apply(name, version + 1)
            elif promoted:
                done += 1
        return done


def _expected_steps(name: str, revisions: dict[int, str]) -> list[tuple[str, int]]:
    """(candidate, weight) of every split the spec asks for, in order: each step once, then the promotion."""
    out: list[tuple[str, int]] = []
    for version in (2, 3):
        steps = HOLD if version == 2 and name in SUPERSEDED else STEPS
        rev = revisions[version]
        out += [(rev, int(str(s["weight"]))) for s in steps]
        if not (version == 2 and name in SUPERSEDED):
            out.append((rev, 100))
    return out


def _splits(plans: list[dict[str, int]], revisions: dict[int, str]) -> list[tuple[str, int]]:
    """(revision, weight) of the newest revision each plan routes to (v2 or v3; plans of v1 alone are skipped),
    consecutive repeats collapsed: the candidate's weight at each split, then 100 once promoted."""
    out: list[tuple[str, int]] = []
    for plan in plans:
        newest = next((revisions[v] for v in (3, 2) if revisions[v] in plan), None)
        if newest is not None and (not out or out[-1] != (newest, plan[newest])):
            out.append((newest, plan[newest]))
    return out


def _owned(cluster: Cluster, ns: str) -> dict[tuple[str, str], dict[str, Any]]:
    items = (get_json(cluster, KINDS, "-n", ns) or {}).get("items", [])
    return {(o["kind"], o["metadata"]["name"]): o for o in items if o["metadata"]["name"] != "kube-root-ca.crt"}


def _normalised(text: str, ns: str) -> str:
    return text.replace(ns, "<ns>")


def test_twenty_operator_kills_during_canaries_and_updates_of_ten_models_converge_like_an_uninterrupted_run(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster = crd
    control_ns = f"{namespace}-ctl"[:63]
    cluster.kubectl("create", "namespace", control_ns)
    prometheus = FakePrometheus().start()
    faulted = OperatorProcess(cluster, namespace, tmp_path / "faulted.log")
    control = OperatorProcess(cluster, control_ns, tmp_path / "control.log")
    watches: list[RouterWatch] = []
    rng = random.Random(SEED)
    kills: list[str] = []
    try:
        faulted.start()
        control.start()
        runs = {ns: Scenario(cluster, ns, prometheus.url) for ns in (namespace, control_ns)}
        for run in runs.values():
            for name in MODELS:
                run.apply(name, 1)
        for ns in runs:
            for name in MODELS:
                wait_ready(cluster, ns, name, timeout=120)
        # The watches start before any split is routed; the first poll applies v2 to every model.
        watches = [RouterWatch(cluster, ns) for ns in runs]
        # The kill moments: seeded-random points in the faulted run's progress, counted in router plan changes (each
        # model's plans go through ~8 changes over its two canaries), so every kill lands mid-rollout, and at
        # least one change happens between two kills.
        points = sorted(rng.sample(range(len(MODELS) + 2, len(MODELS) + 60), KILLS))
        changed_at_kill = -1
        deadline = time.monotonic() + 230
        converged: dict[str, bool] = {}
        started = time.monotonic()
        while time.monotonic() < deadline:
            done = {ns: run.step() for ns, run in runs.items()}
            converged = {ns: n == len(MODELS) for ns, n in done.items()}
            changes = watches[0].changes()
            if len(kills) < KILLS and changes >= max(points[len(kills)], changed_at_kill + 1):
                rolling = len(MODELS) - done[namespace]
                assert rolling > 0, f"kill {len(kills) + 1} would land after every rollout ended ({changes} changes)"
                faulted.kill()
                changed_at_kill = changes
                kills.append(f"kill {len(kills) + 1} at +{time.monotonic() - started:.1f}s after {changes} plan "
                             f"changes: {rolling} models still rolling out")  # fmt: skip
                print(kills[-1], flush=True)
                faulted.start()
            if all(converged.values()) and len(kills) == KILLS:
                break
            time.sleep(0.3)
        print(f"converged after +{time.monotonic() - started:.1f}s with {len(kills)} kills", flush=True)
        assert all(converged.values()), (converged, {ns: run.version for ns, run in runs.items()}, kills)
        assert len(kills) == KILLS, kills

        # Owned objects: the same set as the control's (names are derived from the spec, which both runs share),
        # each owned by its model, nothing of v1 or v2 left once both have drained.
        uids = {ns: {o["metadata"]["name"]: o["metadata"]["uid"]
                     for o in get_json(cluster, "recommendermodels", "-n", ns)["items"]} for ns in runs}  # fmt: skip
        wait_for(lambda: set(_owned(cluster, namespace)) == set(_owned(cluster, control_ns)), 60,
                 message="the faulted run's objects differ from the control's")  # fmt: skip
        for ns in runs:
            objects = _owned(cluster, ns)
            for (kind, name), obj in objects.items():
                refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r["kind"] == "RecommenderModel"]
                assert len(refs) == 1 and refs[0].get("controller") is True, (ns, kind, name, refs)
                assert refs[0]["uid"] == uids[ns].get(refs[0]["name"]), (ns, kind, name, refs)
            for name in MODELS:
                old = {runs[ns].revisions[name][v] for v in (1, 2)}
                stale = [k for k, o in objects.items()
                         if (o["metadata"].get("labels") or {}).get("recserve.dev/revision") in old]  # fmt: skip
                assert not stale, (ns, name, stale)

        for watch in watches:
            watch.stop()
        control_plans, faulted_plans = (w.plans for w in (watches[1], watches[0]))
        for name in MODELS:
            revs = runs[namespace].revisions[name]
            assert revs == runs[control_ns].revisions[name]  # the same specs give the same revisions
            expected = _expected_steps(name, revs)
            # Every traffic step once, in the spec's order: none skipped, none repeated, none gone back to.
            assert _splits(faulted_plans[name], revs) == expected, (name, faulted_plans[name])
            assert _splits(control_plans[name], revs) == expected, (name, control_plans[name])
            assert faulted_plans[name] == control_plans[name], (name, faulted_plans[name], control_plans[name])
            # The final router configuration is the uninterrupted run's.
            cms = [get_json(cluster, "configmap", f"{name}-router", "-n", ns) for ns in (namespace, control_ns)]
            data = [{k: _normalised(v, ns) for k, v in cm["data"].items()} for cm, ns in zip(cms, runs, strict=True)]
            assert data[0] == data[1], name
    finally:
        for watch in watches:
            if watch.proc.poll() is None:
                watch.stop()
        faulted.stop()
        control.stop()
        prometheus.stop()
        cluster.kubectl("delete", "namespace", control_ns, "--wait=false", "--ignore-not-found", check=False)
    for op in (faulted, control):
        log = op.log()
        assert "Traceback" not in log, log[-5000:]
