"""Operator benchmark: a burst of N models (time to Ready, apply->Deployment p50/p99, reconciles, RSS, CPU, API
requests, writes at rest) and a two-replica takeover (kill -9 the leader: time until the standby writes, objects
written by both).

    python bench/operator/bench.py --sizes 50,500,2000 --steady-seconds 60            # the scale table
    python bench/operator/bench.py --sizes '' --takeover lease                        # takeover only
    python bench/operator/bench.py --sizes 500 --floor                                # + the control plane's floor

`--floor` also measures, in the same run, what the cluster alone needs for the same work: the objects the operator
would create for N models (its own builders' output, no owner) applied straight from N/a few client threads, and
the time until every Deployment is available. The operator's time to Ready cannot beat it on the same cluster.

Each size runs in a fresh namespace under a fresh operator process; the namespace is deleted (and waited for)
before the next size, so one size's garbage collection does not load the next. Above CPU_NODE_PODS models the
benchmark adds a simulated CPU node of its own for the duration (the test cluster's cpu-0 holds 1,000 pods).
The operator is the one this tree's `operator/` holds, so the same file measures an older checkout when run
from there (`git archive HEAD | tar -x -C /tmp/before; cd /tmp/before; python bench/operator/bench.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

import kubernetes  # noqa: E402

from recserve_cluster.cluster import CONTROL_PLANE_COMPONENTS, Cluster, get_provider  # noqa: E402
from recserve_cluster.nodes import NodeSpec, build_node  # noqa: E402
from tests.integration.conftest_operator import OperatorProcess, free_port, install_crd  # noqa: E402

WRITE_VERBS = ("apply", "patch-status", "event", "delete", "patch", "create")
CPU_NODE_PODS = 800  # models the shared cpu-0 node takes on its own (1,000 pods, 16 CPUs, other tests' pods too)
BENCH_NODE = "recserve-bench-cpu"


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
        # An s3:// source: kwok pods never fetch it (a pvc:// one would need the claim to schedule).
        "spec": {"model": {"uri": f"s3://models/{name}/1", "format": "onnx", "version": 1}, "serving": serving},
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


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _scrape(port: int) -> dict[str, float] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def _api(metrics: dict[str, float] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if k.startswith("recserve_api_requests_total")}


def _writes(requests: dict[str, float]) -> float:
    return sum(v for k, v in requests.items() if any(f'verb="{w}"' in k for w in WRITE_VERBS))


def _component_ports() -> dict[str, int]:
    """Secure ports of the local control plane's controller-manager and scheduler (kwok binary runtime)."""
    ports: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = Path(args[0].decode(errors="replace")).name if args and args[0] else ""
        if name in ("kube-controller-manager", "kube-scheduler"):
            for arg in args:
                if arg.startswith(b"--secure-port="):
                    ports[name] = int(arg.split(b"=", 1)[1])
    return ports


# The control plane's processes, and those of the real node and its add-ons when the cluster has them (Prometheus
# discovers and scrapes each model's ServiceMonitor; kubelet and containerd run the add-on pods).
WATCHED_PROCESSES = (*CONTROL_PLANE_COMPONENTS, "prometheus", "kubelet", "containerd")


def _component_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each local control-plane process (kwok binary runtime): where a run's time goes
    besides the operator."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            name = Path(args[0].decode(errors="replace")).name if args and args[0] else ""
            if name in WATCHED_PROCESSES:
                out[name] = out.get(name, 0.0) + _cpu_s(int(proc.name))
        except (OSError, ValueError):
            continue
    return out


def _throttled_s() -> dict[str, float]:
    """Seconds the controller-manager's and scheduler's API clients waited on their own rate limiters (QPS):
    time the control plane, not the operator, spends between an operator's Deployment and a Ready pod."""
    import ssl
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    out: dict[str, float] = {}
    for name, port in _component_ports().items():
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=context) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        out[name] = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                        if line.startswith("rest_client_rate_limiter_duration_seconds_sum"))  # fmt: skip
    return out


@contextmanager
def _capacity(cluster: Cluster, n: int) -> Iterator[None]:
    """A simulated CPU node of the benchmark's own while n models would not fit the shared cpu-0 node."""
    if n <= CPU_NODE_PODS:
        yield
        return
    node = build_node(NodeSpec(BENCH_NODE, cpu=str(max(16, n // 50)), memory="512Gi", pods=n + 100))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    try:
        yield
    finally:
        cluster.kubectl("delete", "node", BENCH_NODE, "--wait=false", "--ignore-not-found", check=False)


def _delete_namespace(cluster: Cluster, ns: str, timeout: float = 900) -> float | None:
    """Delete and wait until it is gone (its objects' garbage collection would otherwise load the next size)."""
    start = time.monotonic()
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    while time.monotonic() - start < timeout:
        if cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
            return time.monotonic() - start
        time.sleep(2)
    return None


def _wait_quiet(cluster: Cluster, timeout: float = 900) -> None:
    """Earlier benchmark namespaces still terminating load the control plane: wait until they are gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phases = "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{'\\n'}{end}"
        out = cluster.kubectl("get", "namespaces", "-o", phases, check=False).stdout
        left = [line for line in out.splitlines() if line.startswith("bench-") and line.endswith(" Terminating")]
        if not left:
            return
        print(f"waiting for {len(left)} benchmark namespace(s) to finish terminating", flush=True)
        time.sleep(10)


def measure(cluster: Cluster, n: int, steady_s: float, *, wait_deleted: bool = True) -> dict[str, Any]:
    """Burst-create n models in a fresh namespace under a fresh operator; latency, memory, CPU, requests, writes.
    The namespace is deleted afterwards, and waited for when another measurement follows."""
    ns = f"bench-{n}-{int(time.time())}"
    cluster.kubectl("create", "namespace", ns)
    log = Path(tempfile.mkdtemp()) / "operator.log"
    op = OperatorProcess(cluster, ns, log, resync_seconds=10)
    stop = threading.Event()
    try:
        with _capacity(cluster, n):
            op.start()
            result = _burst(cluster, op, ns, n, steady_s, stop=stop)
    finally:
        stop.set()
        op.stop()
        if wait_deleted:
            result_gc = _delete_namespace(cluster, ns)
        else:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
            result_gc = None
    result["namespace_deleted_s"] = result_gc
    result["operator_log"] = str(log)
    return result


def _burst(cluster: Cluster, op: OperatorProcess, ns: str, n: int, steady_s: float, *,
           stop: threading.Event) -> dict[str, Any]:  # fmt: skip
    rss_idle = _rss_kib(op.pid)
    cpu0 = _cpu_s(op.pid)
    names = [f"m-{i:04d}" for i in range(n)]
    api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
    deployed: dict[str, float] = {}
    ready: dict[str, float] = {}

    # Watch streams record first sight of each Deployment and of phase Ready while models are created in a
    # burst through the API (no kubectl subprocess between the clock and the request). Raw JSON lines, not the
    # client's typed models: deserializing thousands of Deployment events would load the machine being measured.
    def watch(list_fn: Any, record: Any, **kw: Any) -> None:
        while not stop.is_set():
            try:
                resp = list_fn(namespace=ns, watch=True, timeout_seconds=60, _preload_content=False, **kw)
                for line in resp:
                    if line.strip():
                        record(json.loads(line)["object"])
                    if stop.is_set():
                        resp.close()
                        break
            except Exception:  # a dropped stream: watch again (records keep first sight)
                time.sleep(0.2)

    def on_deployment(obj: dict[str, Any]) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        deployed.setdefault(str(labels.get("app.kubernetes.io/instance")), time.monotonic())

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
    throttled0, components0, bench0 = _throttled_s(), _component_cpu_s(), time.process_time()
    applied: dict[str, float] = {}
    start = time.monotonic()
    for name in names:
        applied[name] = time.monotonic()
        custom.create_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels", _model(name))
    created_s = time.monotonic() - start
    deadline = time.monotonic() + 900
    peak_rss = 0
    while len(ready) < n and time.monotonic() < deadline:
        peak_rss = max(peak_rss, _rss_kib(op.pid))
        time.sleep(0.5)
    all_ready_s = (max(ready.values()) - start) if len(ready) == n else None
    busy_cpu = _cpu_s(op.pid) - cpu0
    busy_wall = time.monotonic() - start
    rss_loaded = _rss_kib(op.pid)
    throttled1, components1, bench_cpu = _throttled_s(), _component_cpu_s(), time.process_time() - bench0
    stop.set()
    metrics = op.metrics() or {}
    reconciles = metrics.get("recserve_reconciles_total", 0.0)
    requests = _api(metrics)
    # At rest: every model Ready and nothing changing; count the operator's writes and CPU over a window.
    writes0, cpu1, t1 = _writes(_api(op.metrics())), _cpu_s(op.pid), time.monotonic()
    reconciles0 = (op.metrics() or {}).get("recserve_reconciles_total", 0.0)
    time.sleep(steady_s)
    after = op.metrics() or {}
    steady_writes = _writes(_api(after)) - writes0
    window = time.monotonic() - t1
    steady_cpu = (_cpu_s(op.pid) - cpu1) / window
    rss_rest = _rss_kib(op.pid)
    to_dep = [deployed[m] - applied[m] for m in names if m in deployed]
    to_ready = [ready[m] - applied[m] for m in names if m in ready]
    return {
        "models": n,
        "ready": len(ready),
        "created_in_s": created_s,
        "all_ready_s": all_ready_s,
        "apply_to_deployment_s": _summary(to_dep),
        "apply_to_ready_s": _summary(to_ready),
        "mean_to_ready_s": statistics.fmean(to_ready) if to_ready else None,
        "operator_rss_mib_idle": rss_idle / 1024,
        "operator_rss_mib_loaded": rss_loaded / 1024,
        "operator_rss_mib_peak": max(peak_rss, rss_loaded) / 1024,
        "operator_rss_mib_rest": rss_rest / 1024,
        "operator_cpu_s_until_ready": busy_cpu,
        "operator_cpu_cores_until_ready": busy_cpu / busy_wall if busy_wall else None,
        "operator_cpu_cores_steady": steady_cpu,
        "reconciles": reconciles,
        "reconciles_per_model": reconciles / n,
        "reconciles_per_minute_steady": (after.get("recserve_reconciles_total", 0.0) - reconciles0) * 60 / window,
        "api_requests": requests,
        # What queued the reconciles (watch events by kind, the model itself, deletions; resyncs are not adds).
        "queue_adds": {k: v for k, v in metrics.items() if k.startswith("recserve_workqueue_adds_total")},
        "api_requests_per_reconcile": sum(requests.values()) / reconciles if reconciles else None,
        "writes_until_ready": _writes(requests),
        "steady_writes_per_minute": steady_writes * 60 / window,
        "control_plane_client_throttled_s": {k: v - throttled0.get(k, 0.0) for k, v in throttled1.items()},
        "cpu_s_until_ready": {"operator": busy_cpu, "benchmark": bench_cpu,
                              **{k: v - components0.get(k, 0.0) for k, v in components1.items()}},
    }


# -- the control plane's floor: the operator's objects applied without the operator ------------------------------


def floor(cluster: Cluster, n: int, threads: int = 8) -> dict[str, Any]:
    """The objects the operator creates for n models (its builders' output for the benchmark's spec, without an
    owner reference), server-side applied from `threads` client threads as fast as the API server takes them, in
    the operator's order (ConfigMap, Deployment, Services; a PodDisruptionBudget only above one replica): seconds
    until every Deployment is available, and apply -> Deployment created p50/p99. No reconciles, status writes or
    events: what the cluster itself needs for the same pods."""
    from concurrent.futures import ThreadPoolExecutor

    from recserve_operator.builders.common import Ids
    from recserve_operator.builders.configmap import build_configmap
    from recserve_operator.builders.deployment import build_deployment
    from recserve_operator.builders.pdb import build_pdb
    from recserve_operator.builders.service import build_revision_service, build_stable_service
    from recserve_operator.kube import Kube
    from recserve_operator.settings import OperatorDefaults
    from recserve_operator.spec import parse_spec, revision_of

    ns = f"bench-floor-{n}-{int(time.time())}"
    cluster.kubectl("create", "namespace", ns)
    defaults = OperatorDefaults.from_env({"RECSERVE_TRITON_IMAGE": "nvcr.io/nvidia/tritonserver:25.10-py3"})
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(cluster.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = threads + 2
    client = kubernetes.client.ApiClient(configuration)
    kube = Kube(client)

    def objects(name: str) -> list[dict[str, Any]]:
        spec = parse_spec(_model(name)["spec"])
        ids = Ids(name, ns, "00000000-0000-0000-0000-000000000000", revision_of(spec))
        built = [build_configmap(spec, ids), build_deployment(spec, ids, defaults), build_revision_service(spec, ids),
                 build_pdb(spec, ids), build_stable_service(spec, ids)]  # fmt: skip
        objs = [o for o in built if o is not None]  # one replica: no disruption budget, as the operator
        for obj in objs:
            obj["metadata"].pop("ownerReferences", None)
        return objs

    names = [f"f-{i:04d}" for i in range(n)]
    planned = {name: objects(name) for name in names}
    applied: dict[str, float] = {}
    created: dict[str, float] = {}

    def apply(name: str) -> None:
        applied[name] = time.monotonic()
        for obj in planned[name]:
            kube.apply(obj)
            if obj["kind"] == "Deployment":
                created[name] = time.monotonic()

    apps = kubernetes.client.AppsV1Api(client)
    result: dict[str, Any] = {"models": n, "threads": threads}
    try:
        with _capacity(cluster, n):
            start = time.monotonic()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(apply, names))
            result["applied_in_s"] = time.monotonic() - start

            def available() -> int:
                items = apps.list_namespaced_deployment(ns, _preload_content=False)
                deps = json.loads(items.data)["items"]
                return sum(1 for d in deps if (d.get("status") or {}).get("availableReplicas", 0) >= 1)

            done = _wait(lambda: available() >= n, 900, 0.5)
            result["all_available_s"] = time.monotonic() - start if done else None
            result["apply_to_deployment_s"] = _summary([created[m] - applied[m] for m in names if m in created])
            result["writes"] = sum(kube.requests.values())
    finally:
        _delete_namespace(cluster, ns)
    return result


# -- two replicas: takeover ------------------------------------------------------------------------------------


class Replica:
    """One operator process of a pair: `lease` (this tree's leader election) or `peering` (Kopf peering)."""

    def __init__(self, cluster: Cluster, ns: str, workdir: Path, name: str, *, mode: str, priority: int) -> None:
        self.name, self.mode = name, mode
        self.metrics_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.write_log = workdir / f"{name}.writes.jsonl"
        env = {
            **cluster.env,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
            "PYTHONUNBUFFERED": "1",
            "RECSERVE_METRICS_PORT": str(self.metrics_port),
            "RECSERVE_RESYNC_SECONDS": "10",
            "RECSERVE_WRITE_LOG": str(self.write_log),
            "RECSERVE_IDENTITY": name,
            "RECSERVE_LEADER_ELECTION": "true" if mode == "lease" else "false",
            "RECSERVE_LEASE_NAMESPACE": ns,
            "RECSERVE_PEERING_NAME": "bench",
        }
        cmd = [str(Path(sys.executable).parent / "kopf"), "run", "-m", "recserve_operator.handlers",
               "--namespace", ns, "--liveness", f"http://127.0.0.1:{free_port()}/healthz"]  # fmt: skip
        cmd += ["--standalone"] if mode == "lease" else ["--peering", "bench", "--priority", str(priority)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def metrics(self) -> dict[str, float] | None:
        return _scrape(self.metrics_port)

    def writes(self) -> float:
        return _writes(_api(self.metrics()))

    def written(self) -> list[dict[str, Any]]:
        """(time, verb, path) of every write, when the operator records them (RECSERVE_WRITE_LOG)."""
        if not self.write_log.exists():
            return []
        return [json.loads(line) for line in self.write_log.read_text().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def takeover(cluster: Cluster, mode: str, models: int = 20, timeout: float = 180) -> dict[str, Any]:
    """Two replicas, `models` models Ready under the leader; kill -9 the leader and change every model at once:
    seconds until the standby's first write and until every change is applied; writes by the standby while the
    leader lived; objects written by both processes."""
    ns = f"bench-takeover-{mode}-{int(time.time())}"
    cluster.kubectl("create", "namespace", ns)
    workdir = Path(tempfile.mkdtemp(prefix="takeover-"))
    if mode == "peering":
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(
            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "bench"}}))  # fmt: skip
    api = kubernetes.config.new_client_from_config(str(cluster.kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(api)
    apps = kubernetes.client.AppsV1Api(api)
    a = Replica(cluster, ns, workdir, "replica-a", mode=mode, priority=100)
    time.sleep(3 if mode == "lease" else 8)  # replica-a leads: it starts first (lease) or has the higher priority
    b = Replica(cluster, ns, workdir, "replica-b", mode=mode, priority=50)
    result: dict[str, Any] = {"mode": mode, "models": models}
    try:
        for r in (a, b):
            if not _wait(r.metrics, 60):
                raise RuntimeError(f"{r.name} did not start: {r.log_path.read_text()[-3000:]}")
        names = [f"t-{i:03d}" for i in range(models)]
        for name in names:
            custom.create_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels", _model(name))

        def phases() -> list[str]:
            items = custom.list_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels")["items"]
            return [(o.get("status") or {}).get("phase", "") for o in items]

        if not _wait(lambda: phases().count("Ready") == models, timeout, 1.0):
            raise RuntimeError(f"models not Ready under two replicas: {phases()}")
        time.sleep(15)  # a resync or more at rest with both alive
        leader, standby = (a, b) if a.writes() >= b.writes() else (b, a)
        result["leader"] = leader.name
        result["standby_writes_while_leader_alive"] = standby.writes()
        result["leader_writes_before_kill"] = leader.writes()
        standby_before = standby.writes()
        killed_at_wall = time.time()
        killed = time.monotonic()
        leader.stop(signal.SIGKILL)
        for name in names:  # every model changes right after the leader dies: only a new leader can apply it
            custom.patch_namespaced_custom_object("recserve.dev", "v1alpha1", ns, "recommendermodels", name,
                                                  {"spec": {"serving": {"replicas": 2}}})  # fmt: skip
        first = _wait(lambda: standby.writes() > standby_before, timeout, 0.1)
        result["standby_first_write_s"] = time.monotonic() - killed if first else None

        def scaled() -> bool:
            deps = apps.list_namespaced_deployment(ns).items
            return sum(1 for d in deps if d.spec.replicas == 2) >= models

        done = _wait(scaled, timeout, 0.25)
        result["all_changes_applied_s"] = time.monotonic() - killed if done else None
        # Objects written by both processes: from each process's write log (time, verb, path).
        log_a, log_b = a.written(), b.written()
        paths_a, paths_b = {w["path"] for w in log_a}, {w["path"] for w in log_b}
        result["objects_written_by_both"] = len(paths_a & paths_b)
        # ... and while both were alive (the standby wrote before the leader's death: split brain).
        result["objects_written_by_both_while_both_alive"] = len(
            {w["path"] for w in standby.written() if w["t"] < killed_at_wall}
            & {w["path"] for w in leader.written()})  # fmt: skip
        result["write_logs"] = bool(log_a or log_b)
    finally:
        for r in (a, b):
            r.stop()
        _delete_namespace(cluster, ns, timeout=300)
    result["logs"] = str(workdir)
    return result


def run(sizes: list[int], steady_s: float, out: Path | None, *, keep_cluster: bool = False,
        takeover_modes: list[str] | None = None, takeover_models: int = 20,
        with_floor: bool = False) -> dict[str, Any]:  # fmt: skip
    """Measure each size (and the takeover); a cluster this run brought up is taken down again (unless
    keep_cluster), so nothing it started (kube-apiserver, etcd, kwok, the real node) outlives the benchmark."""
    provider = get_provider()
    existed = provider.current() is not None
    cluster = provider.up()
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "results": [],
        "takeover": [],
        "floor": [],
    }
    try:
        install_crd(cluster)
        _wait_quiet(cluster)
        for mode in takeover_modes or []:  # small: first, so the largest size is last (its deletion not waited)
            try:
                t = takeover(cluster, mode, takeover_models)
            except Exception as exc:  # recorded: the scale table still runs
                t = {"mode": mode, "models": takeover_models, "error": repr(exc)}
            print(json.dumps(t), flush=True)
            report["takeover"].append(t)
            if out:
                _write(out, report)
        for i, n in enumerate(sizes):
            if with_floor:
                f = floor(cluster, n)
                print(json.dumps(f), flush=True)
                report["floor"].append(f)
            r = measure(cluster, n, steady_s, wait_deleted=i < len(sizes) - 1)
            print(json.dumps(r), flush=True)
            report["results"].append(r)
            if out:
                _write(out, report)
    finally:
        if not existed and not keep_cluster and provider.name != "existing":
            provider.down()
    _print(report)
    if out:
        _write(out, report)
    return report


# Where this run kept its logs: printed while it runs, never saved (the results are committed; these are temp dirs).
LOCAL_PATH_KEYS = ("operator_log", "logs")


def _write(out: Path, report: dict[str, Any]) -> None:
    saved = {k: [{f: v for f, v in item.items() if f not in LOCAL_PATH_KEYS} for item in report[k]]
             if k in ("results", "takeover") else report[k] for k in report}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2) + "\n")


def _print(report: dict[str, Any]) -> None:
    print(
        f"{'models':>6} {'all Ready s':>11} {'->Deploy p50/p99 s':>19} {'->Ready p50/p99 s':>18} "
        f"{'rec/model':>9} {'RSS MiB':>8} {'CPU s':>6} {'cores':>5} {'req/rec':>7} {'writes/min rest':>15}"
    )
    for r in report["results"]:
        d, rd = r["apply_to_deployment_s"], r["apply_to_ready_s"]
        all_ready = r["all_ready_s"] or float("nan")
        print(
            f"{r['models']:>6} {all_ready:>11.1f} {d.get('p50', 0):>9.2f}/{d.get('p99', 0):<9.2f}"
            f" {rd.get('p50', 0):>8.2f}/{rd.get('p99', 0):<9.2f} {r['reconciles_per_model']:>9.1f}"
            f" {r['operator_rss_mib_loaded']:>8.0f} {r['operator_cpu_s_until_ready']:>6.1f}"
            f" {r['operator_cpu_cores_until_ready'] or 0:>5.2f} {r['api_requests_per_reconcile'] or 0:>7.2f}"
            f" {r['steady_writes_per_minute']:>15.1f}"
        )
    for f in report["floor"]:
        d = f["apply_to_deployment_s"]
        print(f"floor ({f['models']} models' objects applied without the operator, {f['threads']} threads): every"
              f" Deployment available {f['all_available_s']} s, apply -> Deployment p50/p99 {d.get('p50', 0):.2f}/"
              f"{d.get('p99', 0):.2f} s, {f['writes']} writes")
    for t in report["takeover"]:
        print(
            f"takeover ({t['mode']}, {t['models']} models): standby's first write {t.get('standby_first_write_s')}"
            f" s after kill -9, every change applied {t.get('all_changes_applied_s')} s; standby writes while"
            f" the leader lived {t.get('standby_writes_while_leader_alive')}; objects written by both while"
            f" both alive {t.get('objects_written_by_both_while_both_alive')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,500,2000", help="comma-separated model counts, each measured fresh")
    parser.add_argument("--steady-seconds", type=float, default=60.0, help="window for writes at rest")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "operator.json")
    parser.add_argument("--keep-cluster", action="store_true", help="leave a cluster this run started running")
    parser.add_argument("--takeover", default="", help="comma-separated: lease (leader election), peering (Kopf)")
    parser.add_argument("--takeover-models", type=int, default=20)
    parser.add_argument("--floor", action="store_true", help="also measure the control plane alone (see above)")
    args = parser.parse_args()
    # Stopped by a signal (even from a background shell, which ignores SIGINT): still run the cleanup (operator
    # processes, namespaces, the benchmark's node, a cluster it brought up).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(
        [int(x) for x in args.sizes.split(",") if x],
        args.steady_seconds,
        args.out,
        keep_cluster=args.keep_cluster,
        takeover_modes=[m for m in args.takeover.split(",") if m],
        takeover_models=args.takeover_models,
        with_floor=args.floor,
    )


if __name__ == "__main__":
    main()
