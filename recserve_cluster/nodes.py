"""Simulated test-cluster nodes: two GPU products, labelled as NVIDIA GPU feature discovery does, and a CPU node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# kwok in binary mode manages every node; on kind or an existing cluster it only manages nodes
# carrying this annotation, so the same fake GPU nodes work everywhere without touching real ones.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT_KEY = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: capacity and, for GPU nodes, the product GFD would report."""

    name: str
    cpu: str
    memory: str
    gpus: int = 0
    gpu_product: str = ""
    gpu_memory_mib: int = 0
    pods: int = 110


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("gpu-h100", cpu="64", memory="512Gi", gpus=8, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559),
    NodeSpec("gpu-a10g", cpu="32", memory="128Gi", gpus=4, gpu_product="NVIDIA-A10G", gpu_memory_mib=23028),
    # kwok runs no containers, so the CPU node may hold more pods than a kubelet would: the operator
    # benchmark schedules 500 single-replica models.
    NodeSpec("cpu-0", cpu="16", memory="64Gi", pods=1000),
)


GPU_FAMILIES = {"H100": "hopper", "A10G": "ampere", "A100": "ampere", "L4": "ada-lovelace"}


def gpu_labels(spec: NodeSpec) -> dict[str, str]:
    """The labels NVIDIA GPU feature discovery puts on a node with this product."""
    family = next((f for key, f in GPU_FAMILIES.items() if key in spec.gpu_product), "unknown")
    return {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": spec.gpu_product,
        "nvidia.com/gpu.count": str(spec.gpus),
        "nvidia.com/gpu.memory": str(spec.gpu_memory_mib),
        "nvidia.com/gpu.family": family,
    }


def build_node(spec: NodeSpec) -> dict[str, Any]:
    """A Node object with status set at creation, as kwok expects (nodes accept status on create)."""
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "gpu" if spec.gpus else "cpu",
        "type": "kwok",
    }
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods), "ephemeral-storage": "500Gi"}
    taints: list[dict[str, str]] = []
    if spec.gpus:
        labels.update(gpu_labels(spec))
        capacity["nvidia.com/gpu"] = str(spec.gpus)
        taints.append({"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints} if taints else {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "containerRuntimeVersion": "kwok",
            },
            "phase": "Running",
        },
    }
