"""Model files into a PersistentVolumeClaim on a node, the way a training job leaves them for serving.

A static hostPath PersistentVolume pinned to one node (what an admin creates for a local disk or an NFS
mount) and a claim bound to it; the files travel through a ConfigMap and a copy pod, so the same code works
on the local cluster, kind or any cluster whose node runs containers. Files must fit in a ConfigMap (1 MiB).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .cluster import Cluster
from .errors import ClusterError
from .waiting import wait_for

COPY_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def pv_root(cluster: Cluster, node: str) -> str:
    """Where on the node the volumes live: RECSERVE_PV_ROOT, else the local real node's own folder (removed
    with the node), else /var/tmp/recserve-pv."""
    from . import nodeconfig as nc
    from .realnode import RealNode

    if os.environ.get("RECSERVE_PV_ROOT"):
        return os.environ["RECSERVE_PV_ROOT"]
    if cluster.provider == "kwok" and node == nc.NODE_NAME:
        return str(RealNode(cluster.kubeconfig.parent.name).paths.volumes)
    return "/var/tmp/recserve-pv"


def _pv_name(namespace: str, claim: str) -> str:
    return f"{namespace}-{claim}"


def _key(path: str) -> str:
    """ConfigMap keys cannot hold '/': 'ctr/1/model.keras' -> 'ctr__1__model.keras'."""
    return path.replace("/", "__")


def claim_objects(namespace: str, claim: str, node: str | None, root: str, size: str = "1Gi") -> list[dict[str, Any]]:
    """The PV (hostPath under `root` on `node`, or on any node when None, retained) and the claim bound to it."""
    pv = _pv_name(namespace, claim)
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "PersistentVolume",
         "metadata": {"name": pv, "labels": {"recserve.dev/claim": claim}},
         "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "hostPath": {"path": f"{root}/{pv}", "type": "DirectoryOrCreate"},
                  "claimRef": {"namespace": namespace, "name": claim},
                  "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": size}}}},
    ]  # fmt: skip
    if node is None:
        del objs[0]["spec"]["nodeAffinity"]
    return objs


def copy_pod(namespace: str, claim: str, node: str, files: Mapping[str, Path]) -> dict[str, Any]:
    """A pod that copies the ConfigMap's files into the claim, world-readable (Triton and the builder run as
    uid 1000). hostPath directories are created root-owned, so this pod is the volume's owner, as a
    training job would be."""
    script = "set -e; " + "; ".join(
        f"mkdir -p /data/{Path(dest).parent} && cp /upload/{_key(dest)} /data/{dest}" for dest in files
    ) + "; chmod -R a+rX /data"
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{claim}-upload", "namespace": namespace},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "tolerations": TOLERATE_GPU,
                 "restartPolicy": "Never", "automountServiceAccountToken": False,
                 "containers": [{"name": "copy", "image": COPY_IMAGE, "imagePullPolicy": "IfNotPresent",
                                 "command": ["sh", "-c", script],
                                 "volumeMounts": [{"name": "upload", "mountPath": "/upload"},
                                                  {"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "upload", "configMap": {"name": f"{claim}-upload"}},
                             {"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
    }  # fmt: skip


def _phase(cluster: Cluster, namespace: str, pod: str) -> str:
    out = cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", "jsonpath={.status.phase}", check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def _run_pod(cluster: Cluster, pod: dict[str, Any], timeout: float, what: str) -> None:
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    cluster.kubectl("delete", "pod", name, "-n", ns, "--ignore-not-found", "--wait=true", timeout=90)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    phase = wait_for(lambda: (p := _phase(cluster, ns, name)) in ("Succeeded", "Failed") and p, timeout, 1, what)
    if phase == "Failed":
        logs = cluster.kubectl("logs", name, "-n", ns, check=False).stdout
        raise ClusterError(f"{what} failed: {logs.strip()[-800:]}")
    cluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false")


def upload(cluster: Cluster, namespace: str, claim: str, node: str, files: Mapping[str, Path]) -> None:
    """Create (or reuse) the claim on `node` and copy `files` ({path in the claim: local file}) into it."""
    root = pv_root(cluster, node)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(claim_objects(namespace, claim, node, root)))
    data = {_key(dest): base64.b64encode(Path(src).read_bytes()).decode() for dest, src in files.items()}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{claim}-upload", "namespace": namespace},
          "binaryData": data}
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(cm))
    _run_pod(cluster, copy_pod(namespace, claim, node, files), 180, f"copying the files into PVC {claim}")
    cluster.kubectl("delete", "configmap", f"{claim}-upload", "-n", namespace, "--ignore-not-found")


def remove(cluster: Cluster, namespace: str, claim: str, node: str) -> None:
    """Delete the claim and its PV and empty the node directory (with a pod: the node may be elsewhere)."""
    pv = _pv_name(namespace, claim)
    cluster.kubectl("delete", "pvc", claim, "-n", namespace, "--ignore-not-found", "--wait=false", check=False)
    cluster.kubectl("delete", "pv", pv, "--ignore-not-found", "--wait=false", check=False)
    root = pv_root(cluster, node)
    wipe = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{claim}-wipe", "namespace": namespace},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "tolerations": TOLERATE_GPU,
                 "restartPolicy": "Never", "automountServiceAccountToken": False,
                 "containers": [{"name": "wipe", "image": COPY_IMAGE, "imagePullPolicy": "IfNotPresent",
                                 "command": ["rm", "-rf", f"/pv/{pv}"],
                                 "volumeMounts": [{"name": "pv", "mountPath": "/pv"}]}],
                 "volumes": [{"name": "pv", "hostPath": {"path": root, "type": "DirectoryOrCreate"}}]},
    }  # fmt: skip
    _run_pod(cluster, wipe, 90, f"emptying the volume of PVC {claim}")
