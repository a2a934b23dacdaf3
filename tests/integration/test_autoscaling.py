"""The queue-time HPA on real pods: load through the router, the custom metric served, one Triton pod → two.

The chart's operator serves a tiny Keras model with `serving.autoscaling.targetQueueTimeMicroseconds`; a client
pod POSTs KServe v2 requests from several threads to the router endpoint in status; Triton's queue counters go
through the operator's ServiceMonitor, Prometheus and prometheus-adapter (the chart's rule file, as
recserve_cluster.addons installs it) to the revision's HorizontalPodAutoscaler, which scales the Deployment.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from recserve_operator.builders.hpa import QUEUE_TIME_METRIC
from recserve_operator.names import REVISION_LABEL

from recserve_cluster import volumes
from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.realpods import (
    MODEL,
    NODE,
    PYTHON_IMAGE,
    get,
    keras_model,
    placement,
    platform_fixture,
    recommender_model,
    wait_model_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

T = TypeVar("T")
# Any queueing at all is above 1 µs per request: with several clients and one model instance, requests wait.
TARGET_QUEUE_US = 1
THREADS = 4
# Longer than every wait below together; the pod is deleted when the test ends.
LOAD_SECONDS = 1800
# Small enough that two Triton pods (and the second one's builder) fit next to the add-ons on a 2-CPU node.
RESOURCES = {"gpu": 1, "cpu": "300m", "memory": "3Gi"}
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
LOAD = """
import json, os, threading, time, urllib.request
url, body = os.environ["URL"], os.environ["BODY"].encode()
stop = time.time() + float(os.environ["SECONDS"])
counts = {"ok": 0, "error": 0}
lock = threading.Lock()
def worker():
    while time.time() < stop:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30).read()
            key = "ok"
        except Exception:
            key = "error"
            time.sleep(0.5)
        with lock:
            counts[key] += 1
threads = [threading.Thread(target=worker, daemon=True) for _ in range(int(os.environ["THREADS"]))]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    time.sleep(5)
    with lock:
        print(json.dumps(counts), flush=True)
"""


platform = platform_fixture("t-autoscaling")


def _raw(cluster: Cluster, path: str) -> Any:
    out = cluster.kubectl("get", "--raw", path, check=False, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _quantity(value: str) -> float:
    """A Kubernetes quantity as a number (the suffixes the metrics APIs use)."""
    match = re.fullmatch(r"([0-9.]+)([numkMG]?)", value)
    assert match, value
    scale = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    return float(match.group(1)) * scale[match.group(2)]


def _load_pod(ns: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    container = {
        "name": "load", "image": PYTHON_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["python3", "-c", LOAD],
        "env": [{"name": "URL", "value": url}, {"name": "BODY", "value": json.dumps(body)},
                {"name": "THREADS", "value": str(THREADS)}, {"name": "SECONDS", "value": str(LOAD_SECONDS)}],
        # Capped, so the client cannot take a whole core from the second pod's build; its requests still overlap.
        "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        "securityContext": RESTRICTED,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"load-{secrets.token_hex(3)}", "namespace": ns},
            "spec": {**placement(), "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container]}}  # fmt: skip


def _counts(cluster: Cluster, ns: str, pod: str) -> dict[str, int]:
    """The load client's latest request counts (it prints them every few seconds)."""
    out = cluster.kubectl("logs", pod, "-n", ns, "--tail=1", check=False)
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    counts: dict[str, int] = json.loads(lines[-1]) if lines else {"ok": 0, "error": 0}
    return counts


def _explained(cluster: Cluster, ns: str, hpa: str, load: str, check: Callable[[], T]) -> T:
    """`check()`, and on failure the HPA's own account (events, conditions) and the load client's counts."""
    try:
        return check()
    except AssertionError as exc:
        describe = cluster.kubectl("describe", "hpa", hpa, "-n", ns, check=False).stdout
        raise AssertionError(f"{exc}\nload client: {_counts(cluster, ns, load)}\n{describe}") from None


def test_load_raises_the_queue_time_metric_and_the_hpa_scales_the_revision_to_two_pods(
    cluster: Cluster, platform: str, tmp_path: Path
) -> None:
    ns = platform
    path, x, _ = keras_model(tmp_path)
    volumes.upload(cluster, ns, "models", NODE, {"ctr/1/model.keras": path})
    load = ""
    try:
        autoscaling = {"minReplicas": 1, "maxReplicas": 2, "targetQueueTimeMicroseconds": TARGET_QUEUE_US}
        rm = recommender_model("pvc://models/ctr/1/model.keras", 1,
                               serving={"autoscaling": autoscaling, "resources": RESOURCES})
        cluster.kubectl("apply", "-f", "-", input=json.dumps({**rm, "metadata": {"name": MODEL, "namespace": ns}}))
        rm = wait_model_ready(cluster, ns)
        revision = rm["status"]["stable"]["revision"]
        name = f"{MODEL}-{revision}"
        hpa = get(cluster, "hpa", name, "-n", ns)
        assert hpa is not None, f"the operator creates HPA {ns}/{name}"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [QUEUE_TIME_METRIC]
        assert get(cluster, "deployment", name, "-n", ns)["spec"]["replicas"] == 1

        selector = f"{REVISION_LABEL}={revision},app.kubernetes.io/component=predictor"  # not its build Job's pod
        (pod,) = get(cluster, "pods", "-n", ns, "-l", selector)["items"]
        input_name = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{ns}/pods/"
                                                f"{pod['metadata']['name']}:8000/proxy/v2/models/{MODEL}")
                                .stdout)["inputs"][0]["name"]
        body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        url = f"{rm['status']['endpoints']['http']}/v2/models/{MODEL}/infer"
        client = _load_pod(ns, url, body)
        load = client["metadata"]["name"]
        cluster.kubectl("apply", "-f", "-", input=json.dumps(client))

        # 1. prometheus-adapter serves the metric for the revision's pod, above the target under load (Prometheus
        #    finds the new ServiceMonitor within ~1 min, rate() needs two 15 s scrapes, the adapter relists every 15 s).
        metric_path = (f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{ns}/pods/*/{QUEUE_TIME_METRIC}?"
                       + urllib.parse.urlencode({"labelSelector": selector}))

        def served() -> list[dict[str, Any]] | None:
            items = (_raw(cluster, metric_path) or {}).get("items", [])
            ours = [i for i in items if i["describedObject"]["name"] == pod["metadata"]["name"]]
            return ours if ours and _quantity(ours[0]["value"]) > TARGET_QUEUE_US else None

        items = _explained(cluster, ns, name, load, lambda: wait_for(
            served, 300, 5, f"{QUEUE_TIME_METRIC} of pod {pod['metadata']['name']} above {TARGET_QUEUE_US} µs"))
        assert items[0]["metricName"] == QUEUE_TIME_METRIC  # custom.metrics.k8s.io/v1beta1 MetricValue

        # 2. The HPA reads it: a current value in status, next to the target.
        def measured() -> dict[str, Any] | None:
            status = (get(cluster, "hpa", name, "-n", ns) or {}).get("status", {})
            current = [m for m in status.get("currentMetrics") or [] if m.get("type") == "Pods"]
            return current[0] if current and current[0]["pods"].get("current", {}).get("averageValue") else None

        current = _explained(cluster, ns, name, load,
                             lambda: wait_for(measured, 180, 5, f"HPA {ns}/{name} to report {QUEUE_TIME_METRIC}"))
        assert current["pods"]["metric"]["name"] == QUEUE_TIME_METRIC
        assert _quantity(current["pods"]["current"]["averageValue"]) > TARGET_QUEUE_US, current

        # 3. It scales the revision's Deployment to maxReplicas, and the second Triton pod (it only fetches the
        #    revision's built artifact) becomes ready.
        def scaled() -> dict[str, Any] | None:
            deployment = get(cluster, "deployment", name, "-n", ns) or {}
            return deployment if deployment.get("spec", {}).get("replicas") == 2 else None

        _explained(cluster, ns, name, load, lambda: wait_for(scaled, 240, 5, f"Deployment {ns}/{name} at 2 replicas"))

        def both_ready() -> dict[str, Any] | None:
            deployment = get(cluster, "deployment", name, "-n", ns) or {}
            return deployment if deployment.get("status", {}).get("readyReplicas") == 2 else None

        _explained(cluster, ns, name, load, lambda: wait_for(both_ready, 600, 5, f"2 ready pods of {ns}/{name}"))
        pods = get(cluster, "pods", "-n", ns, "-l", selector)["items"]
        assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {NODE}
        # The HPA controller records the new scale at its next sync (every 15 s), after the pod is already Ready.
        def counted() -> dict[str, Any] | None:
            status: dict[str, Any] = get(cluster, "hpa", name, "-n", ns)["status"]
            return status if status.get("currentReplicas") == 2 else None

        hpa_status = wait_for(counted, 60, 2, "the HPA to count 2 replicas")
        assert hpa_status["desiredReplicas"] == 2, hpa_status
        assert _counts(cluster, ns, load)["ok"] > 0, "the load client got answers through the router"
    finally:
        if load:
            cluster.kubectl("delete", "pod", load, "-n", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", ns, "--ignore-not-found", "--wait=true",
                        "--timeout=120s", check=False, timeout=150)
        volumes.remove(cluster, ns, "models", NODE)
