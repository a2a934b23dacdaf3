"""Latency added by the builtin nginx router: one Triton called directly vs through nginx, side by side."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "operator")]

from recserve_operator.rollout.machine import TrafficWeights  # noqa: E402
from recserve_operator.rollout.policy import RoutingPolicy  # noqa: E402
from recserve_operator.rollout.state import Phase, RolloutState  # noqa: E402
from recserve_operator.routers.plan import build_traffic_plan  # noqa: E402

from bench.rollout.latency import Client, percentiles  # noqa: E402
from model_repo_builder.triton_local import TritonServer, free_ports  # noqa: E402
from recserve_cluster.dataplane import Nginx  # noqa: E402
from tests.dataplane.harness import MODEL, write_scorer_repo  # noqa: E402

TARGETS = ("direct", "nginx-stable", "nginx-50/50")


def nginx_for(workdir: Path, revisions: dict[str, int], address: str) -> Nginx:
    """nginx routing per a plan whose revisions (name -> canary weight) all point at the same Triton."""
    routing = RoutingPolicy()
    (stable, _), *rest = revisions.items()
    canary, weight = rest[0] if rest else (None, 0)
    state = RolloutState(phase=Phase.PROGRESSING if canary else Phase.IDLE, stable_revision=stable, revision=canary,
                         weight=weight)  # fmt: skip
    weights = TrafficWeights(100 - weight, weight, canary is not None)
    plan = build_traffic_plan("bench", state, weights, routing, lambda _m, rev: rev)
    workdir.mkdir(parents=True)
    nginx = Nginx(workdir, free_ports(1)[0])
    nginx.apply(plan, dict.fromkeys(revisions, address))
    return nginx


def run(rounds: int, n: int, warmup: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="recserve-router-bench-"))
    stops: list[Callable[[], None]] = []
    try:
        control = workdir / "fail_share"
        repo = write_scorer_repo(workdir / "triton", 0.0, control)
        http_port, grpc_port, metrics_port = free_ports(3)
        triton = TritonServer(repo, http_port, grpc_port, metrics_port, log_path=workdir / "triton.log")
        triton.start()
        stops.append(triton.stop)
        triton.wait_model_ready(MODEL)
        address = f"127.0.0.1:{http_port}"
        single = nginx_for(workdir / "nginx-stable", {"rev-a": 0}, address)
        stops.append(single.stop)
        split = nginx_for(workdir / "nginx-split", {"rev-a": 0, "rev-b": 50}, address)
        stops.append(split.stop)
        clients = {
            "direct": Client(http_port, sticky=True),
            "nginx-stable": Client(single.port, sticky=True),
            "nginx-50/50": Client(split.port, sticky=True),
        }
        for client in clients.values():
            for i in range(warmup):
                client.call(i)
        per_round: dict[str, list[tuple[float, float]]] = {t: [] for t in TARGETS}
        pooled: dict[str, list[float]] = {t: [] for t in TARGETS}
        rng = np.random.default_rng(11)
        for r in range(rounds):
            order = list(TARGETS[r % 3 :] + TARGETS[: r % 3])  # rotate who goes first in each round
            for target in order:
                users = rng.integers(0, 100_000, size=n)
                lat = [clients[target].call(int(u)) for u in users]
                per_round[target].append(percentiles(lat))
                pooled[target].extend(lat)
        result: dict[str, Any] = {"rounds": rounds, "requests_per_round": n, "targets": {}}
        direct_rounds = per_round["direct"]
        for target in TARGETS:
            p50, p99 = percentiles(pooled[target])
            d50 = [a[0] - b[0] for a, b in zip(per_round[target], direct_rounds, strict=True)]
            d99 = [a[1] - b[1] for a, b in zip(per_round[target], direct_rounds, strict=True)]
            result["targets"][target] = {
                "p50_ms": p50,
                "p99_ms": p99,
                "p50_range_ms": [min(x[0] for x in per_round[target]), max(x[0] for x in per_round[target])],
                "p99_range_ms": [min(x[1] for x in per_round[target]), max(x[1] for x in per_round[target])],
                "added_p50_ms": p50 - percentiles(pooled["direct"])[0],
                "added_p99_ms": p99 - percentiles(pooled["direct"])[1],
                "added_p50_per_round_ms": [min(d50), statistics.median(d50), max(d50)],
                "added_p99_per_round_ms": [min(d99), statistics.median(d99), max(d99)],
            }
        return result
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=500, help="requests per target per round")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    result = run(args.rounds, args.requests, args.warmup)
    print(f"{args.rounds} interleaved rounds x {args.requests} sequential requests per target (keep-alive), "
          "one Triton (python-backend scorer)")  # fmt: skip
    print(f"{'target':>13} {'p50 ms':>8} {'p99 ms':>8}  {'p50 min-max':>13}  {'p99 min-max':>13}  "
          f"{'+p50 ms':>8} {'+p99 ms':>8}  {'+p50/round min/med/max':>26}  "
          f"{'+p99/round min/med/max':>26}")  # fmt: skip
    for target, t in result["targets"].items():
        print(f"{target:>13} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f}  "
              f"{t['p50_range_ms'][0]:6.3f}-{t['p50_range_ms'][1]:<6.3f}  "
              f"{t['p99_range_ms'][0]:6.3f}-{t['p99_range_ms'][1]:<6.3f}  "
              f"{t['added_p50_ms']:+8.3f} {t['added_p99_ms']:+8.3f}  "
              f"{'/'.join(f'{x:+.3f}' for x in t['added_p50_per_round_ms']):>26}  "
              f"{'/'.join(f'{x:+.3f}' for x in t['added_p99_per_round_ms']):>26}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
