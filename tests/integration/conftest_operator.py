"""Integration harness for the operator: install the CRD, run the operator as a real process, read objects."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "recommendermodels.yaml"
KOPF = Path(sys.executable).parent / "kopf"
INSTANCE = "app.kubernetes.io/instance"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/recommendermodels.recserve.dev", timeout=90
    )
    # Established precedes discovery and OpenAPI publication; kubectl needs both (explain, short names).
    wait_for(
        lambda: cluster.kubectl("explain", "rm.spec.serving", check=False).returncode == 0,
        60,
        message="RecommenderModel OpenAPI schema not published",
    )


def get_json(cluster: Cluster, *args: str) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def kwok_model(
    name: str, version: int, *, serving: dict[str, Any] | None = None, rollout: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A RecommenderModel for the control-plane tests: an s3:// ONNX source (kwok pods never fetch it), one GPU
    per replica on the A10G node; `serving` entries replace the defaults' (None drops one), `rollout` is the
    spec's as given."""
    base = {"resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"}, "gpuProduct": "NVIDIA-A10G", **(serving or {})}
    spec: dict[str, Any] = {
        "model": {"uri": f"s3://models/{name}/{version}", "format": "onnx", "version": version},
        "serving": {k: v for k, v in base.items() if v is not None},
    }
    if rollout is not None:
        spec["rollout"] = rollout
    return {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel", "metadata": {"name": name}, "spec": spec}


def apply_yaml(cluster: Cluster, ns: str, obj: dict[str, Any] | str) -> None:
    text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=text)


def model(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = get_json(cluster, "recommendermodels", name, "-n", ns)
    return result


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return None


def ready_model(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    """The model if it is Ready for its current generation, else None (for wait_for predicates)."""
    obj = model(cluster, ns, name)
    cond = condition(obj, "Ready")
    ready = obj and cond and cond["status"] == "True" and obj["status"].get("phase") == "Ready"
    if ready and obj and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


def wait_ready(cluster: Cluster, ns: str, name: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(
        lambda: ready_model(cluster, ns, name), timeout, message=f"RecommenderModel {ns}/{name} did not become Ready"
    )


def owned(
    cluster: Cluster, ns: str, name: str, kinds: str = "deployments,services,configmaps,pdb,hpa"
) -> list[dict[str, Any]]:
    result = get_json(cluster, kinds, "-n", ns, "-l", f"{INSTANCE}={name}")
    return list(result["items"]) if result else []


class OperatorProcess:
    """`kopf run -m recserve_operator.handlers` against the test cluster, logging to a file."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        log_path: Path,
        resync_seconds: float = 2.0,
        *,
        entry_point: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_path
        self.metrics_port = free_port()
        self.resync_seconds = resync_seconds
        # entry_point: `python -m recserve_operator` (namespaces, peering, liveness from env) instead of `kopf run`.
        self.entry_point = entry_point
        # More environment for the process (e.g. leader election: RECSERVE_LEADER_ELECTION, RECSERVE_IDENTITY).
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._logs: list[str] = []

    def start(self) -> None:
        env = dict(self.cluster.env)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
                "RECSERVE_METRICS_PORT": str(self.metrics_port),
                "RECSERVE_RESYNC_SECONDS": str(self.resync_seconds),
                "RECSERVE_TRITON_IMAGE": "nvcr.io/nvidia/tritonserver:25.10-py3",
                "RECSERVE_BUILDER_IMAGE": "recserve/model-repo-builder:test",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        log = self.log_path.open("ab")
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        if self.entry_point:
            env.update(
                RECSERVE_WATCH_NAMESPACES=self.namespace,
                RECSERVE_STANDALONE="true",
                RECSERVE_LIVENESS_ENDPOINT=liveness,
            )
            cmd = [sys.executable, "-m", "recserve_operator"]
        else:
            cmd = [str(KOPF), "run", "--standalone", "-m", "recserve_operator.handlers", "--namespace", self.namespace,
                   "--liveness", liveness]  # fmt: skip
        self.liveness = liveness
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.metrics() is not None, 60, message="operator metrics endpoint did not come up")

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a crashed pod."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


def plugin_env(cluster: Cluster, kubeconfig: Path | None = None) -> dict[str, str]:
    """kubectl and the installed `kubectl-recserve` on PATH, the cluster's kubeconfig (or another) in KUBECONFIG."""
    env = cluster.env
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["KUBECONFIG"] = str(kubeconfig or cluster.kubeconfig)
    return env


def recserve(cluster: Cluster, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`kubectl recserve ARGS` exactly as a user types it (kubectl execs the plugin it finds on PATH)."""
    out = subprocess.run([cluster.kubectl_path, "recserve", *args], capture_output=True, text=True, timeout=60,
                         env=plugin_env(cluster, kubeconfig))  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out


class FakePrometheus:
    """A Prometheus HTTP API on 127.0.0.1 whose answers a test sets (`mode`), for canaries on kwok pods:

    "healthy": the candidate served 1000 requests with no failure and a 5 ms p99 (every guardrail passes);
    "garbage": HTTP 200 with an HTML body; "wrong-shape": JSON that is not an instant vector;
    stopped (`stop()`): nothing listens on its port, connection refused. `start()` again serves the same port.
    """

    ANSWERS = {"nv_inference_request_success": "1000", "nv_inference_request_failure": "0",
               "nv_inference_request_summary_us": "5000", "nv_inference_request_duration_us": "5000"}  # fmt: skip

    def __init__(self, mode: str = "healthy") -> None:
        self.mode = mode
        self.port = free_port()
        self.queries = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _answer(self, query: str) -> tuple[int, str, bytes]:
        if self.mode == "garbage":
            return 200, "text/html", b"<html><body>502 Bad Gateway (upstream said: oops)</body></html>"
        if self.mode == "wrong-shape":
            body = {"status": "success", "data": {"resultType": "matrix", "result": "not a list"}}
            return 200, "application/json", json.dumps(body).encode()
        value = next((v for metric, v in self.ANSWERS.items() if metric in query), None)
        result = [] if value is None else [{"metric": {}, "value": [time.time(), value]}]
        body = {"status": "success", "data": {"resultType": "vector", "result": result}}
        return 200, "application/json", json.dumps(body).encode()

    def start(self) -> FakePrometheus:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("query", [""])[0]
                fake.queries += 1
                code, kind, body = fake._answer(query)
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
