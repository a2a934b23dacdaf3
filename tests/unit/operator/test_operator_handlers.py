"""Kopf registrations: what the operator watches, that Kopf itself writes nothing, and which events trigger."""

from __future__ import annotations

from typing import Any

import kopf
import pytest
from recserve_operator import handlers
from recserve_operator.names import MANAGED_BY_LABEL, MANAGER, MODEL_LABEL, REVISION_LABEL


def _registry() -> kopf.OperatorRegistry:
    return kopf.get_default_registry()


def test_no_change_handler_so_kopf_writes_no_progress_diffbase_or_finalizer() -> None:
    registry = _registry()
    # Kopf's create/update/resume handlers would patch status.kopf and a diff-base annotation on every change,
    # and need a finalizer for deletion handlers: the model's changes go through the work queue instead.
    assert list(registry._changing.get_all_handlers()) == []
    assert list(registry._spawning.get_all_handlers()) == []  # no Kopf timers/daemons (they add finalizers)
    assert not any(getattr(h, "requires_finalizer", None) for h in registry._watching.get_all_handlers())


def test_the_watch_caches_cover_every_kind_the_reconciler_reads() -> None:
    ids = {h.id for h in _registry()._indexing.get_all_handlers()}
    assert set(handlers.IndexedLive.INDEX_BY_KIND.values()) | {"recserve_models"} <= ids


def test_owned_kinds_are_watched_by_label_only() -> None:
    for handler in _registry()._indexing.get_all_handlers():
        if handler.id != "recserve_models":
            assert handler.labels == handlers.OWNED


def _pod(phase: str | None = None, *, ready: bool = False, scheduled: bool = False, rv: str = "1") -> dict[str, Any]:
    conditions = []
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": rv})
    if ready:
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": rv})
    labels = {MANAGED_BY_LABEL: MANAGER, MODEL_LABEL: "m", REVISION_LABEL: "r1",
              "app.kubernetes.io/component": "predictor", "app.kubernetes.io/instance": "m"}  # fmt: skip
    return {"metadata": {"name": "m-r1-x", "uid": "pod-1", "labels": labels, "resourceVersion": rv},
            "status": {"phase": phase, "conditions": conditions}}  # fmt: skip


def _deployment(*, replicas: int = 1, ready: int = 0, rv: str = "1", updated: str = "t1") -> dict[str, Any]:
    return {
        "metadata": {"name": "m-r1", "namespace": "ns", "uid": "dep-1", "resourceVersion": rv, "generation": 1,
                     "labels": {MANAGED_BY_LABEL: MANAGER, MODEL_LABEL: "m"}},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": 1, "readyReplicas": ready,
                   "conditions": [{"type": "Available", "status": "False", "lastUpdateTime": updated}]},
    }  # fmt: skip


def test_a_serving_pods_trigger_is_what_the_reconciler_reads_of_it() -> None:
    pending = handlers._trigger_digest("Pod", _pod("Pending"))
    assert handlers._trigger_digest("Pod", _pod("Pending", scheduled=True, rv="2")) == pending
    assert handlers._trigger_digest("Pod", _pod("Running", ready=True, scheduled=True, rv="3")) != pending


def test_a_deployments_trigger_ignores_its_condition_timestamps_but_not_replicas_or_spec() -> None:
    base = handlers._trigger_digest("Deployment", _deployment())
    assert handlers._trigger_digest("Deployment", _deployment(rv="2", updated="t2")) == base
    assert handlers._trigger_digest("Deployment", _deployment(ready=1)) != base
    assert handlers._trigger_digest("Deployment", _deployment(replicas=3)) != base  # drift: kubectl scale


def test_the_models_own_status_write_is_not_a_trigger_but_a_spec_or_an_annotation_is() -> None:
    body = {"metadata": {"uid": "u", "generation": 1, "annotations": {}}, "status": {}}
    base = handlers._model_signature(body)
    assert handlers._model_signature({**body, "status": {"phase": "Ready"}}) == base
    assert handlers._model_signature({**body, "metadata": {**body["metadata"], "generation": 2}}) != base
    action = {**body["metadata"], "annotations": {"recserve.dev/rollout-action": "abort"}}
    assert handlers._model_signature({**body, "metadata": action}) != base


def test_cached_values_are_compact_and_drop_what_no_reconcile_reads() -> None:
    body = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": "ns", "resourceVersion": "5", "managedFields": [{"manager": "x"}],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "1"}},
        "data": {"a": "b"},
    }  # fmt: skip
    frozen = handlers.Frozen(handlers._plain(body, ("data",)))
    thawed = frozen.thaw()
    assert "managedFields" not in thawed["metadata"]
    assert thawed["metadata"]["annotations"] == {"keep": "1"}
    assert thawed["data"] == {"a": "b"} and thawed["metadata"]["resourceVersion"] == "5"
    assert body["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"], "body untouched"
    assert frozen == handlers.Frozen(handlers._plain(body, ("data",)))


@pytest.mark.parametrize(("strategy", "counts", "expected"), [
    ("immediate", {"applied": 0, "deleted": 0, "status": 0}, 300.0),
    ("immediate", {"applied": 1, "deleted": 0, "status": 0}, 10.0),
    ("canary", {"applied": 0, "deleted": 0, "status": 0}, 10.0),
])  # fmt: skip
def test_a_model_at_rest_resyncs_slowly_one_acting_on_time_at_the_resync_period(
    strategy: str, counts: dict[str, int], expected: float
) -> None:
    from recserve_operator.settings import OperatorDefaults, Runtime

    ctl = handlers.Controller.__new__(handlers.Controller)
    ctl.defaults, ctl.runtime = OperatorDefaults(resync_seconds=10), Runtime(idle_resync_seconds=300)
    model = {"spec": {"rollout": {"strategy": strategy}}}
    assert ctl._resync_after(model, counts) == expected


def test_a_trigger_is_queued_only_once_the_cache_holds_the_new_state() -> None:
    """Kopf stores an index value after the index handler returns: queueing from there let a worker reconcile the
    old state (and miss the change until a resync). The object's event handler, which runs after, queues it."""
    from recserve_operator.workqueue import WorkQueue

    ctl = handlers.Controller.__new__(handlers.Controller)
    ctl.queue, ctl.seen, ctl.signatures, ctl.pending = WorkQueue(), {}, {}, {}
    ctl.reconciler = type("R", (), {"is_own_write": staticmethod(lambda *a: False)})()  # type: ignore[assignment]
    dep = _deployment(ready=1)
    ctl.owned_seen("Deployment", dep, dep, ("ns", "m"))
    assert len(ctl.queue) == 0 and ctl.pending
    ctl.flush(dep)
    assert len(ctl.queue) == 1 and not ctl.pending
    ctl.owned_seen("Deployment", dep, dep, ("ns", "m"))  # the same state again: nothing to do
    assert not ctl.pending
