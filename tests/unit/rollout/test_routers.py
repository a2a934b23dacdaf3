"""Traffic plans and their renderings: golden files, sticky-assignment properties, the router factory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from recserve_operator.names import is_router, model_of
from recserve_operator.rollout.machine import TrafficWeights
from recserve_operator.rollout.policy import ParentRef, RoutingPolicy, RoutingProvider
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.routers.base import BuiltinRouter, GatewayApiRouter, UnknownRouterError, get_router
from recserve_operator.routers.builtin import (
    GRPC_ROUTER_PORT,
    GRPC_SERVICE_PORT,
    NginxSettings,
    assign_variant,
    build_router_configmap,
    build_router_deployment,
    build_router_service,
    murmur2,
    render_local_nginx_conf,
    render_nginx_conf,
)
from recserve_operator.routers.gateway_api import build_httproute
from recserve_operator.routers.plan import Backend, TrafficPlan, build_traffic_plan
from recserve_operator.settings import OperatorDefaults

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "routers"
OWNER = {"apiVersion": "recserve.dev/v1alpha1", "kind": "RecommenderModel", "name": "shop", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": True}  # fmt: skip
ROUTING = RoutingPolicy()
PROGRESSING = RolloutState(phase=Phase.PROGRESSING, stable_revision="a1b2c3d4e5", revision="f6e5d4c3b2", weight=30)


def plan(weight: int = 30, routable: bool = True) -> TrafficPlan:
    return build_traffic_plan("shop", PROGRESSING.evolve(weight=weight), TrafficWeights(100 - weight, weight, routable),
                              ROUTING)  # fmt: skip


def golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("RECSERVE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path}; run with RECSERVE_UPDATE_GOLDEN=1"
    assert actual == path.read_text(), f"{name} changed; review and rerun with RECSERVE_UPDATE_GOLDEN=1"


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the nginx.conf in the ConfigMap) as literal blocks, so golden diffs stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False)


def dump_all(objs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objs, Dumper=_BlockDumper, sort_keys=False)


# ---------------------------------------------------------------- plan


def test_plan_routes_to_per_revision_services() -> None:
    p = plan()
    assert p.backends == (
        Backend("stable", "a1b2c3d4e5", "shop-a1b2c3d4e5", 70),
        Backend("canary", "f6e5d4c3b2", "shop-f6e5d4c3b2", 30),
    )


def test_plan_drops_a_candidate_that_is_not_routable() -> None:
    p = plan(weight=0, routable=False)
    assert [b.variant for b in p.backends] == ["stable"]
    assert p.canary_weight == 0


def test_plan_after_promotion_points_stable_at_the_new_revision() -> None:
    promoted = RolloutState(phase=Phase.PROMOTED, stable_revision="f6e5d4c3b2", revision="f6e5d4c3b2")
    p = build_traffic_plan("shop", promoted, TrafficWeights.stable_only(), ROUTING)
    assert p.backends == (Backend("stable", "f6e5d4c3b2", "shop-f6e5d4c3b2", 100),)


def test_plan_rejects_weights_not_adding_to_100() -> None:
    with pytest.raises(ValueError, match="add up to 100"):
        TrafficPlan((Backend("stable", "a", "s-a", 90),), "x-user-id", "x-recserve-variant")


def test_plan_round_trips_through_the_router_configmaps_plan_json() -> None:
    p = plan()
    cm = build_router_configmap("shop", "ns", p, OWNER)
    assert TrafficPlan.from_dict(json.loads(cm["data"]["plan.json"])) == p


# ---------------------------------------------------------------- golden renderings


def test_nginx_conf_golden() -> None:
    golden("nginx-canary-30.conf", render_nginx_conf(plan()))


def test_nginx_conf_stable_only_golden() -> None:
    golden("nginx-stable-only.conf", render_nginx_conf(plan(0, routable=False)))


def test_local_nginx_conf_golden() -> None:
    conf = render_local_nginx_conf(plan(), {"stable": "127.0.0.1:8000", "canary": "127.0.0.1:9000"}, "/run/rs", 8080)
    golden("nginx-local.conf", conf)


def test_httproute_golden() -> None:
    route = build_httproute(plan(), "shop", "shop", ParentRef("shop-gw", "gateways", "http"), owner_ref=OWNER)
    golden("httproute-canary-30.yaml", dump(route))


def test_builtin_router_objects_golden() -> None:
    objs = BuiltinRouter().render(plan(), "shop", "shop", OWNER)
    golden("builtin-router-objects.yaml", dump_all(objs))


def test_httproute_forced_variant_rules_come_first() -> None:
    route = build_httproute(plan(), "m", "ns", ParentRef("gw"))
    rules = route["spec"]["rules"]
    assert [r["matches"][0].get("headers", [{}])[0].get("value") for r in rules] == ["stable", "canary", None]
    assert [b["weight"] for b in rules[-1]["backendRefs"]] == [70, 30]
    assert all(b["port"] == 8000 for r in rules for b in r["backendRefs"])


def test_router_deployment_is_restricted_and_read_only() -> None:
    dep = build_router_deployment("m", "ns", "abc")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/var/cache/nginx"}
    assert c["image"] == "nginxinc/nginx-unprivileged:1.27-alpine"
    assert c["ports"][0]["containerPort"] == 8080
    assert dep["spec"]["template"]["metadata"]["annotations"]["recserve.dev/router-config-hash"] == "abc"


def test_router_service_selects_router_pods() -> None:
    svc = build_router_service("m", "ns")
    dep = build_router_deployment("m", "ns", "abc")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_a_weight_change_changes_the_config_hash() -> None:
    a = BuiltinRouter().render(plan(10), "m", "ns")[1]["spec"]["template"]["metadata"]["annotations"]
    b = BuiltinRouter().render(plan(50), "m", "ns")[1]["spec"]["template"]["metadata"]["annotations"]
    assert a != b


# ---------------------------------------------------------------- factory


def test_get_router_builds_each_provider() -> None:
    assert isinstance(get_router("builtin"), BuiltinRouter)
    gw = get_router("gatewayAPI", RoutingPolicy(provider=RoutingProvider.GATEWAY_API, parent_ref=ParentRef("gw")))
    assert isinstance(gw, GatewayApiRouter)


@pytest.mark.parametrize("name", ["istio", "", "GatewayAPI"])
def test_get_router_raises_on_unknown_names(name: str) -> None:
    with pytest.raises(UnknownRouterError, match="unknown routing provider"):
        get_router(name)


# ---------------------------------------------------------------- sticky assignment


def test_murmur2_matches_reference_vectors() -> None:
    # Pinned from this implementation after it predicted real nginx 1.22's split_clients choice for 2000
    # users; the dataplane test re-checks against a running nginx.
    assert murmur2(b"") == 0
    assert [murmur2(x) for x in (b"a", b"abcd", b"user-42:rev", b"hello world")] == [
        2456313694, 646393889, 1882780288, 1151865881,
    ]  # fmt: skip


users = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(user=users, w1=st.integers(0, 100), w2=st.integers(0, 100), salt=st.sampled_from(["a1b2c3", "f6e5d4"]))
def test_users_only_move_to_the_candidate_as_its_weight_grows(user: str, w1: int, w2: int, salt: str) -> None:
    lo, hi = sorted((w1, w2))
    if assign_variant(user, lo, salt) == "canary":
        assert assign_variant(user, hi, salt) == "canary"


@settings(max_examples=30, deadline=None)
@given(weight=st.integers(1, 99), seed=st.integers(0, 10**6))
def test_sticky_split_follows_the_weight(weight: int, seed: int) -> None:
    n = 4000
    share = sum(assign_variant(f"u{seed}-{i}", weight, "rev") == "canary" for i in range(n)) / n
    # Binomial sd <= 0.8pp at n=4000; 4 sd keeps the property test deterministic-in-practice.
    assert abs(share - weight / 100) < 0.032


def test_edge_weights_send_everyone_one_way() -> None:
    assert {assign_variant(f"u{i}", 0, "r") for i in range(100)} == {"stable"}
    assert {assign_variant(f"u{i}", 100, "r") for i in range(100)} == {"canary"}


def test_unsafe_values_never_reach_the_nginx_config() -> None:
    bad = TrafficPlan((Backend("stable", "r1", "svc;evil", 100),), "x-user-id", "x-recserve-variant")
    with pytest.raises(ValueError, match="unsafe nginx config value"):
        render_nginx_conf(bad)


def test_builtin_router_objects_pass_the_kubernetes_schema() -> None:
    for obj in BuiltinRouter().render(plan(), "shop", "shop", OWNER):
        kubernetes_validate.validate(obj, "1.35.0", strict=True)


# ---------------------------------------------------------------- nginx itself checks the configs

NGINX = "/usr/sbin/nginx"
LOCAL = NginxSettings(listen_port=8080, runtime_dir="/run/rs", error_log="/run/rs/error.log",
                      access_log="/run/rs/access.log", worker_processes="2",
                      upstreams={"stable": "127.0.0.1:8000", "canary": "127.0.0.1:9000"}, grpc_listen_port=None)
NGINX_CASES = [
    ("the canary at 30% golden config", plan(), NginxSettings()),
    ("the stable-only golden config", plan(0, routable=False), NginxSettings()),
    ("the router ConfigMap's namespaced config", plan(), NginxSettings(namespace="shop")),
    ("the local data plane's golden config", plan(), LOCAL),
    ("the local data plane with gRPC", plan(), dataclasses.replace(LOCAL, grpc_listen_port=8081,
                                                                   grpc_upstreams={"stable": "127.0.0.1:8001",
                                                                                   "canary": "127.0.0.1:9001"})),
    ("a candidate at 100%", plan(100), NginxSettings()),
]  # fmt: skip
_SERVER = re.compile(r"^(\s*server) \S+;$", re.MULTILINE)


@pytest.mark.skipif(not Path(NGINX).exists(), reason=f"{NGINX} is absent (apt-get install nginx) to check configs")
@pytest.mark.parametrize(("name", "the_plan", "settings_"), NGINX_CASES, ids=[c[0] for c in NGINX_CASES])
def test_nginx_accepts_the_generated_config(
    name: str, the_plan: TrafficPlan, settings_: NginxSettings, tmp_path: Path
) -> None:
    """`nginx -t` on the config, with only what the sandbox lacks swapped: upstream hosts that resolve only in the
    cluster (nginx resolves them at load) become 127.0.0.1, the runtime directory a temporary one."""
    def rebase(path: str) -> str:
        return path.replace(settings_.runtime_dir.rstrip("/"), str(tmp_path), 1)

    checked = dataclasses.replace(
        settings_,
        runtime_dir=str(tmp_path),
        error_log=rebase(settings_.error_log),
        access_log=rebase(settings_.access_log),
        upstreams={be.variant: "127.0.0.1:8000" for be in the_plan.backends},
        grpc_upstreams={be.variant: "127.0.0.1:8001" for be in the_plan.backends},
    )
    conf = render_nginx_conf(the_plan, checked)

    def blank(text: str, runtime: str) -> str:
        return _SERVER.sub(r"\1 ADDR;", text.replace(runtime.rstrip("/"), "RUNTIME"))

    # The swap touches nothing else: with runtime paths and server addresses blanked, it is the same config.
    assert blank(conf, str(tmp_path)) == blank(render_nginx_conf(the_plan, settings_), settings_.runtime_dir)
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    result = subprocess.run([NGINX, "-t", "-q", "-p", f"{tmp_path}/", "-e", str(tmp_path / "startup.log"), "-c",
                             str(path)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, f"nginx -t rejected {name}:\n{result.stderr}\n{conf}"


# ---------------------------------------------------------------- gRPC routing


def _grpc_server(conf: str) -> str:
    start = conf.index(f"listen {GRPC_ROUTER_PORT} http2;")
    return conf[start : conf.index("}\n    }", start)]


GRPC_CASES = [
    ("gRPC goes to the Triton gRPC port of each revision", plan(),
     ["upstream recserve_grpc_stable {\n        server shop-a1b2c3d4e5:8001;",
      "upstream recserve_grpc_canary {\n        server shop-f6e5d4c3b2:8001;"]),
    ("gRPC picks the upstream with the same variable as HTTP", plan(),
     ["grpc_pass grpc://recserve_grpc_$recserve_variant;", "proxy_pass http://recserve_$recserve_variant;"]),
    ("gRPC listens with HTTP/2 on its own port", plan(), [f"listen {GRPC_ROUTER_PORT} http2;"]),
    ("a stable-only plan routes gRPC to stable alone", plan(0, routable=False),
     ["upstream recserve_grpc_stable {"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "the_plan", "fragments"), GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_routing(name: str, the_plan: TrafficPlan, fragments: list[str]) -> None:
    conf = render_nginx_conf(the_plan)
    for fragment in fragments:
        assert fragment in conf, fragment


def test_grpc_uses_the_same_weights_and_sticky_split_as_http() -> None:
    """One split_clients and one variant map serve both servers, so a user lands on one variant for both APIs."""
    conf = render_nginx_conf(plan(30))
    assert conf.count("split_clients") == 1 and conf.count("map $http_x_recserve_variant") == 1
    assert "30% canary;" in conf
    assert "X-RecServe-Variant $recserve_variant" in _grpc_server(conf)


def test_a_stable_only_plan_has_no_canary_grpc_upstream() -> None:
    assert "recserve_grpc_canary" not in render_nginx_conf(plan(0, routable=False))


def test_local_configs_route_grpc_only_when_asked() -> None:
    ups = {"stable": "127.0.0.1:8000"}
    assert "grpc_pass" not in render_local_nginx_conf(plan(0, routable=False), ups, "/run/rs", 8080)
    conf = render_local_nginx_conf(plan(0, routable=False), ups, "/run/rs", 8080,
                                   grpc_upstreams={"stable": "127.0.0.1:8001"}, grpc_listen_port=9081)  # fmt: skip
    assert "listen 9081 http2;" in conf and "server 127.0.0.1:8001;" in conf


def test_the_router_service_exposes_grpc_on_the_triton_grpc_port() -> None:
    svc = build_router_service("m", "ns")
    dep = build_router_deployment("m", "ns", "abc")
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc["port"], grpc["targetPort"], grpc["appProtocol"]) == (GRPC_SERVICE_PORT, "grpc", "grpc")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": GRPC_ROUTER_PORT, "protocol": "TCP"} in container["ports"]


# ---------------------------------------------------------------- the router image is an operator setting

IMAGE_CASES = [
    ("the chart's public nginx is the default", {}, "nginxinc/nginx-unprivileged:1.27-alpine"),
    ("RECSERVE_ROUTER_IMAGE overrides it", {"RECSERVE_ROUTER_IMAGE": "registry.local/nginx:test"},
     "registry.local/nginx:test"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "env", "image"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_the_router_image_comes_from_the_operator_settings(name: str, env: dict[str, str], image: str) -> None:
    defaults = OperatorDefaults.from_env(env)
    assert defaults.router_image == image
    objs = get_router("builtin", ROUTING, image=defaults.router_image).render(plan(), "m", "ns")
    (container,) = objs[1]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image


def test_the_charts_router_image_default_matches_the_operators() -> None:
    values = yaml.safe_load((Path(__file__).resolve().parents[3] / "charts/recserve/values.yaml").read_text())
    assert values["defaults"]["routerImage"] == OperatorDefaults().router_image


def test_the_router_pods_go_where_the_operator_settings_place_them() -> None:
    defaults = OperatorDefaults.from_env({
        "RECSERVE_ROUTER_NODE_SELECTOR": '{"node-role.example.com/cpu": "true"}',
        "RECSERVE_ROUTER_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", "value": "edge",'
                                       ' "effect": "NoSchedule"}]',
    })  # fmt: skip
    placement = defaults.router_placement()
    router = get_router("builtin", placement=placement)
    objs = router.render(plan(), "shop", "shop")
    pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.example.com/cpu": "true"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}]
    assert pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


def test_unset_router_placement_adds_nothing_and_bad_json_is_named() -> None:
    assert OperatorDefaults.from_env({}).router_placement() == {}
    with pytest.raises(ValueError, match="RECSERVE_ROUTER_TOLERATIONS must be a JSON list"):
        OperatorDefaults.from_env({"RECSERVE_ROUTER_TOLERATIONS": '{"key": "x"}'})
    with pytest.raises(ValueError, match="RECSERVE_ROUTER_NODE_SELECTOR is not valid JSON"):
        OperatorDefaults.from_env({"RECSERVE_ROUTER_NODE_SELECTOR": "kubernetes.io/os=linux"})


@pytest.mark.parametrize("provider", ["builtin", "gatewayAPI"])
def test_every_router_object_maps_back_to_its_model(provider: str) -> None:
    """The watch caches key owned objects by names.model_of: an edit to a router object reconciles its model, and
    the model's reconcile sees (so it can delete) the router's objects. The builtin router's selector keeps the
    instance label it always had: a live Deployment's selector cannot change."""
    router = get_router(provider, RoutingPolicy(RoutingProvider(provider), ParentRef("gw")))
    for obj in router.render(plan(), "shop", "ns", OWNER):
        assert obj["metadata"]["name"] == "shop-router"
        assert model_of(obj["metadata"]["labels"]) == "shop" and is_router(obj["metadata"]["labels"])
        if obj["kind"] == "Deployment":
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert model_of(template_labels) == "shop"  # router pods too
            assert obj["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "shop-router"
