"""The local demo: cluster, chart, operator, a trained CTR model served by Triton, then a canary to promotion.

Everything runs on this machine. The control plane is real (kwok simulates the nodes, so pods do not run);
this script plays the nodes' part for the data plane: it runs each revision's init step (model_repo_builder,
with the arguments the operator put in the Deployment) and its Triton locally, and a local nginx follows the
operator's router ConfigMap. The operator decides the rollout from real Prometheus metrics of those Tritons.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml

from .cluster import Cluster, get_provider
from .errors import ClusterError
from .waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("RECSERVE_DEMO_DIR", ROOT / ".recserve" / "demo"))
NAMESPACE = "shop"
MODEL = "ctr-dnn"
RELEASE = "recserve"
SYSTEM_NS = "recserve-system"
PY = sys.executable


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def info(msg: str) -> None:
    print(f"    {msg}", flush=True)


def _json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def install_chart(cluster: Cluster) -> None:
    say("Installing the RecServe Helm chart (CRD, RBAC, operator Deployment)")
    # Namespaced mode: the chart's Role/RoleBinding go into the watched namespace, which must exist first.
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                                "metadata": {"name": NAMESPACE}}))
    helm = str(cluster.bins["helm"])
    cmd = [helm, "upgrade", "--install", RELEASE, str(ROOT / "charts" / "recserve"), "-n", SYSTEM_NS,
           "--create-namespace", "--set", f"watchNamespaces={{{NAMESPACE}}}", "--wait", "--timeout", "3m"]
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"helm install failed: {out.stderr.strip()}")
    info("helm release 'recserve' deployed; CRD recommendermodels.recserve.dev registered")


@contextlib.contextmanager
def operator_process(cluster: Cluster, prometheus_url: str) -> Iterator[Path]:
    """The operator runs here as a process (the in-cluster pod is simulated by kwok and does nothing)."""
    from model_repo_builder.triton_local import free_port

    log = WORK / "operator.log"
    env = {**cluster.env, "RECSERVE_PROMETHEUS_URL": prometheus_url, "RECSERVE_METRICS_PORT": str(free_port()),
           "RECSERVE_WATCH_NAMESPACES": NAMESPACE, "RECSERVE_RESYNC_SECONDS": "2"}
    with log.open("w") as fh:
        cmd = [str(Path(PY).parent / "kopf"), "run", "--standalone", "-m", "recserve_operator.handlers",
               "--namespace", NAMESPACE]
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        info(f"operator running (pid {proc.pid}), log: {log}")
        try:
            yield log
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def train(version: int, variant: str) -> Path:
    out = WORK / "models"
    model = out / str(version) / "model.keras"
    if model.exists():
        info(f"model version {version} already trained: {model}")
        return model
    say(f"Training the CTR DNN (variant {variant!r}) on generated e-commerce data -> version {version}")
    subprocess.run([PY, str(ROOT / "examples" / "ctr-dnn" / "train.py"), "--version", str(version), "--variant",
                    variant, "--out", str(out)], check=True)
    return model


def recommender_model(model_path: Path, version: int, prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {"name": MODEL, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": model_path.as_uri(), "format": "keras", "version": version},
            "optimize": {"backend": "onnxruntime", "precision": "fp32"},
            "serving": {"maxBatchSize": 1024, "replicas": 1,
                        "dynamicBatching": {"preferredBatchSizes": [200], "maxQueueDelayMicroseconds": 1000},
                        "instances": {"kind": "GPU", "count": 1},
                        "resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"}, "gpuProduct": "NVIDIA-A10G"},
            "rollout": {
                "strategy": "canary",
                "steps": [{"weight": 20, "pause": "15s"}, {"weight": 50, "pause": "15s"}],
                "routing": {"provider": "builtin", "stickyHeader": "x-user-id"},
                "analysis": {"interval": "5s", "prometheus": prometheus_url, "maxErrorRate": 0.01,
                             "maxP99LatencyMs": 2000, "minRequests": 10},
            },
        },
    }


def status(cluster: Cluster) -> dict[str, Any]:
    return _json(cluster, "get", "recommendermodel", MODEL, "-n", NAMESPACE).get("status") or {}


def local_config(pbtxt: str) -> str:
    """The operator's config with the local runtime swapped in, everything else (batching, warmup) kept.

    The local Triton (nvidia-pytriton) has no native onnxruntime backend and there is no GPU: its python
    backend runs the same ONNX model with ONNX Runtime on the CPU.
    """
    from dataclasses import replace

    from model_repo_builder.config import build_model_config, options_from_config, parse_pbtxt, to_pbtxt

    cfg = parse_pbtxt(pbtxt)
    options = options_from_config(cfg)
    local = replace(options, backend="python", instance_kind="CPU", gpus=(), tensorrt_accelerator=False)
    return to_pbtxt(build_model_config(cfg.name, local))


def revision_build_command(cluster: Cluster, namespace: str, model: str, revision: str,
                           rev_dir: Path) -> tuple[list[str], Path]:
    """The revision's init container args rewritten for a local build under rev_dir: same builder, same args,
    local paths and the CPU runtime. Returns (builder args, the repository they build)."""
    deploy = _json(cluster, "get", "deployment", f"{model}-{revision}", "-n", namespace)
    init = deploy["spec"]["template"]["spec"]["initContainers"][0]
    cm = _json(cluster, "get", "configmap", f"{model}-{revision}", "-n", namespace)
    rev_dir.mkdir(parents=True, exist_ok=True)
    (rev_dir / "config.pbtxt").write_text(local_config(cm["data"]["config.pbtxt"]))
    repo = rev_dir / "models"
    args = [a.replace("/config/config.pbtxt", str(rev_dir / "config.pbtxt")) for a in init["args"]]
    args[args.index("--repo") + 1] = str(repo)
    args[args.index("--backend") + 1] = "python"
    args += ["--overwrite"]
    return args, repo


def run_builder(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """`python -m model_repo_builder ARGS`; the builder's JSON report, or ClusterError with its stderr."""
    out = subprocess.run([PY, "-m", "model_repo_builder", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise ClusterError(f"model build failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def local_build(cluster: Cluster, revision: str) -> Path:
    """Run the revision's init container command locally: same builder, same args, local paths and CPU runtime."""
    args, repo = revision_build_command(cluster, NAMESPACE, MODEL, revision, WORK / "revisions" / revision)
    say(f"Init step of revision {revision}: model-repo-builder {' '.join(args[:3])} ... (convert, parity, config)")
    report = run_builder(args)
    parity = report.get("parity") or {}
    info(f"built {repo}; parity max abs error {parity.get('max_abs_error', parity)}")
    return repo


class Load:
    """Shoppers through the router: each request scores 200 candidates for one user (sticky by x-user-id)."""

    def __init__(self, url: str, data: Any, in_name: str) -> None:
        self.url, self.data, self.in_name = url, data, in_name
        self.by_variant: Counter[str] = Counter()
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from recommend import candidate_items  # examples/ctr-dnn is on sys.path (run() puts it there)

        session = requests.Session()
        rng = np.random.default_rng(7)
        while not self.stop.is_set():
            user = int(rng.integers(self.data.config.n_users))
            x = self.data.features.candidates(user, candidate_items(self.data, user, 200), hour=20, device=0)
            body = {"inputs": [{"name": self.in_name, "shape": list(x.shape), "datatype": "FP32",
                                "data": x.astype(np.float32).ravel().tolist()}]}
            try:
                r = session.post(f"{self.url}/v2/models/{MODEL}/infer", json=body,
                                 headers={"x-user-id": f"user-{user}"}, timeout=10)
                self.by_variant[r.headers.get("X-RecServe-Variant", "?")] += 1
                self.errors += r.status_code != 200
            except requests.RequestException:
                self.errors += 1
            self.stop.wait(0.05)


def print_recommendations(url: str, data: Any, users: list[int]) -> None:
    from recommend import recommend, triton_scorer

    scorer = triton_scorer(url.removeprefix("http://"), MODEL)
    for user in users:
        recs, baseline = recommend(data, scorer, user, top=5)
        info(f"user {user}: top-5 of 200 candidates (mean true click prob of all candidates {baseline:.3f})")
        for r in recs:
            info(f"    item {r.item:5d}  score {r.score:.3f}  category {r.category:2d}  brand {r.brand:3d}  "
                 f"price {r.price:7.2f}  true click prob {r.true_click_prob:.3f}")


def run(keep_serving: bool) -> int:
    from model_repo_builder.triton_local import TritonServer, free_ports

    from .dataplane import Nginx, Prometheus, RouterSync

    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "examples" / "ctr-dnn"))
    sys.path.insert(0, str(ROOT / "examples"))

    say("Starting the local Kubernetes control plane (kube-apiserver, etcd, controllers, kwok GPU nodes)")
    cluster = get_provider().up()
    info(f"kubeconfig: {cluster.kubeconfig}")
    install_chart(cluster)

    v1 = train(1, "baseline")
    from recommend import load_data

    data = load_data(v1.parent / "feature_spec.json")
    in_name = json.loads((v1.parent / "feature_spec.json").read_text())["input_name"]

    with contextlib.ExitStack() as stack:
        prom_port, nginx_port = free_ports(2)
        targets = WORK / "prometheus" / "targets.json"
        targets.parent.mkdir(parents=True, exist_ok=True)
        targets.write_text("[]")
        prom_cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "triton", "scrape_interval": "1s",
                                        "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}]}
        say("Starting Prometheus (Debian's) to scrape the Triton revisions")
        prometheus = Prometheus(WORK / "prometheus", prom_port, prom_cfg)
        stack.callback(prometheus.stop)
        stack.enter_context(operator_process(cluster, prometheus.url))

        # A re-run starts the story from version 1: remove what an earlier run left, children first (foreground
        # deletion returns only once garbage collection has removed every owned object).
        cluster.kubectl("delete", "recommendermodel", MODEL, "-n", NAMESPACE, "--ignore-not-found",
                        "--cascade=foreground", "--wait=true", "--timeout=120s", timeout=150)
        say(f"Applying RecommenderModel {NAMESPACE}/{MODEL} (canary strategy, builtin router)")
        cluster.kubectl("apply", "--server-side", "--field-manager=demo", "-f", "-",
                        input=yaml.safe_dump(recommender_model(v1, 1, prometheus.url)))
        st = wait_for(lambda: (s := status(cluster)).get("phase") == "Ready" and s, 180, 2, "RecommenderModel Ready")
        stable = st["stable"]["revision"]
        info(f"Ready: stable revision {stable} scheduled on an NVIDIA-A10G node")
        print(cluster.kubectl("get", "recommendermodels", "-n", NAMESPACE).stdout, flush=True)

        tritons: dict[str, Any] = {}
        nginx_dir = WORK / "nginx"
        nginx_dir.mkdir(exist_ok=True)
        nginx = Nginx(nginx_dir, nginx_port)
        stack.callback(nginx.stop)
        router = RouterSync(cluster.kubectl, NAMESPACE, f"{MODEL}-router", nginx)

        def serve(revision: str) -> None:
            repo = local_build(cluster, revision)
            http, grpc, metrics = free_ports(3)
            triton = TritonServer(repo, http, grpc, metrics, log_path=WORK / "revisions" / revision / "triton.log",
                                  extra_args=["--metrics-config=summary_latencies=true"])
            triton.start()
            stack.callback(triton.stop)
            tritons[revision] = triton
            router.addresses[revision] = f"127.0.0.1:{http}"
            scrape = [{"targets": [f"127.0.0.1:{t.metrics_port}"], "labels": {"revision": r, "model": MODEL}}
                      for r, t in tritons.items()]
            targets.write_text(json.dumps(scrape))
            info(f"revision {revision} serving on Triton http://127.0.0.1:{http} (metrics :{metrics})")

        serve(stable)
        wait_for(router.sync, 60, 1, "the local router to follow the operator's plan")
        info(f"router (Debian's nginx, config rendered from the operator's plan) on {nginx.url}")

        say("Top-5 recommendations through the router, from the stable model")
        print_recommendations(nginx.url, data, [3, 42, 977])

        load = Load(nginx.url, data, in_name)
        load.thread.start()
        stack.callback(load.stop.set)

        v2 = train(2, "wide")
        say("Applying model version 2 as a canary")
        cluster.kubectl("apply", "--server-side", "--field-manager=demo", "-f", "-",
                        input=yaml.safe_dump(recommender_model(v2, 2, prometheus.url)))
        canary = wait_for(lambda: ((status(cluster).get("canary") or {}).get("revision") or "").replace(stable, "")
                          or None, 120, 1, "the operator to create the canary revision")
        serve(canary)

        say("Canary progressing: the operator moves traffic while Prometheus shows it healthy")
        seen: tuple[Any, ...] = ()
        deadline = time.monotonic() + 300
        result = ""
        while time.monotonic() < deadline:
            router.sync()
            st = status(cluster)
            c = st.get("canary") or {}
            conds = {x["type"]: x for x in st.get("conditions", [])}
            last = c.get("lastAnalysis") or {}
            row = (st.get("phase"), c.get("step"), c.get("weight"), last.get("decision"), c.get("phase"))
            if row != seen:
                seen = row
                info(f"phase={row[0]} step={row[1]} weight={row[2]}% analysis={row[3]} "
                     f"errorRate={last.get('errorRate')} p99Ms={last.get('p99Ms')} | "
                     f"requests by variant so far: {dict(load.by_variant)}")
            if (st.get("stable") or {}).get("revision") == canary:
                result = "Promoted"
                break
            if conds.get("RolledBack", {}).get("status") == "True" or c.get("phase") == "RolledBack":
                result = "RolledBack"
                break
            load.stop.wait(1)
        router.sync()
        if not result:
            raise ClusterError(f"the canary did not finish within 5 minutes; see {WORK / 'operator.log'}")
        say(f"Canary {result}: stable revision is now {status(cluster)['stable']['revision']}")
        print(cluster.kubectl("get", "recommendermodels", "-n", NAMESPACE).stdout, flush=True)
        events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                                 f"involvedObject.name={MODEL}", "--sort-by=.lastTimestamp").stdout
        print("\n".join(events.splitlines()[-8:]), flush=True)
        say("Top-5 recommendations from the promoted model")
        print_recommendations(nginx.url, data, [3, 42])
        info(f"requests served during the rollout: {dict(load.by_variant)}, errors: {load.errors}")
        say(f"Demo finished in {time.monotonic() - started:.0f}s. `make demo-down` removes everything.")
        if keep_serving:
            info(f"serving on {nginx.url} until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0 if result == "Promoted" else 1


def down() -> int:
    get_provider().down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve_cluster.demo", description=__doc__)
    parser.add_argument("cmd", choices=["up", "down"], nargs="?", default="up")
    parser.add_argument("--keep-serving", action="store_true", help="keep Triton/nginx running after the story")
    args = parser.parse_args(argv)
    try:
        return run(args.keep_serving) if args.cmd == "up" else down()
    except (ClusterError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
