"""Canary rollouts driven by the operator process: supersede, restart mid-canary, manual rollout actions."""

from __future__ import annotations

import json
import time
from pathlib import Path
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
ACTION = "recserve.dev/rollout-action"


def _canary(name: str, version: int, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return kwok_model(name, version, rollout={"strategy": "canary", "steps": steps})


def _canary_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(((model(cluster, ns, name) or {}).get("status") or {}).get("canary") or {})


def _at(
    cluster: Cluster, ns: str, name: str, step: int, weight: int, *, revision: str | None = None
) -> dict[str, Any] | None:
    """status.canary when the rollout of `revision` (any when None) is Progressing at `step` with `weight`."""
    c = _canary_status(cluster, ns, name)
    ok = c.get("phase") == "Progressing" and c.get("step") == step and c.get("weight") == weight
    return c if ok and (revision is None or c.get("revision") == revision) else None


def _plan(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    cm = get_json(cluster, "configmap", f"{name}-router", "-n", ns)
    if not cm or "plan.json" not in (cm.get("data") or {}):
        return None
    plan: dict[str, Any] = json.loads(cm["data"]["plan.json"])
    return plan


def _weights(plan: dict[str, Any] | None) -> dict[str, int]:
    """revision -> weight of a router plan."""
    return {b["revision"]: int(b["weight"]) for b in (plan or {}).get("backends", [])}


def _revisions(cluster: Cluster, ns: str, name: str, kinds: str) -> set[str]:
    labels = [o["metadata"].get("labels") or {} for o in owned(cluster, ns, name, kinds)]
    return {lab[REVISION] for lab in labels if REVISION in lab}


def _reconciles(op: OperatorProcess) -> float:
    return (op.metrics() or {}).get("recserve_reconciles_total", 0.0)


def _after_reconciles(op: OperatorProcess, n: int, timeout: float = 60, check: Any = None) -> None:
    """Wait until the operator has run `n` more reconciles (resyncs included); `check()` runs at every poll."""
    target = _reconciles(op) + n

    def done() -> bool:
        if check is not None:
            check()
        return _reconciles(op) >= target

    wait_for(done, timeout, message=f"operator did not reconcile {n} more times")


def _annotations(cluster: Cluster, ns: str, name: str) -> dict[str, str]:
    return dict(((model(cluster, ns, name) or {}).get("metadata") or {}).get("annotations") or {})


def _act(cluster: Cluster, ns: str, name: str, action: str) -> None:
    cluster.kubectl("annotate", "rm", name, "-n", ns, f"{ACTION}={action}", "--overwrite")


def _wait_action_cleared(cluster: Cluster, ns: str, name: str) -> None:
    wait_for(lambda: ACTION not in _annotations(cluster, ns, name), 30,
             message="the handled rollout action annotation was not cleared")  # fmt: skip


def test_a_new_revision_supersedes_a_canary_in_progress(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    steps = [{"weight": 20, "pause": "3s"}, {"weight": 50, "pause": "10m"}]
    apply_yaml(cluster, namespace, _canary("sup", 1, steps))
    stable = wait_ready(cluster, namespace, "sup")["status"]["stable"]["revision"]

    apply_yaml(cluster, namespace, _canary("sup", 2, steps))
    b = wait_for(lambda: _at(cluster, namespace, "sup", 1, 50), 60, message="B never reached step 1")["revision"]
    assert b != stable
    assert _weights(_plan(cluster, namespace, "sup")) == {stable: 50, b: 50}
    stable_dep = get_json(cluster, "deployment", f"sup-{stable}", "-n", namespace)

    # Revision C, with a long first step so step 0 can be observed.
    apply_yaml(cluster, namespace, _canary("sup", 3, [{"weight": 20, "pause": "10m"}, {"weight": 50, "pause": "10m"}]))
    c_status = wait_for(
        lambda: (c := _at(cluster, namespace, "sup", 0, 20)) and c["revision"] not in (b, stable) and c,
        60,
        message="C never became the canary at step 0",
    )
    c = c_status["revision"]
    assert c_status["stableRevision"] == stable
    wait_for(lambda: b not in _revisions(cluster, namespace, "sup", "deployments,services,configmaps,pdb"), 60,
             message="B's objects were not removed")  # fmt: skip
    assert _revisions(cluster, namespace, "sup", "deployments") == {stable, c}
    assert _weights(_plan(cluster, namespace, "sup")) == {stable: 80, c: 20}

    def b_never_routed() -> None:
        plan = _plan(cluster, namespace, "sup")
        assert plan is not None and b not in json.dumps(plan), plan
        assert _canary_status(cluster, namespace, "sup").get("revision") == c

    _after_reconciles(operator, 4, check=b_never_routed)
    obj = model(cluster, namespace, "sup")
    assert obj is not None and obj["status"]["stable"]["revision"] == stable
    # The stable revision was not touched: same Deployment object, same spec.
    live = get_json(cluster, "deployment", f"sup-{stable}", "-n", namespace)
    assert live["metadata"]["uid"] == stable_dep["metadata"]["uid"]
    assert live["metadata"]["generation"] == stable_dep["metadata"]["generation"]
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=Superseded").stdout
    assert c in events and b in events


def test_an_operator_restart_mid_canary_resumes_at_the_same_step_without_moving_traffic(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    steps = [{"weight": 20, "pause": "2s"}, {"weight": 50, "pause": "10m"}]
    apply_yaml(cluster, namespace, _canary("rst", 1, steps))
    stable = wait_ready(cluster, namespace, "rst")["status"]["stable"]["revision"]
    apply_yaml(cluster, namespace, _canary("rst", 2, steps))
    wait_for(lambda: _at(cluster, namespace, "rst", 1, 50), 60, message="canary never reached step 1")
    # Let the step-1 writes settle (router, status) before recording.
    _after_reconciles(operator, 2)

    operator.kill()
    before = _canary_status(cluster, namespace, "rst")
    plan_cm = get_json(cluster, "configmap", "rst-router", "-n", namespace)
    deployments = sorted(o["metadata"]["name"] for o in owned(cluster, namespace, "rst", "deployments"))
    assert _weights(json.loads(plan_cm["data"]["plan.json"])) == {stable: 50, before["revision"]: 50}

    operator.start()
    # A fresh process: its counter starts at 0; the resume handler plus a few 2 s resyncs.
    wait_for(lambda: _reconciles(operator) >= 4, 60, message="the restarted operator did not reconcile")
    after = _canary_status(cluster, namespace, "rst")
    for key in ("phase", "revision", "stableRevision", "step", "weight", "stepStartedAt", "startedAt", "paused"):
        assert after.get(key) == before.get(key), (key, before, after)
    now_cm = get_json(cluster, "configmap", "rst-router", "-n", namespace)
    assert now_cm["data"] == plan_cm["data"]
    assert now_cm["metadata"]["resourceVersion"] == plan_cm["metadata"]["resourceVersion"], "router was rewritten"
    assert sorted(o["metadata"]["name"] for o in owned(cluster, namespace, "rst", "deployments")) == deployments
    assert len(deployments) == 2  # stable and canary, one each (the router is its own instance)
    assert get_json(cluster, "deployment", "rst-router", "-n", namespace) is not None


def test_manual_pause_resume_and_promote_through_the_rollout_action_annotation(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    steps = [{"weight": 20, "pause": "6s"}, {"weight": 50, "pause": "10m"}]
    apply_yaml(cluster, namespace, _canary("man", 1, steps))
    stable = wait_ready(cluster, namespace, "man")["status"]["stable"]["revision"]
    apply_yaml(cluster, namespace, _canary("man", 2, steps))
    cand = wait_for(lambda: _at(cluster, namespace, "man", 0, 20), 60, message="canary never reached 20%")
    rev = cand["revision"]

    # pause: the weight stays at 20% well past the step's 6 s pause.
    _act(cluster, namespace, "man", "pause")
    wait_for(lambda: _canary_status(cluster, namespace, "man").get("paused") is True, 30, message="not paused")
    _wait_action_cleared(cluster, namespace, "man")
    end = time.monotonic() + 10

    def still_paused() -> bool:
        c = _canary_status(cluster, namespace, "man")
        assert c["paused"] is True and c["step"] == 0 and c["weight"] == 20, c
        assert _weights(_plan(cluster, namespace, "man")) == {stable: 80, rev: 20}
        return time.monotonic() >= end

    wait_for(still_paused, 30, message="pause window")

    # resume: the step restarts its pause, then the canary advances to step 1.
    _act(cluster, namespace, "man", "resume")
    wait_for(lambda: _canary_status(cluster, namespace, "man").get("paused") is False, 30, message="not resumed")
    _wait_action_cleared(cluster, namespace, "man")
    wait_for(lambda: _at(cluster, namespace, "man", 1, 50, revision=rev), 60, message="did not advance after resume")
    assert _weights(_plan(cluster, namespace, "man")) == {stable: 50, rev: 50}

    # promote: immediately stable = candidate (the 10 m pause is skipped), the old revision goes.
    _act(cluster, namespace, "man", "promote")
    obj = wait_for(
        lambda: (o := model(cluster, namespace, "man")) and o["status"]["stable"]["revision"] == rev and o,
        30,
        message="promote was not applied",
    )
    assert obj["status"]["canary"]["phase"] == "Promoted"
    _wait_action_cleared(cluster, namespace, "man")
    wait_for(lambda: _weights(_plan(cluster, namespace, "man")) == {rev: 100}, 30, message="router kept the old")
    wait_for(lambda: _revisions(cluster, namespace, "man", "deployments,services,configmaps,pdb") == {rev}, 60,
             message="the old stable revision was not removed")  # fmt: skip
    reasons = cluster.kubectl("get", "events", "-n", namespace, "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"Paused", "Resumed", "Promoted"} <= set(reasons), reasons


def _router_cm(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    return get_json(cluster, "configmap", f"{name}-router", "-n", ns) if _plan(cluster, ns, name) else None


def _stable_endpoint(cluster: Cluster, ns: str, name: str) -> bool:
    status = (model(cluster, ns, name) or {}).get("status") or {}
    return str((status.get("endpoints") or {}).get("http", "")).startswith(f"http://{name}.{ns}.svc")


def test_a_router_edit_is_corrected_by_its_event_and_a_switch_to_immediate_removes_the_router(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    """The router's objects belong to their model (label recserve.dev/model): an edit to one reconciles the model
    at once (the resync is too slow to be what corrects it here), and once the spec goes back to `immediate` the
    router's ConfigMap, Deployment and Service are deleted and the endpoints name the stable Service again."""
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log", resync_seconds=600)
    op.start()
    try:
        apply_yaml(crd, namespace, _canary("sw", 1, [{"weight": 20, "pause": "10m"}]))
        wait_ready(crd, namespace, "sw")
        served = wait_for(lambda: _router_cm(crd, namespace, "sw"), 60, message="no router ConfigMap")
        assert served["metadata"]["labels"]["recserve.dev/model"] == "sw"
        edit = json.dumps({"data": {"nginx.conf": "# edited by hand"}})
        crd.kubectl("patch", "configmap", "sw-router", "-n", namespace, "--type=merge", "-p", edit)
        wait_for(lambda: (_router_cm(crd, namespace, "sw") or {}).get("data") == served["data"], 30,
                 message="the edited router ConfigMap was not restored")  # fmt: skip

        apply_yaml(crd, namespace, kwok_model("sw", 1, rollout={"strategy": "immediate"}))
        kinds = ("configmap", "deployment", "service")
        wait_for(lambda: not any(get_json(crd, kind, "sw-router", "-n", namespace) for kind in kinds), 60,
                 message="the router outlived the switch to immediate")  # fmt: skip
        wait_for(lambda: _stable_endpoint(crd, namespace, "sw"), 30, message="endpoints still name the router")
        assert wait_ready(crd, namespace, "sw")["status"]["phase"] == "Ready"
    finally:
        op.stop()
    assert "Traceback" not in op.log(), op.log()[-5000:]
