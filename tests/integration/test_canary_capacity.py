"""Capacity-aware canary, driven by the operator process on the kwok cluster: a 10% canary of a 4-replica model holds
5 GPUs (not 8), a promotion never holds more, and an abort has the stable back at 4 Ready before the candidate goes.

Run with `pytest -s` to see the GPU counts measured (issue 12, item 2).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    OperatorProcess,
    apply_yaml,
    get_json,
    kwok_model,
    model,
    owned,
    wait_ready,
)

pytestmark = pytest.mark.integration

REVISION = "recserve.dev/revision"
INSTANCE = "app.kubernetes.io/instance"
ACTION = "recserve.dev/rollout-action"
GPU = "nvidia.com/gpu"
# The gpu-h100 kwok node has 8 GPUs; gpu-a10g has 4, fewer than the 5 a 10% canary of 4 replicas holds.
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
REPLICAS = 4
SURGE = 1


def _model(name: str, version: int, steps: list[dict[str, Any]]) -> dict[str, Any]:
    # No analysis: steps advance on their pauses alone, and an hour holds the first one.
    return kwok_model(name, version, serving={"replicas": REPLICAS, "gpuProduct": GPU_PRODUCT},
                      rollout={"strategy": "canary", "steps": steps, "routing": {"provider": "builtin"}})


def _pod_gpus(pod: dict[str, Any]) -> int:
    """A pod's effective nvidia.com/gpu request: its containers' sum, or its largest init container's."""
    spec = pod.get("spec") or {}

    def request(c: dict[str, Any]) -> int:
        return int(((c.get("resources") or {}).get("requests") or {}).get(GPU, 0))

    return max(sum(map(request, spec.get("containers") or [])), max(map(request, spec.get("initContainers") or []),
                                                                     default=0))  # fmt: skip


def _gpus(cluster: Cluster, ns: str, name: str) -> dict[str, int]:
    """revision -> GPUs requested by the model's non-terminating pods (Pending ones too: they hold the request)."""
    pods = get_json(cluster, "pods", "-n", ns, "-l", f"{INSTANCE}={name}") or {"items": []}
    held: dict[str, int] = {}
    for pod in pods["items"]:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        rev = (meta.get("labels") or {}).get(REVISION, "?")
        held[rev] = held.get(rev, 0) + _pod_gpus(pod)
    return held


def _canary(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(((model(cluster, ns, name) or {}).get("status") or {}).get("canary") or {})


def _plan(cluster: Cluster, ns: str, name: str) -> dict[str, int]:
    """revision -> weight of the router plan."""
    cm = get_json(cluster, "configmap", f"{name}-router", "-n", ns)
    if not cm or "plan.json" not in (cm.get("data") or {}):
        return {}
    return {b["revision"]: int(b["weight"]) for b in json.loads(cm["data"]["plan.json"])["backends"]}


def _router_rolled(cluster: Cluster, ns: str, name: str) -> bool:
    """Every router pod runs the router Deployment's current template (so the plan in its ConfigMap)."""
    dep = get_json(cluster, "deployment", f"{name}-router", "-n", ns)
    if not dep:
        return False
    st, n = dep.get("status") or {}, int(dep["spec"].get("replicas", 1))
    current = int(st.get("observedGeneration", 0)) >= int(dep["metadata"].get("generation", 1))
    return current and st.get("updatedReplicas") == st.get("replicas") == n and st.get("availableReplicas", 0) >= n


def _deployments(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """revision -> the model's Deployment of that revision (not terminating)."""
    return {
        o["metadata"]["labels"][REVISION]: o
        for o in owned(cluster, ns, name, "deployments")
        if REVISION in (o["metadata"].get("labels") or {}) and not o["metadata"].get("deletionTimestamp")
    }


def _ready(dep: dict[str, Any] | None) -> int:
    return int(((dep or {}).get("status") or {}).get("readyReplicas") or 0)


def _act(cluster: Cluster, ns: str, name: str, action: str) -> None:
    cluster.kubectl("annotate", "rm", name, "-n", ns, f"{ACTION}={action}", "--overwrite")


def _canary_served(cluster: Cluster, ns: str, name: str, step: int, weight: int) -> tuple[str, str] | None:
    """(stable, candidate) once the canary is at `step` with `weight` and the router pods serve that split."""
    c = _canary(cluster, ns, name)
    if c.get("phase") != "Progressing" or (c.get("step"), c.get("weight"), c.get("servedWeight")) != (
        step, weight, weight,
    ):  # fmt: skip
        return None
    stable, cand = c["stableRevision"], c["revision"]
    ok = _plan(cluster, ns, name) == {stable: 100 - weight, cand: weight} and _router_rolled(cluster, ns, name)
    return (stable, cand) if ok else None


def _start(cluster: Cluster, ns: str, name: str, weight: int) -> tuple[str, str]:
    """v1 Ready at 4 replicas, then v2 as a canary until the router serves its first step's `weight`."""
    steps = [{"weight": weight, "pause": "1h"}]
    apply_yaml(cluster, ns, _model(name, 1, steps))
    stable = wait_ready(cluster, ns, name, timeout=120)["status"]["stable"]["revision"]
    wait_for(lambda: _ready(_deployments(cluster, ns, name).get(stable)) == REPLICAS, 120,
             message=f"the stable never had {REPLICAS} Ready replicas")  # fmt: skip
    apply_yaml(cluster, ns, _model(name, 2, steps))
    revisions = wait_for(lambda: _canary_served(cluster, ns, name, 0, weight), 180,
                         message=f"the router never served the canary's {weight}%")  # fmt: skip
    assert revisions[0] == stable
    return revisions


def test_a_10_percent_canary_of_4_replicas_holds_5_gpus_and_its_promotion_never_more(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster, name = operator.cluster, "cap"
    stable, cand = _start(cluster, namespace, name, 10)
    held = wait_for(lambda: (g := _gpus(cluster, namespace, name)) == {stable: REPLICAS, cand: 1} and g, 60,
                    message="the 10% split's pods did not settle at stable 4 + canary 1")  # fmt: skip
    deps = _deployments(cluster, namespace, name)
    assert (deps[stable]["spec"]["replicas"], deps[cand]["spec"]["replicas"]) == (REPLICAS, 1)
    print(f"\nGPUs held during the 10% canary of {REPLICAS} replicas: {sum(held.values())} "
          f"(stable {held[stable]} + canary {held[cand]}; a canary copying spec.serving.replicas: {2 * REPLICAS})")
    assert sum(held.values()) == REPLICAS + SURGE

    _act(cluster, namespace, name, "promote")
    samples: list[dict[str, int]] = []

    def promoted() -> bool:
        samples.append(_gpus(cluster, namespace, name))
        deps = _deployments(cluster, namespace, name)
        c = _canary(cluster, namespace, name)
        return (
            c.get("phase") == "Promoted" and not c.get("retiringRevision") and set(deps) == {cand}
            and _ready(deps[cand]) == REPLICAS and _plan(cluster, namespace, name) == {cand: 100}
        )  # fmt: skip

    wait_for(promoted, 240, interval=0.2, message="the promotion did not finish")
    totals = [sum(s.values()) for s in samples]
    print(f"GPUs held during the promotion: at most {max(totals)} over {len(totals)} polls; "
          f"sequence (old, new): {list(dict.fromkeys((s.get(stable, 0), s.get(cand, 0)) for s in samples))}")
    over = [s for s in samples if sum(s.values()) > REPLICAS + SURGE]
    assert not over, f"polls holding more than {REPLICAS + SURGE} GPUs: {over}"
    assert _deployments(cluster, namespace, name)[cand]["spec"]["replicas"] == REPLICAS
    assert stable not in _deployments(cluster, namespace, name)
    assert model(cluster, namespace, name)["status"]["stable"]["revision"] == cand  # type: ignore[index]
    wait_for(lambda: ACTION not in ((model(cluster, namespace, name) or {})["metadata"].get("annotations") or {}),
             30, message="the handled rollout action was not cleared")  # fmt: skip


@pytest.mark.parametrize("weight", [10, 50], ids=["at-10", "at-50"])
def test_an_abort_has_the_stable_back_at_4_ready_before_the_candidate_is_deleted(
    operator: OperatorProcess, namespace: str, weight: int
) -> None:
    cluster, name = operator.cluster, f"abort{weight}"
    stable, cand = _start(cluster, namespace, name, weight)
    at_abort = _deployments(cluster, namespace, name)
    print(f"\nabort at {weight}%: stable {_ready(at_abort.get(stable))} Ready, candidate "
          f"{_ready(at_abort.get(cand))} Ready, GPUs {_gpus(cluster, namespace, name)}")
    _act(cluster, namespace, name, "abort")
    started = time.monotonic()
    polls: list[tuple[float, int, bool, dict[str, int], bool]] = []  # (s, stable Ready, candidate exists, plan, rolled)

    def candidate_gone() -> bool:
        deps = _deployments(cluster, namespace, name)
        polls.append((round(time.monotonic() - started, 1), _ready(deps.get(stable)), cand in deps,
                      _plan(cluster, namespace, name), _router_rolled(cluster, namespace, name)))  # fmt: skip
        return cand not in deps

    wait_for(candidate_gone, 180, interval=0.2, message="the aborted candidate was not deleted")
    order = list(dict.fromkeys((ready, exists) for _, ready, exists, _, _ in polls))
    print(f"abort at {weight}%: (stable Ready, candidate Deployment exists) in the order polled: {order}")
    # The first look without the candidate finds the stable at its 4 Ready and the router serving it alone (the
    # looks before it show the candidate kept while the stable had fewer).
    _, ready, _, plan, rolled = polls[-1]
    assert ready == REPLICAS, f"the candidate went while the stable had {ready} Ready: {polls}"
    assert plan == {stable: 100} and rolled, f"the router did not serve the stable alone: {polls}"
    c = _canary(cluster, namespace, name)
    assert c.get("phase") == "Aborted" and c.get("servedWeight") == 0, c
    assert _deployments(cluster, namespace, name)[stable]["spec"]["replicas"] == REPLICAS
    assert model(cluster, namespace, name)["status"]["stable"]["revision"] == stable  # type: ignore[index]
