"""The shadow analysis end to end on local processes: users through Debian's nginx with the generated mirror
config, the comparator, a real Prometheus scraping it, and the operator's own queries and verdict.

The fake KServe v2 backends of tests/unit/shadow stand in for Triton: the stable answers a fixed top 10; the
candidate the same (passes) or a shuffled ranking with equal scores, no errors and the same speed (fails on the
top-10 overlap alone).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from recserve_operator.metrics.base import collect_shadow
from recserve_operator.rollout.analysis import Verdict, evaluate_shadow
from recserve_operator.rollout.policy import ShadowPolicy

from model_repo_builder.triton_local import free_ports
from recserve_cluster.dataplane import PROMETHEUS, Prometheus, prometheus_config, wait_until
from tests.unit.shadow.test_comparator import TOP, Backend, config, needs_nginx, nginx, servers, users

POLICY = ShadowPolicy(percent=100, min_requests=100, min_top_k_overlap=0.9, min_rank_correlation=0.5,
                      max_p99_latency_ms=1000, max_error_rate=0.01)  # fmt: skip
N = 150


@needs_nginx
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason=f"{PROMETHEUS} is absent (apt-get install prometheus)")
@pytest.mark.parametrize(("candidate", "verdict"), [("same", Verdict.PASS), ("shuffled", Verdict.FAIL)])
def test_the_operators_queries_judge_the_comparators_series_in_prometheus(
    candidate: str, verdict: Verdict, tmp_path: Path
) -> None:
    with servers(Backend("same"), Backend(candidate), config()) as s:
        assert s.config is not None
        (port,) = free_ports(1)
        target = f"127.0.0.1:{s.config.metrics_port}"
        prom = Prometheus(tmp_path / "prometheus", port, prometheus_config({"shadow": (target, {"namespace": "shop"})}))
        try:
            prom.wait_targets_up(["shadow"])
            (tmp_path / "nginx").mkdir()
            with nginx(tmp_path / "nginx", s, 100, s.config.intake_port) as url:
                got = users(url, N)
            assert got == [(200, "same", TOP)] * N  # users only ever get the stable's answer

            def measured() -> object:
                # One instant for every query, as the operator's looks: without it a scrape between two queries
                # gave "compared" the new samples and "mirrored" not yet (error rate None: flaky under load).
                m = collect_shadow(prom.provider.at(time.time()), model="shop", stable="r1", candidate="r2",
                                   window_s=120, namespace="shop")  # fmt: skip
                counted = min(m.compared or 0, m.mirrored or 0)
                return m if counted >= N - 0.5 and m.p99_ms is not None else None

            m = wait_until(measured, 30, "Prometheus to hold every comparison")
            result = evaluate_shadow(POLICY, m)  # type: ignore[arg-type]
        finally:
            prom.stop()
    assert result.verdict is verdict, result.reason
    assert result.measured["errorRate"] == 0.0 and result.measured["dropped"] == 0.0
    if candidate == "same":
        assert result.measured["topKOverlap"] == pytest.approx(1.0)
        assert result.measured["rankCorrelation"] == pytest.approx(1.0)
        assert result.measured["maxAbsScoreDiff"] == 0.0
    else:
        assert [c.name for c in result.failed_checks] == ["topKOverlap", "rankCorrelation"]
        assert result.measured["topKOverlap"] < 0.2  # type: ignore[operator]
