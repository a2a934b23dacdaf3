"""The shadow phase in the routers: plan, nginx mirror config (golden + nginx -t), comparator sidecar, HTTPRoute
RequestMirror, the scrape, and the PromQL the shadow analysis runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from recserve_operator.builders.common import Ids
from recserve_operator.builders.servicemonitor import build_shadow_servicemonitor
from recserve_operator.metrics.base import collect_shadow, shadow_queries
from recserve_operator.names import router_selector
from recserve_operator.rollout.machine import TrafficWeights
from recserve_operator.rollout.policy import ParentRef, RoutingPolicy
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.routers.base import BuiltinRouter, GatewayApiRouter, UnknownRouterError
from recserve_operator.routers.builtin import NginxSettings, render_nginx_conf
from recserve_operator.routers.plan import Backend, Shadow, TrafficPlan, build_traffic_plan

from tests.unit.rollout.test_routers import NGINX, OWNER, golden

SHADOWING = RolloutState(phase=Phase.PROGRESSING, stable_revision="a1b2c3d4e5", revision="f6e5d4c3b2",
                         shadowing=True)  # fmt: skip
MIRROR = TrafficWeights(100, 0, False, mirror=10)


def shadow_plan(percent: int = 10) -> TrafficPlan:
    return build_traffic_plan("shop", SHADOWING, TrafficWeights(100, 0, False, mirror=percent), RoutingPolicy(),
                              top_k=5)  # fmt: skip


def test_the_plan_routes_users_to_stable_only_and_shadows_the_candidate() -> None:
    p = shadow_plan()
    assert p.backends == (Backend("stable", "a1b2c3d4e5", "shop-a1b2c3d4e5", 100),)
    assert p.shadow == Shadow("f6e5d4c3b2", "shop-f6e5d4c3b2", 10, 5)
    assert TrafficPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_no_mirror_no_shadow() -> None:
    assert build_traffic_plan("shop", SHADOWING, TrafficWeights.stable_only(), RoutingPolicy()).shadow is None


def test_a_revision_cannot_be_routed_and_shadowed() -> None:
    with pytest.raises(ValueError, match="both routed and shadowed"):
        TrafficPlan((Backend("stable", "a", "s-a", 100),), "x-user-id", "x-v", Shadow("a", "s-a", 10))
    with pytest.raises(ValueError, match="1-100"):
        Shadow("b", "s-b", 0)


def test_nginx_shadow_config_golden() -> None:
    golden("nginx-shadow-10.conf", render_nginx_conf(shadow_plan(), NginxSettings(namespace="shop")))


def test_the_mirror_is_sampled_and_never_waits_for_the_comparator() -> None:
    conf = render_nginx_conf(shadow_plan(25))
    assert 'split_clients "${request_id}shadow" $recserve_shadow_sampled {\n        25% 1;\n        * 0;' in conf
    infer = conf[conf.index("location ~ ^/v2/models/") :]
    assert "mirror /_recserve_shadow;" in infer
    internal = conf[conf.index("location = /_recserve_shadow") :]
    for line in ("internal;", "if ($recserve_shadow_sampled = 0) {", "proxy_connect_timeout 100ms;",
                 "proxy_read_timeout 200ms;", "proxy_pass http://recserve_shadow$request_uri;"):  # fmt: skip
        assert line in internal
    assert "server 127.0.0.1:9098;" in conf
    # Users are routed exactly as without a shadow: only stable is an upstream of the main request.
    assert "upstream recserve_canary" not in conf
    every = render_nginx_conf(shadow_plan(100))
    assert 'split_clients "${request_id}shadow" $recserve_shadow_sampled {\n        * 1;' in every


@pytest.mark.skipif(not Path(NGINX).exists(), reason=f"{NGINX} is absent (apt-get install nginx) to check configs")
def test_nginx_accepts_the_shadow_config(tmp_path: Path) -> None:
    settings = NginxSettings(runtime_dir=str(tmp_path), error_log=str(tmp_path / "e.log"),
                             access_log=str(tmp_path / "a.log"), upstreams={"stable": "127.0.0.1:8000"},
                             grpc_upstreams={"stable": "127.0.0.1:8001"})  # fmt: skip
    path = tmp_path / "nginx.conf"
    path.write_text(render_nginx_conf(shadow_plan(), settings))
    result = subprocess.run([NGINX, "-t", "-q", "-p", f"{tmp_path}/", "-e", str(tmp_path / "startup.log"), "-c",
                             str(path)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_router_pod_gets_the_comparator_sidecar_and_the_service_its_metrics_port() -> None:
    objs = BuiltinRouter(shadow_image="ghcr.io/recserve/operator:0.1.0").render(shadow_plan(), "shop", "ns", OWNER)
    golden("builtin-router-shadow.yaml", json.dumps(objs, indent=1, sort_keys=True) + "\n")
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    _, sidecar = deploy["spec"]["template"]["spec"]["containers"]
    assert sidecar["image"] == "ghcr.io/recserve/operator:0.1.0"
    assert sidecar["command"] == ["python", "-m", "recserve_operator.shadow"]
    assert "--stable-url=http://shop-a1b2c3d4e5.ns.svc:8000" in sidecar["args"]
    assert "--candidate-url=http://shop-f6e5d4c3b2.ns.svc:8000" in sidecar["args"]
    assert "--top-k=5" in sidecar["args"]
    svc = next(o for o in objs if o["kind"] == "Service")
    assert {"name": "shadow-metrics", "port": 9099, "targetPort": "shadow-metrics", "protocol": "TCP"} in svc[
        "spec"]["ports"]  # fmt: skip
    plain = BuiltinRouter().render(build_traffic_plan("shop", SHADOWING, TrafficWeights.stable_only(),
                                                      RoutingPolicy()), "shop", "ns", OWNER)  # fmt: skip
    plain_deploy = next(o for o in plain if o["kind"] == "Deployment")
    assert len(plain_deploy["spec"]["template"]["spec"]["containers"]) == 1
    with pytest.raises(UnknownRouterError, match="comparator image"):
        BuiltinRouter().render(shadow_plan(), "shop", "ns", OWNER)


def test_gateway_api_mirrors_by_percent_to_the_candidate() -> None:
    (route,) = GatewayApiRouter(ParentRef("gw")).render(shadow_plan(15), "shop", "ns", OWNER)
    last = route["spec"]["rules"][-1]
    assert last["backendRefs"] == [{"kind": "Service", "name": "shop-a1b2c3d4e5", "port": 8000, "weight": 100}]
    assert last["filters"] == [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"kind": "Service", "name": "shop-f6e5d4c3b2", "port": 8000}, "percent": 15}}]  # fmt: skip
    # The forced-variant rules name only routed backends: no user request can reach the shadowed candidate.
    assert all(r["backendRefs"][0]["name"] != "shop-f6e5d4c3b2" for r in route["spec"]["rules"])


def test_the_comparator_is_scraped_through_the_router_service() -> None:
    ids = Ids(name="shop", namespace="ns", uid="u-1", revision="a1b2c3d4e5")
    sm = build_shadow_servicemonitor(ids)
    assert sm["metadata"]["name"] == "shop-router"
    assert sm["spec"]["selector"] == {"matchLabels": router_selector("shop")}
    assert sm["spec"]["endpoints"][0]["port"] == "shadow-metrics"


class FakeProvider:
    def __init__(self, answers: dict[str, float | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def query_scalar(self, query: str) -> float | None:
        self.asked.append(query)
        for key, value in self.answers.items():
            if key in query:
                return value
        return None

    def query_vector(self, query: str) -> list[tuple[dict[str, str], float]]:
        raise AssertionError("not used")

    def triton_series(self, revision: str, window_s: float) -> object:
        raise AssertionError("not used")


def test_shadow_queries_select_the_pair_and_count_since_the_phase_began() -> None:
    q = shadow_queries("shop", "a1", "b2", 330.4, namespace="ns")
    sel = 'model="shop",stable="a1",candidate="b2",namespace="ns"'
    assert q["compared"] == f'sum(increase(recserve_shadow_requests_total{{{sel},outcome="compared"}}[330s]))'
    assert q["mirrored"] == f'sum(increase(recserve_shadow_requests_total{{{sel},outcome!="dropped"}}[330s]))'
    assert q["overlap"] == (f"sum(increase(recserve_shadow_topk_overlap_sum{{{sel}}}[330s])) / "
                            f"sum(increase(recserve_shadow_topk_overlap_count{{{sel}}}[330s]))")  # fmt: skip
    assert "histogram_quantile(0.99" in q["p99_s"] and "candidate_latency_seconds_bucket" in q["p99_s"]


def test_collect_shadow_turns_series_into_measurements() -> None:
    provider = FakeProvider({
        'outcome="candidate_error"': 5.0, 'outcome!="dropped"': 500.0, 'outcome="compared"': 490.0,
        'outcome="dropped"': 3.0, "histogram_quantile": 0.012, "topk_overlap": 0.25, "rank_concordance": -0.4,
        "abs_diff_mean": 0.1, "max_over_time": 0.6,
    })  # fmt: skip
    m = collect_shadow(provider, model="shop", stable="a1", candidate="b2", window_s=60)  # type: ignore[arg-type]
    assert (m.mirrored, m.compared, m.dropped, m.error_rate) == (500.0, 490.0, 3.0, 0.01)
    assert m.p99_ms == pytest.approx(12.0)
    assert (m.top_k_overlap, m.rank_correlation, m.mean_abs_score_diff, m.max_abs_score_diff) == (0.25, -0.4, 0.1,
                                                                                                   0.6)  # fmt: skip


def test_nothing_compared_reports_no_comparison_values() -> None:
    provider = FakeProvider({})
    m = collect_shadow(provider, model="shop", stable="a1", candidate="b2", window_s=60)  # type: ignore[arg-type]
    assert m.compared is None and m.top_k_overlap is None and m.error_rate is None


def _httproute_schema() -> dict[str, object] | None:
    import yaml

    from recserve_cluster import tools

    crd = (tools.go_module_dir("sigs.k8s.io/gateway-api", tools.GATEWAY_API_VERSION) / "config" / "crd" / "standard"
           / "gateway.networking.k8s.io_httproutes.yaml")  # fmt: skip
    if not crd.exists():
        return None
    doc = yaml.safe_load(crd.read_text())
    version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    schema: dict[str, object] = version["schema"]["openAPIV3Schema"]
    return schema


def test_the_mirroring_httproute_fits_the_gateway_api_crd_the_test_cluster_installs() -> None:
    """Structural check against the pinned Gateway API's standard-channel HTTPRoute schema (percent exists there)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _httproute_schema()
    if schema is None:
        pytest.skip("the Gateway API module is not in the tools cache (make tools)")
    (route,) = GatewayApiRouter(ParentRef("gw")).render(shadow_plan(15), "shop", "ns", OWNER)
    jsonschema.validate(route, schema)
    route["spec"]["rules"][-1]["filters"][0]["requestMirror"]["percent"] = 150  # the check can fail
    with pytest.raises(jsonschema.ValidationError, match="maximum of 100"):
        jsonschema.validate(route, schema)
    mirror = schema["properties"]["spec"]["properties"]["rules"]["items"]["properties"]["filters"]["items"][  # type: ignore[index]
        "properties"]["requestMirror"]["properties"]  # fmt: skip
    assert "percent" in mirror and "fraction" in mirror


def test_gateway_api_mirroring_is_judged_on_the_candidates_own_triton_series() -> None:
    from recserve_operator.metrics.base import TritonSeries, collect_mirrored
    from recserve_operator.rollout.analysis import Verdict, evaluate_shadow
    from recserve_operator.rollout.policy import RolloutPolicy

    class Triton(FakeProvider):
        def triton_series(self, revision: str, window_s: float) -> TritonSeries:  # type: ignore[override]
            assert (revision, window_s) == ("b2", 120)
            return TritonSeries(requests=300.0, error_rate=0.0, p99_ms=9.0, p99_is_average=False)

    m = collect_mirrored(Triton({}), candidate="b2", window_s=120)  # type: ignore[arg-type]
    assert (m.mirrored, m.compared, m.error_rate, m.p99_ms, m.top_k_overlap) == (300.0, 300.0, 0.0, 9.0, None)
    policy = RolloutPolicy.from_spec({
        "strategy": "canary", "steps": [{"weight": 10}], "analysis": {"prometheus": "http://p:9090"},
        "routing": {"provider": "gatewayAPI", "parentRef": {"name": "gw"}}, "shadow": {"maxP99LatencyMs": 20},
    })  # fmt: skip
    assert policy.shadow is not None
    result = evaluate_shadow(policy.shadow, m)
    assert result.verdict is Verdict.PASS and {c.name for c in result.checks} == {"p99LatencyMs", "errorRate"}
