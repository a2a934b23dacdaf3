"""The chart installed for tests on real pods: local images, one watched namespace, everything on the real node."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import yaml
from numpy.typing import NDArray

from recserve_cluster import nodeconfig as nc
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import get_json

ROOT = Path(__file__).resolve().parents[2]
# On kind or another cluster: a node that runs containers, carries `nvidia.com/gpu.product=NVIDIA-L4` and has the
# images loaded.
NODE = os.environ.get("RECSERVE_REAL_NODE_NAME", nc.NODE_NAME)
PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
MODEL = "ctr"  # the RecommenderModel (and Triton model) name the real-pod tests use


def placement() -> dict[str, Any]:
    """Pod spec fields that put a pod on NODE (it carries the GPU taint)."""
    return {"nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


@contextmanager
def installed_platform(
    cluster: Cluster, tmp: Path, prefix: str, extra_values: Callable[[str], dict[str, Any]] | None = None
) -> Iterator[str]:
    """The chart installed with the local images, watching one new namespace (yielded), its operator on NODE, its
    defaults otherwise: each revision is built once by a Job and published to the embedded model store.
    `extra_values(namespace)`: more chart values (top-level keys, replacing these), for the namespace to watch.

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
                           "routerTolerations": placement()["tolerations"]},
              # Build once, the chart's default, on the embedded store; this cluster has no volume provisioner.
              "modelStore": {"embedded": {"persistence": {"enabled": False}}}}
    values.update(extra_values(ns) if extra_values is not None else {})
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


def platform_fixture(prefix: str, extra_values: Callable[[str], dict[str, Any]] | None = None) -> Any:
    """A module-scoped `platform` fixture: the chart installed for the module's tests, its namespace yielded."""

    @pytest.fixture(scope="module")
    def platform(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        with installed_platform(cluster, tmp_path_factory.mktemp("chart"), prefix, extra_values) as ns:
            yield ns

    return platform


def apply(cluster: Cluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


get = get_json  # `kubectl get -o json`, None when the object does not exist


def keras_model(tmp: Path, rows: int = 16, seed: int = 5) -> tuple[Path, NDArray[Any], NDArray[Any]]:
    """A small trained CTR DNN saved as .keras, `rows` request rows for it and Keras's own predictions."""
    import keras

    from tests.builder.models import ctr_dnn, synthetic_ctr

    path = ctr_dnn(tmp / "model.keras", steps=5, hidden=(16, 8))
    feats, _ = synthetic_ctr(rows, seed=seed)
    x = np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1).astype(np.float32)
    return path, x, np.asarray(keras.models.load_model(path)(x))


def recommender_model(uri: str, version: int, **extra: Any) -> dict[str, Any]:
    """The real-pod tests' RecommenderModel `MODEL`: ONNX Runtime on the real node's GPU product, a builtin-router
    canary of one quick step. `extra` merges into the spec's top-level sections."""
    spec: dict[str, Any] = {
        "model": {"uri": uri, "format": "keras", "version": version},
        "optimize": {"backend": "onnxruntime", "precision": "fp32", "parity": {"maxAbsError": 1e-4}},
        "serving": {"replicas": 1, "maxBatchSize": 64, "instances": {"kind": "GPU", "count": 1},
                    "resources": {"gpu": 1, "cpu": "1", "memory": "3Gi"}, "gpuProduct": nc.REAL_NODE.gpu_product},
        "rollout": {"strategy": "canary", "routing": {"provider": "builtin"},
                    "steps": [{"weight": 50, "pause": "10s"}],
                    "analysis": {"interval": "15s", "maxErrorRate": 0.05, "minRequests": 5}},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    return {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel",
            "metadata": {"name": MODEL}, "spec": spec}


def wait_model_ready(cluster: Cluster, ns: str, name: str = MODEL, timeout: float = 600) -> dict[str, Any]:
    """The RecommenderModel once its phase is Ready; fails at once on BuildFailed or InvalidSpec."""

    def ready() -> dict[str, Any] | None:
        rm = get(cluster, "recommendermodel", name, "-n", ns) or {}
        st = rm.get("status") or {}
        failed = [c for c in st.get("conditions", []) if c.get("reason") in ("BuildFailed", "InvalidSpec")]
        if failed:
            raise AssertionError(f"the model failed: {failed}")
        return rm if st.get("phase") == "Ready" else None

    return wait_for(ready, timeout, 3, f"RecommenderModel {ns}/{name} Ready")


def run_client_pod(cluster: Cluster, ns: str, script: str, *, image: str = PYTHON_IMAGE,
                   env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run `python -c script` once in a pod on NODE; its log (stdout). Fails with the log when the pod fails."""
    name = f"client-{secrets.token_hex(3)}"
    container = {"name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python", "-c", script],
                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "allowPrivilegeEscalation": False,
                                     "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}}
    apply(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
                    "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                             "containers": [container]}})

    def done() -> str | None:
        phase = (get(cluster, "pod", name, "-n", ns) or {}).get("status", {}).get("phase")
        if phase == "Failed":
            raise AssertionError(f"client pod {name} failed: {cluster.kubectl('logs', name, '-n', ns).stdout[-2000:]}")
        return phase if phase == "Succeeded" else None

    wait_for(done, timeout, 1, f"client pod {name}")
    return cluster.kubectl("logs", name, "-n", ns).stdout


def infer_in_cluster(cluster: Cluster, ns: str, url: str, x: NDArray[Any], input_name: str) -> NDArray[Any]:
    """POST one KServe v2 request from a pod (DNS, Service, kube-proxy and the router all in the path)."""
    body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    script = ("import os, urllib.request\n"
              f"req = urllib.request.Request({url!r}, data=os.environ['BODY'].encode(),"
              " headers={'Content-Type': 'application/json'})\n"
              "print(urllib.request.urlopen(req, timeout=30).read().decode())\n")
    response = json.loads(run_client_pod(cluster, ns, script, env={"BODY": json.dumps(body)}).strip().splitlines()[-1])
    return np.asarray(response["outputs"][0]["data"], dtype=np.float32).reshape(x.shape[0], -1)


GRPC_CLIENT = """
import json, os, numpy as np, tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(os.environ["ADDRESS"])
x = np.asarray(json.loads(os.environ["ROWS"]), dtype=np.float32)
inp = grpcclient.InferInput(os.environ["INPUT"], list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(os.environ["MODEL"], [inp])
print(json.dumps(result.as_numpy(result.get_response().outputs[0].name).ravel().tolist()))
"""


def infer_grpc_in_cluster(cluster: Cluster, ns: str, address: str, x: NDArray[Any], *, model: str,
                          input_name: str) -> NDArray[Any]:
    """One KServe v2 gRPC inference from a pod, with tritonclient (the operator image carries it)."""
    from recserve_cluster import images

    out = run_client_pod(cluster, ns, GRPC_CLIENT, image=images.operator_image(),
                         env={"ADDRESS": address, "MODEL": model, "INPUT": input_name,
                              "ROWS": json.dumps(x.tolist())})
    return np.asarray(json.loads(out.strip().splitlines()[-1]), dtype=np.float32).reshape(x.shape[0], -1)


PROMETHEUS = ("monitoring", "prometheus", 9090)
DASHBOARD = ROOT / "charts" / "recserve" / "dashboards" / "recserve-overview.json"


def prometheus_query(cluster: Cluster, query: str, *, refused_ok: bool = False) -> list[dict[str, Any]]:
    """An instant query against the in-cluster Prometheus, through the API server's Service proxy.

    refused_ok: a refusal (Prometheus restarting, the proxy's 503) reads as no data, for polling loops.
    """
    ns, svc, port = PROMETHEUS
    path = f"/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy/api/v1/query?" + urlencode({"query": query})
    out = cluster.kubectl("get", "--raw", path, check=False)
    if out.returncode != 0:
        if refused_ok:
            return []
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


def save_onnx(graph: Any, path: Path) -> Path:
    """An opset-13 ONNX model of `graph` (IR 8, which the CPU Triton's ONNX Runtime reads), checked and saved."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
