"""The README's main job end to end: `python -m recserve_cluster.demo up` promotes a canary, on real pods.

The chart's operator pod decides every step from the in-cluster Prometheus, which scrapes the Triton pods the
operator's ServiceMonitor selects; shoppers in a pod send their requests through the builtin router's nginx pods
and export the click counters the dashboard's click-through panel reads. The demo
runs on the session's cluster (the one with the real node) and is removed again with `demo.clean`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recserve_cluster.cluster import Cluster
from tests.integration.realpods import dashboard_queries, prometheus_query

pytestmark = [pytest.mark.integration, pytest.mark.dataplane, pytest.mark.realnode]

ROOT = Path(__file__).resolve().parents[2]


def _demo(cluster: Cluster, env: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    """One `demo up`, its output in `log`: a run past its deadline fails with what it printed and the pods' state
    (a run's own waits allow up to ~25 min; a healthy one takes 3-4)."""
    with log.open("w") as out:
        try:
            done = subprocess.run([sys.executable, "-m", "recserve_cluster.demo", "up"], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, text=True, timeout=900)  # fmt: skip
        except subprocess.TimeoutExpired:
            pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
            raise AssertionError(f"demo up ran past 900 s:\n{log.read_text()[-6000:]}\n{pods}") from None
    return subprocess.CompletedProcess(done.args, done.returncode, log.read_text(), "")


@pytest.mark.timeout(2400)  # two runs of up to 900 s each, plus the dashboard queries and the clean-up
def test_demo_trains_serves_and_promotes_a_canary_decided_by_the_operator_and_can_run_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    from recserve_cluster import demo
    from recserve_cluster.cluster import real_node_enabled

    if cluster.provider == "kwok" and not real_node_enabled():
        pytest.skip("RECSERVE_REAL_NODE=0: the kwok-only cluster runs no containers")
    env = {**os.environ, "RECSERVE_DEMO_DIR": str(tmp_path), "KUBECONFIG": str(cluster.kubeconfig)}
    try:
        runs = [_demo(cluster, env, tmp_path / f"demo-{i}.log") for i in range(2)]
        operator_log = cluster.kubectl("logs", "-n", demo.SYSTEM_NS, f"deploy/{demo.RELEASE}", "--tail=-1",
                                       check=False).stdout
        # Every panel of the chart's Grafana dashboard shows the demo's data from the in-cluster Prometheus.
        panels = {(title, query): prometheus_query(cluster, query)
                  for title, query in dashboard_queries(demo.NAMESPACE, demo.MODEL)}
    finally:
        demo.clean(cluster)
    first, again = runs
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]  # re-runnable on the same cluster
    assert "Canary Promoted" in log
    assert "top-5 of 200 candidates" in log
    # Built once by the revision's Job (the chart's default), fetched by the serving pods.
    assert "model-repo-builder converted the model once" in log and "fetched the artifact and checked" in log
    assert "Traceback" not in operator_log, operator_log[-4000:]
    # The rollout was decided by analysis of real metrics, and canary traffic really flowed without an error,
    # also while the router switched plans and the old revision drained.
    assert "analysis=advance" in log or "analysis=promote" in log
    assert "'canary':" in log
    assert "errors: 0" in log
    # Panels the local node cannot fill: nv_gpu_* needs a GPU (the CPU Triton exports none). The click-through
    # panel reads the shoppers' counters (recserve_cluster.shoppers) through their ServiceMonitor.
    # The shadow comparison row needs a shadow phase, which the demo's canary has not: its panels are filled and
    # checked by tests/integration/test_shadow_realpods.py.
    needs_gpu = {title for title, _ in panels if "GPU" in title}
    needs_shadow = {title for title, query in panels if "recserve_shadow_" in query}
    skipped = needs_gpu | needs_shadow
    empty = [title for (title, query), result in panels.items() if not result and title not in skipped]
    assert not empty, f"dashboard panels without data: {empty}"
    assert len(needs_gpu) == 2, needs_gpu  # a new panel must show data or be listed here with its reason
    assert len(needs_shadow) == 3, needs_shadow
    ctr = [r for (title, _), result in panels.items() if "Click-through" in title for r in result]
    stable = [float(r["value"][1]) for r in ctr if r["metric"].get("variant") == "stable"]
    assert stable and 0 < stable[0] < 1, ctr
