"""reconcile() through a shadow phase against the in-memory API and a fake Prometheus: the router mirrors with the
comparator sidecar, a passing look starts the first step, a failing one rolls back with the measured values, an
outage holds the phase with MetricsAvailable=False."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from test_metrics_outage import Model, Prometheus

SHADOW = {"percent": 25, "minRequests": 100, "minTopKOverlap": 0.9, "maxP99LatencyMs": 50}
GOOD = {'outcome="compared"': "400", 'outcome="dropped"': "0", 'outcome="candidate_error"': "0",
        'outcome!="dropped"': "400", "histogram_quantile": "0.012", "recserve_shadow_topk_overlap": "0.995",
        "recserve_shadow_rank_concordance": "0.99", "recserve_shadow_score_abs_diff": "0.0001"}  # fmt: skip
SHUFFLED = {**GOOD, "recserve_shadow_topk_overlap": "0.04", "recserve_shadow_rank_concordance": "0.2"}


class ShadowPrometheus(Prometheus):
    """Answers the comparator's series (first key contained in the query wins)."""

    answers: dict[str, str] = GOOD

    def answer(self, path: str) -> bytes:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(path).query)["query"][0]
        value = next((v for key, v in self.answers.items() if key in query), None)
        result = [] if value is None else [{"metric": {}, "value": [0, value]}]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


@pytest.fixture
def prometheus() -> Iterator[ShadowPrometheus]:
    server = ShadowPrometheus()
    yield server
    server.close()


def rollout(url: str) -> dict[str, Any]:
    return {"strategy": "canary", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}],
            "analysis": {"interval": "1m", "prometheus": url, "maxErrorRate": 0.01, "minRequests": 100},
            "shadow": SHADOW}  # fmt: skip


def start_shadow(m: Model) -> tuple[str, str]:
    m.kube.exists = lambda path: True  # type: ignore[method-assign]  # the ServiceMonitor CRD is installed
    m.reconcile(0)
    stable = m.kube.status["stable"]["revision"]
    m.kube.make_available(stable)
    m.version = 4
    m.reconcile(10)  # the candidate builds: the rollout waits
    candidate = m.kube.status["latestRevision"]
    m.kube.make_available(candidate)
    m.reconcile(20)
    assert m.canary["shadowing"] is True and m.canary["weight"] == 0, m.canary
    return stable, candidate


def router(m: Model) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    objs = m.kube.objects
    return (objs[("ConfigMap", "shop", "ctr-dnn-router")], objs[("Deployment", "shop", "ctr-dnn-router")],
            objs[("Service", "shop", "ctr-dnn-router")])  # fmt: skip


def test_the_router_mirrors_to_the_comparator_while_users_stay_on_stable(prometheus: ShadowPrometheus) -> None:
    m = Model(rollout(prometheus.url))
    stable, candidate = start_shadow(m)
    cm, deploy, svc = router(m)
    plan = json.loads(cm["data"]["plan.json"])
    assert [(b["revision"], b["weight"]) for b in plan["backends"]] == [(stable, 100)]
    assert plan["shadow"] == {"revision": candidate, "service": f"ctr-dnn-{candidate}", "percent": 25, "topK": 10}
    assert "mirror /_recserve_shadow;" in cm["data"]["nginx.conf"] and "25% 1;" in cm["data"]["nginx.conf"]
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["nginx", "shadow-comparator"]
    assert f"--candidate-revision={candidate}" in containers[1]["args"]
    assert any(p["name"] == "shadow-metrics" for p in svc["spec"]["ports"])
    sm = m.kube.objects[("ServiceMonitor", "shop", "ctr-dnn-router")]
    assert sm["spec"]["endpoints"][0]["port"] == "shadow-metrics"
    assert m.events("RolloutStarted") or m.events("ShadowStarted")


def test_a_passing_shadow_starts_the_first_step_and_the_mirror_goes(prometheus: ShadowPrometheus) -> None:
    m = Model(rollout(prometheus.url))
    stable, candidate = start_shadow(m)
    m.reconcile(90)
    c = m.canary
    assert (c["shadowing"], c["weight"], c["step"]) == (False, 10, 0), c
    assert c["shadow"]["verdict"] == "pass" and c["shadow"]["measured"]["topKOverlap"] == 0.995
    assert c["shadow"]["measured"]["rankCorrelation"] == 0.99  # Prometheus computes 2 * mean - 1
    assert m.events("ShadowPassed")
    cm, deploy, _ = router(m)
    plan = json.loads(cm["data"]["plan.json"])
    assert {b["revision"]: b["weight"] for b in plan["backends"]} == {stable: 90, candidate: 10}
    assert "shadow" not in plan and len(deploy["spec"]["template"]["spec"]["containers"]) == 1


def test_a_shuffled_ranking_is_rolled_back_with_the_measured_values(prometheus: ShadowPrometheus) -> None:
    prometheus.answers = SHUFFLED
    m = Model(rollout(prometheus.url))
    stable, candidate = start_shadow(m)
    m.reconcile(90)
    c = m.canary
    assert c["phase"] == "RolledBack" and c["revision"] == candidate and not c["shadowing"], c
    measured = c["shadow"]["measured"]
    assert measured["topKOverlap"] == 0.04 and measured["errorRate"] == 0.0 and measured["p99Ms"] == 12.0
    assert [x["name"] for x in c["shadow"]["checks"] if x["passed"] is False] == ["topKOverlap"]
    events = [e for e in m.events("RolledBack") if "topKOverlap=0.04 (min 0.9)" in e[2]]
    assert events and events[0][0] == "Warning", m.kube.events
    plan = json.loads(router(m)[0]["data"]["plan.json"])
    assert [b["revision"] for b in plan["backends"]] == [stable] and "shadow" not in plan


def test_a_prometheus_outage_holds_the_shadow_with_a_condition(prometheus: ShadowPrometheus) -> None:
    m = Model(rollout(prometheus.url))
    start_shadow(m)
    prometheus.broken = (503, b"<html>down</html>", "text/html")
    for seconds in (90, 150, 210):
        m.reconcile(seconds)
        assert m.canary["shadowing"] is True and m.canary["phase"] == "Progressing"
    status, reason, _ = m.condition("MetricsAvailable") or ("", "", "")
    assert (status, reason) == ("False", "MetricsUnavailable")
    assert m.canary["shadow"]["verdict"] == "inconclusive"
