"""Faults on real pods: a candidate whose Triton crash-loops mid-canary, and the real node removed and re-added.

The operator runs as a local process (this checkout's code) against the real control plane; its Triton, builder
and router pods run on the real node with the project's images. Version 1 and 2 of a small ONNX scorer are built
by the revision pods' init containers and served by the CPU Triton.

Crash loop: at its first step (50%, a long pause) the candidate's model repository loses its model and Triton is
told to stop; restarted by the kubelet, the real Triton fails to load the model and exits, again and again
(CrashLoopBackOff). The operator rolls the candidate back, naming the crash loop, and stable keeps serving.

Node removed: the real node's kubelet stops and its Node object is deleted (a machine lost). The control plane
deletes its pods, new ones wait for a node; the model says Ready=False with the scheduler's reason meanwhile.
Re-added (kubelet registers again), the revision's pods are scheduled there again and the model is Ready.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from recserve_operator.names import REVISION_LABEL

from recserve_cluster import nodeconfig as nc
from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster, KwokProvider, get_provider, real_node_enabled
from tests.helpers import wait_for
from tests.integration.conftest_operator import OperatorProcess, condition, install_crd
from tests.integration.realpods import MODEL, NODE, apply, get, placement, recommender_model, run_client_pod
from tests.integration.test_rollback_realpods import write_item_scorer

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "2Gi"}
ENV = {
    # The images the chart would give the operator, all built for and loaded on the real node.
    "RECSERVE_TRITON_IMAGE": "nvcr.io/nvidia/tritonserver:25.10-py3",
    "RECSERVE_BUILDER_IMAGE": "ghcr.io/recserve/model-repo-builder:0.1.0",
    "RECSERVE_ROUTER_NODE_SELECTOR": json.dumps(placement()["nodeSelector"]),
    "RECSERVE_ROUTER_TOLERATIONS": json.dumps(placement()["tolerations"]),
}
# One request for the scorer (user FP32 [1, 8], item_id INT64 [1, 1]) through the model's endpoint.
INFER = """
import json, os, urllib.request
body = {"inputs": [{"name": "user", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8},
                   {"name": "item_id", "shape": [1, 1], "datatype": "INT64", "data": [3]}]}
req = urllib.request.Request(os.environ["URL"], data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=30) as resp:
    print(json.dumps({"variant": resp.headers.get("X-RecServe-Variant"), "body": json.loads(resp.read())}))
"""


def _spec(version: int) -> dict[str, Any]:
    rm = recommender_model(f"pvc://models/{MODEL}/{version}/model.onnx", version, model={"format": "onnx"},
                           serving={"resources": RESOURCES},
                           rollout={"steps": [{"weight": 50, "pause": "10m"}]})  # fmt: skip
    del rm["spec"]["rollout"]["analysis"]  # the pause holds the first step; no Prometheus is asked
    return rm


@dataclass
class Served:
    cluster: Cluster
    ns: str
    operator: OperatorProcess


def _status(s: Served) -> dict[str, Any]:
    return dict((get(s.cluster, "recommendermodel", MODEL, "-n", s.ns) or {}).get("status") or {})


def _ready(s: Served) -> dict[str, Any] | None:
    st = _status(s)
    ready = condition({"status": st}, "Ready")
    bad = [c for c in st.get("conditions", []) if c.get("reason") in ("BuildFailed", "InvalidSpec", "FetchFailed")]
    assert not bad, bad
    return st if ready and ready["status"] == "True" and st.get("phase") in ("Ready", "Degraded") else None


def _infer(s: Served) -> dict[str, Any]:
    url = f"{_status(s)['endpoints']['http']}/v2/models/{MODEL}/infer"
    answer: dict[str, Any] = json.loads(run_client_pod(s.cluster, s.ns, INFER, env={"URL": url}).splitlines()[-1])
    assert answer["body"]["outputs"][0]["name"] == "score", answer
    return answer


def _pods(s: Served, revision: str) -> list[dict[str, Any]]:
    items = (get(s.cluster, "pods", "-n", s.ns, "-l", f"{REVISION_LABEL}={revision}") or {}).get("items", [])
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


@pytest.fixture(scope="module")
def served(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The operator process watching a new namespace where version 1 is served (Ready) on the real node."""
    if cluster.provider == "kwok" and not real_node_enabled():
        pytest.skip("RECSERVE_REAL_NODE=0: the kwok-only cluster runs no containers")
    install_crd(cluster)
    tmp = tmp_path_factory.mktemp("faults")
    ns = f"t-faults-real-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "recserve.dev/test=true")
    operator = OperatorProcess(cluster, ns, tmp / "operator.log", extra_env=ENV)
    try:
        files = {
            f"{MODEL}/{v}/model.onnx": write_item_scorer(tmp / str(v) / "model.onnx", 1000, seed=v) for v in (1, 2)
        }
        volumes.upload(cluster, ns, "models", NODE, files)
        operator.start()
        s = Served(cluster, ns, operator)
        apply(cluster, {**_spec(1), "metadata": {"name": MODEL, "namespace": ns}})
        wait_for(lambda: _ready(s), 300, 2, "version 1 Ready on the real node")
        yield s
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)  # fmt: skip
        operator.stop()
        volumes.remove(cluster, ns, "models", NODE)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    log = operator.log()
    assert "Traceback" not in log, log[-5000:]


def test_a_candidate_whose_triton_crash_loops_mid_canary_is_rolled_back_and_stable_keeps_serving(
    served: Served,
) -> None:
    s, cluster = served, served.cluster
    stable = _status(s)["stable"]["revision"]
    stable_uid = get(cluster, "deployment", f"{MODEL}-{stable}", "-n", s.ns)["metadata"]["uid"]
    apply(cluster, {**_spec(2), "metadata": {"name": MODEL, "namespace": s.ns}})

    def split() -> dict[str, Any] | None:
        c = _status(s).get("canary") or {}
        ok = c.get("phase") == "Progressing" and c.get("weight") == 50 and c.get("revision") not in (None, stable)
        return c if ok else None

    cand = wait_for(split, 300, 2, "the candidate built, Available and at 50%")["revision"]
    pod = _pods(s, cand)[0]["metadata"]["name"]
    # Break the candidate's model repository and stop Triton: every restart now fails to load the model.
    # (The exec ends with its container: its exit status is not checked.)
    cluster.kubectl("exec", pod, "-n", s.ns, "-c", "triton", "--", "sh", "-c", "rm -rf /models/* && kill 1",
                    check=False)  # fmt: skip

    def crash_looping() -> str | None:
        for p in _pods(s, cand):
            for cs in p["status"].get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                code = ((cs.get("lastState") or {}).get("terminated") or {}).get("exitCode")
                # In back-off after a start of its own that failed (the kubelet restarts a first exit at once).
                if cs["name"] == "triton" and waiting.get("reason") == "CrashLoopBackOff" and code:
                    return f"exit code {code} after {cs['restartCount']} restarts"
        return None

    # Observed before the operator removes the candidate, unless it is faster than this poll: a real crash loop.
    looping = wait_for(lambda: crash_looping() or (_status(s).get("canary") or {}).get("phase") == "RolledBack",
                       120, 1, "the candidate's Triton to crash-loop")  # fmt: skip
    print(f"\n[faults on real pods] candidate triton crash-looping: {looping} (True: already rolled back)")

    def rolled_back() -> dict[str, Any] | None:
        c = _status(s).get("canary") or {}
        return c if c.get("phase") == "RolledBack" else None

    canary = wait_for(rolled_back, 180, 1, "the operator to roll the crash-looping candidate back")
    assert canary["revision"] == cand and "CrashLoopBackOff" in canary["message"], canary
    st = _status(s)
    ready, degraded = condition({"status": st}, "Ready"), condition({"status": st}, "Degraded")
    assert st["stable"]["revision"] == stable and ready is not None and ready["status"] == "True", st
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", "RolledBack"), degraded
    events = cluster.kubectl("get", "events", "-n", s.ns, "--field-selector", "reason=RolledBack").stdout
    assert "CrashLoopBackOff" in events, events
    # Stable kept serving: the same Deployment, all the traffic, and it answers through the router.
    assert get(cluster, "deployment", f"{MODEL}-{stable}", "-n", s.ns)["metadata"]["uid"] == stable_uid

    def stable_only() -> bool:
        cm = get(cluster, "configmap", f"{MODEL}-router", "-n", s.ns) or {}
        backends = json.loads((cm.get("data") or {}).get("plan.json") or "{}").get("backends", [])
        return [(b["revision"], b["weight"]) for b in backends] == [(stable, 100)]

    wait_for(stable_only, 60, 1, "the router plan to send everything to stable")
    wait_for(lambda: get(cluster, "deployment", f"{MODEL}-{cand}", "-n", s.ns) is None, 180, 2,
             "the rolled-back candidate's Deployment to be removed")  # fmt: skip
    assert _infer(s)["variant"] == "stable"


def _kwok_with_node() -> KwokProvider:
    provider = get_provider()
    if not isinstance(provider, KwokProvider) or not provider.real_node:
        pytest.skip("only the local provider starts (and so may remove) the real node")
    return provider


def _wait_system_pods(cluster: Cluster) -> None:
    """The add-ons on the real node (CoreDNS, Prometheus, adapters) are Running and Ready again."""
    for ns in ("kube-system", "monitoring"):

        def ready(ns: str = ns) -> bool:
            pods = (get(cluster, "pods", "-n", ns) or {}).get("items", [])
            return bool(pods) and all(
                any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                for p in pods
                if not p["metadata"].get("deletionTimestamp")
                and p["status"].get("phase") not in ("Succeeded", "Failed")
            )

        wait_for(ready, 240, 2, f"the pods in {ns} to be Ready again")


def test_the_real_node_removed_and_readded_reschedules_the_revisions_and_status_says_so_meanwhile(
    served: Served,
) -> None:
    s, cluster = served, served.cluster
    provider = _kwok_with_node()
    st = wait_for(lambda: _ready(s), 120, 2, "the model Ready before the node goes")
    stable = st["stable"]["revision"]
    before = {p["metadata"]["uid"] for p in _pods(s, stable)}
    assert before
    try:
        provider.node.remove(cluster)

        def says_unschedulable() -> dict[str, Any] | None:
            cond = condition({"status": _status(s)}, "Ready")
            if cond is None or cond["status"] != "False" or cond["reason"] not in ("Unschedulable", "InsufficientGPU"):
                return None
            return cond if stable in cond["message"] else None

        # The pod GC deletes the pods of a node that no longer exists (after its 40 s quarantine); their
        # replacements cannot be scheduled anywhere: the real node's GPU product is on no other node.
        cond = wait_for(says_unschedulable, 180, 2, "Ready=False naming the unschedulable revision")
        assert "cannot be scheduled" in cond["message"], cond
        assert _status(s)["phase"] != "Ready"
    finally:
        provider.node.readd(cluster)  # even on failure: the node and its add-ons come back for the next tests
        _wait_system_pods(cluster)
    st = wait_for(lambda: _ready(s), 300, 2, "the model Ready again on the re-added node")
    assert st["stable"]["revision"] == stable
    now = _pods(s, stable)
    assert now and not {p["metadata"]["uid"] for p in now} & before, "the revision's pods were not replaced"
    assert all(p["spec"]["nodeName"] == nc.NODE_NAME for p in now)
    assert _infer(s)["variant"] == "stable"
