"""The in-cluster add-ons for real: Prometheus Operator's Prometheus scrapes a ServiceMonitor, prometheus-adapter
serves the HPA's queue-time metric, metrics-server reports a real pod's CPU.

The scrape target stands in for Triton (nothing here needs a GPU): a Python exporter on the real node serving
the two Triton counters the adapter rule reads, behind the Service, ServiceMonitor and HPA the RecServe
operator's own builders produce. Prometheus is queried from the host through its Service's ClusterIP only.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import yaml
from recserve_operator.builders.common import Ids, revision_selector
from recserve_operator.builders.hpa import QUEUE_TIME_METRIC, build_hpa
from recserve_operator.builders.service import build_revision_service
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.metrics.prometheus import REVISION_LABEL
from recserve_operator.spec import parse_spec

from recserve_cluster import addons
from recserve_cluster import nodeconfig as nc
from recserve_cluster.cluster import CLUSTER_NAME, Cluster, real_node_enabled
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

ROOT = Path(__file__).resolve().parents[2]
PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
# Per request: 250 µs in the queue. The counters move together, so the adapter's rate ratio is exactly this.
QUEUE_US_PER_REQUEST = 250
EXPORTER = """
import http.server, time
T0 = time.time()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = int((time.time() - T0) * 20)
        body = (
            "# TYPE nv_inference_request_success counter\\n"
            'nv_inference_request_success{model="ctr",version="1"} %d\\n'
            "# TYPE nv_inference_queue_duration_us counter\\n"
            'nv_inference_queue_duration_us{model="ctr",version="1"} %d\\n'
        ) % (n, n * QUEUE_US)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body.encode())
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8002), H).serve_forever()
""".replace("QUEUE_US", str(QUEUE_US_PER_REQUEST))


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    """The add-ons as `up` installs them (idempotent: on a cluster that has them this changes nothing)."""
    if cluster.provider != "kwok" or not real_node_enabled():
        pytest.skip("the add-ons run on the local cluster's real node (RECSERVE_REAL_NODE=0 or another provider)")
    from recserve_cluster.realnode import RealNode

    addons.install(cluster, str(RealNode(CLUSTER_NAME).paths.containerd_socket))
    return cluster


def _apply(cluster: Cluster, *objs: dict[str, Any]) -> None:
    cluster.apply_objects(list(objs))


def _get(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)  # type: ignore[no-any-return]


def _raw(cluster: Cluster, path: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", "--raw", path, check=False, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _prometheus_query(cluster: Cluster, query: str) -> list[dict[str, Any]]:
    ip = _get(cluster, "service", addons.PROMETHEUS_SERVICE, "-n", addons.NAMESPACE)["spec"]["clusterIP"]
    url = f"http://{ip}:{addons.PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def _spec(queue_target_us: int) -> Any:
    manifest = yaml.safe_load((ROOT / "examples/ctr-dnn/cpu-only.yaml").read_text())
    manifest["spec"]["serving"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2,
                                                  "targetQueueTimeMicroseconds": queue_target_us}
    return parse_spec(manifest["spec"])


def _unowned(obj: dict[str, Any]) -> dict[str, Any]:
    # No RecommenderModel owns these here; a dangling owner reference would let the garbage collector delete them.
    obj = deepcopy(obj)
    obj["metadata"].pop("ownerReferences", None)
    return obj


def _exporter_deployment(ids: Ids) -> dict[str, Any]:
    """Where the operator would run Triton for this revision: same name, same pod labels, the metrics port."""
    labels = revision_selector(ids)
    container = {
        "name": "triton-metrics", "image": PYTHON_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", EXPORTER],
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8001},
                  {"name": "metrics", "containerPort": 8002}],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": RESTRICTED,
    }
    pod = {**nc.real_pod_placement(), "containers": [container],
           "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                               "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": ids.revision_name, "namespace": ids.namespace, "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}


@pytest.fixture
def triton_standin(installed: Cluster, namespace: str) -> Iterator[tuple[Ids, Any]]:
    """A revision's Service and ServiceMonitor (the operator's builders) in front of the exporter Deployment."""
    spec = _spec(queue_target_us=100)
    ids = Ids(name="ctr", namespace=namespace, uid="00000000-0000-0000-0000-000000000001", revision="r1")
    _apply(installed, _exporter_deployment(ids), _unowned(build_revision_service(spec, ids)),
           _unowned(build_servicemonitor(ids.namespace)))
    installed.kubectl("rollout", "status", f"deployment/{ids.revision_name}", "-n", namespace, "--timeout=120s",
                      timeout=150)
    yield ids, spec


def test_a_servicemonitor_target_produces_series_in_prometheus(installed: Cluster,
                                                               triton_standin: tuple[Ids, Any]) -> None:
    ids, _ = triton_standin
    query = f'nv_inference_request_success{{namespace="{ids.namespace}"}}'
    # A new ServiceMonitor reaches Prometheus after the kubelet syncs its config Secret volume (up to ~1 min)
    # and the reloader's next poll.
    series = wait_for(lambda: _prometheus_query(installed, query), 150, 2, f"series of {query}")
    labels = series[0]["metric"]
    pods = _get(installed, "pods", "-n", ids.namespace, "-l", f"recserve.dev/revision={ids.revision}")["items"]
    assert labels["pod"] in {p["metadata"]["name"] for p in pods}
    assert labels["service"] == ids.revision_name
    # The ServiceMonitor's relabeling: the revision reaches every series under the name the rollout queries use.
    assert labels[REVISION_LABEL] == ids.revision
    assert "recserve_dev_revision" not in labels
    assert labels["model"] == "ctr"


def test_the_prometheus_pod_runs_the_built_server_non_root_with_a_read_only_root(installed: Cluster) -> None:
    pod = _get(installed, "pod", f"prometheus-{addons.PROMETHEUS_NAME}-0", "-n", addons.NAMESPACE)
    assert pod["spec"]["nodeName"] == nc.NODE_NAME
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for c in pod["spec"]["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    # The reloader's override keeps every flag the operator generates (its init container shows them).
    init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "init-config-reloader")
    reloader = next(c for c in pod["spec"]["containers"] if c["name"] == "config-reloader")
    assert reloader["args"] == addons.reloader_args()
    paths = ("--config-file", "--config-envsubst-file", "--watched-dir")
    assert {a for a in init["args"] if a.startswith(paths)} <= set(reloader["args"])
    ip = _get(installed, "service", addons.PROMETHEUS_SERVICE, "-n", addons.NAMESPACE)["spec"]["clusterIP"]
    with urllib.request.urlopen(f"http://{ip}:{addons.PROMETHEUS_PORT}/api/v1/status/buildinfo", timeout=10) as r:
        assert json.loads(r.read())["data"]["version"] == addons.PROMETHEUS_VERSION.lstrip("v")


def _quantity(value: str) -> float:
    """A Kubernetes quantity as a number (the suffixes the metrics APIs use)."""
    match = re.fullmatch(r"([0-9.]+)([numkMG]?|Ki|Mi|Gi)", value)
    assert match, value
    scale = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30}
    return float(match.group(1)) * scale[match.group(2)]


def test_the_custom_metrics_api_serves_the_hpa_queue_time_metric(installed: Cluster,
                                                                 triton_standin: tuple[Ids, Any]) -> None:
    ids, spec = triton_standin
    listed: bool = wait_for(
        lambda: {r["name"] for r in (_raw(installed, "/apis/custom.metrics.k8s.io/v1beta1") or {}).get("resources", [])}
        >= {f"pods/{QUEUE_TIME_METRIC}"},
        120, 3, f"pods/{QUEUE_TIME_METRIC} in the custom metrics API",
    )
    assert listed
    path = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{ids.namespace}/pods/*/{QUEUE_TIME_METRIC}"
    items = wait_for(lambda: (_raw(installed, path) or {}).get("items"), 120, 3, path)
    assert abs(_quantity(items[0]["value"]) - QUEUE_US_PER_REQUEST) < 1, items
    # The HPA the operator builds reads it: 250 µs against a 100 µs target scales the revision up.
    _apply(installed, _unowned(build_hpa(spec, ids) or {}))

    def measured() -> dict[str, Any] | None:
        status = _get(installed, "hpa", ids.revision_name, "-n", ids.namespace).get("status", {})
        return status if status.get("currentMetrics") and status.get("desiredReplicas", 0) > 1 else None

    status = wait_for(measured, 120, 3, "the HPA to read triton_queue_time_us")
    current = status["currentMetrics"][0]["pods"]
    assert current["metric"]["name"] == QUEUE_TIME_METRIC
    assert abs(_quantity(current["current"]["averageValue"]) - QUEUE_US_PER_REQUEST) < 1, status
    assert status["desiredReplicas"] == 2


def test_metrics_server_reports_cpu_of_a_pod_on_the_real_node(installed: Cluster, namespace: str) -> None:
    busy = ("import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.05: pass\n"
            "    time.sleep(0.2)\n")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "busy", "namespace": namespace},
           "spec": {**nc.real_pod_placement(),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "busy", "image": PYTHON_IMAGE, "imagePullPolicy": "IfNotPresent",
                                    "command": ["python3", "-c", busy], "securityContext": RESTRICTED,
                                    "resources": {"requests": {"cpu": "10m"}, "limits": {"memory": "32Mi"}}}]}}
    _apply(installed, pod)
    installed.kubectl("wait", "--for=condition=Ready", "pod/busy", "-n", namespace, "--timeout=120s", timeout=150)
    path = f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/busy"
    metrics = wait_for(lambda: _raw(installed, path), 120, 3, path)
    assert _quantity(metrics["containers"][0]["usage"]["cpu"]) > 0, metrics
    top = installed.kubectl("top", "pod", "busy", "-n", namespace, "--no-headers").stdout
    assert top.split()[0] == "busy" and top.split()[1].endswith("m"), top


def test_metrics_server_reads_only_the_real_kubelet(installed: Cluster) -> None:
    nodes = wait_for(lambda: (_raw(installed, "/apis/metrics.k8s.io/v1beta1/nodes") or {}).get("items"), 120, 3,
                     "node metrics")
    assert [n["metadata"]["name"] for n in nodes] == [nc.NODE_NAME]
    log = installed.kubectl("logs", "deployment/metrics-server", "-n", addons.METRICS_SERVER_NAMESPACE,
                            "--tail=200").stdout
    assert "Failed to scrape node" not in log, log[-3000:]


def test_a_second_install_changes_no_object(installed: Cluster) -> None:
    placeholder = addons.ServingCert("", "", "")
    refs = [addons._ref(o) for o in addons.all_objects(placeholder, placeholder)]

    def versions() -> dict[str, str]:
        seen = {}
        for ref in refs:
            meta = _get(installed, *ref)["metadata"]
            # Objects with a spec generation are compared by it (their status moves on its own).
            seen[ref[0]] = str(meta.get("generation") or meta["resourceVersion"])
        return seen

    before = versions()
    from recserve_cluster.realnode import RealNode

    addons.install(installed, str(RealNode(CLUSTER_NAME).paths.containerd_socket))
    assert versions() == before
