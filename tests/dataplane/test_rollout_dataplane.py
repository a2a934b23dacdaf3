"""The rollout engine against a real data plane: nginx in front of two Tritons, Prometheus, a click exporter."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from recserve_operator.rollout.machine import Action, TrafficWeights
from recserve_operator.rollout.policy import RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.routers.builtin import assign_variant
from recserve_operator.routers.plan import build_traffic_plan

from .harness import LoadGenerator, Stack, data_plane, drive, infer, wait_seconds, wait_until

pytestmark = [
    pytest.mark.dataplane,
    pytest.mark.skipif(not (shutil.which("nginx") or shutil.which("/usr/sbin/nginx")), reason="needs nginx"),
    pytest.mark.skipif(not (shutil.which("prometheus") or shutil.which("/usr/bin/prometheus")),
                       reason="needs prometheus"),
]  # fmt: skip

INTERVAL_S = 3.0
ROUTING = {"provider": "builtin", "stickyHeader": "x-user-id", "variantHeader": "x-recserve-variant"}
ANALYSIS = {"interval": f"{INTERVAL_S:g}s", "maxErrorRate": 0.02, "maxP99LatencyMs": 1000, "minRequests": 10,
            "failureLimit": 1}  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with data_plane(true_ctr={"stable": 0.050, "canary": 0.056}, seed=2026) as s:
        yield s


def canary_policy(stack: Stack) -> RolloutPolicy:
    return RolloutPolicy.from_spec({
        "strategy": "canary",
        "steps": [{"weight": 10, "pause": "3s"}, {"weight": 50, "pause": "3s"}],
        "routing": ROUTING,
        "analysis": {**ANALYSIS, "prometheus": stack.prometheus.url},
    })  # fmt: skip


def fresh_state(stack: Stack) -> RolloutState:
    """Stable rev-a takes all traffic, then a quiet interval so the candidate's analysis window starts clean."""
    state = RolloutState(phase=Phase.IDLE, stable_revision=stack.stable.revision)
    stack.route(build_traffic_plan("model", state, TrafficWeights.stable_only(), canary_policy(stack).routing,
                                   lambda _m, rev: rev))  # fmt: skip
    wait_seconds(INTERVAL_S + 1.0)
    return state


def test_healthy_candidate_is_promoted_through_all_steps(stack: Stack) -> None:
    stack.candidate.set_fail_share(0.0)
    policy = canary_policy(stack)
    state = fresh_state(stack)
    with LoadGenerator(stack.nginx.url, rps=80) as load:
        run = drive(stack, policy, state, stack.candidate.revision,
                    until=lambda d: d.action in (Action.PROMOTE, Action.ROLL_BACK), timeout_s=90)  # fmt: skip
        stats = load.snapshot()
    assert run.final.action is Action.PROMOTE, run.final.reason
    weights = [s.canary_weight for s in run.decisions if s.action is Action.SET_WEIGHT]
    assert weights == [10, 50]
    assert run.final.state.stable_revision == stack.candidate.revision
    assert stats.sent["canary"] > 0
    assert sum(stats.errors.values()) == 0, stats
    assert stats.mismatched == 0
    # After promotion nginx routes everything to the promoted revision (the candidate's Triton).
    variant, ok, _ = infer(requests.Session(), stack.nginx.url, 7, {"x-user-id": "anyone"})
    assert ok and variant == "stable" and stack.nginx.plan is not None
    assert [b.revision for b in stack.nginx.plan.backends] == [stack.candidate.revision]


def test_failing_candidate_is_rolled_back_within_two_intervals_while_stable_serves(stack: Stack) -> None:
    policy = canary_policy(stack)
    state = fresh_state(stack)
    stack.candidate.set_fail_share(0.3)
    try:
        with LoadGenerator(stack.nginx.url, rps=80) as load:
            run = drive(stack, policy, state, stack.candidate.revision,
                        until=lambda d: d.action in (Action.PROMOTE, Action.ROLL_BACK), timeout_s=60)  # fmt: skip
            stats = load.snapshot()
    finally:
        stack.candidate.set_fail_share(0.0)
    assert run.final.action is Action.ROLL_BACK, run.final.reason
    print("rollback timeline:", [(round(s.at_s, 2), s.action.value, s.canary_weight) for s in run.decisions])
    assert "errorRate" in run.final.reason
    first_traffic = next(s.at_s for s in run.decisions if s.canary_weight > 0)
    rolled_back = run.decisions[-1].at_s
    assert rolled_back - first_traffic <= 2 * INTERVAL_S + 0.5, run.decisions
    assert stats.errors["canary"] > 0
    assert stats.errors["stable"] == 0, stats
    assert stats.errors["?"] == 0, stats
    assert stats.sent["stable"] > 0
    assert stack.nginx.plan is not None and stack.nginx.plan.canary_weight == 0
    assert run.final.state.phase is Phase.ROLLED_BACK


def test_ab_test_picks_the_variant_with_the_higher_true_ctr(stack: Stack) -> None:
    stack.candidate.set_fail_share(0.0)
    prom = stack.prometheus.url
    policy = RolloutPolicy.from_spec({
        "strategy": "abTest",
        "routing": ROUTING,
        "analysis": {**ANALYSIS, "prometheus": prom, "abTest": {
            "clicks": 'sum(recserve_clicks_total{variant="{{variant}}"})',
            "impressions": 'sum(recserve_impressions_total{variant="{{variant}}"})',
            "confidence": 0.95, "minImpressions": 10000, "power": 0.8, "minDetectableEffect": 0.12,
            "maxDuration": "10m", "split": 50,
        }},
    })  # fmt: skip
    exporter = stack.exporter
    batch = 6000

    def simulate_and_wait_for_scrape(state: RolloutState) -> None:
        if not state.active or state.weight == 0:
            return
        exporter.simulate(batch)
        want = exporter.totals["canary"]
        q = 'sum(recserve_impressions_total{variant="canary"})'
        wait_until(lambda: stack.prometheus.provider.query_scalar(q) == want, 10, "prometheus to scrape the exporter")

    state = fresh_state(stack)
    with LoadGenerator(stack.nginx.url, rps=40):
        run = drive(stack, policy, state, stack.candidate.revision,
                    before_look=simulate_and_wait_for_scrape,
                    until=lambda d: d.action in (Action.PROMOTE, Action.ROLL_BACK), timeout_s=240)  # fmt: skip
    assert run.final.action is Action.PROMOTE, run.final.reason
    print("A/B:", run.final.reason, f"after {len(run.decisions)} looks")
    ab = run.final.state.ab
    assert ab is not None and ab.winner == "canary"
    assert ab.lift is not None and ab.lift > 0
    assert ab.sequential_p_value is not None and ab.sequential_p_value <= 0.05
    assert min(v.impressions for v in ab.variants) >= 10000


def test_split_stickiness_and_forced_variant_over_10000_requests(stack: Stack) -> None:
    stack.candidate.set_fail_share(0.0)
    weight = 30
    state = RolloutState(phase=Phase.PROGRESSING, stable_revision=stack.stable.revision,
                         revision=stack.candidate.revision, weight=weight)  # fmt: skip
    policy = canary_policy(stack)
    stack.route(build_traffic_plan("model", state, TrafficWeights(100 - weight, weight, True), policy.routing,
                                   lambda _m, rev: rev))  # fmt: skip
    users = [f"user-{i}" for i in range(2500)]
    jobs = [(u, i) for i in range(4) for u in users]  # 10,000 requests, 4 per user

    local = threading.local()

    def one(job: tuple[str, int]) -> tuple[str, str, bool, bool]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        session = local.session
        variant, ok, agrees = infer(session, stack.nginx.url, int(job[0].split("-")[1]), {"x-user-id": job[0]})
        return job[0], variant, ok, agrees

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, jobs))
    assert all(ok for _, _, ok, _ in results)
    assert all(agrees for _, _, _, agrees in results)
    by_user: dict[str, set[str]] = {}
    for user, variant, _, _ in results:
        by_user.setdefault(user, set()).add(variant)
    assert all(len(v) == 1 for v in by_user.values()), "a user was served by both variants"
    share = Counter(v for _, v, _, _ in results)["canary"] / len(results)
    assert abs(share - weight / 100) <= 0.02, share
    # nginx's choice is exactly the one predicted by the Python replica of its hash.
    salt = stack.candidate.revision
    assert all(next(iter(v)) == assign_variant(u, weight, salt) for u, v in by_user.items())

    # Requests without the sticky header still split by weight.
    session = requests.Session()
    anon = Counter(infer(session, stack.nginx.url, i, {})[0] for i in range(2000))
    assert abs(anon["canary"] / 2000 - weight / 100) <= 0.04, anon

    # The forced-variant header overrides the user's assignment both ways.
    stable_user = next(u for u in users if assign_variant(u, weight, salt) == "stable")
    canary_user = next(u for u in users if assign_variant(u, weight, salt) == "canary")
    forced_c = infer(session, stack.nginx.url, 1, {"x-user-id": stable_user, "x-recserve-variant": "canary"})
    forced_s = infer(session, stack.nginx.url, 1, {"x-user-id": canary_user, "x-recserve-variant": "stable"})
    assert forced_c == ("canary", True, True)
    assert forced_s == ("stable", True, True)
