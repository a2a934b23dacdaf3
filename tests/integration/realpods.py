"""The chart installed for tests on real pods: local images, one watched namespace, everything on the real node."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

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


PROMETHEUS = ("monitoring", "prometheus", 9090)
DASHBOARD = ROOT / "charts" / "recserve" / "dashboards" / "recserve-overview.json"


def prometheus_query(cluster: Cluster, query: str) -> list[dict[str, Any]]:
    """An instant query against the in-cluster Prometheus, through the API server's Service proxy."""
    ns, svc, port = PROMETHEUS
    path = f"/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy/api/v1/query?" + urlencode({"query": query})
    out = cluster.kubectl("get", "--raw", path, check=False)
    if out.returncode != 0:
        raise AssertionError(f"Prometheus refused {query!r}: {out.stderr.strip()[-500:]}")
    result: list[dict[str, Any]] = json.loads(out.stdout)["data"]["result"]
    return result


def dashboard_queries(namespace: str, model: str, rate_interval: str = "2m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the chart's dashboard, with Grafana's variables filled in the
    way Grafana would for one namespace and model: template variables from their defaults, $__rate_interval
    as a window that holds several scrapes."""
    board = json.loads(DASHBOARD.read_text())
    # Kubernetes names have no regex metacharacters but ".", which matches itself too.
    values: dict[str, str] = {"namespace": namespace, "model": model, "revision": ".*",
                              "__rate_interval": rate_interval}
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") in ("constant", "textbox", "custom") and var["name"] not in values:
            current = (var.get("current") or {}).get("value") or var.get("query")
            values[var["name"]] = str(current)

    def fill(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)

    return [(panel["title"], fill(t["expr"])) for panel in board["panels"] for t in panel.get("targets", [])
            if t.get("expr")]
