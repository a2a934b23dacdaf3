"""What mirroring costs users: the builtin router's nginx without and with a shadow phase, side by side.

One local Triton (the data-plane tests' python-backend scorer) serves as both the stable and the shadowed
candidate. Three nginx routers run the generated configs: stable only; shadow at 10%; shadow at 100%. The two
shadow routers mirror to one comparator process (`python -m recserve_operator.shadow`, as in the router pod),
which sends every mirrored request to the stable and the candidate (here the same Triton) and compares.

Latency: interleaved rounds of sequential keep-alive requests per router (the case where nginx's mirror could
hold a connection's next request); p50/p99 and the p99 added over the stable-only router, pooled and per round.
Throughput: C client threads for S seconds per router: users' requests/s, failures, and what the comparator
compared and dropped in that time (its sustainable rate against the router's).

    python bench/rollout/shadow_overhead.py --rounds 6 --requests 400
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "operator")]

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from recserve_operator.rollout.machine import TrafficWeights  # noqa: E402
from recserve_operator.rollout.policy import RoutingPolicy  # noqa: E402
from recserve_operator.rollout.state import Phase, RolloutState  # noqa: E402
from recserve_operator.routers.builtin import render_local_nginx_conf  # noqa: E402
from recserve_operator.routers.plan import build_traffic_plan  # noqa: E402

from bench.rollout.latency import Client, percentiles  # noqa: E402
from model_repo_builder.triton_local import TritonServer, free_ports  # noqa: E402
from recserve_cluster.dataplane import NGINX, wait_until  # noqa: E402
from tests.dataplane.harness import MODEL, write_scorer_repo  # noqa: E402

TARGETS = ("stable-only", "shadow-10%", "shadow-100%")
PERCENT = {"stable-only": 0, "shadow-10%": 10, "shadow-100%": 100}


def start_nginx(workdir: Path, percent: int, triton: str, intake: str) -> tuple[int, subprocess.Popen[bytes]]:
    state = RolloutState(phase=Phase.PROGRESSING, stable_revision="rev-a", revision="rev-b", shadowing=True)
    plan = build_traffic_plan("bench", state, TrafficWeights(100, 0, False, mirror=percent), RoutingPolicy(),
                              lambda _m, rev: rev)  # fmt: skip
    workdir.mkdir(parents=True)
    (port,) = free_ports(1)
    conf = render_local_nginx_conf(plan, {"stable": triton}, str(workdir), port, user="root",
                                   shadow_intake=intake)  # fmt: skip
    (workdir / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX, "-p", f"{workdir}/", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=(workdir / "stderr.log").open("wb"))  # fmt: skip
    wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok, 15, "nginx")
    return port, proc


def comparator_counts(metrics_port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "recserve_shadow_requests_total":
                out[s.labels["outcome"]] = s.value
            elif s.name == "recserve_shadow_mirrored_total":
                out["mirrored"] = s.value
    return out


def throughput(port: int, threads: int, seconds: float) -> tuple[float, int]:
    """(answered requests/s, failed) with `threads` keep-alive clients for `seconds`."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    failures = [0] * threads

    def work(i: int) -> None:
        client = Client(port)
        while time.perf_counter() < stop:
            try:
                client.call(i)
                counts[i] += 1
            except Exception:
                failures[i] += 1
                client = Client(port)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), sum(failures)


def run(rounds: int, n: int, warmup: int, threads: int, seconds: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="recserve-shadow-bench-"))
    stops: list[Callable[[], None]] = []
    try:
        repo = write_scorer_repo(workdir / "triton", 0.0, workdir / "fail_share")
        http_port, grpc_port, metrics_port = free_ports(3)
        triton = TritonServer(repo, http_port, grpc_port, metrics_port, log_path=workdir / "triton.log")
        triton.start()
        stops.append(triton.stop)
        triton.wait_model_ready(MODEL)
        address = f"127.0.0.1:{http_port}"
        intake, cmp_metrics = free_ports(2)
        comparator = subprocess.Popen(
            [sys.executable, "-m", "recserve_operator.shadow", "--model", MODEL, "--stable-revision", "rev-a",
             "--candidate-revision", "rev-b", "--stable-url", f"http://{address}", "--candidate-url",
             f"http://{address}", f"--intake-port={intake}", f"--metrics-port={cmp_metrics}"],
            stdout=subprocess.DEVNULL, stderr=(workdir / "comparator.log").open("wb"),
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "operator"), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        stops.append(lambda: _stop(comparator))
        wait_until(lambda: requests.get(f"http://127.0.0.1:{cmp_metrics}/healthz", timeout=1).ok, 20, "comparator")
        ports = {}
        for target in TARGETS:
            port, proc = start_nginx(workdir / target, PERCENT[target], address, f"127.0.0.1:{intake}")
            ports[target] = port
            stops.append(functools.partial(_stop, proc))
        clients = {t: Client(p) for t, p in ports.items()}
        for client in clients.values():
            for i in range(warmup):
                client.call(i)
        per_round: dict[str, list[tuple[float, float]]] = {t: [] for t in TARGETS}
        pooled: dict[str, list[float]] = {t: [] for t in TARGETS}
        rng = np.random.default_rng(11)
        for r in range(rounds):
            for target in TARGETS[r % 3 :] + TARGETS[: r % 3]:
                lat = [clients[target].call(int(u)) for u in rng.integers(0, 100_000, size=n)]
                per_round[target].append(percentiles(lat))
                pooled[target].extend(lat)
        base50, base99 = percentiles(pooled["stable-only"])
        result: dict[str, Any] = {"rounds": rounds, "requests_per_round": n, "latency": {}, "throughput": {}}
        for target in TARGETS:
            p50, p99 = percentiles(pooled[target])
            d99 = [a[1] - b[1] for a, b in zip(per_round[target], per_round["stable-only"], strict=True)]
            result["latency"][target] = {
                "p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50 - base50, "added_p99_ms": p99 - base99,
                "p99_ratio": p99 / base99, "added_p99_per_round_ms": [min(d99), statistics.median(d99), max(d99)],
            }  # fmt: skip
        for target in TARGETS:
            before = comparator_counts(cmp_metrics)
            rate, failed = throughput(ports[target], threads, seconds)
            # The comparator finishes its queue after the load: count what it compared for this window.
            wait_until(functools.partial(_settled, cmp_metrics, before), 30, "the comparator's queue to drain")
            after = comparator_counts(cmp_metrics)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            result["throughput"][target] = {"users_rps": rate, "users_failed": failed,
                                            "mirrored": delta.get("mirrored", 0), "compared": delta.get("compared", 0),
                                            "dropped": delta.get("dropped", 0),
                                            "compared_per_s": delta.get("compared", 0) / seconds}  # fmt: skip
        return result
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


def _settled(metrics_port: int, before: dict[str, float]) -> bool:
    now = comparator_counts(metrics_port)
    done = sum(v for k, v in now.items() if k != "mirrored") - sum(v for k, v in before.items() if k != "mirrored")
    return done >= now.get("mirrored", 0) - before.get("mirrored", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=400, help="sequential requests per router per round")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=8, help="client threads of the throughput phase")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput window")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    result = run(args.rounds, args.requests, args.warmup, args.threads, args.seconds)
    print(f"{args.rounds} interleaved rounds x {args.requests} sequential keep-alive requests per router; one Triton "
          "(python-backend scorer) as stable and candidate; one comparator process")  # fmt: skip
    print(f"{'router':>12} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'p99 ratio':>9}  "
          f"{'+p99/round min/med/max':>24}")  # fmt: skip
    for target, t in result["latency"].items():
        print(f"{target:>12} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['added_p50_ms']:+8.3f} {t['added_p99_ms']:+8.3f} "
              f"{t['p99_ratio']:9.3f}  {'/'.join(f'{x:+.3f}' for x in t['added_p99_per_round_ms']):>24}")  # fmt: skip
    print(f"throughput: {args.threads} client threads x {args.seconds:g}s per router")
    print(f"{'router':>12} {'users/s':>9} {'failed':>7} {'mirrored':>9} {'compared':>9} {'dropped':>8} "
          f"{'compared/s':>10}")  # fmt: skip
    for target, t in result["throughput"].items():
        print(f"{target:>12} {t['users_rps']:9.1f} {t['users_failed']:7d} {t['mirrored']:9.0f} {t['compared']:9.0f} "
              f"{t['dropped']:8.0f} {t['compared_per_s']:10.1f}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
