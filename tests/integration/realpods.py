"""The chart installed for tests on real pods: local images, one watched namespace, everything on the real node."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recserve_cluster import nodeconfig as nc
from recserve_cluster.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
# On kind or another cluster: a node that runs containers, carries `nvidia.com/gpu.product=NVIDIA-L4` and has the
# images loaded.
NODE = os.environ.get("RECSERVE_REAL_NODE_NAME", nc.NODE_NAME)
PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"


def placement() -> dict[str, Any]:
    """Pod spec fields that put a pod on NODE (it carries the GPU taint)."""
    return {"nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


@contextmanager
def installed_platform(cluster: Cluster, tmp: Path, prefix: str) -> Iterator[str]:
    """The chart installed with the local images, watching one new namespace (yielded), its operator on NODE.

    Leaving deletes the namespace's RecommenderModels, the release and both namespaces.
    """
    from recserve_cluster import images
    from tests.integration.test_helm import _helm, _release_name

    ns = f"{prefix}-{secrets.token_hex(3)}"
    system = f"{ns}-system"
    for n in (ns, system):
        cluster.kubectl("create", "namespace", n)
        cluster.kubectl("label", "namespace", n, "recserve.dev/test=true")
    repository, tag = images.operator_image().rsplit(":", 1)
    release = _release_name(ns)
    values = {"image": {"repository": repository, "tag": tag}, "watchNamespaces": [ns], **placement(),
              "defaults": {"resyncSeconds": 2, "routerNodeSelector": placement()["nodeSelector"],
                           "routerTolerations": placement()["tolerations"]}}
    try:
        _helm(cluster, "install", release, str(ROOT / "charts" / "recserve"), "-n", system, "--wait",
              "--timeout", "4m", values=values, tmp_path=tmp)
        yield ns
    finally:
        cluster.kubectl("delete", "recommendermodels", "--all", "-n", ns, "--wait=true", "--timeout=120s",
                        check=False, timeout=150)
        subprocess.run([str(cluster.bins["helm"]), "--kubeconfig", str(cluster.kubeconfig), "uninstall", release,
                        "-n", system, "--wait", "--timeout", "2m"], capture_output=True, timeout=180,
                       env=cluster.env)
        for n in (ns, system):
            cluster.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found", check=False)
