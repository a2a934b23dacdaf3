"""One ServiceMonitor per namespace for every model's revisions: created once, never per model, the per-model ones
of earlier versions removed, and deleted with the namespace's last model."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_samples import minimal_spec, model_body
from recserve_operator import handlers
from recserve_operator.builders.common import Ids
from recserve_operator.builders.servicemonitor import build_servicemonitor, build_shadow_servicemonitor
from recserve_operator.names import REVISIONS_SERVICEMONITOR
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from recserve_operator.workqueue import WorkQueue
from test_operator_reconcile import FakeKube, FakeLive

# A ServiceMonitor an operator before this change made for model `old` (its builder's output then).
PER_MODEL = {
    "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
    "metadata": {"name": "old", "namespace": "shop", "uid": "uid-old",
                 "labels": {"app.kubernetes.io/name": "recserve-triton", "app.kubernetes.io/instance": "old",
                            "app.kubernetes.io/component": "predictor", "app.kubernetes.io/managed-by": "recserve"}},
    "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": "old"}},
             "endpoints": [{"port": "metrics", "interval": "15s"}]},
}  # fmt: skip


class MonitoredKube(FakeKube):
    """The API with Prometheus Operator's CRDs installed."""

    def exists(self, path: str) -> bool:
        self.requests["discovery"] += 1
        return True

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.requests[f"apply {obj['kind']}"] += 1
        return super().apply(obj)

    def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests[f"get {resource.kind}"] += 1
        return super().get(resource, namespace, name)


@pytest.fixture
def env() -> tuple[Reconciler, MonitoredKube]:
    kube = MonitoredKube()
    return Reconciler(kube, OperatorDefaults(), FakeLive(kube)), kube  # type: ignore[arg-type]


def _run(rec: Reconciler, kube: FakeKube, name: str, namespace: str = "shop") -> dict[str, int]:
    body = model_body(minimal_spec(), name=name, namespace=namespace)
    body["metadata"]["uid"] = f"uid-{namespace}-{name}"
    return rec.reconcile(body, lambda t, r, m: kube.events.append((t, r, m)))


def _monitors(kube: FakeKube) -> list[tuple[str, str]]:
    return sorted((ns, name) for kind, ns, name in kube.objects if kind == "ServiceMonitor")


def test_models_of_a_namespace_share_one_servicemonitor_written_once(env: Any) -> None:
    rec, kube = env
    for i in range(5):
        _run(rec, kube, f"m{i}")
    _run(rec, kube, "m0", namespace="ads")
    assert _monitors(kube) == [("ads", REVISIONS_SERVICEMONITOR), ("shop", REVISIONS_SERVICEMONITOR)]
    monitor = kube.objects[("ServiceMonitor", "shop", REVISIONS_SERVICEMONITOR)]
    assert "ownerReferences" not in monitor["metadata"]  # no model owns it: it outlives each of them
    # 6 models, 2 namespaces: one read and one write per namespace, none per model.
    assert kube.requests["apply ServiceMonitor"] == 2 and kube.requests["get ServiceMonitor"] == 2
    assert kube.requests["apply Deployment"] == 6


def test_the_per_model_servicemonitors_of_an_earlier_version_are_deleted_once_per_namespace(env: Any) -> None:
    rec, kube = env
    shadow = build_shadow_servicemonitor(Ids("other", "shop", "uid-other", "r1"))  # a shadow phase's: kept
    foreign = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "shop-frontend", "namespace": "shop", "labels": {"app": "frontend"}},
               "spec": {"endpoints": [{"port": "metrics"}]}}  # fmt: skip
    for obj in (PER_MODEL, shadow, foreign):
        kube.objects[("ServiceMonitor", "shop", obj["metadata"]["name"])] = obj
    counts = _run(rec, kube, "ctr-dnn")
    assert _monitors(kube) == sorted([("shop", REVISIONS_SERVICEMONITOR), ("shop", "other-router"),
                                      ("shop", "shop-frontend")])  # fmt: skip
    assert counts["deleted"] == 1
    lists = kube.requests["list"]
    _run(rec, kube, "ctr-dnn")
    _run(rec, kube, "two-tower")
    assert kube.requests["list"] == lists  # looked for once per namespace and process


def test_the_last_model_of_a_namespace_takes_the_servicemonitor_with_it_and_a_new_one_brings_it_back(
    env: Any,
) -> None:
    rec, kube = env
    _run(rec, kube, "ctr-dnn")
    assert rec.namespace_emptied("shop") == []  # no model there now
    assert _monitors(kube) == []
    _run(rec, kube, "two-tower")  # the verification cache was cleared: not trusted to still exist
    assert _monitors(kube) == [("shop", REVISIONS_SERVICEMONITOR)]


def test_without_prometheus_operator_no_servicemonitor_is_written_or_looked_for() -> None:
    kube = FakeKube()
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    _run(rec, kube, "ctr-dnn")
    assert _monitors(kube) == [] and kube.requests["list"] == 0
    assert rec.namespace_emptied("shop") == [] and kube.requests["delete"] == 0


class _Live:
    def __init__(self, keys: list[tuple[str, str]]) -> None:
        self.keys = keys

    def model(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def model_keys(self) -> list[tuple[str, str]]:
        return list(self.keys)


class _Recorder:
    def __init__(self) -> None:
        self.forgotten: list[tuple[str, str]] = []
        self.emptied: list[str] = []
        self.created_meanwhile: list[tuple[str, str]] = []

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        self.forgotten.append((namespace, name))

    def namespace_emptied(self, namespace: str) -> list[tuple[str, str]]:
        self.emptied.append(namespace)
        return list(self.created_meanwhile)


@pytest.mark.parametrize(("remaining", "emptied"), [([], ["shop"]), ([("shop", "two-tower")], []),
                                                    ([("ads", "ctr-dnn")], ["shop"])])  # fmt: skip
def test_a_deleted_model_empties_its_namespace_only_when_it_was_the_last(
    remaining: list[tuple[str, str]], emptied: list[str]
) -> None:
    """The deletion is handled by a worker (an API call never runs on Kopf's event loop): model_gone queues the
    key, and the worker finds no model for it."""
    ctl = handlers.Controller.__new__(handlers.Controller)
    ctl.queue, ctl.seen, ctl.signatures, ctl.pending = WorkQueue(), {}, {("shop", "ctr-dnn"): 1}, {}
    recorder = _Recorder()
    ctl.reconciler = recorder  # type: ignore[assignment]
    ctl.live = _Live(remaining)  # type: ignore[assignment]
    ctl.model_gone("shop", "ctr-dnn", "uid-1")
    assert recorder.forgotten == [("shop", "ctr-dnn")] and len(ctl.queue) == 1
    ctl._process(("shop", "ctr-dnn"), 0.0)
    assert recorder.emptied == emptied


def _recommender(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}"}}  # fmt: skip


def _leave_monitor(kube: FakeKube, namespace: str) -> None:
    """What a namespace keeps after its models were deleted while no operator ran: the ServiceMonitor, no owner."""
    monitor = build_servicemonitor(namespace)
    monitor["metadata"]["uid"] = f"uid-sm-{namespace}"
    kube.objects[("ServiceMonitor", namespace, REVISIONS_SERVICEMONITOR)] = monitor


def test_at_start_a_servicemonitor_left_where_no_model_is_goes_and_one_beside_a_model_stays(env: Any) -> None:
    rec, kube = env
    for ns in ("gone", "shop", "ads"):
        _leave_monitor(kube, ns)
    kube.objects[("RecommenderModel", "shop", "ctr")] = _recommender("shop", "ctr")
    assert rec.sweep_orphaned_monitors(()) == []  # cluster-wide
    assert _monitors(kube) == [("shop", REVISIONS_SERVICEMONITOR)]
    # Reads only where something may be orphaned: 1 ServiceMonitor list, 1 model list per ServiceMonitor, and a
    # second model list where one was deleted (a model created meanwhile must get it back).
    assert kube.requests["list"] == 1 + 3 + 2 and kube.requests["delete"] == 2


def test_a_namespaced_operator_looks_only_in_its_namespaces(env: Any) -> None:
    rec, kube = env
    for ns in ("gone", "elsewhere"):
        _leave_monitor(kube, ns)
    rec.sweep_orphaned_monitors(("gone", "shop"))
    assert _monitors(kube) == [("elsewhere", REVISIONS_SERVICEMONITOR)]


def test_a_model_created_between_the_look_and_the_delete_is_reconciled_again(env: Any) -> None:
    rec, kube = env
    _leave_monitor(kube, "shop")
    delete = kube.delete

    def racing_delete(kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        kube.objects[("RecommenderModel", namespace, "new")] = _recommender(namespace, "new")  # just created
        return delete(kind, namespace, name, uid)

    kube.delete = racing_delete  # type: ignore[method-assign]
    assert rec.sweep_orphaned_monitors(()) == [("shop", "new")]
    _run(rec, kube, "new")  # its reconcile, queued urgently by the operator, brings the ServiceMonitor back
    assert _monitors(kube) == [("shop", REVISIONS_SERVICEMONITOR)]


def test_without_prometheus_operator_nothing_is_listed() -> None:
    kube = FakeKube()  # its discovery answers: no ServiceMonitor API
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    assert rec.sweep_orphaned_monitors(()) == [] and kube.requests["list"] == 0


class _Sweeper:
    def __init__(self, outcome: Any) -> None:
        self.outcome, self.scopes = outcome, []

    def sweep_orphaned_monitors(self, namespaces: tuple[str, ...]) -> list[tuple[str, str]]:
        self.scopes.append(namespaces)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return list(self.outcome)


@pytest.mark.parametrize("outcome", [[("shop", "new")], handlers.NotLeading("standby"), ApiException(status=503)])
def test_the_controller_sweeps_its_watched_namespaces_and_queues_what_the_sweep_returns(outcome: Any) -> None:
    ctl = handlers.Controller.__new__(handlers.Controller)
    ctl.queue, ctl.defaults = WorkQueue(), OperatorDefaults(watch_namespaces=("shop",))
    ctl.reconciler = _Sweeper(outcome)  # type: ignore[assignment]
    ctl._sweep_orphans()  # a failure is logged, never raised: the operator starts all the same
    assert ctl.reconciler.scopes == [("shop",)]  # type: ignore[attr-defined]
    assert len(ctl.queue) == (1 if isinstance(outcome, list) else 0)


def test_a_model_created_as_the_last_one_went_is_reconciled_at_once() -> None:
    """The caches did not show it yet, so the namespace looked empty; the API after the delete does."""
    ctl = handlers.Controller.__new__(handlers.Controller)
    ctl.queue, ctl.seen, ctl.signatures, ctl.pending = WorkQueue(), {}, {("shop", "ctr-dnn"): 1}, {}
    recorder = _Recorder()
    recorder.created_meanwhile = [("shop", "new")]
    ctl.reconciler = recorder  # type: ignore[assignment]
    ctl.live = _Live([])  # type: ignore[assignment]
    ctl.model_gone("shop", "ctr-dnn", "uid-1")
    ctl._process(ctl.queue.get(0)[0], 0.0)  # type: ignore[index]
    assert recorder.emptied == ["shop"] and (ctl.queue.get(0) or ((),))[0] == ("shop", "new")
