"""The first real install, on real pods: helm install → RecommenderModel from a PVC → Ready → answers.

Nothing here is simulated: the chart's operator runs as its Deployment, the operator's builder init
container converts the Keras model it reads from a PersistentVolumeClaim, Triton serves it, the builtin
router's nginx pods route to it by Service DNS, and the in-cluster Prometheus (Prometheus Operator) scrapes
what the operator's ServiceMonitor selects. On kind or another cluster, set RECSERVE_REAL_NODE_NAME to a
node that runs containers, carries `nvidia.com/gpu.product=NVIDIA-L4` and has the images loaded.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from recserve_cluster import nodeconfig as nc
from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import NODE, PYTHON_IMAGE, installed_platform
from tests.integration.realpods import placement as _placement

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "ctr"
PROMETHEUS = ("monitoring", "prometheus", 9090)


def _apply(cluster: Cluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def _get(cluster: Cluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def prometheus_query(cluster: Cluster, query: str) -> list[dict[str, Any]]:
    """An instant query against the in-cluster Prometheus, through the apiserver's Service proxy."""
    ns, svc, port = PROMETHEUS
    path = (f"/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy/api/v1/query?"
            + urllib.parse.urlencode({"query": query}))
    out = cluster.kubectl("get", "--raw", path, check=False)
    if out.returncode != 0:
        return []
    result: list[dict[str, Any]] = json.loads(out.stdout)["data"]["result"]
    return result


def _keras_model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    import keras

    from tests.builder.models import ctr_dnn, synthetic_ctr

    path = ctr_dnn(tmp_path / "model.keras", steps=5, hidden=(16, 8))
    feats, _ = synthetic_ctr(16, seed=5)
    x = np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1).astype(np.float32)
    return path, x, np.asarray(keras.models.load_model(path)(x))


@pytest.fixture(scope="module")
def platform(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chart installed with the local images, watching one namespace, its operator on the real node."""
    with installed_platform(cluster, tmp_path_factory.mktemp("chart"), "t-first-install") as ns:
        yield ns


def recommender_model(uri: str, version: int, **extra: Any) -> dict[str, Any]:
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


def _ready(cluster: Cluster, ns: str, timeout: float) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        rm = _get(cluster, "recommendermodel", MODEL, "-n", ns) or {}
        st = rm.get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions", [])}
        failed = [c for c in conds.values() if c.get("reason") in ("BuildFailed", "InvalidSpec")]
        if failed:
            raise AssertionError(f"the model failed: {failed}")
        return rm if st.get("phase") == "Ready" else None

    return wait_for(ready, timeout, 3, f"RecommenderModel {ns}/{MODEL} Ready")


def infer_in_cluster(cluster: Cluster, ns: str, url: str, x: np.ndarray, input_name: str) -> np.ndarray:
    """POST one KServe v2 request from a pod (DNS, Service, kube-proxy and the router all in the path)."""
    body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    script = ("import os, urllib.request\n"
              f"req = urllib.request.Request({url!r}, data=os.environ['BODY'].encode(),"
              " headers={'Content-Type': 'application/json'})\n"
              "print(urllib.request.urlopen(req, timeout=30).read().decode())\n")
    name = f"client-{secrets.token_hex(3)}"
    _apply(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
                     "spec": {**_placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                              "containers": [{"name": "client", "image": PYTHON_IMAGE,
                                              "imagePullPolicy": "IfNotPresent", "command": ["python", "-c", script],
                                              "env": [{"name": "BODY", "value": json.dumps(body)}]}]}})

    def done() -> str | None:
        phase = (_get(cluster, "pod", name, "-n", ns) or {}).get("status", {}).get("phase")
        if phase == "Failed":
            raise AssertionError(f"the client pod failed: {cluster.kubectl('logs', name, '-n', ns).stdout[-2000:]}")
        return phase if phase == "Succeeded" else None

    wait_for(done, 120, 1, "the client pod's request")
    response = json.loads(cluster.kubectl("logs", name, "-n", ns).stdout.strip().splitlines()[-1])
    data = response["outputs"][0]["data"]
    return np.asarray(data, dtype=np.float32).reshape(x.shape[0], -1)


def test_helm_install_serves_a_keras_model_from_a_pvc_through_the_router_with_metrics_by_revision(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    path, x, expected = _keras_model(tmp_path)
    volumes.upload(cluster, ns, "models", NODE, {"ctr/1/model.keras": path})
    try:
        _apply(cluster, {**recommender_model("pvc://models/ctr/1/model.keras", 1),
                         "metadata": {"name": MODEL, "namespace": ns}})
        rm = _ready(cluster, ns, 600)
        revision = rm["status"]["stable"]["revision"]
        pods = _get(cluster, "pods", "-n", ns, "-l", f"recserve.dev/revision={revision}")["items"]
        assert [p["spec"]["nodeName"] for p in pods] == [NODE]
        # The builder init container really ran the build (defect 1: its command exists in the image) and
        # read the model from the mounted claim (defect 3).
        init = pods[0]["status"]["initContainerStatuses"][0]
        assert init["state"]["terminated"]["exitCode"] == 0, init
        config = json.loads(cluster.kubectl("get", "configmap", f"{MODEL}-{revision}", "-n", ns, "-o",
                                            "jsonpath={.data}").stdout or "{}")
        assert "model_warmup" in config.get("config.pbtxt", ""), "Triton's readiness waits for the warmup"

        router = _get(cluster, "deployments", "-n", ns, "-l", "app.kubernetes.io/component=router")["items"]
        assert router, "the builtin router's Deployment exists"
        router_pods = _get(cluster, "pods", "-n", ns, "-l",
                           f"app.kubernetes.io/instance={router[0]['metadata']['name']},app.kubernetes.io/component=router")["items"]
        assert router_pods and {p["spec"]["nodeName"] for p in router_pods} == {NODE}

        endpoint = rm["status"]["endpoints"]["http"]
        assert endpoint == f"http://{MODEL}-router.{ns}.svc.cluster.local:8000"
        url = f"{endpoint}/v2/models/{MODEL}/infer"
        input_name = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/"
                                                f"{pods[0]['metadata']['name']}:8000/proxy/v2/models/{MODEL}")
                                .stdout)["inputs"][0]["name"]
        got = infer_in_cluster(cluster, ns, url, x, input_name)
        np.testing.assert_allclose(got, expected.reshape(got.shape), atol=1e-4)

        # The generated ServiceMonitor yields the `revision` label every query, dashboard and HPA rule uses
        # (defect 2), and Triton exports the latency summaries the p99 comes from (defect 5).
        def scraped() -> list[dict[str, Any]]:
            return prometheus_query(cluster, f'nv_inference_request_success{{namespace="{ns}",revision="{revision}"}}')

        series = wait_for(scraped, 180, 5, "Prometheus to scrape the revision through its ServiceMonitor")
        assert float(series[0]["value"][1]) >= 1
        p99 = prometheus_query(cluster, f'nv_inference_request_summary_us{{namespace="{ns}",revision="{revision}",'
                                        'quantile="0.99"}')
        assert p99, "Triton exports latency summaries"
    finally:
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        volumes.remove(cluster, ns, "models", NODE)
