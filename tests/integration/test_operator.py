"""The operator as a process against the real control plane: examples to Ready, GPUs, rollouts, restarts, GC."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from recserve_operator.crd_schema import CRD_NAME, SCHEMA_DIGEST, SCHEMA_DIGEST_ANNOTATION, UPGRADE_COMMAND
from recserve_operator.names import REVISIONS_SERVICEMONITOR

from recserve_cluster import nodeconfig as nc
from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    ROOT,
    OperatorProcess,
    apply_yaml,
    condition,
    get_json,
    kwok_model,
    model,
    owned,
    ready_model,
    wait_ready,
)

pytestmark = pytest.mark.integration

EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))
NODE_FOR_PRODUCT = {"NVIDIA-A10G": "gpu-a10g", "NVIDIA-H100-80GB-HBM3": "gpu-h100"}
REVISION = "recserve.dev/revision"


def _example(path: Path) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "RecommenderModel")


def _on_kwok(path: Path) -> bool:
    # An example for the real node's GPU product runs real containers there: test_first_install serves it.
    return bool(_example(path)["spec"]["serving"].get("gpuProduct") != nc.REAL_NODE.gpu_product)


KWOK_EXAMPLES = [p for p in EXAMPLES if _on_kwok(p)]


def _small(name: str, version: int = 3, **serving: Any) -> dict[str, Any]:
    return kwok_model(name, version, serving=serving)


def _pods(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    result = get_json(cluster, "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}")
    return [p for p in result["items"] if not p["metadata"].get("deletionTimestamp")] if result else []


def _source_uris(doc: dict[str, Any]) -> list[str]:
    model = doc["spec"]["model"]
    calibration = (doc["spec"].get("optimize") or {}).get("calibration") or {}
    return [u for u in (model.get("uri"), calibration.get("uri")) if u]


@pytest.mark.parametrize("path", KWOK_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_every_example_reaches_ready_on_the_right_nodes(operator: OperatorProcess, namespace: str, path: Path) -> None:
    cluster = operator.cluster
    doc = _example(path)
    name = doc["metadata"]["name"]
    # pvc:// sources are mounted into the builder: their claims must exist and be bound for the pod to schedule.
    claims = {u.removeprefix("pvc://").split("/")[0] for u in _source_uris(doc) if u.startswith("pvc://")}
    for claim in claims:
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
            volumes.claim_objects(namespace, claim, None, "/var/tmp/recserve-pv")))  # fmt: skip
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", str(path))
        obj = wait_ready(cluster, namespace, name)
    finally:
        for claim in claims:  # PersistentVolumes are cluster-scoped: the namespace's deletion keeps them
            cluster.kubectl("delete", "pv", f"{namespace}-{claim}", "--wait=false", "--ignore-not-found", check=False)

    rev = obj["status"]["stable"]["revision"]
    assert obj["status"]["latestRevision"] == rev
    # Progressive strategies put the built-in router in front; immediate serves from the front Service.
    progressive = doc["spec"].get("rollout", {}).get("strategy", "immediate") != "immediate"
    host = f"{name}-router" if progressive else name
    assert obj["status"]["endpoints"]["http"] == f"http://{host}.{namespace}.svc.cluster.local:8000"
    assert {c["type"] for c in obj["status"]["conditions"]} >= {
        "Ready",
        "ModelRepositoryReady",
        "Progressing",
        "Degraded",
    }
    front = get_json(cluster, "service", name, "-n", namespace)
    assert front["spec"]["selector"][REVISION] == rev
    product = doc["spec"]["serving"].get("gpuProduct")
    expected_node = NODE_FOR_PRODUCT[product] if product else "cpu-0"
    pods = _pods(cluster, namespace, name)
    assert pods and {p["spec"]["nodeName"] for p in pods} == {expected_node}
    # One ServiceMonitor for the namespace's revisions, none per model.
    _require_servicemonitors(cluster)
    monitors = get_json(cluster, "servicemonitors.monitoring.coreos.com", "-n", namespace)["items"]
    assert [m["metadata"]["name"] for m in monitors] == [REVISIONS_SERVICEMONITOR]
    assert monitors[0]["spec"]["endpoints"][0]["port"] == "metrics"
    columns = cluster.kubectl("get", "rm", name, "-n", namespace).stdout
    assert columns.split("\n")[0].split()[:6] == ["NAME", "PHASE", "BACKEND", "STABLE", "CANARY", "READY"]
    assert "Ready" in columns.split("\n")[1]


def test_more_gpus_than_exist_reports_insufficient_gpu(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("too-big", resources={"gpu": 16, "cpu": "1", "memory": "1Gi"}))

    def insufficient() -> dict[str, Any] | None:
        obj = model(cluster, namespace, "too-big")
        cond = condition(obj, "Ready")
        return obj if cond and cond["reason"] == "InsufficientGPU" else None

    obj = wait_for(insufficient, 60, message="Ready never reported InsufficientGPU")
    assert "Insufficient nvidia.com/gpu" in condition(obj, "Ready")["message"]  # type: ignore[index]
    assert condition(obj, "Degraded")["status"] == "True"  # type: ignore[index]
    assert obj["status"]["phase"] == "Pending"
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=InsufficientGPU").stdout
    assert "too-big" in events


def test_an_invalid_spec_the_schema_cannot_catch_reports_invalid_spec(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("dup-batch", dynamicBatching={"preferredBatchSizes": [64, 64]}))

    def invalid() -> dict[str, Any] | None:
        obj = model(cluster, namespace, "dup-batch")
        cond = condition(obj, "Ready")
        return obj if cond and cond["reason"] == "InvalidSpec" else None

    obj = wait_for(invalid, 60, message="Ready never reported InvalidSpec")
    assert "must not repeat" in condition(obj, "Ready")["message"]  # type: ignore[index]
    assert obj["status"]["phase"] == "Failed"
    assert owned(cluster, namespace, "dup-batch") == []


def _update_version(cluster: Cluster, ns: str, name: str, version: int) -> None:
    patch = {"spec": {"model": {"uri": f"s3://models/{name}/{version}", "version": version}}}
    cluster.kubectl("patch", "rm", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


def _revisions(cluster: Cluster, ns: str, name: str) -> set[str]:
    return {o["metadata"]["labels"][REVISION] for o in owned(cluster, ns, name, "deployments")}


def test_an_update_rolls_a_new_revision_and_removes_the_old(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("roll", replicas=2))
    old = wait_ready(cluster, namespace, "roll")["status"]["stable"]["revision"]

    _update_version(cluster, namespace, "roll", 4)
    obj = wait_for(
        lambda: (o := ready_model(cluster, namespace, "roll")) and o["status"]["stable"]["revision"] != old and o,
        90,
        message="new revision never became stable",
    )
    new = obj["status"]["stable"]["revision"]
    assert obj["status"]["stable"]["modelVersion"] == 4
    wait_for(lambda: _revisions(cluster, namespace, "roll") == {new}, 60, message="old revision was not removed")
    names = sorted(o["kind"] + "/" + o["metadata"]["name"] for o in owned(cluster, namespace, "roll"))
    assert names == sorted(
        [
            f"ConfigMap/roll-{new}",
            f"Deployment/roll-{new}",
            f"PodDisruptionBudget/roll-{new}",
            f"Service/roll-{new}",
            "Service/roll",
        ]
    )
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=Promoted").stdout
    assert new in events


def test_operator_restart_mid_rollout_converges_without_duplicates(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("restart"))
    old = wait_ready(cluster, namespace, "restart")["status"]["stable"]["revision"]

    _update_version(cluster, namespace, "restart", 5)

    # The two revisions stand side by side for ~1.3 s on kwok; polling the API with kubectl (0.2-0.5 s a call on a
    # busy machine) could miss that window. The operator's own log line shows the new Deployment the moment it is
    # created, so the kill lands while the old revision is still there (asserted below).
    def created_new() -> bool:
        lines = operator.log_path.read_text(errors="replace").splitlines()
        return sum(f"Created Deployment namespace={namespace} name=restart-" in line for line in lines) >= 2

    wait_for(created_new, 60, 0.05, message="new revision not created")
    operator.kill()
    deleted_old = f"Deleted Deployment namespace={namespace} name=restart-{old}"
    assert deleted_old not in operator.log_path.read_text(errors="replace"), "the rollout finished before the kill"
    operator.start()

    obj = wait_for(
        lambda: (o := ready_model(cluster, namespace, "restart")) and o["status"]["stable"]["revision"] != old and o,
        90,
        message="did not converge after restart",
    )
    new = obj["status"]["stable"]["revision"]
    wait_for(lambda: _revisions(cluster, namespace, "restart") == {new}, 60, message="old revision left behind")
    kinds = [o["kind"] for o in owned(cluster, namespace, "restart")]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service", "Service"]  # one replica: no budget


def _resource_versions(cluster: Cluster, ns: str) -> dict[str, str]:
    result = get_json(cluster, "recommendermodels,deployments,services,configmaps,pdb,hpa", "-n", ns)
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in result["items"]}


def test_a_steady_state_makes_no_writes(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("steady", replicas=2))
    apply_yaml(
        cluster,
        namespace,
        _small(
            "steady-cpu", resources={"gpu": 0, "cpu": "1", "memory": "1Gi"}, instances={"kind": "CPU"}, gpuProduct=None
        ),
    )
    canary = _small("steady-canary")
    canary["spec"]["rollout"] = {"strategy": "canary", "steps": [{"weight": 10, "pause": "1m"}]}
    apply_yaml(cluster, namespace, canary)
    for name in ("steady", "steady-cpu", "steady-canary"):
        wait_ready(cluster, namespace, name)
    # Let the last status write and its watch events settle: versions stable for two resync periods.
    settled: dict[str, Any] = {"rv": None, "since": time.monotonic()}

    def quiet() -> bool:
        rv = _resource_versions(cluster, namespace)
        if rv != settled["rv"]:
            settled.update(rv=rv, since=time.monotonic())
        return bool(time.monotonic() - settled["since"] > 2 * operator.resync_seconds)

    wait_for(quiet, 60, message="objects kept changing")
    before = _resource_versions(cluster, namespace)
    writes_before = _writes(operator)
    reconciles_before = operator.metrics()["recserve_reconciles_total"]  # type: ignore[index]

    with pytest.raises(AssertionError):
        wait_for(lambda: _resource_versions(cluster, namespace) != before, 10, interval=1.0, message="idle")
    assert _resource_versions(cluster, namespace) == before
    assert _writes(operator) == writes_before
    # The idle window did reconcile (resync timer), it just found nothing to change.
    assert operator.metrics()["recserve_reconciles_total"] > reconciles_before  # type: ignore[index]


def _writes(op: OperatorProcess) -> float:
    m = op.metrics() or {}
    return sum(
        v
        for k, v in m.items()
        if k.startswith("recserve_api_requests_total") and 'verb="get"' not in k and 'verb="discovery"' not in k
    )


def test_drift_in_owned_objects_is_corrected(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("drift"))
    rev = wait_ready(cluster, namespace, "drift")["status"]["stable"]["revision"]
    cluster.kubectl("delete", "service", "drift", "-n", namespace)
    cluster.kubectl("scale", "deployment", f"drift-{rev}", "-n", namespace, "--replicas=3")
    wait_for(lambda: get_json(cluster, "service", "drift", "-n", namespace), 30, message="front Service not recreated")
    wait_for(
        lambda: get_json(cluster, "deployment", f"drift-{rev}", "-n", namespace)["spec"]["replicas"] == 1,
        30,
        message="replicas drift not corrected",
    )


def _require_servicemonitors(cluster: Cluster) -> None:
    served = cluster.kubectl("get", "crd", "servicemonitors.monitoring.coreos.com", check=False).returncode == 0
    assert served, "the ServiceMonitor CRD is missing: cluster.prepare installs it on every cluster the tests use"


def _namespace_monitor(cluster: Cluster, namespace: str) -> bool:
    return cluster.kubectl("get", "servicemonitors.monitoring.coreos.com", REVISIONS_SERVICEMONITOR, "-n", namespace,
                           check=False).returncode == 0  # fmt: skip


def test_deletion_leaves_nothing_behind(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("gone", replicas=2))
    apply_yaml(cluster, namespace, _small("kept"))
    wait_ready(cluster, namespace, "gone")
    wait_ready(cluster, namespace, "kept")
    _require_servicemonitors(cluster)
    assert _namespace_monitor(cluster, namespace)
    cluster.kubectl("delete", "rm", "gone", "-n", namespace, "--wait=true", timeout=60)
    wait_for(
        lambda: owned(cluster, namespace, "gone") == [] and _pods(cluster, namespace, "gone") == [],
        60,
        message="owned objects survived deletion",
    )
    # The namespace's ServiceMonitor serves the model still there, and goes with the last one.
    assert _namespace_monitor(cluster, namespace)
    cluster.kubectl("delete", "rm", "kept", "-n", namespace, "--wait=true", timeout=60)
    wait_for(
        lambda: owned(cluster, namespace, "kept") == [] and not _namespace_monitor(cluster, namespace),
        60,
        message="the namespace's last model left objects or its ServiceMonitor behind",
    )


def test_a_servicemonitor_whose_last_model_went_while_no_operator_ran_is_deleted_at_start(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    """No model owns the namespace's ServiceMonitor; the operator deletes it with the last model, and, when that
    happened while no operator ran, at its next start. A model applied afterwards gets it back."""
    _require_servicemonitors(crd)
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log")
    op.start()
    try:
        apply_yaml(crd, namespace, _small("left"))
        wait_ready(crd, namespace, "left")
        assert _namespace_monitor(crd, namespace)
    finally:
        op.stop()
    crd.kubectl("delete", "rm", "left", "-n", namespace, "--wait=true", timeout=60)  # no operator runs
    assert _namespace_monitor(crd, namespace)
    op = OperatorProcess(crd, namespace, tmp_path / "operator-2.log")
    op.start()
    try:
        wait_for(lambda: not _namespace_monitor(crd, namespace), 60, 0.5,
                 "the orphaned ServiceMonitor to be deleted at start")  # fmt: skip
        assert f"Deleted ServiceMonitor namespace={namespace} name={REVISIONS_SERVICEMONITOR}" in op.log()
        apply_yaml(crd, namespace, _small("back"))
        wait_ready(crd, namespace, "back")
        wait_for(lambda: _namespace_monitor(crd, namespace), 30, 0.5, "the ServiceMonitor back with a new model")
    finally:
        op.stop()
    assert "Traceback" not in op.log(), op.log()[-5000:]


def test_the_per_model_servicemonitor_of_an_earlier_version_gives_way_to_the_namespaces(
    operator: OperatorProcess, namespace: str
) -> None:
    """An upgrade from the per-model design: both ServiceMonitors would scrape every revision twice (and double
    every rate the rollouts compare), so the operator deletes the old one; a user's own ServiceMonitor stays."""
    cluster = operator.cluster
    _require_servicemonitors(cluster)
    labels = {"app.kubernetes.io/name": "recserve-triton", "app.kubernetes.io/instance": "upgraded",
              "app.kubernetes.io/component": "predictor", "app.kubernetes.io/managed-by": "recserve"}  # fmt: skip
    endpoints = [{"port": "metrics", "interval": "15s", "path": "/metrics"}]
    for name, meta_labels in (("upgraded", labels), ("shop-frontend", {"app": "frontend"})):
        apply_yaml(cluster, namespace, {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
            "spec": {"selector": {"matchLabels": meta_labels}, "endpoints": endpoints},
        })  # fmt: skip
    apply_yaml(cluster, namespace, _small("upgraded"))
    wait_ready(cluster, namespace, "upgraded")

    def monitors() -> list[str] | None:
        items = get_json(cluster, "servicemonitors.monitoring.coreos.com", "-n", namespace)["items"]
        names = sorted(m["metadata"]["name"] for m in items)
        return names if names == [REVISIONS_SERVICEMONITOR, "shop-frontend"] else None

    wait_for(monitors, 60, message="the per-model ServiceMonitor was not replaced by the namespace's")


def test_scaling_changes_replicas_in_place_without_a_new_revision(operator: OperatorProcess, namespace: str) -> None:
    cluster = operator.cluster
    apply_yaml(cluster, namespace, _small("scale"))
    rev = wait_ready(cluster, namespace, "scale")["status"]["stable"]["revision"]
    updated = copy.deepcopy(_small("scale", replicas=3))
    apply_yaml(cluster, namespace, updated)
    wait_for(
        lambda: (o := ready_model(cluster, namespace, "scale")) and o["status"]["stable"]["readyReplicas"] == 3,
        60,
        message="did not scale to 3",
    )
    assert _revisions(cluster, namespace, "scale") == {rev}


def test_a_canary_without_analysis_steps_through_the_router_and_promotes(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    body = _small("can")
    body["spec"]["rollout"] = {"strategy": "canary", "steps": [{"weight": 30, "pause": "3s"}]}
    apply_yaml(cluster, namespace, body)
    old = wait_ready(cluster, namespace, "can")["status"]["stable"]["revision"]
    assert get_json(cluster, "deployment", "can-router", "-n", namespace) is not None

    _update_version(cluster, namespace, "can", 6)

    def at_step() -> dict[str, Any] | None:
        obj = model(cluster, namespace, "can")
        canary = (obj or {}).get("status", {}).get("canary") or {}
        return obj if canary.get("phase") == "Progressing" and canary.get("weight") == 30 else None

    obj = wait_for(at_step, 60, message="canary never reached its 30% step")
    new = obj["status"]["canary"]["revision"]
    assert obj["status"]["stable"]["revision"] == old
    conf = get_json(cluster, "configmap", "can-router", "-n", namespace)["data"]
    assert any(new in text and old in text for text in conf.values())

    promoted = wait_for(
        lambda: (o := ready_model(cluster, namespace, "can")) and o["status"]["stable"]["revision"] == new and o,
        60,
        message="canary was not promoted",
    )
    assert promoted["status"]["canary"]["phase"] == "Promoted"
    wait_for(lambda: _revisions(cluster, namespace, "can") == {new}, 60, message="old revision was not removed")


def test_the_module_entry_point_takes_namespaces_and_liveness_from_the_environment(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log", entry_point=True)
    op.start()
    try:
        apply_yaml(crd, namespace, _small("entry"))
        wait_ready(crd, namespace, "entry")
        with urllib.request.urlopen(op.liveness, timeout=5) as resp:
            probes = json.loads(resp.read())
        assert probes["reconciles"] >= 1
    finally:
        op.stop()
    assert "Traceback" not in op.log(), op.log()[-5000:]


def _crd_digest(cluster: Cluster) -> str | None:
    crd = get_json(cluster, "crd", CRD_NAME) or {}
    return ((crd.get("metadata") or {}).get("annotations") or {}).get(SCHEMA_DIGEST_ANNOTATION)


def test_an_outdated_crd_is_reported_until_the_documented_command_applies_this_releases(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Helm never upgrades CRDs: the operator says so (log, metric) and keeps serving; the command its message
    names, run as a user would from the repository, brings the CRD up to date and clears both."""
    crd.kubectl("annotate", "crd", CRD_NAME, f"{SCHEMA_DIGEST_ANNOTATION}=0123456789abcdef", "--overwrite")
    op = OperatorProcess(crd, namespace, tmp_path / "operator.log", extra_env={"RECSERVE_CRD_RECHECK_SECONDS": "1"})
    op.start()
    try:
        wait_for(lambda: (op.metrics() or {}).get("recserve_crd_schema_current") == 0.0, 60, 0.5,
                 "recserve_crd_schema_current 0 for an outdated CRD")  # fmt: skip
        errors = [line for line in op.log().splitlines() if "CRD schema Outdated" in line]
        assert len(errors) == 1, op.log()[-3000:]  # logged once, not at every look
        assert "has schema 0123456789abcdef" in errors[0] and UPGRADE_COMMAND in errors[0], errors[0]
        apply_yaml(crd, namespace, _small("stale-crd"))
        wait_ready(crd, namespace, "stale-crd")  # the check never stops the operator

        command = UPGRADE_COMMAND.split()
        assert command[0] == "kubectl"
        out = subprocess.run([crd.kubectl_path, "--kubeconfig", str(crd.kubeconfig), *command[1:]], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert _crd_digest(crd) == SCHEMA_DIGEST
        wait_for(lambda: (op.metrics() or {}).get("recserve_crd_schema_current") == 1.0, 30, 0.5,
                 "recserve_crd_schema_current 1 once the CRD is applied")  # fmt: skip
        assert "CRD schema Current" in op.log()
    finally:
        op.stop()
        if _crd_digest(crd) != SCHEMA_DIGEST:
            crd.kubectl("annotate", "crd", CRD_NAME, f"{SCHEMA_DIGEST_ANNOTATION}={SCHEMA_DIGEST}", "--overwrite")
    assert "Traceback" not in op.log(), op.log()[-5000:]


def test_gateway_api_canary_weights_an_httproute_and_abort_restores_stable(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    if cluster.kubectl("get", "crd", "httproutes.gateway.networking.k8s.io", check=False).returncode != 0:
        pytest.fail("the test cluster is expected to carry the Gateway API CRDs")
    body = _small("gw")
    body["spec"]["rollout"] = {
        "strategy": "canary",
        "steps": [{"weight": 20, "pause": "1h"}, {"weight": 60, "pause": "1h"}],
        "routing": {"provider": "gatewayAPI", "parentRef": {"name": "shop-gw"}},
    }
    apply_yaml(cluster, namespace, body)
    old = wait_ready(cluster, namespace, "gw")["status"]["stable"]["revision"]
    _update_version(cluster, namespace, "gw", 7)

    def weighted() -> dict[str, int] | None:
        route = get_json(cluster, "httproutes.gateway.networking.k8s.io", "gw-router", "-n", namespace)
        if not route:
            return None
        refs = [ref for rule in route["spec"]["rules"] for ref in rule.get("backendRefs", [])]
        weights = {ref["name"]: ref.get("weight", 1) for ref in refs}
        return weights if len(set(weights.values())) > 1 else None

    weights = wait_for(weighted, 60, message="HTTPRoute never split traffic")
    new = model(cluster, namespace, "gw")["status"]["canary"]["revision"]  # type: ignore[index]
    assert weights[f"gw-{old}"] == 80 and weights[f"gw-{new}"] == 20

    cluster.kubectl("annotate", "rm", "gw", "-n", namespace, "recserve.dev/rollout-action=abort", "--overwrite")

    def aborted() -> dict[str, Any] | None:
        obj = model(cluster, namespace, "gw")
        return obj if obj and obj["status"].get("canary", {}).get("phase") in ("Aborted", "RolledBack") else None

    obj = wait_for(aborted, 60, message="abort was not applied")
    assert obj["status"]["stable"]["revision"] == old
    wait_for(lambda: _revisions(cluster, namespace, "gw") == {old}, 60, message="aborted candidate still runs")
    assert weighted() is None
    wait_for(
        lambda: (
            "recserve.dev/rollout-action"
            not in (model(cluster, namespace, "gw") or {})["metadata"].get("annotations", {})
        ),
        30,
        message="the consumed rollout action annotation was not cleared",
    )
