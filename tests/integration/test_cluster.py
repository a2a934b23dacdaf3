"""The local control plane is real: scheduling on GPU capacity, CEL validation and garbage collection."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from recserve_cluster.cluster import Cluster
from recserve_cluster.nodes import DEFAULT_NODES
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _apply(cluster: Cluster, obj: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj), check=check)


def _gpu_deployment(name: str, ns: str, gpus: int, product: str | None = None) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "tolerations": [GPU_TOLERATION],
        "containers": [{"name": "triton", "image": "nvcr.io/nvidia/tritonserver:25.01-py3",
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
    }
    if product:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}},
    }


def _pods_of(cluster: Cluster, ns: str, app: str) -> list[dict[str, Any]]:
    return _get(cluster, "pods", "-n", ns, "-l", f"app={app}")["items"]  # type: ignore[no-any-return]


def test_all_nodes_are_ready_and_gpu_nodes_report_allocatable_gpus(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in _get(cluster, "nodes")["items"]}
    for spec in DEFAULT_NODES:
        node = nodes[spec.name]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", f"{spec.name} not Ready"
        if spec.gpus:
            assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(spec.gpus)
            assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == spec.gpu_product
            assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        else:
            assert "nvidia.com/gpu" not in node["status"]["allocatable"]


def test_gpu_deployment_becomes_available_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, _gpu_deployment("any-gpu", namespace, gpus=1))
    cluster.kubectl("rollout", "status", "deployment/any-gpu", "-n", namespace, "--timeout=90s", timeout=100)
    (pod,) = _pods_of(cluster, namespace, "any-gpu")
    assert pod["spec"]["nodeName"] in {n.name for n in DEFAULT_NODES if n.gpus}


@pytest.mark.parametrize("product,node", [("NVIDIA-A10G", "gpu-a10g"), ("NVIDIA-H100-80GB-HBM3", "gpu-h100")])
def test_gpu_product_selector_places_the_pod_on_that_products_node(
    cluster: Cluster, namespace: str, product: str, node: str
) -> None:
    _apply(cluster, _gpu_deployment("pinned", namespace, gpus=2, product=product))
    cluster.kubectl("rollout", "status", "deployment/pinned", "-n", namespace, "--timeout=90s", timeout=100)
    (pod,) = _pods_of(cluster, namespace, "pinned")
    assert pod["spec"]["nodeName"] == node


def test_pod_asking_for_more_gpus_than_any_node_has_stays_unschedulable(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, _gpu_deployment("too-big", namespace, gpus=16))

    def unschedulable() -> dict[str, Any] | None:
        pods = _pods_of(cluster, namespace, "too-big")
        for cond in pods[0]["status"].get("conditions", []) if pods else []:
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return cond  # type: ignore[no-any-return]
        return None

    cond = wait_for(unschedulable, timeout=60, message="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    (pod,) = _pods_of(cluster, namespace, "too-big")
    assert pod["status"]["phase"] == "Pending"


CEL_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.celtest.recserve.dev"},
    "spec": {
        "group": "celtest.recserve.dev", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                "type": "object",
                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must not exceed max"}],
            }}}},
        }],
    },
}


def test_cel_rule_refuses_a_bad_object_with_the_rules_message(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, CEL_CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.celtest.recserve.dev", "--timeout=60s")

    def widget(lo: int, hi: int) -> dict[str, Any]:
        return {"apiVersion": "celtest.recserve.dev/v1", "kind": "Widget",
                "metadata": {"name": f"w-{lo}-{hi}", "namespace": namespace}, "spec": {"min": lo, "max": hi}}

    good = wait_for(lambda: _apply(cluster, widget(1, 2), check=False).returncode == 0 or None, timeout=30,
                    message="the Widget kind to be served")
    assert good
    bad = _apply(cluster, widget(5, 2), check=False)
    assert bad.returncode != 0
    assert "min must not exceed max" in bad.stderr


def test_deleting_an_owner_garbage_collects_its_children(cluster: Cluster, namespace: str) -> None:
    owner = json.loads(cluster.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout)
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "namespace": namespace, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}]},
        "data": {"k": "v"},
    }
    _apply(cluster, child)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
             timeout=60, message="the child ConfigMap to be garbage-collected")
