"""Time from a canary starting to fail to traffic off it, on the real data plane (Triton x2, nginx, Prometheus)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "operator")]

from recserve_operator.rollout.machine import Action, TrafficWeights, next_step  # noqa: E402
from recserve_operator.rollout.policy import RolloutPolicy  # noqa: E402
from recserve_operator.rollout.state import Phase, RolloutState  # noqa: E402
from recserve_operator.routers.plan import build_traffic_plan  # noqa: E402

from tests.dataplane.harness import LoadGenerator, Stack, data_plane, observe, wait_seconds, wait_until  # noqa: E402


def by_revision(_model: str, revision: str) -> str:
    return revision


def one_run(stack: Stack, interval_s: float, fail_share: float, onset_delay_s: float) -> dict[str, float]:
    policy = RolloutPolicy.from_spec({
        "strategy": "canary",
        "steps": [{"weight": 20, "pause": "10m"}],  # a long pause: only a failed check can end this step
        "analysis": {"interval": f"{interval_s:g}s", "prometheus": stack.prometheus.url, "maxErrorRate": 0.02,
                     "minRequests": 10, "failureLimit": 1},
    })  # fmt: skip
    stack.candidate.set_fail_share(0.0)
    state = RolloutState(phase=Phase.IDLE, stable_revision=stack.stable.revision)
    stack.route(build_traffic_plan("m", state, TrafficWeights.stable_only(), policy.routing, by_revision))
    wait_seconds(interval_s + 1.0)
    desired = stack.candidate.revision
    with LoadGenerator(stack.nginx.url, rps=80) as load:
        fail_at = None
        started = time.monotonic()
        while True:
            if fail_at is None and time.monotonic() - started >= onset_delay_s:
                stack.candidate.set_fail_share(fail_share)
                fail_at = time.monotonic()
            d = next_step(policy, state, observe(stack, policy, state, desired), datetime.now(UTC))
            decided = time.monotonic()
            stack.route(build_traffic_plan("m", d.state, d.weights, policy.routing, by_revision))
            routed = time.monotonic()
            state = d.state
            if d.action is Action.ROLL_BACK:
                break
            if time.monotonic() - started > 120:
                raise RuntimeError(f"no rollback within 120s: {d.reason}")
            # The operator's loop: requeue after the decision's requeue_after (at most one interval).
            end = time.monotonic() + min(d.requeue_after or interval_s, interval_s)
            while time.monotonic() < end:
                if fail_at is None and time.monotonic() - started >= onset_delay_s:
                    stack.candidate.set_fail_share(fail_share)
                    fail_at = time.monotonic()
                wait_seconds(0.05)
        wait_seconds(1.0)  # let in-flight canary requests drain before reading the last one seen
        last_canary = load.snapshot().last_seen.get("canary", routed)
    stack.candidate.set_fail_share(0.0)
    assert fail_at is not None
    return {
        "decision_s": decided - fail_at,
        "traffic_off_s": routed - fail_at,
        "last_canary_response_s": last_canary - fail_at,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--interval", type=float, default=3.0, help="analysis interval in seconds")
    ap.add_argument("--fail-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    results = []
    with data_plane() as stack:
        wait_until(stack.candidate.available, 30, "candidate model ready")
        for i in range(args.runs):
            # Failure onset at a random phase of the analysis loop, after the canary step has started.
            r = one_run(stack, args.interval, args.fail_share, onset_delay_s=2.0 + float(rng.uniform(0, args.interval)))
            results.append(r)
            print(f"run {i + 1}: " + ", ".join(f"{k}={v:.2f}s" for k, v in r.items()), flush=True)
    print(f"\nanalysis interval {args.interval:g}s, scrape interval 1s, candidate failing {args.fail_share:.0%}, "
          f"{args.runs} runs")  # fmt: skip
    for key in results[0]:
        vals = [r[key] for r in results]
        print(f"{key:>24}: median {statistics.median(vals):.2f}s, max {max(vals):.2f}s, "
              f"max/interval {max(vals) / args.interval:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
