"""Operator benchmark: apply->Deployment and apply->Ready latency (p50/p99), memory with many models, API requests."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

import kubernetes  # noqa: E402
import yaml  # noqa: E402

from recserve_cluster.cluster import get_provider  # noqa: E402
from tests.integration.conftest_operator import OperatorProcess, install_crd  # noqa: E402


def _model(name: str, replicas: int = 1) -> dict[str, Any]:
    # CPU-only models so GPU capacity (12 GPUs in the test cluster) never limits the measurement.
    serving: dict[str, Any] = {
        "resources": {"gpu": 0, "cpu": "10m", "memory": "16Mi"},
        "instances": {"kind": "CPU"},
        "replicas": replicas,
    }
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": f"pvc://models/{name}/1", "format": "onnx", "version": 1}, "serving": serving},
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": _pct(values, 0.5), "p99": _pct(values, 0.99), "n": len(values)} if values else {"n": 0}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(latency_n: int, memory_n: int, out: Path | None, sequential: bool = False) -> dict[str, Any]:
    cluster = get_provider().up()
    install_crd(cluster)
    ns = f"bench-{int(time.time())}"
    cluster.kubectl("create", "namespace", ns)
    log = Path(tempfile.mkdtemp()) / "operator.log"
    op = OperatorProcess(cluster, ns, log, resync_seconds=10)
    op.start()
    try:
        rss_idle = _rss_kib(op.pid)
        # Latency: watch streams record first sight of each Deployment and of phase Ready while models are
        # created in a burst through the API (no kubectl subprocess between the clock and the request).
        names = [f"lat-{i:03d}" for i in range(latency_n)]
        api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
        deployed: dict[str, float] = {}
        ready: dict[str, float] = {}
        stop = threading.Event()

        def watch(list_fn: Any, record: Any, **kw: Any) -> None:
            w = kubernetes.watch.Watch()
            for event in w.stream(list_fn, namespace=ns, timeout_seconds=600, **kw):
                record(event["object"])
                if stop.is_set():
                    w.stop()

        def on_deployment(obj: Any) -> None:
            deployed.setdefault(obj.metadata.labels.get("app.kubernetes.io/instance"), time.monotonic())

        def on_model(obj: dict[str, Any]) -> None:
            if (obj.get("status") or {}).get("phase") == "Ready":
                ready.setdefault(obj["metadata"]["name"], time.monotonic())

        custom = kubernetes.client.CustomObjectsApi(api)
        threads = [
            threading.Thread(
                target=watch, args=(kubernetes.client.AppsV1Api(api).list_namespaced_deployment, on_deployment),
                daemon=True,
            ),
            threading.Thread(
                target=watch, args=(custom.list_namespaced_custom_object, on_model),
                kwargs={"group": "recserve.dev", "version": "v1alpha1", "plural": "recommendermodels"}, daemon=True,
            ),
        ]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(1.0)  # let both watches establish before the first create
        applied: dict[str, float] = {}
        for name in names:
            applied[name] = time.monotonic()
            custom.create_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels", _model(name))
            # Sequential mode measures one model at a time (no queueing behind the others).
            while sequential and name not in ready and time.monotonic() - applied[name] < 120:
                time.sleep(0.05)
        deadline = time.monotonic() + 600
        while len(ready) < len(names) and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        to_dep = [deployed[n] - applied[n] for n in names if n in deployed]
        to_ready = [ready[n] - applied[n] for n in names if n in ready]
        metrics = op.metrics() or {}
        reconciles = metrics.get("recserve_reconciles_total", 0.0)
        requests = {k: v for k, v in metrics.items() if k.startswith("recserve_api_requests_total")}

        # Memory: grow to memory_n models (zero replicas: the kwok node holds 110 pods), measure once all reconciled.
        extra = [_model(f"mem-{i:03d}", replicas=0) for i in range(memory_n - latency_n)]
        print(json.dumps({"to_deployment_s": _summary(to_dep), "to_ready_s": _summary(to_ready)}), flush=True)
        for i in range(0, len(extra), 25):
            chunk = yaml.safe_dump_all(extra[i : i + 25])
            cluster.kubectl("create", "-n", ns, "-f", "-", input=chunk, timeout=300)
        settle = time.monotonic() + 300
        while time.monotonic() < settle:
            models = json.loads(cluster.kubectl("get", "rm", "-n", ns, "-o", "json").stdout)["items"]
            if sum("observedGeneration" in (m.get("status") or {}) for m in models) >= memory_n:
                break
        rss_many = _rss_kib(op.pid)
        result = {
            "models_latency": latency_n,
            "mode": "sequential" if sequential else "burst",
            "apply_to_deployment_s": _summary(to_dep),
            "apply_to_ready_s": _summary(to_ready),
            "mean_to_ready_s": statistics.fmean(to_ready) if to_ready else None,
            "reconciles": reconciles,
            "api_requests": requests,
            "api_requests_per_reconcile": sum(requests.values()) / reconciles if reconciles else None,
            "rss_mib_idle": rss_idle / 1024,
            f"rss_mib_{memory_n}_models": rss_many / 1024,
        }
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-models", type=int, default=50)
    parser.add_argument("--memory-models", type=int, default=200)
    parser.add_argument("--sequential", action="store_true", help="create the latency models one at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator.json")
    args = parser.parse_args()
    run(args.latency_models, args.memory_models, args.out, args.sequential)


if __name__ == "__main__":
    main()
