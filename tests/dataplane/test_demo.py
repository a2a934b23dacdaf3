"""The README's main job end to end: `python -m recserve_cluster.demo up` on its own cluster promotes a canary.

The operator process decides every step from real Prometheus metrics of two real Triton servers serving the
trained CTR model, behind Debian's nginx following the operator's router ConfigMap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.dataplane]

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_serves_and_promotes_a_canary_decided_by_the_operator_and_can_run_again(tmp_path: Path) -> None:
    env = {**os.environ, "RECSERVE_CLUSTER_NAME": "demo-test", "RECSERVE_DEMO_DIR": str(tmp_path)}
    try:
        runs = [subprocess.run([sys.executable, "-m", "recserve_cluster.demo", "up"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=900) for _ in range(2)]  # fmt: skip
    finally:
        subprocess.run([sys.executable, "-m", "recserve_cluster.demo", "down"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    first, again = runs
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]  # re-runnable on the same cluster
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert "Canary Promoted" in log
    assert "top-5 of 200 candidates" in log
    operator_log = (tmp_path / "operator.log").read_text()
    assert "Traceback" not in operator_log, operator_log[-4000:]
    # The rollout was decided by analysis of real metrics, and canary traffic really flowed.
    assert "analysis=advance" in log or "analysis=promote" in log
    assert "'canary':" in log
    assert "errors: 0" in log
