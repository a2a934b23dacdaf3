"""Local data plane processes: Debian's nginx running the builtin-router config, Prometheus, a click exporter."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
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
