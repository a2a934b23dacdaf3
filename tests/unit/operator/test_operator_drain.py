"""A revision the traffic decision dropped is deleted only once the router no longer routes to it."""

from __future__ import annotations

from typing import Any

import pytest
from recserve_operator.lifecycle import router_serves
from recserve_operator.names import ROUTER_CONFIG_HASH_ANNOTATION


def _router(hash_: str, *, generation: int = 2, observed: int = 2, replicas: int = 2, updated: int = 2,
            total: int = 2, available: int = 2) -> dict[str, Any]:  # fmt: skip
    return {
        "kind": "Deployment",
        "metadata": {"name": "ctr-router", "generation": generation},
        "spec": {"replicas": replicas,
                 "template": {"metadata": {"annotations": {ROUTER_CONFIG_HASH_ANNOTATION: hash_}}}},
        "status": {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated,
                   "availableReplicas": available},
    }


def _pod(terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ctr-router-abc"}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-01T22:00:00Z"
    return {"metadata": meta}


DESIRED = _router("new")


@pytest.mark.parametrize(
    ("case", "live", "pods", "serves"),
    [
        ("the rollout finished and every pod runs the new plan", _router("new"), [_pod(), _pod()], True),
        ("the live router still runs the old plan", _router("old"), [_pod(), _pod()], False),
        ("the controller has not seen the new template yet", _router("new", observed=1), [_pod()], False),
        ("an old pod is still counted", _router("new", updated=1, total=3), [_pod(), _pod(), _pod()], False),
        ("a new pod is not available yet", _router("new", available=1), [_pod(), _pod()], False),
        ("an old pod is draining its connections", _router("new"), [_pod(), _pod(), _pod(terminating=True)], False),
        ("the router Deployment does not exist yet", None, [], False),
    ],
)
def test_the_router_serves_the_new_plan_only_when_no_old_pod_is_left(
    case: str, live: dict[str, Any] | None, pods: list[dict[str, Any]], serves: bool
) -> None:
    assert router_serves(DESIRED, live, pods) is serves, case


def test_without_a_builtin_router_nothing_waits() -> None:
    assert router_serves(None, None, [])


def test_a_promotion_keeps_the_old_revision_until_the_router_pods_have_rolled() -> None:
    """Through reconcile(): the plan moves all traffic to the candidate; the old revision stays until the
    router Deployment reports the new plan on every pod, and goes in the reconcile after that."""
    from datetime import UTC, datetime, timedelta

    from operator_samples import minimal_spec, model_body
    from recserve_operator.names import REVISION_LABEL
    from recserve_operator.reconcile import Reconciler
    from recserve_operator.settings import OperatorDefaults
    from test_operator_reconcile import FakeKube, FakeLive, HealthyCanary

    kube = FakeKube()
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    rec._providers["http://prometheus.monitoring:9090"] = HealthyCanary()
    rollout = {"strategy": "canary", "steps": [{"weight": 25, "pause": "1m"}],
               "analysis": {"interval": "1m", "maxErrorRate": 0.01, "minRequests": 100}}
    t0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

    def run(body: dict[str, Any], minutes: float) -> None:
        rec.reconcile(body, lambda *e: None, now=t0 + timedelta(minutes=minutes))

    run(model_body(minimal_spec(rollout=rollout)), 0)
    old = kube.status["stable"]["revision"]
    kube.make_available(old)
    changed = minimal_spec(rollout=rollout, model={"uri": "pvc://models/ctr-dnn/4", "format": "keras", "version": 4})
    run(model_body(changed, generation=2), 0.2)
    new = kube.status["latestRevision"]
    kube.make_available(new)
    run(model_body(changed, generation=2), 0.4)
    kube.roll_router()
    run(model_body(changed, generation=2), 3)
    assert kube.status["stable"]["revision"] == new != old
    assert kube.objects[("Service", "shop", "ctr-dnn")]["spec"]["selector"][REVISION_LABEL] == new
    # Promoted, but the router pods still run the plan that names the old revision: it keeps serving.
    assert ("Deployment", "shop", f"ctr-dnn-{old}") in kube.objects
    run(model_body(changed, generation=2), 3.2)
    assert ("Deployment", "shop", f"ctr-dnn-{old}") in kube.objects
    kube.roll_router()
    run(model_body(changed, generation=2), 3.4)
    assert not [k for k in kube.objects if k[2].endswith(old)]
