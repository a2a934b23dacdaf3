"""kill -9 the operator 20 times at seeded-random moments while 10 models run canaries and spec updates.

Two operator processes run the same scenario side by side, each in its own namespace: a control that is never
interrupted, and the faulted one, killed with SIGKILL and restarted 20 times. Every model keeps being updated
(v1 -> v2 -> v3 -> ...) by 3-step canaries for as long as kills remain, so every kill lands while rollouts are in
flight however fast or slow the machine is; half of the models have every even version replaced by the next one
while it waits at its second step (a supersede). The control applies the same versions, following the faulted
run. Every router ConfigMap write is recorded by a watch. The faulted namespace must end exactly where the control
does: every model promoted to its last version and Ready, the same owned objects with one owner reference to their
model and nothing left of older revisions, in each model's router plans every step of the specs once and in order
(none skipped, none repeated), and the same final router configuration.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

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

SEED = 142  # issue 14, item 2: the kill moments are the same in every run
MODELS = [f"k{i}" for i in range(10)]
SUPERSEDED = set(MODELS[:5])  # their even versions are replaced while at the second step
KILLS = 20
# A kill comes this many seconds (seeded-random) after the restarted operator serves its metrics: early in its
# first reconciles, mid-analysis, between a router write and a status write.
KILL_AFTER_S = (0.2, 6.0)
STEPS = [{"weight": 20, "pause": "2s"}, {"weight": 50, "pause": "2s"}, {"weight": 80, "pause": "2s"}]
HOLD = [{"weight": 20, "pause": "2s"}, {"weight": 50, "pause": "10m"}]  # waits at 50% until superseded
# CPU-only serving on the kwok nodes: twenty models with canaries need more than the simulated GPUs.
CPU = {"resources": {"gpu": 0, "cpu": "10m", "memory": "32Mi"}, "instances": {"kind": "CPU"}, "gpuProduct": None}
KINDS = "deployments,services,configmaps,jobs,pdb,hpa"
# With one `kubectl apply` per poll and namespace, 20 kills took 122-124 s here (converged at 141-144 s). With one
# apply per model, one CI run's kills came 30-70 s apart, longer after polls that had updated more models, and the
# 900 s limit stopped it at 17 kills. The deadline and the test's own timeout leave room for a much slower machine.
DEADLINE_S = 1200


def _holds(name: str, version: int) -> bool:
    return name in SUPERSEDED and version % 2 == 0


def _spec(name: str, version: int, prometheus: str) -> dict[str, Any]:
    steps = HOLD if _holds(name, version) else STEPS
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

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(10)


class Scenario:
    """Drives one namespace's models from their status, one `kubectl get` per poll. The faulted run (no `leader`)
    starts a model's next version whenever it is promoted, while `more` is set; the control follows the versions
    its leader applied."""

    def __init__(self, cluster: Cluster, ns: str, prometheus: str, leader: Scenario | None = None) -> None:
        self.cluster, self.ns, self.prometheus, self.leader = cluster, ns, prometheus, leader
        self.version = dict.fromkeys(MODELS, 1)
        self.revisions: dict[str, dict[int, str]] = {m: {} for m in MODELS}
        self.more = True
        # What each poll saw, for a failure's diagnosis: seconds, the poll's duration, models per state.
        self.timeline: list[dict[str, Any]] = []

    def apply(self, versions: dict[str, int]) -> None:
        """One `kubectl apply` for every model's next version (a poll may start many)."""
        if versions:
            docs = [_spec(name, version, self.prometheus) for name, version in versions.items()]
            apply_yaml(self.cluster, self.ns, yaml.safe_dump_all(docs))
            self.version.update(versions)

    def _next(self, name: str, version: int) -> bool:
        if self.leader is None:
            return self.more
        return self.leader.version[name] > version

    def step(self) -> tuple[int, int]:
        """Apply what each model is ready for; how many models are at rest (their last version promoted) and how
        many were in a canary (their status says so) at this poll."""
        began = time.monotonic()
        items = (get_json(self.cluster, "recommendermodels", "-n", self.ns) or {}).get("items", [])
        at_rest = in_canary = 0
        nexts: dict[str, int] = {}
        states: Counter[str] = Counter()
        for obj in items:
            name = obj["metadata"]["name"]
            version, status, gen = self.version[name], obj.get("status") or {}, obj["metadata"]["generation"]
            canary = status.get("canary") or {}
            if status.get("observedGeneration") != gen or not status.get("latestRevision"):
                states["unobserved"] += 1
                continue
            states[f"{status.get('phase')}/{canary.get('phase')}/{canary.get('step')}"] += 1
            latest = status["latestRevision"]
            self.revisions[name][version] = latest
            in_canary += canary.get("revision") == latest and canary.get("phase") == "Progressing"
            if _holds(name, version):
                at_second = canary.get("revision") == latest and canary.get("step") == 1
                at_second = at_second and canary.get("phase") == "Progressing" and canary.get("weight") == 50
                if at_second and (self.leader is None or self.leader.version[name] > version):
                    nexts[name] = version + 1  # always superseded, also once the kills are done
                continue
            promoted = (status.get("stable") or {}).get("revision") == latest and status.get("phase") == "Ready"
            promoted = promoted and (version == 1 or canary.get("phase") == "Promoted")
            if promoted and self._next(name, version):
                nexts[name] = version + 1
            elif promoted:
                at_rest += 1
        self.apply(nexts)
        self.timeline.append({"at": round(began, 2), "took": round(time.monotonic() - began, 2), "states": states,
                              "applied": nexts})  # fmt: skip
        return at_rest, in_canary


def _expected_steps(name: str, revisions: dict[int, str]) -> list[tuple[str, int]]:
    """(candidate, weight) of every split the specs ask for, in order: each step once, then the promotion (a
    superseded version has none)."""
    out: list[tuple[str, int]] = []
    for version in sorted(v for v in revisions if v >= 2):
        rev = revisions[version]
        out += [(rev, int(str(s["weight"]))) for s in (HOLD if _holds(name, version) else STEPS)]
        if not _holds(name, version):
            out.append((rev, 100))
    return out


def _splits(plans: list[dict[str, int]], revisions: dict[int, str]) -> list[tuple[str, int]]:
    """(revision, weight) of the newest revision each plan routes to (plans of v1 alone are skipped), consecutive
    repeats collapsed: the candidate's weight at each split, then 100 once promoted. A superseded candidate's plans
    are followed by the stable's alone until the next candidate serves: that is no step (the stable's promotion is
    already counted), and a restarted operator may rightly never write it."""
    newest_first = [revisions[v] for v in sorted(revisions, reverse=True) if v >= 2]
    out: list[tuple[str, int]] = []
    for plan in plans:
        newest = next((rev for rev in newest_first if rev in plan), None)
        if newest is None or out[-1:] == [(newest, plan[newest])]:
            continue
        if plan[newest] == 100 and (newest, 100) in out:
            continue  # back to the promoted stable alone
        out.append((newest, plan[newest]))
    return out


def _owned(cluster: Cluster, ns: str) -> dict[tuple[str, str], dict[str, Any]]:
    items = (get_json(cluster, KINDS, "-n", ns) or {}).get("items", [])
    return {(o["kind"], o["metadata"]["name"]): o for o in items if o["metadata"]["name"] != "kube-root-ca.crt"}


def _normalised(text: str, ns: str) -> str:
    return text.replace(ns, "<ns>")


@pytest.mark.timeout(DEADLINE_S + 300)
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
    run = Scenario(cluster, namespace, prometheus.url)
    ctl = Scenario(cluster, control_ns, prometheus.url, leader=run)
    started = time.monotonic()
    try:
        faulted.start()
        control.start()
        for scenario in (run, ctl):
            scenario.apply(dict.fromkeys(MODELS, 1))
        for ns in (namespace, control_ns):
            for name in MODELS:
                wait_ready(cluster, ns, name, timeout=120)
        # The watches start before any split is routed; the first poll applies v2 to every model.
        watches = [RouterWatch(cluster, ns) for ns in (namespace, control_ns)]
        started = time.monotonic()
        kill_at = started + rng.uniform(*KILL_AFTER_S)

        def converged() -> bool:
            """One poll of both runs; kill the faulted operator when a kill is due and a canary is in flight."""
            nonlocal kill_at
            at_rest, in_canary = run.step()
            ctl_at_rest, _ = ctl.step()
            # A kill falls due at its seeded moment and lands at the first poll that sees a canary in flight.
            if len(kills) < KILLS and time.monotonic() >= kill_at and in_canary > 0:
                faulted.kill()
                killed = time.monotonic()
                faulted.start()  # returns once the new process serves its metrics
                kills.append(f"kill {len(kills) + 1} at +{killed - started:.1f}s: {in_canary} models in a canary,"
                             f" versions {sorted(set(run.version.values()))}, restarted in"
                             f" {time.monotonic() - killed:.1f}s")  # fmt: skip
                print(kills[-1], flush=True)
                kill_at = time.monotonic() + rng.uniform(*KILL_AFTER_S)
                run.more = len(kills) < KILLS
            return len(kills) == KILLS and at_rest == ctl_at_rest == len(MODELS) and ctl.version == run.version

        try:
            wait_for(converged, DEADLINE_S, interval=0.3)
        except AssertionError:
            polls = sorted(run.timeline + ctl.timeline, key=lambda p: -p["took"])
            raise AssertionError(f"no convergence after {len(kills)} kills {kills}; versions {run.version} /"
                                 f" {ctl.version}; {len(polls)} polls, the slowest {polls[:5]}") from None  # fmt: skip
        print(f"converged after +{time.monotonic() - started:.1f}s with {len(kills)} kills; last versions "
              f"{run.version}", flush=True)  # fmt: skip
        assert len(kills) == KILLS, kills
        assert ctl.version == run.version, (run.version, ctl.version)
        assert run.step()[0] == ctl.step()[0] == len(MODELS), (run.version, kills)
        # At least one update per model, each with a canary (every model went through two versions or more).
        assert min(run.version.values()) >= 3, run.version

        # Owned objects: the same set as the control's (names are derived from the spec, which both runs share),
        # each owned by its model, nothing of an older version left once both have drained.
        uids = {ns: {o["metadata"]["name"]: o["metadata"]["uid"]
                     for o in get_json(cluster, "recommendermodels", "-n", ns)["items"]}
                for ns in (namespace, control_ns)}  # fmt: skip
        wait_for(lambda: set(_owned(cluster, namespace)) == set(_owned(cluster, control_ns)), 60,
                 message="the faulted run's objects differ from the control's")  # fmt: skip
        for ns in (namespace, control_ns):
            objects = _owned(cluster, ns)
            for (kind, obj_name), obj in objects.items():
                refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r["kind"] == "RecommenderModel"]
                assert len(refs) == 1 and refs[0].get("controller") is True, (ns, kind, obj_name, refs)
                assert refs[0]["uid"] == uids[ns].get(refs[0]["name"]), (ns, kind, obj_name, refs)
            for name in MODELS:
                old = {rev for v, rev in run.revisions[name].items() if v < run.version[name]}
                stale = [k for k, o in objects.items()
                         if (o["metadata"].get("labels") or {}).get("recserve.dev/revision") in old]  # fmt: skip
                assert not stale, (ns, name, stale)

        for watch in watches:
            watch.stop()
        faulted_plans, control_plans = (w.plans for w in watches)
        for name in MODELS:
            revs = run.revisions[name]
            assert revs == ctl.revisions[name]  # the same specs give the same revisions
            expected = _expected_steps(name, revs)
            # Every traffic step once, in the spec's order: none skipped, none repeated, none gone back to.
            for run_name, plans in (("faulted", faulted_plans[name]), ("control", control_plans[name])):
                got = _splits(plans, revs)
                if got != expected:
                    (tmp_path / f"{name}-{run_name}-plans.json").write_text(
                        json.dumps({"revisions": revs, "plans": plans, "splits": got, "expected": expected}, indent=1)
                    )
                assert got == expected, f"{name} ({run_name}): splits {got}\nexpected {expected}\nplans {plans}"
            # The final router configuration is the uninterrupted run's.
            cms = [get_json(cluster, "configmap", f"{name}-router", "-n", ns) for ns in (namespace, control_ns)]
            data = [{k: _normalised(v, ns) for k, v in cm["data"].items()}
                    for cm, ns in zip(cms, (namespace, control_ns), strict=True)]  # fmt: skip
            assert data[0] == data[1], name
    finally:
        timeline = {"started": started, "kills": kills, "faulted": run.timeline, "control": ctl.timeline}
        (tmp_path / "timeline.json").write_text(json.dumps(timeline))
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
