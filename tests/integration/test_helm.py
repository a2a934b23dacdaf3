"""The Helm chart on the real control plane: install, upgrade, uninstall, server-side validation and RBAC.

RBAC is proven, not inferred: the tests log in with a token of the chart's ServiceAccount, ask the
apiserver what it may do, and run the real operator process with that identity and the chart's own
Deployment arguments against a RecommenderModel.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from recserve_cluster.cluster import Cluster
from tests.chart.render import CHART, VALUE_SETS
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = "recommendermodels.recserve.dev"
# The pinned control plane pulls nothing (kwok nodes), so any well-formed reference works.
TEST_IMAGE = {"repository": "ghcr.io/recserve/operator", "tag": "0.1.0-test"}
OLD_TRITON = "nvcr.io/nvidia/tritonserver:25.10-py3"
NEW_TRITON = "nvcr.io/nvidia/tritonserver:25.11-py3"
# How a denied request shows in Kopf's and the Kubernetes client's logs (a bare "403" would also match the
# milliseconds of a timestamp), plus Kopf's fallback warnings and any crash.
FORBIDDEN_MARKERS = ("forbidden", "(403)", "'code': 403", "status=403", "not enough permissions", "traceback")
# The shared test cluster has no volume provisioner: the embedded model store (on by default) keeps its
# artifacts on an emptyDir (kind and real clusters use the default StorageClass).
NO_PROVISIONER = {"modelStore": {"embedded": {"persistence": {"enabled": False}}}}
STORE_KEYS = "recserve-model-store"  # the keys Secret build Jobs and serving pods read, in each model namespace


def _release_name(namespace: str) -> str:
    """Unique per test, because the chart's ClusterRoles are named after the release."""
    return "rs-" + hashlib.sha256(namespace.encode()).hexdigest()[:8]


def _helm(cluster: Cluster, *args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [str(cluster.bins["helm"]), "--kubeconfig", str(cluster.kubeconfig), *args]
    if values is not None:
        assert tmp_path is not None
        values_file = tmp_path / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(values_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cluster.env)
    assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _get(cluster: Cluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _model(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"pvc://models/{name}/1", "format": "onnx", "version": 1},
            "serving": {"resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"}, "gpuProduct": "NVIDIA-A10G"},
        },
    }


def _deployment_available(cluster: Cluster, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
    dep = _get(cluster, "deployment", name, "-n", namespace)
    if not dep:
        return None
    status = dep.get("status", {})
    available = any(c["type"] == "Available" and c["status"] == "True" for c in status.get("conditions", []))
    rolled = (
        status.get("observedGeneration") == dep["metadata"]["generation"]
        and status.get("updatedReplicas") == replicas
        and status.get("availableReplicas") == replicas
        and status.get("replicas") == replicas  # no pod of the old template left
    )
    return dep if available and rolled else None


@pytest.fixture
def extra_namespaces(cluster: Cluster, namespace: str) -> Iterator[tuple[str, str]]:
    """A watched and an unwatched namespace next to the release namespace."""
    watched, unwatched = f"{namespace}-w"[:63], f"{namespace}-u"[:63]
    for ns in (watched, unwatched):
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "recserve.dev/test=true")
    yield watched, unwatched
    for ns in (watched, unwatched):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str


@pytest.fixture
def release(cluster: Cluster, namespace: str) -> Iterator[Release]:
    """A release name in the test's namespace, uninstalled at the end even when the test fails (its
    ClusterRoles are cluster-wide)."""
    name = _release_name(namespace)
    yield Release(name, namespace)
    subprocess.run([str(cluster.bins["helm"]), "--kubeconfig", str(cluster.kubeconfig), "uninstall", name,
                    "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "2m"],
                   capture_output=True, text=True, timeout=180, env=cluster.env)  # fmt: skip


def test_install_upgrade_and_uninstall_keep_the_crd_and_the_users_models(
    cluster: Cluster, release: Release, tmp_path: Path
) -> None:
    namespace = release.namespace
    fullname = f"{release.name}-recserve"
    values: dict[str, Any] = {"image": TEST_IMAGE, "defaults": {"tritonImage": OLD_TRITON}, **NO_PROVISIONER}

    out = _helm(cluster, "install", release.name, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
                values=values, tmp_path=tmp_path)  # fmt: skip
    assert "helm test" in out.stdout and "every namespace" in out.stdout, out.stdout  # NOTES next steps
    crd = _get(cluster, "crd", CRD_NAME)
    assert crd and any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    first = wait_for(lambda: _deployment_available(cluster, namespace, fullname, 1), 120,
                     message="operator Deployment did not become Available")  # fmt: skip
    first_checksum = first["spec"]["template"]["metadata"]["annotations"]["checksum/defaults"]
    assert first["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--all-namespaces"
    # Build once by default: the embedded store runs beside the operator, which is told to publish there.
    wait_for(lambda: _deployment_available(cluster, namespace, f"{fullname}-model-store", 1), 120,
             message="the embedded model store did not become Available")  # fmt: skip
    defaults = _get(cluster, "configmap", f"{fullname}-defaults", "-n", namespace)["data"]
    assert defaults["RECSERVE_MODEL_STORE"] == "s3://recserve-models/artifacts", defaults
    assert defaults["RECSERVE_MODEL_STORE_SECRET_SOURCE"] == f"{namespace}/{fullname}-model-store", defaults

    # Upgrade: two replicas (leader election) and a new default Triton image.
    values = {**values, "replicaCount": 2, "defaults": {"tritonImage": NEW_TRITON}}
    _helm(cluster, "upgrade", release.name, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
          values=values, tmp_path=tmp_path)  # fmt: skip
    defaults = _get(cluster, "configmap", f"{fullname}-defaults", "-n", namespace)
    assert defaults["data"]["RECSERVE_TRITON_IMAGE"] == NEW_TRITON
    second = wait_for(lambda: _deployment_available(cluster, namespace, fullname, 2), 180,
                      message="operator Deployment did not roll to 2 available replicas")  # fmt: skip
    assert second["spec"]["template"]["metadata"]["annotations"]["checksum/defaults"] != first_checksum
    env = {e["name"]: e.get("value") for e in second["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RECSERVE_LEADER_ELECTION"] == "true"
    assert env["RECSERVE_LEASE_NAME"] == f"{fullname}-operator"
    # These pods land on kwok nodes and run nothing: the election itself is tested with operator processes
    # (test_operator_takeover.py), the chart's Lease RBAC below (test_the_operator_works_as_the_chart_...).
    pods = _get(cluster, "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={release.name}")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and p["metadata"]["labels"].get("app.kubernetes.io/component") != "model-store"]  # fmt: skip
    hashes = {p["metadata"]["labels"]["pod-template-hash"] for p in live}
    assert len(live) == 2 and len(hashes) == 1, "pods were not rolled onto the new template"

    # A user's model must outlive the chart.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(_model("survivor")))
    _helm(cluster, "uninstall", release.name, "-n", namespace, "--wait", "--timeout", "2m")
    assert _get(cluster, "deployment", fullname, "-n", namespace) is None
    assert _get(cluster, "clusterrole", f"{fullname}-operator") is None
    assert _get(cluster, "crd", CRD_NAME), "the CRD was deleted with the release"
    assert _get(cluster, "recommendermodel", "survivor", "-n", namespace), "a user's RecommenderModel was deleted"


def _ensure_chart_crds(cluster: Cluster) -> None:
    """CRDs as `helm install` would create them (skipping those already there), for tests that only render."""
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and _get(cluster, "crd", doc["metadata"]["name"]) is None:
                cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(doc))
            if doc:
                cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                                f"crd/{doc['metadata']['name']}", timeout=90)  # fmt: skip


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_apiserver_accepts_every_rendered_manifest_in_a_server_side_dry_run(
    cluster: Cluster, namespace: str, name: str, tmp_path: Path
) -> None:
    """Admission, CRD-backed kinds (ServiceMonitor, KopfPeering) and the server's own schema, per values set."""
    _ensure_chart_crds(cluster)
    values = json.loads(json.dumps(VALUE_SETS[name]))
    if "watchNamespaces" in values:
        values["watchNamespaces"] = [namespace]  # dry-run objects must land in an existing namespace
    if "grafanaDashboard" in values:
        values["grafanaDashboard"]["namespace"] = namespace
    if "namespace" in (values.get("metricsAdapter") or {}).get("rules", {}):
        values["metricsAdapter"]["rules"]["namespace"] = namespace
    out = _helm(cluster, "template", _release_name(namespace), str(CHART), "-n", namespace,
                "--kube-version", "1.35.4", values=values, tmp_path=tmp_path)  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    # Pod admission looks the ServiceAccount up, so the accounts (inert on their own) are created for real.
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(accounts))
    applied = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                              input=yaml.safe_dump_all(docs), check=False)  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("(server dry run)") == len(docs), applied.stdout


def _token_kubeconfig(cluster: Cluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (bound token, 20 minutes)."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=20m").stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    server_cluster = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in server_cluster:  # relative paths would break in another directory
        server_cluster["certificate-authority"] = str(
            (cluster.kubeconfig.parent / server_cluster["certificate-authority"]).resolve()
        )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server_cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": service_account}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _can_i(cluster: Cluster, kubeconfig: Path, *args: str) -> bool:
    out = subprocess.run([cluster.kubectl_path, "--kubeconfig", str(kubeconfig), "auth", "can-i", *args],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {args}: {out.stdout} {out.stderr}"
    return answer == "yes"


def _wait_with_log(predicate: Any, log_path: Path, message: str, timeout: float = 120) -> Any:
    """wait_for, with the operator's log tail in the failure message (that is where a denial shows)."""
    try:
        return wait_for(predicate, timeout, message=message)
    except AssertionError as exc:
        tail = log_path.read_text(errors="replace")[-6000:]
        raise AssertionError(f"{exc}\n--- operator log (tail) ---\n{tail}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["standalone", "leader-election", "cluster-mode"])
def test_the_operator_works_as_the_chart_service_account_and_can_do_nothing_more(
    cluster: Cluster, release: Release, extra_namespaces: tuple[str, str], mode: str, tmp_path: Path
) -> None:
    """Both modes with the chart's defaults (build once, the embedded store): the operator creates the model's build
    Job; in cluster mode it first copies the store's keys into the model's namespace, the one Secret it may touch."""
    namespace = release.namespace
    watched, unwatched = extra_namespaces
    fullname = f"{release.name}-recserve"
    cluster_mode, replicas = mode == "cluster-mode", 2 if mode == "leader-election" else 1
    # No metrics Service: this test needs none, and the shared cluster's service IP range is small.
    values = {"image": TEST_IMAGE, "replicaCount": replicas, "metrics": {"service": {"enabled": False}},
              **NO_PROVISIONER, **({} if cluster_mode else {"watchNamespaces": [watched]})}  # fmt: skip
    _helm(cluster, "install", release.name, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
          values=values, tmp_path=tmp_path)  # fmt: skip
    kubeconfig = _token_kubeconfig(cluster, namespace, fullname, tmp_path / "sa.kubeconfig")

    # (a) What the apiserver says this identity may do.
    rm = "recommendermodels.recserve.dev"
    allowed = [
        ("patch", rm, "--subresource=status", "-n", watched),
        ("watch", rm, "-n", watched),
        ("create", "deployments.apps", "-n", watched),
        ("patch", "deployments.apps", "-n", watched),
        ("delete", "services", "-n", watched),
        ("list", "pods", "-n", watched),
        ("create", "events", "-n", watched),
        ("patch", "httproutes.gateway.networking.k8s.io", "-n", watched),
        ("patch", "servicemonitors.monitoring.coreos.com", "-n", watched),
    ]
    denied = [
        ("get", "secrets", "-n", watched),
        ("get", "secrets", "-n", namespace),
        ("list", "secrets", "--all-namespaces"),
        ("watch", "secrets", "-n", watched),
        ("get", "secrets/someone-elses", "-n", watched),
        ("create", "secrets/someone-elses", "-n", watched),
        ("get", f"secrets/{fullname}-operator-token", "-n", namespace),
        ("update", "deployments.apps", "-n", watched),
        ("delete", "pods", "-n", watched),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    if cluster_mode:  # the store's keys: read at the source, copied by name into model namespaces
        allowed += [("get", f"secrets/{fullname}-model-store", "-n", namespace),
                    ("create", f"secrets/{STORE_KEYS}", "-n", watched),
                    ("patch", f"secrets/{STORE_KEYS}", "-n", watched),
                    ("create", "deployments.apps", "-n", unwatched)]  # fmt: skip
    else:
        denied += [("get", f"secrets/{fullname}-model-store", "-n", namespace),
                   ("create", f"secrets/{STORE_KEYS}", "-n", watched),
                   ("create", "deployments.apps", "-n", unwatched), ("list", rm, "-n", unwatched),
                   ("patch", rm, "--subresource=status", "-n", unwatched),
                   ("create", "deployments.apps", "-n", namespace)]  # the release namespace is not watched either
    if replicas > 1:
        allowed.append(("update", f"leases.coordination.k8s.io/{fullname}-operator", "-n", namespace))
        denied.append(("update", "leases.coordination.k8s.io/someone-else", "-n", namespace))
        denied.append(("update", f"leases.coordination.k8s.io/{fullname}-operator", "-n", watched))
    wrong = [a for a in allowed if not _can_i(cluster, kubeconfig, *a)]
    wrong += [("NOT DENIED", *d) for d in denied if _can_i(cluster, kubeconfig, *d)]
    assert not wrong, f"RBAC differs from the contract: {wrong}"
    listing = subprocess.run(
        [cluster.kubectl_path, "--kubeconfig", str(kubeconfig), "auth", "can-i", "--list", "-n", watched],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    granted_resources = {row[0] for row in rows}
    assert "*" not in granted_resources and "*.*" not in granted_resources
    # Columns: resource, non-resource URLs, resource names, verbs.
    secrets_rows = [" ".join(row[1:]) for row in rows if row[0] == "secrets"]
    assert secrets_rows == ([f"[] [{STORE_KEYS}] [get create patch]"] if cluster_mode else []), listing
    assert "recommendermodels.recserve.dev/status" in granted_resources, listing

    # (b) The real operator with this identity and the chart's own arguments reconciles a model.
    deployment = _get(cluster, "deployment", fullname, "-n", namespace)
    chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [a for a in chart_args if not a.startswith(("--liveness", "--log-format"))]
    if cluster_mode:
        # The shared test cluster holds other tests' models (some in namespaces being deleted): this run watches
        # the model's namespace only, with the ClusterRole's rights.
        assert "--all-namespaces" in args
        args = [a for a in args if a != "--all-namespaces"] + [f"--namespace={watched}"]
    args += ["--liveness", f"http://127.0.0.1:{_free_port()}/healthz", "--log-format=plain", "--verbose"]
    defaults = _get(cluster, "configmap", f"{fullname}-defaults", "-n", namespace)["data"]
    env = {
        **os.environ,
        **defaults,
        "KUBECONFIG": str(kubeconfig),
        "RECSERVE_METRICS_PORT": "0",  # several operators may run side by side in the test session
        "RECSERVE_RESYNC_SECONDS": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kopf", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        cluster.kubectl("apply", "-n", watched, "-f", "-", input=yaml.safe_dump(_model("rbac-proof")))
        owned = _wait_with_log(
            lambda: (_get(cluster, "jobs", "-n", watched, "-l", "app.kubernetes.io/instance=rbac-proof")
                     or {}).get("items"),
            log_path, "the operator running as the chart's ServiceAccount produced no build Job",
        )  # fmt: skip
        assert owned[0]["metadata"]["ownerReferences"][0]["name"] == "rbac-proof"
        envs = owned[0]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"prefix": "STORE_", "secretRef": {"name": STORE_KEYS}} in envs, envs
        copy = _get(cluster, "secret", STORE_KEYS, "-n", watched)
        source = _get(cluster, "secret", f"{fullname}-model-store", "-n", namespace)
        assert copy is not None and source is not None
        assert copy["data"] == {k: source["data"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        # The chart put it there in namespaced mode; the operator copied it in cluster mode.
        assert copy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == ("recserve" if cluster_mode else "Helm")
        _wait_with_log(lambda: (_get(cluster, "recommendermodel", "rbac-proof", "-n", watched) or {}).get("status"),
                       log_path, "the operator wrote no status")  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Kopf's graceful stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    log_text = log_path.read_text(errors="replace")
    lines = log_text.splitlines()
    # Two lines of context: Kopf logs the failed request just before the traceback.
    hits = [" | ".join(lines[max(0, i - 2) : i + 1]) for i, line in enumerate(lines)
            if any(m in line.lower() for m in FORBIDDEN_MARKERS)]  # fmt: skip
    assert not hits, "operator log shows denied requests or errors:\n" + "\n".join(hits[:20])
    assert "rbac-proof" in log_text, log_text[-3000:]
    # Its start-up reads with this identity: the CRD (listed by name) is the one the chart installed.
    assert "CRD schema Current" in log_text, log_text[-3000:]
