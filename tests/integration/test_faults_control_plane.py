"""Control-plane and metrics faults mid-rollout, on the real API server with the operator as a process.

kube-apiserver restarted, then etcd restarted, each while a canary is at its second step: the operator lives
through the outage without a Traceback and the rollout completes. A Prometheus that answers garbage, then JSON of
the wrong shape, then nothing at all: the canary holds its step (no promotion) while MetricsAvailable says why
in the provider's words, and once Prometheus answers properly the rollout resumes and completes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from recserve_cluster.cluster import Cluster, KwokProvider, get_provider
from tests.helpers import wait_for
from tests.integration.conftest_operator import (
    FakePrometheus,
    OperatorProcess,
    apply_yaml,
    condition,
    get_json,
    kwok_model,
    model,
    ready_model,
    wait_ready,
)

pytestmark = pytest.mark.integration

CPU = {"resources": {"gpu": 0, "cpu": "10m", "memory": "32Mi"}, "instances": {"kind": "CPU"}, "gpuProduct": None}


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus().start()
    yield fake
    fake.stop()


def _spec(name: str, version: int, prometheus: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    analysis = {"interval": "2s", "prometheus": prometheus, "maxErrorRate": 0.01, "minRequests": 1}
    return kwok_model(name, version, serving=CPU, rollout={"strategy": "canary", "steps": steps,
                                                          "analysis": analysis, "progressDeadline": "10m"})  # fmt: skip


def _canary(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(((model(cluster, ns, name) or {}).get("status") or {}).get("canary") or {})


def _promoted(cluster: Cluster, ns: str, name: str, version: int) -> dict[str, Any] | None:
    """The model once `version`'s revision is promoted, stable and Ready for the current generation."""
    obj = ready_model(cluster, ns, name)
    if not obj or obj["spec"]["model"]["version"] != version:
        return None
    canary = obj["status"].get("canary") or {}
    latest = obj["status"]["latestRevision"]
    ok = canary.get("phase") == "Promoted" and canary.get("revision") == latest == obj["status"]["stable"]["revision"]
    return obj if ok else None


def _at_step(cluster: Cluster, ns: str, name: str, step: int) -> dict[str, Any] | None:
    obj = model(cluster, ns, name) or {}
    c = (obj.get("status") or {}).get("canary") or {}
    latest = (obj.get("status") or {}).get("latestRevision")
    return c if c.get("phase") == "Progressing" and c.get("step") == step and c.get("revision") == latest else None


def _reconciles(op: OperatorProcess) -> float:
    return (op.metrics() or {}).get("recserve_reconciles_total", 0.0)


def _kwok() -> KwokProvider:
    provider = get_provider()
    if not isinstance(provider, KwokProvider):
        pytest.skip("only the local kwok provider runs the control plane as processes this test may restart")
    return provider


def _alive(op: OperatorProcess) -> None:
    assert op.proc is not None and op.proc.poll() is None, f"the operator exited: {op.log()[-3000:]}"
    assert "Traceback" not in op.log(), op.log()[-5000:]


def _outage(cluster: Cluster, provider: KwokProvider, component: str, down: Callable[[], bool]) -> None:
    """Stop `component`, wait until `down()` sees the outage, start it again; it is started even on failure."""
    how = provider.stop_component(component)
    try:
        wait_for(down, 60, message=f"the outage of {component} to show")
    finally:
        provider.start_component(component, how)
        provider.wait_ready(cluster)


def _readyz(cluster: Cluster) -> str:
    out = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else f"failed: {out.stderr.strip()[:200]}"


def test_kube_apiserver_and_etcd_restarted_mid_rollout_the_operator_survives_and_the_rollouts_complete(
    operator: OperatorProcess, namespace: str, prometheus: FakePrometheus
) -> None:
    provider, cluster = _kwok(), operator.cluster
    steps = [{"weight": 20, "pause": "1s"}, {"weight": 50, "pause": "5s"}, {"weight": 80, "pause": "1s"}]
    apply_yaml(cluster, namespace, _spec("cp", 1, prometheus.url, steps))
    wait_ready(cluster, namespace, "cp")
    for version, component in ((2, "kube-apiserver"), (3, "etcd")):
        apply_yaml(cluster, namespace, _spec("cp", version, prometheus.url, steps))
        before = wait_for(lambda: _at_step(cluster, namespace, "cp", 1), 60, message=f"v{version} never at step 1")
        old_pid = provider.component_pid(component)
        # The API server down: requests fail outright. etcd down: the API server is up but not ready.
        _outage(cluster, provider, component, lambda: _readyz(cluster) != "ok")
        assert provider.component_pid(component) != old_pid
        obj = wait_for(partial(_promoted, cluster, namespace, "cp", version), 120,
                       message=f"v{version} was not promoted after the {component} restart")  # fmt: skip
        assert obj["status"]["stable"]["revision"] == before["revision"]
        _alive(operator)
    router = get_json(cluster, "configmap", "cp-router", "-n", namespace)
    assert router is not None and obj["status"]["stable"]["revision"] in router["data"]["plan.json"]
    assert get_json(cluster, "deployment", "cp-router", "-n", namespace) is not None
    # Revision Deployments (the router's carry instance=cp-router): the superseded one drains once the router
    # serves the promoted plan, a moment after the promotion.
    expected = [f"cp-{before['revision']}"]

    def revisions() -> list[str]:
        items = get_json(cluster, "deployments", "-n", namespace, "-l", "app.kubernetes.io/instance=cp")["items"]
        return sorted(d["metadata"]["name"] for d in items if not d["metadata"].get("deletionTimestamp"))

    wait_for(lambda: revisions() == expected, 60, message=f"the revision Deployments never became {expected}")


def test_prometheus_answering_garbage_or_unreachable_holds_the_canary_and_the_rollout_resumes_when_it_answers(
    operator: OperatorProcess, namespace: str, prometheus: FakePrometheus
) -> None:
    cluster = operator.cluster
    steps = [{"weight": 20, "pause": "1s"}, {"weight": 50, "pause": "1s"}]
    apply_yaml(cluster, namespace, _spec("pm", 1, prometheus.url, steps))
    stable = wait_ready(cluster, namespace, "pm")["status"]["stable"]["revision"]
    prometheus.mode = "garbage"
    apply_yaml(cluster, namespace, _spec("pm", 2, prometheus.url, steps))
    held = wait_for(lambda: _at_step(cluster, namespace, "pm", 0), 60, message="the canary never reached step 0")
    cand = held["revision"]

    def metrics_say(words: str) -> dict[str, Any] | None:
        cond = condition(model(cluster, namespace, "pm"), "MetricsAvailable")
        ok = cond and cond["status"] == "False" and cond["reason"] == "MetricsUnavailable" and words in cond["message"]
        return cond if ok else None

    def holds_until(target: float) -> bool:
        """The canary is where it was (asserted at every poll) until the operator has reconciled `target` times."""
        c, obj = _canary(cluster, namespace, "pm"), model(cluster, namespace, "pm") or {}
        assert (c["phase"], c["step"], c["weight"], c["revision"]) == ("Progressing", 0, 20, cand), c
        assert obj["status"]["stable"]["revision"] == stable, obj["status"]
        return _reconciles(operator) >= target

    for mode, words in (("garbage", "non-JSON body"), ("wrong-shape", "expected a scalar or instant vector"),
                        ("stopped", "unreachable")):  # fmt: skip
        if mode == "stopped":
            prometheus.stop()
        else:
            prometheus.mode = mode
        cond: dict[str, Any] = wait_for(partial(metrics_say, words), 30,
                                        message=f"MetricsAvailable does not say {words!r}")  # fmt: skip
        if mode != "wrong-shape":  # the provider names the query there, not the server
            assert prometheus.url in cond["message"], cond
        # Held: over several reconciles (2 s resyncs, 2 s analysis interval, the step's 1 s pause long over),
        # nothing moves and nothing is promoted.
        target = _reconciles(operator) + 4
        wait_for(partial(holds_until, target), 60, message="the operator stopped reconciling")
        _alive(operator)

    prometheus.mode = "healthy"
    prometheus.start()
    obj = wait_for(lambda: _promoted(cluster, namespace, "pm", 2), 90, message="the rollout did not resume")
    assert obj["status"]["stable"]["revision"] == cand
    metrics = condition(obj, "MetricsAvailable")
    assert metrics is not None and metrics["status"] == "True", metrics
    _alive(operator)
