"""Smoke tests on the real node: containers run, DNS resolves, the chart's operator and the images work for real.

These pods run in containerd on `real-0` (kubelet, runc, CNI, kube-proxy, CoreDNS), with the images
`make images` built from the project's own Dockerfile and stand-ins. On kind or an existing cluster,
set RECSERVE_REAL_NODE_NAME to a node that runs containers and has the images loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from numpy.typing import NDArray

from recserve_cluster import nodeconfig as nc
from recserve_cluster.cluster import Cluster
from recserve_cluster.errors import ClusterError
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.realnode]

ROOT = Path(__file__).resolve().parents[2]
NODE = os.environ.get("RECSERVE_REAL_NODE_NAME", nc.NODE_NAME)
PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
BUILDER_IMAGE = "ghcr.io/recserve/model-repo-builder:0.1.0"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


@pytest.fixture(autouse=True)
def _real_node(cluster: Cluster) -> None:
    """These tests need containers: on the local provider they are skipped only when the user asked for the
    kwok-only cluster (RECSERVE_REAL_NODE=0); CI runs the default, with the real node."""
    from recserve_cluster.cluster import real_node_enabled

    if cluster.provider == "kwok" and not real_node_enabled():
        pytest.skip("RECSERVE_REAL_NODE=0: the kwok-only cluster runs no containers")


def _placement() -> dict[str, Any]:
    return {"nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def _pod(name: str, ns: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    pod_spec = {
        **_placement(),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"imagePullPolicy": "IfNotPresent", "securityContext": RESTRICTED, **c} for c in containers],
        **spec,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": pod_spec}


def _apply(cluster: Cluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def _pod_json(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)  # type: ignore[no-any-return]


def _wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        pod = _pod_json(cluster, ns, name)
        if pod["status"].get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"pod {name} failed: {json.dumps(pod['status'])[:2000]}")
        return pod if pod["status"].get("phase") == phase else None

    return wait_for(reached, timeout, 1, f"pod {ns}/{name} {phase}")


def _wait_ready(cluster: Cluster, ns: str, name: str, timeout: float = 180) -> dict[str, Any]:
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", ns, f"--timeout={int(timeout)}s",
                    timeout=timeout + 30)
    return _pod_json(cluster, ns, name)


def test_a_pod_runs_in_a_container_and_its_logs_are_read_through_the_api(cluster: Cluster, namespace: str) -> None:
    script = "import os, socket; print('hello from', socket.gethostname(), 'uid', os.getuid())"
    _apply(cluster, _pod("hello", namespace, [{"name": "main", "image": PYTHON_IMAGE,
                                                "command": ["python", "-c", script]}], restartPolicy="Never"))
    pod = _wait_phase(cluster, namespace, "hello", "Succeeded")
    assert pod["spec"]["nodeName"] == NODE
    assert pod["status"]["podIP"].startswith("10.244.") or NODE != nc.NODE_NAME
    logs = cluster.kubectl("logs", "hello", "-n", namespace).stdout
    assert logs.strip() == "hello from hello uid 10001"


def test_a_pod_reaches_another_by_its_service_dns_name(cluster: Cluster, namespace: str) -> None:
    server = _pod("web", namespace, [{
        "name": "web", "image": PYTHON_IMAGE,
        "command": ["python", "-c", "import http.server as h\n"
                    "class H(h.BaseHTTPRequestHandler):\n"
                    "    def do_GET(self):\n"
                    "        self.send_response(200); self.end_headers(); self.wfile.write(b'served by web')\n"
                    "h.HTTPServer(('', 8080), H).serve_forever()"],
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }])
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    _apply(cluster, server, service)
    _wait_ready(cluster, namespace, "web")
    fetch = ("import socket, urllib.request; "
             f"print(socket.gethostbyname('web.{namespace}.svc.cluster.local')); "
             f"print(urllib.request.urlopen('http://web.{namespace}.svc.cluster.local/', timeout=10).read().decode())")
    _apply(cluster, _pod("client", namespace, [{"name": "main", "image": PYTHON_IMAGE,
                                                 "command": ["python", "-c", fetch]}], restartPolicy="Never"))
    _wait_phase(cluster, namespace, "client", "Succeeded")
    resolved, body = cluster.kubectl("logs", "client", "-n", namespace).stdout.strip().splitlines()
    svc_ip = json.loads(cluster.kubectl("get", "svc", "web", "-n", namespace, "-o", "json").stdout)["spec"]["clusterIP"]
    assert resolved == svc_ip
    assert body == "served by web"


def test_a_gpu_pod_lands_on_the_real_node_only_while_it_fits_the_simulated_capacity(
    cluster: Cluster, namespace: str
) -> None:
    def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
        pod = _pod(name, namespace, [{"name": "main", "image": PYTHON_IMAGE,
                                      "command": ["python", "-c", "import time; time.sleep(600)"],
                                      "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
                   terminationGracePeriodSeconds=1)
        pod["spec"]["nodeSelector"] = {"nvidia.com/gpu.product": nc.REAL_NODE.gpu_product}
        return pod

    _apply(cluster, gpu_pod("all-gpus", nc.REAL_NODE.gpus))
    pod = _wait_ready(cluster, namespace, "all-gpus")
    assert pod["spec"]["nodeName"] == NODE
    _apply(cluster, gpu_pod("one-more", 1))

    def unschedulable() -> str | None:
        p = _pod_json(cluster, namespace, "one-more")
        cond: dict[str, Any] = next((c for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled"), {})
        return cond.get("message") if cond.get("reason") == "Unschedulable" else None

    message = wait_for(unschedulable, 60, 1, "the extra GPU pod to be refused")
    assert "Insufficient nvidia.com/gpu" in message
    cluster.kubectl("delete", "pod", "all-gpus", "-n", namespace, "--wait=true", timeout=90)
    pod = _wait_ready(cluster, namespace, "one-more")
    assert pod["spec"]["nodeName"] == NODE


def _keras_model(tmp_path: Path) -> tuple[Path, NDArray[Any], NDArray[Any]]:
    from tests.builder.models import ctr_dnn, synthetic_ctr

    path = ctr_dnn(tmp_path / "ctr.keras", steps=5, hidden=(16, 8))
    import keras

    feats, _ = synthetic_ctr(8, seed=3)
    x = np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1).astype(np.float32)
    return path, x, np.asarray(keras.models.load_model(path)(x))


def test_the_builder_image_builds_a_keras_model_in_an_init_container_and_triton_serves_it(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    model, x, expected = _keras_model(tmp_path)
    # A ConfigMap carries the model file on any cluster (the model is ~40 KB).
    cluster.kubectl("create", "configmap", "model", "-n", namespace, f"--from-file=ctr.keras={model}")
    volumes = [{"name": "source", "configMap": {"name": "model"}}, {"name": "models", "emptyDir": {}},
               {"name": "tmp", "emptyDir": {}}]
    init = {
        "name": "builder", "image": BUILDER_IMAGE, "imagePullPolicy": "IfNotPresent", "securityContext": RESTRICTED,
        "args": ["build", "--source", "/source/ctr.keras", "--format", "keras", "--name", "ctr", "--version", "1",
                 "--repo", "/models", "--backend", "onnxruntime", "--precision", "fp32",
                 # The CPU Triton image has no CUDA: a KIND_GPU instance group fails to load there.
                 "--instance-kind", "CPU", "--json"],
        "volumeMounts": [{"name": "source", "mountPath": "/source"}, {"name": "models", "mountPath": "/models"},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    triton = {
        "name": "triton", "image": TRITON_IMAGE,
        "command": ["tritonserver"],
        "args": ["--model-repository=/models", "--model-control-mode=explicit", "--load-model=ctr",
                 "--strict-readiness=true", "--exit-on-error=true", "--http-port=8000", "--grpc-port=8001",
                 "--metrics-port=8002"],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/v2/models/ctr/ready", "port": 8000}, "periodSeconds": 2},
        "volumeMounts": [{"name": "models", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}})
    pod = _pod("serve", namespace, [triton], initContainers=[init], volumes=volumes)
    _apply(cluster, pod)
    ready = _wait_ready(cluster, namespace, "serve", timeout=420)
    report = json.loads(cluster.kubectl("logs", "serve", "-c", "builder", "-n", namespace).stdout.strip()
                        .splitlines()[-1])
    assert report.get("ok", report.get("status") == "ok"), report
    base = f"http://{ready['status']['podIP']}:8000/v2/models/ctr"
    with urllib.request.urlopen(f"{base}/config", timeout=10) as r:
        config = json.loads(r.read())
    # The production config, unchanged: the onnxruntime backend with dynamic batching.
    assert config["backend"] == "onnxruntime"
    assert "dynamic_batching" in config
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
    inp = config["input"][0]
    body = {"inputs": [{"name": inp["name"], "shape": list(x.shape), "datatype": "FP32",
                        "data": x.flatten().tolist()}]}
    req = urllib.request.Request(f"{base}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_helm_install_with_the_local_images_gives_a_ready_operator_pod_that_reconciles(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    from recserve_cluster import images
    from tests.integration.test_helm import _helm, _release_name

    repository, tag = images.operator_image().rsplit(":", 1)
    release = _release_name(namespace)
    # The operator alone (its embedded model store off): build once on real pods has its own suites.
    values = {"image": {"repository": repository, "tag": tag}, "watchNamespaces": [namespace], **_placement(),
              "modelStore": {"embedded": {"enabled": False}}}
    try:
        _helm(cluster, "install", release, str(ROOT / "charts" / "recserve"), "-n", namespace, "--wait",
              "--timeout", "4m", values=values, tmp_path=tmp_path)
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=recserve",
                                          "-o", "json").stdout)["items"]
        assert [p["spec"]["nodeName"] for p in pods] == [NODE]
        status = pods[0]["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0
        model = {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel",
                 "metadata": {"name": "ctr", "namespace": namespace},
                 "spec": {"model": {"uri": "s3://models/ctr/1", "format": "onnx", "version": 1},
                          "serving": {"resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"},
                                      "gpuProduct": "NVIDIA-A10G"}}}
        _apply(cluster, model)

        # The operator in its pod sees the model and writes its children and status through the API.
        def reconciled() -> dict[str, Any] | None:
            rm = json.loads(cluster.kubectl("get", "recommendermodel", "ctr", "-n", namespace, "-o", "json").stdout)
            conds = {c["type"]: c for c in rm.get("status", {}).get("conditions", [])}
            deps = cluster.kubectl("get", "deployments", "-n", namespace, "-l", "app.kubernetes.io/instance=ctr",
                                   "-o", "name", check=False).stdout.split()
            return rm if conds and deps else None

        rm = wait_for(reconciled, 120, 2, "the operator pod to reconcile the model")
        assert rm["status"]["observedGeneration"] == 1
        log = cluster.kubectl("logs", pods[0]["metadata"]["name"], "-n", namespace).stdout
        assert "Traceback" not in log, log[-3000:]
    finally:
        subprocess.run([str(cluster.bins["helm"]), "--kubeconfig", str(cluster.kubeconfig), "uninstall", release,
                        "-n", namespace, "--wait", "--timeout", "2m"], capture_output=True, timeout=180,
                       env=cluster.env)


def test_stopping_the_node_leaves_no_process_link_rule_mount_or_cgroup_and_it_restarts(cluster: Cluster) -> None:
    """Runs last in this module: it stops real-0 (every pod on it dies) and brings it back."""
    from recserve_cluster.cluster import KwokProvider, get_provider
    from recserve_cluster.realnode import RealNode, leftovers

    provider = get_provider()
    if not isinstance(provider, KwokProvider) or not provider.real_node:
        pytest.skip("only the local provider starts (and so may stop) the real node")
    node = RealNode(provider.cluster_name)
    assert node.running()
    assert any(leftovers(node).values())  # the check sees a running node
    node.stop()
    nothing: dict[str, list[str]] = {k: [] for k in ("processes", "links", "rules", "mounts", "cgroups", "routes")}
    assert leftovers(node) == nothing
    # A start that fails part-way (the kubelet exits at once) names the component and leaves nothing behind.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSERVE_KUBELET", "/bin/false")
        with pytest.raises(ClusterError, match="kubelet exited during start"):
            provider.up()
    assert leftovers(RealNode(provider.cluster_name)) == nothing
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"  # the control plane it did not start stays
    provider.up()  # control plane still up: only the node is started again
    assert node.running() or RealNode(provider.cluster_name).running()
    wait_for(lambda: json.loads(cluster.kubectl("get", "node", NODE, "-o", "json").stdout)["spec"]
             .get("unschedulable") is None, 30, 1, "the node to accept pods again")
