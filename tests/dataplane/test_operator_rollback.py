"""The operator process rolls a failing canary back from real Prometheus metrics of local Tritons behind nginx."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper
from recserve_operator.spec import parse_spec, revision_of

from model_repo_builder.triton_local import TritonServer, free_ports
from recserve_cluster.cluster import Cluster
from recserve_cluster.dataplane import Nginx, Prometheus, RouterSync, revision_build_command, run_builder
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    OperatorProcess,
    apply_yaml,
    get_json,
    install_crd,
    model,
    wait_ready,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.dataplane,
    pytest.mark.skipif(not (shutil.which("nginx") or shutil.which("/usr/sbin/nginx")), reason="needs nginx"),
    pytest.mark.skipif(not (shutil.which("prometheus") or shutil.which("/usr/bin/prometheus")),
                       reason="needs prometheus"),
]  # fmt: skip

NAME = "ctr"
INTERVAL_S = 5.0
FAIL_SHARE = 0.3
RESYNC_S = 1.0
FEATURES = 8

# Replaces the built python-backend model.py: the builder's model (renamed served_model.py) serves, and a
# deterministic share of executions raises. Raising, not returning an error response, is what Triton counts in
# nv_inference_request_failure. Without dynamic batching in the config each execution holds one request.
FAILING_MODEL_PY = '''\
"""Failure injection around the built model: floor(n * FAIL_SHARE) of the first n executions raise."""

import importlib.util
import os

import triton_python_backend_utils as pb_utils

FAIL_SHARE = {share}


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "served_model.py")
        spec = importlib.util.spec_from_file_location("recserve_served_model", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.inner = module.TritonPythonModel()
        self.inner.initialize(args)
        self.n = 0

    def execute(self, requests):
        self.n += 1
        if int(self.n * FAIL_SHARE) > int((self.n - 1) * FAIL_SHARE):
            raise pb_utils.TritonModelException("injected failure")
        return self.inner.execute(requests)

    def finalize(self):
        self.inner.finalize()
'''


def _spec(version: int, prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": f"pvc://models/{NAME}/{version}/model.onnx", "format": "onnx", "version": version},
            "serving": {"resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"}, "gpuProduct": "NVIDIA-A10G"},
            "rollout": {
                "strategy": "canary",
                # A long first step: only a failed analysis can end this rollout within the test.
                "steps": [{"weight": 30, "pause": "10m"}],
                "routing": {"provider": "builtin", "stickyHeader": "x-user-id"},
                "analysis": {"interval": f"{INTERVAL_S:g}s", "prometheus": prometheus_url, "maxErrorRate": 0.05,
                             "maxP99LatencyMs": 2000, "minRequests": 10, "failureLimit": 1},
            },
        },
    }  # fmt: skip


def write_ctr_onnx(path: Path, seed: int) -> None:
    """A tiny CTR scorer exported as ONNX: sigmoid(x @ w), x float32 [batch, FEATURES]."""
    w = np.random.default_rng(seed).normal(size=(FEATURES, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["score"])],
        "ctr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))


class LocalRevisions:
    """Plays the nodes' part: builds each revision with its init container's args (recserve_cluster.demo), runs
    its Triton, registers it with Prometheus (file_sd, `revision` label) and with the RouterSync that makes nginx
    follow the operator's router ConfigMap."""

    def __init__(self, cluster: Cluster, namespace: str, workdir: Path, targets: Path, router: RouterSync) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir
        self.targets = targets
        self.router = router
        self.pvc_root = workdir / "pvc"
        self.tritons: dict[str, TritonServer] = {}

    def serve(self, revision: str, *, fail_share: float) -> TritonServer:
        rev_dir = self.workdir / revision
        args, repo = revision_build_command(self.cluster, self.namespace, NAME, revision, rev_dir)
        report = run_builder(args, env={**os.environ, "RECSERVE_PVC_ROOT": str(self.pvc_root)})
        assert report["status"] == "ok" and report["parity"]["passed"], report
        if fail_share:
            version_dir = Path(report["path"])
            (version_dir / "model.py").rename(version_dir / "served_model.py")
            (version_dir / "model.py").write_text(FAILING_MODEL_PY.format(share=fail_share))
        http, grpc, metrics = free_ports(3)
        triton = TritonServer(repo, http, grpc, metrics, log_path=rev_dir / "triton.log",
                              extra_args=["--metrics-config=summary_latencies=true"])  # fmt: skip
        self.tritons[revision] = triton
        triton.start()
        triton.wait_model_ready(NAME)
        scrape = [{"targets": [f"127.0.0.1:{t.metrics_port}"], "labels": {"revision": rev, "model": NAME}}
                  for rev, t in self.tritons.items()]  # fmt: skip
        self.targets.write_text(json.dumps(scrape))
        self.router.addresses[revision] = f"127.0.0.1:{http}"
        return triton

    def stop(self) -> None:
        for triton in self.tritons.values():
            with contextlib.suppress(Exception):
                triton.stop()


class Shoppers:
    """Load through nginx: `threads` keep-alive sessions scoring one candidate per request, sticky by x-user-id."""

    def __init__(self, url: str, rps: float = 60.0, threads: int = 2) -> None:
        self.url = f"{url}/v2/models/{NAME}/infer"
        self.period = threads / rps
        self.sent: Counter[str] = Counter()  # by X-RecServe-Variant
        self.errors: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _one(self, session: requests.Session, user: int, x: list[float]) -> tuple[str, bool]:
        body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": x}]}
        resp = session.post(self.url, json=body, headers={"x-user-id": f"user-{user}"}, timeout=10)
        return resp.headers.get("X-RecServe-Variant", "?"), resp.status_code == 200

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        session = requests.Session()
        while not self.stop.is_set():
            user, x = int(rng.integers(5000)), rng.normal(size=FEATURES).astype(np.float32).tolist()
            failure = ""
            try:
                try:
                    variant, ok = self._one(session, user, x)
                except requests.ConnectionError:  # a keep-alive connection closed by an nginx reload: retry once
                    variant, ok = self._one(session, user, x)
            except requests.RequestException as exc:
                variant, ok, failure = "?", False, repr(exc)
            with self.lock:
                self.sent[variant] += 1
                self.errors[variant] += not ok
                if failure and len(self.failures) < 5:
                    self.failures.append(failure)
            self.stop.wait(self.period)

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.sent), Counter(self.errors)

    def __enter__(self) -> Shoppers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    op = OperatorProcess(cluster, namespace, tmp_path / "operator.log", resync_seconds=RESYNC_S)
    op.start()
    yield op
    op.stop()
    log = op.log()
    assert "Traceback" not in log, log[-5000:]


def _prometheus(workdir: Path) -> tuple[Prometheus, Path]:
    targets = workdir / "targets.json"
    targets.write_text("[]")
    file_sd = {"files": [str(targets)], "refresh_interval": "1s"}
    job = {"job_name": "triton", "scrape_interval": "1s", "file_sd_configs": [file_sd]}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    (workdir / "prometheus").mkdir()
    return Prometheus(workdir / "prometheus", free_ports(1)[0], config), targets


def _targets_up(prom: Prometheus, revisions: set[str]) -> bool:
    up = {labels.get("revision") for labels, v in prom.provider.query_vector('up{job="triton"}') if v == 1}
    return revisions <= up


def test_the_operator_rolls_back_a_failing_canary_from_real_metrics(
    operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster = operator.cluster
    with contextlib.ExitStack() as stack:
        prom, targets = _prometheus(tmp_path)
        stack.callback(prom.stop)
        (tmp_path / "nginx").mkdir()
        nginx = Nginx(tmp_path / "nginx", free_ports(1)[0])
        stack.callback(nginx.stop)
        router = RouterSync(cluster.kubectl, namespace, f"{NAME}-router", nginx)
        local = LocalRevisions(cluster, namespace, tmp_path / "revisions", targets, router)
        stack.callback(local.stop)
        for version in (1, 2):
            write_ctr_onnx(local.pvc_root / "models" / NAME / str(version) / "model.onnx", seed=version)

        v1, v2 = _spec(1, prom.url), _spec(2, prom.url)
        apply_yaml(cluster, namespace, v1)
        stable_rev = wait_ready(cluster, namespace, NAME)["status"]["stable"]["revision"]
        assert stable_rev == revision_of(parse_spec(v1["spec"]))
        local.serve(stable_rev, fail_share=0.0)
        plan = wait_for(router.sync, 60, message="nginx to follow the operator's stable-only plan")
        assert [b.revision for b in plan.backends] == [stable_rev]

        with Shoppers(nginx.url, rps=60, threads=2) as load:
            wait_for(lambda: load.snapshot()[0]["stable"] >= 20, 30, message="stable traffic through nginx")
            apply_yaml(cluster, namespace, v2)
            canary_rev = revision_of(parse_spec(v2["spec"]))
            wait_for(lambda: get_json(cluster, "deployment", f"{NAME}-{canary_rev}", "-n", namespace), 60,
                     message="the operator to create the canary Deployment")  # fmt: skip
            # The init step, run here: the operator's builder args, then failures injected into the built model.
            local.serve(canary_rev, fail_share=FAIL_SHARE)
            wait_for(lambda: _targets_up(prom, {stable_rev, canary_rev}), 30, message="Prometheus targets up")

            def canary_routed() -> bool:
                p = router.sync()
                return p is not None and p.canary_weight > 0

            # RouterSync holds a plan back until its revisions serve locally: this is when the canary gets traffic.
            wait_for(canary_routed, 60, interval=0.2, message="the operator to route 30% to the canary")
            first_traffic = time.monotonic()
            assert router.nginx.plan is not None and router.nginx.plan.canary_weight == 30

            def stable_only() -> bool:
                p = router.sync()
                return p is not None and [b.revision for b in p.backends] == [stable_rev]

            wait_for(stable_only, 60, interval=0.2, message="the router plan to return to stable only")
            rolled_back_after = time.monotonic() - first_traffic
            # Traffic keeps flowing on stable after the rollback: it must stay error-free.
            settled = load.snapshot()[0]["stable"] + 40
            wait_for(lambda: load.snapshot()[0]["stable"] >= settled, 30, message="stable traffic after rollback")
            sent, errors = load.snapshot()

        obj = model(cluster, namespace, NAME)
        assert obj is not None
        canary = obj["status"]["canary"]
        print(f"canary first received traffic -> router back on stable: {rolled_back_after:.2f}s "
              f"(analysis interval {INTERVAL_S:g}s); lastAnalysis: {canary.get('lastAnalysis')}")  # fmt: skip
        print(f"load through nginx: sent {dict(sent)}, errors {dict(errors)}, failures {load.failures}")
        assert canary["phase"] == "RolledBack", canary
        assert canary["revision"] == canary_rev
        assert "errorRate" in canary["message"], canary["message"]
        assert canary["lastAnalysis"]["errorRate"] > 0.05
        assert obj["status"]["stable"]["revision"] == stable_rev
        assert rolled_back_after <= 2 * INTERVAL_S, rolled_back_after
        events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=RolledBack").stdout
        assert "errorRate" in events, events
        # The canary really served (and failed a share); the stable variant never failed.
        assert sent["canary"] > 0 and errors["canary"] > 0, (sent, errors)
        assert errors["stable"] == 0, (sent, errors)
        assert sent["?"] == 0, (sent, errors, load.failures)
        # The rolled-back candidate is gone from the cluster; stable answers everyone through the router.
        wait_for(lambda: get_json(cluster, "deployment", f"{NAME}-{canary_rev}", "-n", namespace) is None, 30,
                 message="the rolled-back candidate's Deployment was not removed")  # fmt: skip
        session = requests.Session()
        body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.5] * FEATURES}]}
        for uid in range(20):
            resp = session.post(f"{nginx.url}/v2/models/{NAME}/infer", json=body,
                                headers={"x-user-id": f"user-{uid}"}, timeout=10)  # fmt: skip
            assert resp.status_code == 200 and resp.headers.get("X-RecServe-Variant") == "stable"
