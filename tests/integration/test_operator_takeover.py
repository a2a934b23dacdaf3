"""Two operator replicas with leader election on the real API server: the standby writes nothing while the leader
lives, takes over after the leader's kill -9, and no object is written by both while both run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import OperatorProcess, apply_yaml, get_json, kwok_model, wait_ready

pytestmark = pytest.mark.integration

# Short lease timings keep the test quick; the decision logic is the same as with the defaults (15/10/2 s).
TIMING = {"RECSERVE_LEASE_DURATION_SECONDS": "6", "RECSERVE_RENEW_DEADLINE_SECONDS": "4",
          "RECSERVE_RETRY_PERIOD_SECONDS": "1"}  # fmt: skip
LEASE = "recserve-operator"


def _replica(cluster: Cluster, namespace: str, tmp_path: Path, identity: str) -> OperatorProcess:
    env = {"RECSERVE_LEADER_ELECTION": "true", "RECSERVE_LEASE_NAMESPACE": namespace, "RECSERVE_IDENTITY": identity,
           "RECSERVE_WRITE_LOG": str(tmp_path / f"{identity}.writes.jsonl"), **TIMING}  # fmt: skip
    return OperatorProcess(cluster, namespace, tmp_path / f"{identity}.log", extra_env=env)


def _holder(cluster: Cluster, namespace: str) -> str | None:
    lease = get_json(cluster, "lease", LEASE, "-n", namespace)
    return (lease or {}).get("spec", {}).get("holderIdentity") or None


def _writes(tmp_path: Path, identity: str) -> list[dict[str, Any]]:
    path = tmp_path / f"{identity}.writes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reconciler_writes(op: OperatorProcess) -> float:
    metrics = op.metrics() or {}
    verbs = ('verb="apply"', 'verb="patch-status"', 'verb="patch"', 'verb="delete"', 'verb="event"')
    return sum(
        v for k, v in metrics.items() if k.startswith("recserve_api_requests_total") and any(x in k for x in verbs)
    )


def test_the_standby_takes_over_after_the_leader_is_killed_and_nothing_is_written_twice(
    crd: Cluster, namespace: str, tmp_path: Path
) -> None:
    a = _replica(crd, namespace, tmp_path, "replica-a")
    b = _replica(crd, namespace, tmp_path, "replica-b")
    a.start()
    try:
        wait_for(lambda: _holder(crd, namespace) == "replica-a", 30, message="replica-a never took the lease")
        b.start()
        apply_yaml(crd, namespace, kwok_model("ha", 1))
        wait_ready(crd, namespace, "ha")
        assert (b.metrics() or {}).get("recserve_leader") == 0.0 and (a.metrics() or {}).get("recserve_leader") == 1
        assert _reconciler_writes(b) == 0, "the standby wrote while the leader lived"
        assert _writes(tmp_path, "replica-b") == []
        assert _holder(crd, namespace) == "replica-a"

        a.kill()
        killed_at = time.time()
        crd.kubectl("patch", "rm", "ha", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"serving": {"replicas": 2}}}))  # fmt: skip
        wait_for(lambda: _holder(crd, namespace) == "replica-b", 60, message="replica-b never took the lease")
        rev = (get_json(crd, "rm", "ha", "-n", namespace) or {})["status"]["stable"]["revision"]
        wait_for(lambda: (get_json(crd, "deployment", f"ha-{rev}", "-n", namespace) or {}).get("spec", {})
                 .get("replicas") == 2, 60, message="the new leader did not apply the change")  # fmt: skip
        assert (b.metrics() or {}).get("recserve_leader") == 1.0
    finally:
        a.stop()
        b.stop()
    by_a, by_b = _writes(tmp_path, "replica-a"), _writes(tmp_path, "replica-b")
    assert by_a and by_b, "each replica wrote while it led"
    assert max(w["t"] for w in by_a) < killed_at < min(w["t"] for w in by_b), "the replicas' writes overlapped"
    for op in (a, b):
        assert "Traceback" not in op.log(), op.log()[-5000:]
