"""A revision's disruption budget and autoscaler follow the spec in place (neither scale nor autoscaling is part of
the revision): created when asked for, deleted when no longer, and never an orphan fighting the operator."""

from __future__ import annotations

from typing import Any

from operator_samples import minimal_spec, model_body
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from test_operator_reconcile import FakeKube, FakeLive

SERVING = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G"}


def _env() -> tuple[Reconciler, FakeKube]:
    kube = FakeKube()
    return Reconciler(kube, OperatorDefaults(), FakeLive(kube)), kube  # type: ignore[arg-type]


def _run(rec: Reconciler, kube: FakeKube, serving: dict[str, Any], generation: int) -> dict[str, int]:
    body = model_body(minimal_spec(serving={**SERVING, **serving}), generation=generation, status=kube.status)
    return rec.reconcile(body, lambda t, r, m: kube.events.append((t, r, m)))


def _of(kube: FakeKube, kind: str) -> list[str]:
    return sorted(name for k, _, name in kube.objects if k == kind)


def _deployment(kube: FakeKube) -> dict[str, Any]:
    (dep,) = [o for (k, _, _), o in kube.objects.items() if k == "Deployment"]
    return dep


def test_the_disruption_budget_exists_only_while_the_revision_can_run_several_pods() -> None:
    rec, kube = _env()
    _run(rec, kube, {"replicas": 1}, 1)
    revision = kube.status["latestRevision"]
    assert _of(kube, "PodDisruptionBudget") == []  # maxUnavailable 1 of 1 pod would allow every eviction
    kube.make_available(revision)
    _run(rec, kube, {"replicas": 3}, 2)
    assert kube.status["latestRevision"] == revision  # scaled in place, no new revision
    assert _of(kube, "PodDisruptionBudget") == [f"ctr-dnn-{revision}"]
    counts = _run(rec, kube, {"replicas": 1}, 3)
    assert _of(kube, "PodDisruptionBudget") == [] and counts["deleted"] == 1
    assert _run(rec, kube, {"replicas": 1}, 3) == {"applied": 0, "deleted": 0, "status": 0}


def test_autoscaling_up_to_one_pod_has_no_budget_but_up_to_several_has() -> None:
    rec, kube = _env()
    _run(rec, kube, {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 1, "targetCPUUtilization": 70}}, 1)
    assert _of(kube, "PodDisruptionBudget") == [] and len(_of(kube, "HorizontalPodAutoscaler")) == 1
    _run(rec, kube, {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetCPUUtilization": 70}}, 2)
    assert len(_of(kube, "PodDisruptionBudget")) == 1


def test_removing_autoscaling_deletes_the_autoscaler_and_the_operator_sets_the_replicas_again() -> None:
    """Defect: the autoscaler stayed after `autoscaling` was removed and kept scaling the Deployment."""
    rec, kube = _env()
    _run(rec, kube, {"replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilization": 70}}, 1)
    revision = kube.status["latestRevision"]
    assert _of(kube, "HorizontalPodAutoscaler") == [f"ctr-dnn-{revision}"]
    assert "replicas" not in _deployment(kube)["spec"]  # the autoscaler owns the scale
    kube.make_available(revision)
    counts = _run(rec, kube, {"replicas": 3}, 2)
    assert kube.status["latestRevision"] == revision
    assert _of(kube, "HorizontalPodAutoscaler") == [] and counts["deleted"] == 1
    assert _deployment(kube)["spec"]["replicas"] == 3
    assert _of(kube, "PodDisruptionBudget") == [f"ctr-dnn-{revision}"]
