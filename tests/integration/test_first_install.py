"""The first real install, on real pods: helm install → the local example from a PVC → Ready → answers.

The example is `examples/ctr-dnn/local-l4.yaml`, applied unchanged: it is the manifest the local node serves.

Nothing here is simulated: the chart's operator runs as its Deployment, with the chart's defaults: the revision's
build Job converts the Keras model it reads from a PersistentVolumeClaim and publishes it to the chart's embedded
model store, the serving pod's init container fetches it and checks its digest, Triton serves it, the builtin
router's nginx pods route to it by Service DNS, and the in-cluster Prometheus (Prometheus Operator) scrapes
what the operator's ServiceMonitor selects. On kind or another cluster, set RECSERVE_REAL_NODE_NAME to a
node that runs containers, carries `nvidia.com/gpu.product=NVIDIA-L4` and has the images loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from recserve_operator.names import BUILDER_CONTAINER, COMPONENT_LABEL, FETCH_CONTAINER, REVISION_LABEL

from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import recserve
from tests.integration.realpods import (
    NODE,
    get,
    infer_grpc_in_cluster,
    infer_in_cluster,
    keras_model,
    platform_fixture,
    prometheus_query,
    wait_model_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ctr-dnn" / "local-l4.yaml"
platform = platform_fixture("t-first-install")


def test_helm_install_serves_the_local_example_from_a_pvc_through_the_router_over_http_and_grpc(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    example = yaml.safe_load(EXAMPLE.read_text())
    name, uri = example["metadata"]["name"], example["spec"]["model"]["uri"]
    claim, key = uri.removeprefix("pvc://").split("/", 1)
    path, x, expected = keras_model(tmp_path)
    volumes.upload(cluster, ns, claim, NODE, {key: path})
    try:
        cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))  # the example file itself, unchanged
        rm = wait_model_ready(cluster, ns, name)
        revision = rm["status"]["stable"]["revision"]
        pods = get(cluster, "pods", "-n", ns, "-l",
                   f"{REVISION_LABEL}={revision},{COMPONENT_LABEL}=predictor")["items"]  # fmt: skip
        assert [p["spec"]["nodeName"] for p in pods] == [NODE]
        # Build once, by default: the builder really ran the build in the revision's Job (defect 1: its command
        # exists in the image), reading the model from the mounted claim (defect 3); the serving pod only fetched.
        (build,) = get(cluster, "pods", "-n", ns, "-l", f"{REVISION_LABEL}={revision},{COMPONENT_LABEL}=builder")[
            "items"]  # fmt: skip
        (builder,) = build["status"]["containerStatuses"]
        assert builder["name"] == BUILDER_CONTAINER and builder["state"]["terminated"]["exitCode"] == 0, builder
        (init,) = pods[0]["status"]["initContainerStatuses"]
        assert init["name"] == FETCH_CONTAINER and init["state"]["terminated"]["exitCode"] == 0, init
        assert not any(v.get("persistentVolumeClaim") for v in pods[0]["spec"]["volumes"]), "serving mounts no source"
        # `kubectl recserve build-log` shows that build's output, down to its JSON report with the parity gate's
        # measurement against the Keras model.
        log = recserve(cluster, "build-log", name, "-n", ns)
        assert log.returncode == 0, log.stderr
        report = json.loads(log.stdout.strip().splitlines()[-1])
        assert report["status"] == "ok" and report["parity"]["passed"] is True, report.get("parity")
        assert f"revision {revision}, pod {build['metadata']['name']}" in log.stderr
        missing = recserve(cluster, "build-log", name, "-n", ns, "--revision", "0000000000")
        assert missing.returncode == 1 and f"revisions with pods: {revision}" in missing.stderr, missing.stderr
        config = json.loads(cluster.kubectl("get", "configmap", f"{name}-{revision}", "-n", ns, "-o",
                                            "jsonpath={.data}").stdout or "{}")
        assert "model_warmup" in config.get("config.pbtxt", ""), "Triton's readiness waits for the warmup"

        router = get(cluster, "deployments", "-n", ns, "-l", "app.kubernetes.io/component=router")["items"]
        assert router, "the builtin router's Deployment exists"
        selector = f"app.kubernetes.io/instance={router[0]['metadata']['name']},app.kubernetes.io/component=router"
        router_pods = get(cluster, "pods", "-n", ns, "-l", selector)["items"]
        assert router_pods and {p["spec"]["nodeName"] for p in router_pods} == {NODE}

        endpoints = rm["status"]["endpoints"]
        host = f"{name}-router.{ns}.svc.cluster.local"
        assert endpoints == {"http": f"http://{host}:8000", "grpc": f"{host}:8001"}
        input_name = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/"
                                                f"{pods[0]['metadata']['name']}:8000/proxy/v2/models/{name}")
                                .stdout)["inputs"][0]["name"]
        got = infer_in_cluster(cluster, ns, f"{endpoints['http']}/v2/models/{name}/infer", x, input_name)
        np.testing.assert_allclose(got, expected.reshape(got.shape), atol=1e-4)
        # High-QPS clients speak gRPC: the router's nginx carries it to Triton's gRPC port (defect 8).
        got = infer_grpc_in_cluster(cluster, ns, endpoints["grpc"], x, model=name, input_name=input_name)
        np.testing.assert_allclose(got, expected.reshape(got.shape), atol=1e-4)

        # The generated ServiceMonitor yields the `revision` label every query, dashboard and HPA rule uses
        # (defect 2), and Triton exports the latency summaries the p99 comes from (defect 5).
        def scraped() -> list[dict[str, Any]] | None:
            series = prometheus_query(
                cluster, f'nv_inference_request_success{{namespace="{ns}",revision="{revision}"}}', refused_ok=True)
            return series if series and float(series[0]["value"][1]) >= 2 else None  # the HTTP and gRPC requests

        wait_for(scraped, 180, 5, "Prometheus to scrape both requests through the revision's ServiceMonitor")
        p99 = prometheus_query(cluster, f'nv_inference_request_summary_us{{namespace="{ns}",revision="{revision}",'
                                        'quantile="0.99"}')
        assert p99, "Triton exports latency summaries"
    finally:
        cluster.kubectl("delete", "recommendermodel", name, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        volumes.remove(cluster, ns, claim, NODE)
