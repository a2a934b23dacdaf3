"""A canary whose Prometheus is unreachable, driven by the operator process: it holds its step, says so in
MetricsAvailable, logs the outage once, keeps correcting drift, and progressDeadline rolls it back."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

from recserve_cluster.cluster import Cluster
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    OperatorProcess,
    apply_yaml,
    condition,
    free_port,
    get_json,
    kwok_model,
    model,
    owned,
    wait_ready,
)

pytestmark = pytest.mark.integration

NAME = "mout"
REVISION = "recserve.dev/revision"
DEADLINE_S = 45


def _model(version: int, prometheus: str) -> dict[str, Any]:
    return kwok_model(NAME, version, rollout={
        "strategy": "canary",
        "steps": [{"weight": 20, "pause": "2s"}, {"weight": 50, "pause": "10m"}],
        # Nothing listens there: every look is "connection refused", the shape of a Prometheus outage.
        "analysis": {"interval": "5s", "prometheus": prometheus, "maxErrorRate": 0.01, "minRequests": 1},
        "progressDeadline": f"{DEADLINE_S}s",
    })  # fmt: skip


def _canary(cluster: Cluster, ns: str) -> dict[str, Any]:
    return dict(((model(cluster, ns, NAME) or {}).get("status") or {}).get("canary") or {})


def _weights(cluster: Cluster, ns: str) -> dict[str, int]:
    """revision -> weight in the builtin router's plan."""
    cm = get_json(cluster, "configmap", f"{NAME}-router", "-n", ns) or {}
    plan = json.loads((cm.get("data") or {}).get("plan.json") or "{}")
    return {b["revision"]: int(b["weight"]) for b in plan.get("backends", [])}


def _uid(cluster: Cluster, ns: str, kind: str, name: str) -> str | None:
    obj = get_json(cluster, kind, name, "-n", ns)
    return str(obj["metadata"]["uid"]) if obj else None


def _recreated(cluster: Cluster, ns: str, name: str, old_uid: str | None) -> bool:
    """The Service is there again, as a new object."""
    return _uid(cluster, ns, "service", name) not in (None, old_uid)


def _reconciles(op: OperatorProcess) -> float:
    return (op.metrics() or {}).get("recserve_reconciles_total", 0.0)


def _after_reconciles(op: OperatorProcess, n: int, check: Any = None) -> None:
    """Wait until the operator has run `n` more reconciles (resyncs included); `check()` runs at every poll."""
    target = _reconciles(op) + n

    def done() -> bool:
        if check is not None:
            check()
        return _reconciles(op) >= target

    wait_for(done, 30, message=f"operator did not reconcile {n} more times")


def _revisions(cluster: Cluster, ns: str) -> set[str]:
    labels = [o["metadata"].get("labels") or {} for o in owned(cluster, ns, NAME, "deployments,services")]
    return {lab[REVISION] for lab in labels if REVISION in lab}


def _outage_lines(op: OperatorProcess) -> list[str]:
    return [line for line in op.log().splitlines() if "Metrics unavailable" in line and f"name={NAME}" in line]


def test_an_unreachable_prometheus_holds_the_canary_then_the_progress_deadline_rolls_it_back(
    operator: OperatorProcess, namespace: str
) -> None:
    cluster = operator.cluster
    prometheus = f"http://127.0.0.1:{free_port()}"
    apply_yaml(cluster, namespace, _model(1, prometheus))
    stable = wait_ready(cluster, namespace, NAME)["status"]["stable"]["revision"]
    stable_uid = _uid(cluster, namespace, "deployment", f"{NAME}-{stable}")

    apply_yaml(cluster, namespace, _model(2, prometheus))
    at_step = wait_for(lambda: (c := _canary(cluster, namespace)).get("weight") == 20 and c, 60,
                       message="the canary never reached its first step")  # fmt: skip
    cand = at_step["revision"]
    cond = wait_for(
        lambda: (x := condition(model(cluster, namespace, NAME), "MetricsAvailable")) and x["status"] == "False" and x,
        30,
        message="MetricsAvailable=False did not appear",
    )
    assert cond["reason"] == "MetricsUnavailable" and prometheus in cond["message"], cond
    assert "Connection refused" in cond["message"], cond

    # The outage holds the step (the 2 s pause is long over) and the router keeps the split.
    def held() -> None:
        c = _canary(cluster, namespace)
        assert (c["phase"], c["step"], c["weight"], c["revision"]) == ("Progressing", 0, 20, cand), c
        assert _weights(cluster, namespace) == {stable: 80, cand: 20}

    _after_reconciles(operator, 4, check=held)

    # Drift is still corrected while metrics are down: deleted children come back.
    services = {f"{NAME}-{cand}": _uid(cluster, namespace, "service", f"{NAME}-{cand}"),
                NAME: _uid(cluster, namespace, "service", NAME)}  # fmt: skip
    cluster.kubectl("delete", "service", *services, "-n", namespace, "--wait=true")
    for svc, old_uid in services.items():
        wait_for(functools.partial(_recreated, cluster, namespace, svc, old_uid), 30,
                 message=f"service {svc} was not recreated")  # fmt: skip
    held()

    log = operator.log()
    assert "Traceback" not in log, log[-5000:]
    assert 1 <= len(_outage_lines(operator)) <= 2, _outage_lines(operator)

    # progressDeadline: no conclusive look since the step started, so the candidate is rolled back.
    ended = wait_for(lambda: (c := _canary(cluster, namespace)).get("phase") == "RolledBack" and c, DEADLINE_S + 60,
                     message="progressDeadline did not roll the canary back")  # fmt: skip
    assert ended["reason"] == "ProgressDeadlineExceeded" and ended["revision"] == cand, ended
    obj = model(cluster, namespace, NAME)
    progressing, degraded, ready = (condition(obj, t) for t in ("Progressing", "Degraded", "Ready"))
    assert progressing and (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert degraded and (degraded["status"], degraded["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert "metrics unavailable" in progressing["message"], progressing
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "reason=ProgressDeadlineExceeded").stdout  # fmt: skip
    assert cand in events, events

    # The stable revision kept serving throughout: same Deployment, Ready, all traffic, the candidate gone.
    assert ready and ready["status"] == "True", ready
    assert obj is not None and obj["status"]["stable"]["revision"] == stable
    assert _uid(cluster, namespace, "deployment", f"{NAME}-{stable}") == stable_uid
    wait_for(lambda: _weights(cluster, namespace) == {stable: 100}, 30, message="the router kept the candidate")
    wait_for(lambda: _revisions(cluster, namespace) == {stable}, 60,
             message="the rolled-back candidate's objects were not removed")  # fmt: skip

    # Steady state: nothing more is written, and the outage was still reported once.
    before = (model(cluster, namespace, NAME) or {})["metadata"]["resourceVersion"]
    _after_reconciles(operator, 3)
    assert (model(cluster, namespace, NAME) or {})["metadata"]["resourceVersion"] == before
    assert 1 <= len(_outage_lines(operator)) <= 2, _outage_lines(operator)
    assert "Traceback" not in operator.log()
