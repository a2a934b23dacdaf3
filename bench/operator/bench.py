"""Operator benchmark at 50/200/500 models: time to Ready, apply->Deployment p50/p99, RSS, CPU, requests, writes."""

from __future__ import annotations

import argparse
import json
import os
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


WRITE_VERBS = ("apply", "patch-status", "event", "delete", "patch")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _api(op: OperatorProcess) -> dict[str, float]:
    return {k: v for k, v in (op.metrics() or {}).items() if k.startswith("recserve_api_requests_total")}


def _writes(requests: dict[str, float]) -> float:
    return sum(v for k, v in requests.items() if any(f'verb="{w}"' in k for w in WRITE_VERBS))


def measure(cluster: Any, n: int, steady_s: float) -> dict[str, Any]:
    """Burst-create n models in a fresh namespace under a fresh operator; latency, memory, CPU, requests, writes."""
    ns = f"bench-{n}-{int(time.time())}"
    cluster.kubectl("create", "namespace", ns)
    log = Path(tempfile.mkdtemp()) / "operator.log"
    op = OperatorProcess(cluster, ns, log, resync_seconds=10)
    op.start()
    try:
        rss_idle = _rss_kib(op.pid)
        cpu0 = _cpu_s(op.pid)
        names = [f"m-{i:03d}" for i in range(n)]
        api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
        deployed: dict[str, float] = {}
        ready: dict[str, float] = {}
        stop = threading.Event()

        # Watch streams record first sight of each Deployment and of phase Ready while models are created in a
        # burst through the API (no kubectl subprocess between the clock and the request).
        def watch(list_fn: Any, record: Any, **kw: Any) -> None:
            w = kubernetes.watch.Watch()
            for event in w.stream(list_fn, namespace=ns, timeout_seconds=900, **kw):
                record(event["object"])
                if stop.is_set():
                    w.stop()

        def on_deployment(obj: Any) -> None:
            deployed.setdefault(obj.metadata.labels.get("app.kubernetes.io/instance"), time.monotonic())

        def on_model(obj: dict[str, Any]) -> None:
            if (obj.get("status") or {}).get("phase") == "Ready":
                ready.setdefault(obj["metadata"]["name"], time.monotonic())

        custom = kubernetes.client.CustomObjectsApi(api)
        apps = kubernetes.client.AppsV1Api(api)
        threads = [
            threading.Thread(target=watch, args=(apps.list_namespaced_deployment, on_deployment), daemon=True),
            threading.Thread(
                target=watch, args=(custom.list_namespaced_custom_object, on_model),
                kwargs={"group": "recserve.dev", "version": "v1alpha1", "plural": "recommendermodels"}, daemon=True,
            ),
        ]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(1.0)  # let both watches establish before the first create
        applied: dict[str, float] = {}
        start = time.monotonic()
        for name in names:
            applied[name] = time.monotonic()
            custom.create_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels", _model(name))
        deadline = time.monotonic() + 900
        while len(ready) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        all_ready_s = (max(ready.values()) - start) if len(ready) == n else None
        busy_cpu = _cpu_s(op.pid) - cpu0
        rss_loaded = _rss_kib(op.pid)
        stop.set()
        reconciles = (op.metrics() or {}).get("recserve_reconciles_total", 0.0)
        requests = _api(op)
        # Steady state: every model Ready and nothing changing; count the operator's writes over a window.
        writes0, cpu1, t1 = _writes(_api(op)), _cpu_s(op.pid), time.monotonic()
        time.sleep(steady_s)
        steady_writes = _writes(_api(op)) - writes0
        window = time.monotonic() - t1
        steady_cpu = (_cpu_s(op.pid) - cpu1) / window
        to_dep = [deployed[m] - applied[m] for m in names if m in deployed]
        to_ready = [ready[m] - applied[m] for m in names if m in ready]
        return {
            "models": n,
            "ready": len(ready),
            "all_ready_s": all_ready_s,
            "apply_to_deployment_s": _summary(to_dep),
            "apply_to_ready_s": _summary(to_ready),
            "mean_to_ready_s": statistics.fmean(to_ready) if to_ready else None,
            "operator_rss_mib_idle": rss_idle / 1024,
            "operator_rss_mib_loaded": rss_loaded / 1024,
            "operator_cpu_s_until_ready": busy_cpu,
            "operator_cpu_cores_steady": steady_cpu,
            "reconciles": reconciles,
            "api_requests": requests,
            "api_requests_per_reconcile": sum(requests.values()) / reconciles if reconciles else None,
            "steady_writes_per_minute": steady_writes * 60 / window,
        }
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def run(sizes: list[int], steady_s: float, out: Path | None, *, keep_cluster: bool = False) -> list[dict[str, Any]]:
    """Measure each size; a cluster this run brought up is taken down again (unless keep_cluster), so nothing it
    started (kube-apiserver, etcd, kwok, the real node) outlives the benchmark."""
    provider = get_provider()
    existed = provider.current() is not None
    cluster = provider.up()
    results = []
    try:
        install_crd(cluster)
        for n in sizes:
            r = measure(cluster, n, steady_s)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if not existed and not keep_cluster and provider.name != "existing":
            provider.down()
    print(f"{'models':>6} {'all Ready s':>11} {'->Deploy p50/p99 s':>19} {'->Ready p50/p99 s':>18} "
          f"{'RSS MiB':>8} {'CPU s':>6} {'req/reconcile':>13} {'writes/min steady':>17}")
    for r in results:
        d, rd = r["apply_to_deployment_s"], r["apply_to_ready_s"]
        all_ready = r["all_ready_s"] or float("nan")
        print(f"{r['models']:>6} {all_ready:>11.1f} {d.get('p50', 0):>9.2f}/{d.get('p99', 0):<9.2f}"
              f" {rd.get('p50', 0):>8.2f}/{rd.get('p99', 0):<9.2f} {r['operator_rss_mib_loaded']:>8.0f}"
              f" {r['operator_cpu_s_until_ready']:>6.1f} {r['api_requests_per_reconcile'] or 0:>13.2f}"
              f" {r['steady_writes_per_minute']:>17.1f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="50,200,500", help="comma-separated model counts, each measured fresh")
    parser.add_argument("--steady-seconds", type=float, default=60.0, help="window for steady-state writes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator.json")
    parser.add_argument("--keep-cluster", action="store_true", help="leave a cluster this run started running")
    args = parser.parse_args()
    run([int(x) for x in args.sizes.split(",")], args.steady_seconds, args.out, keep_cluster=args.keep_cluster)


if __name__ == "__main__":
    main()
