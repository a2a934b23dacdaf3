"""reconcile() against an in-memory API: creates, converges with no writes, corrects drift, replaces revisions."""

from __future__ import annotations

import copy
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_samples import minimal_spec, model_body
from recserve_operator.metrics.base import TritonSeries
from recserve_operator.names import REVISION_LABEL, model_of
from recserve_operator.reconcile import Reconciler, is_subset, merge_patch
from recserve_operator.settings import OperatorDefaults


class FakeKube:
    """Server-side apply semantics that matter here: merge by name, bump resourceVersion only on change."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: Counter[str] = Counter()
        self.status: dict[str, Any] | None = None
        self.events: list[tuple[str, str, str]] = []
        self.rv = 100

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.requests["apply"] += 1
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        live = self.objects.get(key)
        if live is None or not is_subset(obj, live):
            self.rv += 1
            live = copy.deepcopy(obj)
            live["metadata"]["resourceVersion"] = str(self.rv)
            live["metadata"]["uid"] = f"uid-{self.rv}"
            if obj["kind"] == "Deployment":
                live["metadata"]["generation"] = 1
                live["status"] = {}
            self.objects[key] = live
        return copy.deepcopy(live)

    def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests["get"] += 1
        live = self.objects.get((resource.kind, namespace, name))
        return copy.deepcopy(live) if live else None

    def patch_annotations(self, namespace: str, name: str, annotations: dict[str, Any]) -> None:
        self.requests["patch"] += 1

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
        self.requests["scale"] += 1
        live = self.objects.get(("Deployment", namespace, name))
        if live is None:
            return None
        self.rv += 1
        live["spec"]["replicas"] = replicas
        live["metadata"]["resourceVersion"] = str(self.rv)
        live["metadata"]["generation"] = live["metadata"].get("generation", 1) + 1
        return copy.deepcopy(live)

    def list_objects(self, resource: Any, namespace: str, label_selector: str = "", *, field_selector: str = "",
                     limit: int = 0) -> list[dict[str, Any]]:  # fmt: skip
        self.requests["list"] += 1
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        named = field_selector.removeprefix("metadata.name=") if field_selector else None
        found = [copy.deepcopy(o) for (kind, ns, name), o in self.objects.items()
                 if kind == resource.kind and namespace in ("", ns) and named in (None, name)
                 and wanted.items() <= (o["metadata"].get("labels") or {}).items()]  # fmt: skip
        return found[:limit] if limit else found

    def exists(self, path: str) -> bool:
        self.requests["discovery"] += 1
        return False

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        self.requests["delete"] += 1
        return self.objects.pop((kind, namespace, name), None) is not None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.requests["patch-status"] += 1
        self.status = _apply_merge_patch(self.status or {}, status)
        return {}

    def roll_router(self) -> None:
        """The router Deployment's controller finished rolling its pods to the applied template."""
        for (kind, _, name), obj in self.objects.items():
            if kind == "Deployment" and name.endswith("-router"):
                replicas = obj["spec"].get("replicas", 1)
                gen = obj["metadata"].get("generation", 1)
                obj["status"] = {"observedGeneration": gen, "replicas": replicas, "updatedReplicas": replicas,
                                 "availableReplicas": replicas}
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)

    def make_available(self, revision: str) -> None:
        for (kind, _, _), obj in self.objects.items():
            if kind == "Deployment" and obj["metadata"]["labels"].get(REVISION_LABEL) == revision:
                replicas = obj["spec"].get("replicas", 1)
                obj["status"] = {"observedGeneration": 1, "readyReplicas": replicas, "updatedReplicas": replicas}
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)


def _apply_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _apply_merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeLive:
    """The operator's watch caches: owned objects keyed by their model (handlers._owned_key)."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube

    def owned(self, kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.kube.objects.items()
            if k == kind and ns == namespace and model_of(o["metadata"]["labels"]) == instance
        ]


@pytest.fixture
def env() -> tuple[Reconciler, FakeKube, list[tuple[str, str, str]]]:
    kube = FakeKube()
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    return rec, kube, kube.events


def _run(rec: Reconciler, kube: FakeKube, body: dict[str, Any]) -> dict[str, int]:
    return rec.reconcile(body, lambda t, r, m: kube.events.append((t, r, m)))


def _kinds(kube: FakeKube) -> list[str]:
    return sorted(f"{k}/{n}" for k, _, n in kube.objects)


def test_first_reconcile_creates_the_revision_and_points_the_front_service_at_it(env: Any) -> None:
    rec, kube, _ = env
    counts = _run(rec, kube, model_body(minimal_spec()))
    rev = kube.status["latestRevision"]
    assert _kinds(kube) == sorted(
        [
            f"ConfigMap/ctr-dnn-{rev}",
            f"Deployment/ctr-dnn-{rev}",
            f"Service/ctr-dnn-{rev}",
            "Service/ctr-dnn",
        ]
    )  # one replica: no disruption budget (it would allow every eviction)
    assert counts == {"applied": 4, "deleted": 0, "status": 1}
    assert kube.objects[("Service", "shop", "ctr-dnn")]["spec"]["selector"][REVISION_LABEL] == rev
    assert kube.status["stable"]["revision"] == rev
    assert kube.status["phase"] == "Deploying"


def test_a_converged_model_makes_no_writes(env: Any) -> None:
    rec, kube, _ = env
    body = model_body(minimal_spec())
    _run(rec, kube, body)
    kube.make_available(kube.status["latestRevision"])
    _run(rec, kube, body)
    assert kube.status["phase"] == "Ready"
    before = dict(kube.requests)
    for _ in range(3):
        assert _run(rec, kube, model_body(minimal_spec(), status=kube.status)) == {
            "applied": 0,
            "deleted": 0,
            "status": 0,
        }
    assert dict(kube.requests) == before


def test_drift_in_an_owned_object_is_corrected(env: Any) -> None:
    rec, kube, _ = env
    body = model_body(minimal_spec())
    _run(rec, kube, body)
    rev = kube.status["latestRevision"]
    kube.objects[("Deployment", "shop", f"ctr-dnn-{rev}")]["spec"]["replicas"] = 7
    kube.rv += 1
    kube.objects[("Deployment", "shop", f"ctr-dnn-{rev}")]["metadata"]["resourceVersion"] = str(kube.rv + 1000)
    del kube.objects[("Service", "shop", "ctr-dnn")]
    counts = _run(rec, kube, body)
    assert counts["applied"] == 2
    assert kube.objects[("Deployment", "shop", f"ctr-dnn-{rev}")]["spec"]["replicas"] == 1
    assert ("Service", "shop", "ctr-dnn") in kube.objects


def test_a_spec_change_keeps_the_old_revision_until_the_new_one_is_available(env: Any) -> None:
    rec, kube, events = env
    _run(rec, kube, model_body(minimal_spec()))
    old = kube.status["latestRevision"]
    kube.make_available(old)
    _run(rec, kube, model_body(minimal_spec()))

    changed = minimal_spec(model={"uri": "pvc://models/ctr-dnn/4", "format": "keras", "version": 4})
    _run(rec, kube, model_body(changed, generation=2))
    new = kube.status["latestRevision"]
    assert new != old
    assert kube.status["stable"]["revision"] == old
    assert kube.status["phase"] == "Progressing"
    assert kube.objects[("Service", "shop", "ctr-dnn")]["spec"]["selector"][REVISION_LABEL] == old
    assert ("Deployment", "shop", f"ctr-dnn-{old}") in kube.objects

    kube.make_available(new)
    counts = _run(rec, kube, model_body(changed, generation=2))
    assert counts["deleted"] == 3  # the old revision's ConfigMap, Deployment and Service
    assert kube.status["stable"] == {"revision": new, "modelVersion": 4, "readyReplicas": 1}
    assert kube.objects[("Service", "shop", "ctr-dnn")]["spec"]["selector"][REVISION_LABEL] == new
    assert not [k for k in kube.objects if k[2].endswith(old)]
    assert ("Normal", "Promoted") in [(t, r) for t, r, _ in events]
    assert kube.status["phase"] == "Ready"


def test_an_invalid_spec_sets_invalid_spec_and_touches_nothing(env: Any) -> None:
    rec, kube, events = env
    _run(rec, kube, model_body(minimal_spec(optimize={"precision": "int8"})))
    assert kube.objects == {}
    ready = next(x for x in kube.status["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "calibration" in ready["message"]
    assert kube.status["phase"] == "Failed"
    assert any(r == "InvalidSpec" and t == "Warning" for t, r, _ in events)


def test_is_subset_ignores_server_defaults_but_not_changed_values() -> None:
    desired = {"spec": {"replicas": 1, "template": {"containers": [{"name": "a", "image": "x"}]}}}
    live = {
        "spec": {
            "replicas": 1,
            "progressDeadlineSeconds": 600,
            "template": {"containers": [{"name": "a", "image": "x", "terminationMessagePath": "/dev/x"}]},
        }
    }
    assert is_subset(desired, live)
    live["spec"]["template"]["containers"][0]["image"] = "y"
    assert not is_subset(desired, live)


@pytest.mark.parametrize(("desired", "live"), [("2.5", "2500m"), ("1024Mi", "1Gi"), ("2000", "2k"), ("1000m", "1")])
def test_is_subset_compares_quantities_as_the_apiserver_canonicalizes_them(desired: str, live: str) -> None:
    assert is_subset({"cpu": desired}, {"cpu": live})
    assert not is_subset({"cpu": desired}, {"cpu": "3"})


class HealthyCanary:
    """Prometheus stand-in: the candidate serves plenty of requests without errors."""

    def __init__(self) -> None:
        self.queried: list[str] = []

    def query_scalar(self, query: str) -> float | None:
        return 0.0

    def triton_series(self, revision: str, window_s: float) -> TritonSeries:
        self.queried.append(revision)
        return TritonSeries(requests=5000.0, error_rate=0.0, p99_ms=4.0, p99_is_average=False)


def test_canary_runs_beside_stable_with_router_weights_and_promotes_after_passing_analysis(env: Any) -> None:
    rec, kube, events = env
    prometheus = HealthyCanary()
    rec._providers["http://prometheus.monitoring:9090"] = prometheus
    rollout = {
        "strategy": "canary",
        "steps": [{"weight": 25, "pause": "1m"}],
        "analysis": {"interval": "1m", "maxErrorRate": 0.01, "maxP99LatencyMs": 25, "minRequests": 100},
    }
    t0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    spec = minimal_spec(rollout=rollout)
    rec.reconcile(model_body(spec), lambda *e: events.append(e), now=t0)
    old = kube.status["stable"]["revision"]
    kube.make_available(old)
    assert ("ConfigMap", "shop", "ctr-dnn-router") in kube.objects
    assert kube.status["canary"]["phase"] == "Idle"

    changed = minimal_spec(rollout=rollout, model={"uri": "pvc://models/ctr-dnn/4", "format": "keras", "version": 4})
    rec.reconcile(model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(seconds=10))
    new = kube.status["latestRevision"]
    assert kube.status["canary"]["phase"] == "Progressing"
    assert kube.status["canary"]["weight"] == 0
    assert {old, new} == {
        k[2].removeprefix("ctr-dnn-") for k in kube.objects if k[0] == "Deployment" and k[2] != "ctr-dnn-router"
    }

    kube.make_available(new)
    rec.reconcile(model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(seconds=20))
    assert kube.status["canary"]["weight"] == 25
    assert new in kube.objects[("ConfigMap", "shop", "ctr-dnn-router")]["data"]["nginx.conf"]
    assert kube.status["stable"]["revision"] == old

    rec.reconcile(model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(minutes=3))
    assert prometheus.queried and set(prometheus.queried) == {new}
    assert kube.status["stable"]["revision"] == new
    assert kube.status["canary"]["phase"] == "Promoted"
    kube.roll_router()  # the old revision goes once the router pods serve the new plan
    rec.reconcile(model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(minutes=3.1))
    assert [k for k in kube.objects if k[0] == "Deployment" and k[2] != "ctr-dnn-router"] == [
        ("Deployment", "shop", f"ctr-dnn-{new}")
    ]


def test_merge_patch_nulls_nested_keys_that_disappeared_and_skips_equal_values() -> None:
    old = {"phase": "Ready", "canary": {"weight": 10, "lastAnalysis": {"verdict": "pass"}}, "stable": {"revision": "a"}}
    new = {"phase": "Ready", "canary": {"weight": 0}, "stable": {"revision": "a"}}
    assert merge_patch(old, new) == {"canary": {"weight": 0, "lastAnalysis": None}}
    assert _apply_merge_patch(old, merge_patch(old, new)) == new


class FailingCanary(HealthyCanary):
    def triton_series(self, revision: str, window_s: float) -> TritonSeries:
        self.queried.append(revision)
        return TritonSeries(requests=5000.0, error_rate=0.4, p99_ms=4.0, p99_is_average=False)


def test_a_canary_failing_analysis_is_rolled_back_removed_and_reported_degraded(env: Any) -> None:
    rec, kube, events = env
    rec._providers["http://prometheus.monitoring:9090"] = FailingCanary()
    rollout = {
        "strategy": "canary",
        "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}],
        "analysis": {"interval": "1m", "maxErrorRate": 0.01, "failureLimit": 1},
    }
    t0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    rec.reconcile(model_body(minimal_spec(rollout=rollout)), lambda *e: events.append(e), now=t0)
    old = kube.status["stable"]["revision"]
    kube.make_available(old)
    changed = minimal_spec(rollout=rollout, model={"uri": "pvc://models/ctr-dnn/9", "format": "keras", "version": 9})
    for minutes in (1, 2, 4, 6, 8):
        rec.reconcile(
            model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(minutes=minutes)
        )
        new = kube.status["latestRevision"]
        kube.make_available(new)
    assert kube.status["canary"]["phase"] == "RolledBack"
    assert kube.status["stable"]["revision"] == old
    conds = {x["type"]: (x["status"], x["reason"]) for x in kube.status["conditions"]}
    assert conds["Progressing"] == ("False", "RolledBack")
    assert conds["Degraded"] == ("True", "RolledBack")
    assert conds["Ready"][0] == "True"
    assert kube.status["phase"] == "Degraded"
    kube.roll_router()  # the candidate goes once the router pods no longer name it
    rec.reconcile(model_body(changed, generation=2), lambda *e: events.append(e), now=t0 + timedelta(minutes=9))
    assert not [k for k in kube.objects if k[2] == f"ctr-dnn-{new}"]


@pytest.mark.parametrize("provider", ["builtin", "gatewayAPI"])
def test_a_switch_back_to_immediate_deletes_the_router_and_serves_from_the_stable_service(
    env: Any, provider: str
) -> None:
    """Router objects belong to their model (names.model_of): when the strategy no longer needs them they go, and
    the endpoints go back to the stable front Service. An HTTPRoute (not in the watch caches) is asked to go once."""
    rec, kube, events = env
    routing: dict[str, Any] = {"provider": provider}
    if provider == "gatewayAPI":
        routing["parentRef"] = {"name": "shop-gw"}
    canary = {"strategy": "canary", "steps": [{"weight": 25, "pause": "1m"}], "routing": routing}
    rec.reconcile(model_body(minimal_spec(rollout=canary)), lambda *e: events.append(e))
    kube.make_available(kube.status["stable"]["revision"])
    router = {k for k in kube.objects if k[2] == "ctr-dnn-router"}
    expected = {"builtin": {"ConfigMap", "Deployment", "Service"}, "gatewayAPI": {"HTTPRoute"}}[provider]
    assert {k[0] for k in router} == expected

    immediate = minimal_spec(rollout={"strategy": "immediate"})
    rec.reconcile(model_body(immediate, generation=2), lambda *e: events.append(e))
    assert not [k for k in kube.objects if k[2] == "ctr-dnn-router"]
    assert "ctr-dnn.shop.svc" in kube.status["endpoints"]["http"]
    deletes = kube.requests["delete"]
    rec.reconcile(model_body(immediate, generation=2), lambda *e: events.append(e))
    assert kube.requests["delete"] == deletes  # steady state: nothing left to delete, no request repeated


def test_an_invalid_rollout_policy_is_an_invalid_spec_naming_the_field_and_changes_nothing(env: Any) -> None:
    rec, kube, events = env
    rec.reconcile(model_body(minimal_spec()), lambda *e: events.append(e))
    kube.make_available(kube.status["stable"]["revision"])
    before = copy.deepcopy(kube.objects)
    bad = minimal_spec(rollout={"strategy": "canary", "steps": [{"weight": 50}, {"weight": 20}]})
    rec.reconcile(model_body(bad, generation=2), lambda *e: events.append(e))
    assert kube.objects == before
    degraded = next(x for x in kube.status["conditions"] if x["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec" and "spec.rollout.steps[1].weight" in degraded["message"]


def test_each_analysis_look_gets_the_shared_prometheus_pinned_to_its_instant() -> None:
    from recserve_operator.metrics.prometheus import PrometheusProvider

    kube = FakeKube()
    rec = Reconciler(kube, OperatorDefaults(), FakeLive(kube))  # type: ignore[arg-type]
    first, second = rec._metrics("http://prom:9090"), rec._metrics("http://prom:9090")
    assert isinstance(first, PrometheusProvider) and isinstance(second, PrometheusProvider)
    assert first.evaluation_time is not None and second.evaluation_time is not None
    assert first.evaluation_time <= second.evaluation_time and first.session is second.session  # one pool
    shared = rec._providers["http://prom:9090"]
    assert isinstance(shared, PrometheusProvider) and shared.evaluation_time is None
