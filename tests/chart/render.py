"""Rendering the Helm chart with the pinned helm binary, for the chart checks and the install test."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from recserve_cluster import tools
from recserve_cluster.errors import ClusterError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "recserve"
# The pinned control plane's version: rendering, capabilities and schema validation all target it.
KUBE_VERSION = tools.KUBERNETES_VERSION.lstrip("v")
RELEASE = "rs"
RELEASE_NAMESPACE = "recserve-system"

# Values combinations every check runs against (the list, plus namespaced mode with peering).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-mode-two-replicas": {"replicaCount": 2},
    "namespaced-mode": {"watchNamespaces": ["team-a", "team-b"]},
    "namespaced-mode-two-replicas": {"watchNamespaces": ["team-a"], "replicaCount": 2},
    "namespaced-mode-embedded-store-on-an-emptydir": {
        "watchNamespaces": ["team-a", "team-b"], "modelStore": {"embedded": {"persistence": {"enabled": False}}}},
    "no-model-store": {"modelStore": {"embedded": {"enabled": False}}},
    "all-optional-features": {
        "replicaCount": 2,
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
        "metricsAdapter": {"rules": {"create": True, "namespace": "monitoring"}},
        "networkPolicy": {"enabled": True, "apiServerCIDRs": ["10.0.0.1/32"]},
        "image": {"digest": "sha256:" + "a" * 64},
        "defaults": {"prometheusUrl": "http://kube-prometheus.monitoring:9090"},
    },
}


def helm_binary() -> Path:
    """The pinned helm (RECSERVE_HELM, the cache, or PATH at the pinned version); never built by a test."""
    try:
        return tools.resolve(next(t for t in tools.TOOLS if t.name == "helm"), build=False)
    except ClusterError as exc:
        raise AssertionError(f"{exc} (the chart checks need the pinned helm)") from None


def helm(*args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [str(helm_binary()), *args]
    if values:
        assert tmp_path is not None, "values need a tmp_path to write the values file to"
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(values_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def render(values: dict[str, Any], tmp_path: Path, *, include_crds: bool = False) -> list[dict[str, Any]]:
    """The manifests `helm install` would send (test hooks included), parsed."""
    args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--kube-version", KUBE_VERSION]
    if include_crds:
        args.append("--include-crds")
    out = helm(*args, values=values, tmp_path=tmp_path)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_to_dir(values: dict[str, Any], tmp_path: Path, out_dir: Path) -> None:
    """One file per template, as scanners expect (comments and annotations preserved)."""
    helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--kube-version", KUBE_VERSION,
         "--output-dir", str(out_dir), values=values, tmp_path=tmp_path)  # fmt: skip


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, *, store: bool = False) -> dict[str, Any]:
    """The one object of `kind` the operator's part of the chart renders (store=True: the embedded model
    store's, which is on by default)."""
    found = [d for d in by_kind(docs, kind)
             if (((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") == "model-store")
             == store]  # fmt: skip
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
