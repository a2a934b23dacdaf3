"""Local data plane processes: Debian's nginx running the builtin-router config, Prometheus, a click exporter."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import start_http_server
from recserve_operator.metrics.prometheus import PrometheusProvider
from recserve_operator.routers.builtin import render_local_nginx_conf
from recserve_operator.routers.plan import TrafficPlan

from .errors import ClusterError
from .waiting import wait_for

T = TypeVar("T")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_INTERVAL_S = 1.0


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll until truthy or raise TimeoutError naming `what` (connection errors while starting count as not yet)."""
    return wait_for(predicate, timeout_s, interval_s, what)




class Nginx:
    """Debian's nginx with a generated config; `apply` re-renders it and reloads gracefully."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.dir = workdir
        self.port = port
        self.conf = workdir / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.plan: TrafficPlan | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _workers(self) -> set[int]:
        if self.proc is None:
            return set()
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return {int(p) for p in out.stdout.split()}

    def apply(self, plan: TrafficPlan, addresses: Mapping[str, str]) -> None:
        """Route per `plan`; addresses maps revision -> host:port of its Triton."""
        if plan == self.plan:
            return
        upstreams = {b.variant: addresses[b.revision] for b in plan.backends}
        user = "root" if os.geteuid() == 0 else None
        self.conf.write_text(render_local_nginx_conf(plan, upstreams, str(self.dir), self.port, user=user))
        check = subprocess.run([NGINX, "-t", "-q", "-p", str(self.dir), "-c", str(self.conf)],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the generated config:\n{check.stderr}\n{self.conf.read_text()}")
        if self.proc is None:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.dir), "-c", str(self.conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=(self.dir / "stderr.log").open("wb"),
            )  # fmt: skip
            wait_until(lambda: requests.get(f"{self.url}/healthz", timeout=1).ok, 15, "nginx to serve /healthz")
        else:
            old = self._workers()
            self.proc.send_signal(signal.SIGHUP)
            # The reload is in effect once none of the old workers is left.
            wait_until(lambda: (w := self._workers()) and not (w & old), 15, "nginx workers to reload")
        self.plan = plan

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None




class ClickExporter:
    """prometheus-client HTTP server exposing impressions/clicks counters per variant (simulated users)."""

    def __init__(self, port: int, true_ctr: Mapping[str, float], seed: int) -> None:
        self.port = port
        self.true_ctr = dict(true_ctr)
        self.rng = np.random.default_rng(seed)
        self.registry = CollectorRegistry()
        self.impressions = PromCounter("recserve_impressions", "Recommendations shown", ["variant"],
                                       registry=self.registry)  # fmt: skip
        self.clicks = PromCounter("recserve_clicks", "Recommendations clicked", ["variant"], registry=self.registry)
        self.totals: Tally[str] = Tally()
        self.click_totals: Tally[str] = Tally()
        for v in self.true_ctr:
            self.impressions.labels(v).inc(0)
            self.clicks.labels(v).inc(0)
        self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def simulate(self, impressions_per_variant: int) -> None:
        """Show `impressions_per_variant` recommendations per variant; each is clicked with its true CTR."""
        for variant, ctr in self.true_ctr.items():
            clicks = int(self.rng.binomial(impressions_per_variant, ctr))
            self.impressions.labels(variant).inc(impressions_per_variant)
            self.clicks.labels(variant).inc(clicks)
            self.totals[variant] += impressions_per_variant
            self.click_totals[variant] += clicks

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()



def prometheus_config(targets: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, Any]:
    """Scrape config: job -> (host:port, static labels such as variant and revision)."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S:g}s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "scrape_interval": f"{SCRAPE_INTERVAL_S:g}s",
             "static_configs": [{"targets": [addr], "labels": dict(labels)}]}
            for job, (addr, labels) in targets.items()
        ],
    }  # fmt: skip


class Prometheus:
    def __init__(self, workdir: Path, port: int, config: dict[str, Any]) -> None:
        self.dir = workdir
        self.port = port
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: requests.get(f"{self.url}/-/ready", timeout=1).ok, 60, "prometheus to be ready")
        self.provider = PrometheusProvider(self.url, timeout_s=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_targets_up(self, jobs: list[str]) -> None:
        def up(job: str) -> bool:
            return self.provider.query_scalar(f'up{{job="{job}"}}') == 1

        for job in jobs:
            wait_until(functools.partial(up, job), 30, f"target {job} up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()


class RouterSync:
    """Follows the operator's builtin-router ConfigMap (plan.json) and applies it to a local nginx.

    This is what the router pods do in a cluster; locally each revision's Service is a local Triton, so
    `addresses` maps revision -> host:port. A plan naming a revision with no local address yet is held back:
    traffic never goes to a revision that is not serving here.
    """

    def __init__(self, kubectl: Callable[..., Any], namespace: str, configmap: str, nginx: Nginx) -> None:
        self.kubectl = kubectl
        self.namespace = namespace
        self.configmap = configmap
        self.nginx = nginx
        self.addresses: dict[str, str] = {}

    def current_plan(self) -> TrafficPlan | None:
        out = self.kubectl("get", "configmap", self.configmap, "-n", self.namespace, "-o", "json", check=False)
        if out.returncode != 0:
            return None
        data = json.loads(out.stdout).get("data") or {}
        return TrafficPlan.from_dict(json.loads(data["plan.json"])) if "plan.json" in data else None

    def sync(self) -> TrafficPlan | None:
        """Apply the current plan if every revision in it is served locally; returns the plan in effect."""
        plan = self.current_plan()
        if plan is not None and all(b.revision in self.addresses for b in plan.backends):
            self.nginx.apply(plan, self.addresses)
        return self.nginx.plan


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


def revision_build_command(cluster: Any, namespace: str, model: str, revision: str,
                           rev_dir: Path) -> tuple[list[str], Path]:
    """The revision's init container args rewritten for a local build under rev_dir: same builder, same args,
    local paths and the CPU runtime. Returns (builder args, the repository they build)."""
    deploy = _kjson(cluster, "get", "deployment", f"{model}-{revision}", "-n", namespace)
    init = deploy["spec"]["template"]["spec"]["initContainers"][0]
    cm = _kjson(cluster, "get", "configmap", f"{model}-{revision}", "-n", namespace)
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
    out = subprocess.run([sys.executable, "-m", "model_repo_builder", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise ClusterError(f"model build failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def _kjson(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)
