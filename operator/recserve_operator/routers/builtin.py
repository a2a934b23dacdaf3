"""Built-in router: an nginx config rendered from the traffic plan, plus its ConfigMap/Deployment/Service."""

# Sticky assignment uses nginx's `split_clients`, which hashes the key with MurmurHash2 and gives each
# entry a *cumulative* slice of the 32-bit hash space in listed order. The candidate is listed first, so at
# weight w it owns hashes [0, w% * 2^32): growing w only grows that slice, so a user moves from stable to
# the candidate only when the candidate's share grows and never back. `assign_variant` reproduces the
# exact nginx arithmetic so tests can predict nginx's choice per user. The key is the sticky header plus the
# candidate revision as a salt: each new candidate gets a fresh sample of users, but within one rollout
# assignment is fixed. Requests without the header fall back to `$request_id` (random per request), which
# still splits by weight.

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from recserve_operator.names import ROUTER_CONFIG_HASH_ANNOTATION, router_labels, router_name, router_selector
from recserve_operator.routers.plan import CANARY, STABLE, Shadow, TrafficPlan
from recserve_operator.settings import DEFAULT_ROUTER_IMAGE

__all__ = [
    "DEFAULT_IMAGE",
    "GRPC_ROUTER_PORT",
    "GRPC_SERVICE_PORT",
    "ROUTER_PORT",
    "Block",
    "Directive",
    "NginxSettings",
    "assign_variant",
    "build_router_configmap",
    "build_router_deployment",
    "build_router_service",
    "config_hash",
    "header_variable",
    "murmur2",
    "render_local_nginx_conf",
    "render_nginx_conf",
]

DEFAULT_IMAGE = DEFAULT_ROUTER_IMAGE  # the operator passes its router_image setting (RECSERVE_ROUTER_IMAGE)
ROUTER_PORT = 8080
PRESTOP_SLEEP_S = 5
SERVICE_PORT = 8000  # clients keep talking to the Triton HTTP port number
BACKEND_PORT = 8000
GRPC_ROUTER_PORT = 8081
GRPC_SERVICE_PORT = 8001  # clients keep talking to the Triton gRPC port number
GRPC_BACKEND_PORT = 8001
CONF_KEY = "nginx.conf"
PLAN_KEY = "plan.json"  # the same plan as data, for local routers (recserve_cluster.dataplane)
CONF_DIR = "/etc/recserve-router"
_SAFE_ARG = re.compile(r'^[^\s;{}"\'\\#]+\Z')  # \Z: $ would pass a value that ends in a newline
_UPSTREAM_PREFIX = "recserve_"
_GRPC_UPSTREAM_PREFIX = "recserve_grpc_"
_VARIANT_VAR = "$recserve_variant"
# Shadow phase: nginx mirrors a sampled share of KServe v2 infer requests to the comparator sidecar
# (recserve_operator.shadow) on the pod's loopback; the comparator answers at once and compares later.
SHADOW_INTAKE_PORT = 9098
SHADOW_METRICS_PORT = 9099
SHADOW_LOCATION = "/_recserve_shadow"
SHADOW_CONTAINER = "shadow-comparator"
_INFER_LOCATION = "^/v2/models/[^/]+(/versions/[^/]+)?/infer$"
_SHADOW_VAR = "$recserve_shadow_sampled"


# ---------------------------------------------------------------- hashing (mirrors nginx exactly)


def murmur2(data: bytes) -> int:
    """nginx's ngx_murmur_hash2 (MurmurHash2, seed 0, little-endian 4-byte blocks)."""
    m = 0x5BD1E995
    mask = 0xFFFFFFFF
    length = len(data)
    h = length & mask
    i = 0
    while length - i >= 4:
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
        i += 4
    rest = length - i
    if rest == 3:
        h ^= data[i + 2] << 16
    if rest >= 2:
        h ^= data[i + 1] << 8
    if rest >= 1:
        h ^= data[i]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def split_key(user: str, salt: str) -> str:
    return f"{user}:{salt}"


def assign_variant(user: str, canary_weight: int, salt: str) -> str:
    """The variant nginx's split_clients picks for `user` at `canary_weight` percent (same arithmetic)."""
    if canary_weight <= 0:
        return STABLE
    if canary_weight >= 100:
        return CANARY
    threshold = canary_weight * 100 * 0xFFFFFFFF // 10000
    return CANARY if murmur2(split_key(user, salt).encode()) < threshold else STABLE


# ---------------------------------------------------------------- a small nginx config builder


def _arg(value: str) -> str:
    # Plan values are DNS names, revisions, header names and paths: refuse anything that could break out.
    if not _SAFE_ARG.match(value):
        raise ValueError(f"unsafe nginx config value: {value!r}")
    return value


@dataclass(frozen=True)
class Directive:
    name: str
    args: tuple[str, ...] = ()

    def render(self, indent: int) -> list[str]:
        parts = [self.name, *self.args]
        return ["    " * indent + " ".join(parts) + ";"]


@dataclass(frozen=True)
class Block:
    name: str
    args: tuple[str, ...] = ()
    children: tuple[Directive | Block, ...] = field(default_factory=tuple)

    def render(self, indent: int) -> list[str]:
        head = " ".join([self.name, *self.args])
        lines = ["    " * indent + head + " {"]
        for child in self.children:
            lines.extend(child.render(indent + 1))
        lines.append("    " * indent + "}")
        return lines


def d(name: str, *args: str) -> Directive:
    return Directive(name, tuple(args))


def b(name: str, args: Sequence[str], *children: Directive | Block) -> Block:
    return Block(name, tuple(args), tuple(children))


def render_config(items: Sequence[Directive | Block]) -> str:
    lines: list[str] = []
    for item in items:
        lines.extend(item.render(0))
    return "\n".join(lines) + "\n"


def header_variable(header: str) -> str:
    """nginx's variable for a request header: lower case, dashes to underscores."""
    return "$http_" + _arg(header).lower().replace("-", "_")


# ---------------------------------------------------------------- nginx.conf


@dataclass(frozen=True)
class NginxSettings:
    """Where nginx keeps its runtime files; the defaults suit the unprivileged image with a read-only root."""

    listen_port: int = ROUTER_PORT
    runtime_dir: str = "/tmp"
    error_log: str = "/dev/stderr"
    access_log: str = "/dev/stdout"
    worker_processes: str = "auto"
    upstreams: Mapping[str, str] = field(default_factory=dict)  # variant -> "host:port" override
    # gRPC (HTTP/2) server routing Triton's gRPC API by the same weights; None: HTTP only (local data planes).
    grpc_listen_port: int | None = GRPC_ROUTER_PORT
    grpc_upstreams: Mapping[str, str] = field(default_factory=dict)  # variant -> "host:port" override
    shadow_intake: str = f"127.0.0.1:{SHADOW_INTAKE_PORT}"  # the comparator (a sidecar on the pod's loopback)
    namespace: str | None = None  # for fully-qualified Service DNS names
    user: str | None = None  # only meaningful when nginx starts as root (local runs)


def _upstream_address(variant: str, service: str, settings: NginxSettings, *, grpc: bool = False) -> str:
    overrides = settings.grpc_upstreams if grpc else settings.upstreams
    if variant in overrides:
        return overrides[variant]
    # No ".cluster.local": the cluster domain varies; the pod resolv.conf search list completes ".svc".
    host = f"{service}.{settings.namespace}.svc" if settings.namespace else service
    return f"{host}:{GRPC_BACKEND_PORT if grpc else BACKEND_PORT}"


def _upstreams(plan: TrafficPlan, s: NginxSettings, *, grpc: bool) -> tuple[Block, ...]:
    prefix = _GRPC_UPSTREAM_PREFIX if grpc else _UPSTREAM_PREFIX
    return tuple(
        b("upstream", [prefix + _arg(be.variant)],
          d("server", _arg(_upstream_address(be.variant, be.service, s, grpc=grpc))),
          d("keepalive", "32"))
        for be in plan.backends
    )  # fmt: skip


def _grpc_server(s: NginxSettings) -> tuple[Block, ...]:
    if s.grpc_listen_port is None:
        return ()
    return (
        b(
            "server",
            [],
            # `listen ... http2` rather than the `http2 on` directive: nginx before 1.25.1 (Debian 12's 1.22,
            # the local stand-in) only knows this form; newer nginx accepts it with a deprecation warning.
            d("listen", str(s.grpc_listen_port), "http2"),
            b(
                "location",
                ["/"],
                d("grpc_pass", f"grpc://{_GRPC_UPSTREAM_PREFIX}{_VARIANT_VAR}"),
                d("grpc_read_timeout", "60s"),
                d("client_max_body_size", "64m"),
                d("add_header", "X-RecServe-Variant", _VARIANT_VAR, "always"),
            ),
        ),
    )


def _proxy_directives() -> tuple[Directive, ...]:
    return (
        d("proxy_pass", f"http://{_UPSTREAM_PREFIX}{_VARIANT_VAR}"),
        d("proxy_http_version", "1.1"),
        d("proxy_set_header", "Connection", '""'),
        d("proxy_set_header", "Host", "$host"),
        d("proxy_read_timeout", "60s"),
        d("client_max_body_size", "64m"),
        d("add_header", "X-RecServe-Variant", _VARIANT_VAR, "always"),
    )


def _shadow_http(shadow: Shadow | None, s: NginxSettings) -> tuple[Directive | Block, ...]:
    """The sampling of mirrored requests and the comparator's upstream (http context)."""
    if shadow is None:
        return ()
    sampled = (d("*", "1"),) if shadow.percent >= 100 else (d(f"{shadow.percent}%", "1"), d("*", "0"))
    return (
        # Per request, independent of the user: every user's traffic is sampled alike.
        b("split_clients", ['"${request_id}shadow"', _SHADOW_VAR], *sampled),
        b("upstream", ["recserve_shadow"], d("server", _arg(s.shadow_intake)), d("keepalive", "16")),
    )


def _shadow_locations(shadow: Shadow | None) -> tuple[Block, ...]:
    """Infer requests are mirrored to an internal location; the main request never waits for it (the comparator
    answers 204 at once, and a comparator that is down or slow fails the mirror within 100 ms, never the request).
    Only KServe v2 JSON infer requests are mirrored: the comparator needs both answers as JSON."""
    if shadow is None:
        return ()
    return (
        b(
            "location",
            ["~", _INFER_LOCATION],
            d("mirror", SHADOW_LOCATION),
            # Keep typical ranking bodies in memory: the mirror re-sends the same buffer.
            d("client_body_buffer_size", "1m"),
            *_proxy_directives(),
        ),
        b(
            "location",
            ["=", SHADOW_LOCATION],
            d("internal"),
            d("access_log", "off"),
            b("if", [f"({_SHADOW_VAR}", "=", "0)"], d("return", "204")),
            d("proxy_pass", "http://recserve_shadow$request_uri"),
            d("proxy_http_version", "1.1"),
            d("proxy_set_header", "Connection", '""'),
            d("proxy_connect_timeout", "100ms"),
            d("proxy_send_timeout", "200ms"),
            d("proxy_read_timeout", "200ms"),
        ),
    )


def render_nginx_conf(plan: TrafficPlan, settings: NginxSettings | None = None) -> str:
    """The complete nginx.conf (main context) routing per the plan."""
    s = settings or NginxSettings()
    rt = s.runtime_dir.rstrip("/")
    canary = plan.backend(CANARY)
    salt = canary.revision if canary is not None else ""
    sticky = header_variable(plan.sticky_header)
    forced = header_variable(plan.variant_header)

    if canary is None or canary.weight <= 0:
        split_entries: tuple[Directive, ...] = (d("*", STABLE),)
    elif canary.weight >= 100:
        split_entries = (d("*", CANARY),)
    else:
        # Candidate first: it owns the low end of the hash space, so its slice only grows with its weight.
        split_entries = (d(f"{canary.weight}%", CANARY), d("*", STABLE))
    forced_entries = tuple(d(_arg(be.variant), be.variant) for be in plan.backends)
    upstreams = _upstreams(plan, s, grpc=False)
    if s.grpc_listen_port is not None:
        upstreams += _upstreams(plan, s, grpc=True)
    log_format = (
        "'$remote_addr [$time_iso8601] \"$request\" $status $request_time '"
        " 'variant=$recserve_variant upstream=$upstream_addr'"
    )
    main: list[Directive | Block] = []
    if s.user:
        main.append(d("user", _arg(s.user)))
    main += [
        d("worker_processes", _arg(s.worker_processes)),
        d("pid", _arg(f"{rt}/nginx.pid")),
        d("error_log", _arg(s.error_log), "warn"),
        b("events", [], d("worker_connections", "4096")),
        b(
            "http",
            [],
            d("client_body_temp_path", _arg(f"{rt}/client_temp")),
            d("proxy_temp_path", _arg(f"{rt}/proxy_temp")),
            d("fastcgi_temp_path", _arg(f"{rt}/fastcgi_temp")),
            d("uwsgi_temp_path", _arg(f"{rt}/uwsgi_temp")),
            d("scgi_temp_path", _arg(f"{rt}/scgi_temp")),
            d("log_format", "recserve", log_format),
            d("access_log", _arg(s.access_log), "recserve"),
            d("server_tokens", "off"),
            d("keepalive_requests", "10000"),
            # Sticky key: the user id salted with the candidate revision; no header -> random per request.
            b(
                "map",
                [sticky, "$recserve_split_key"],
                d('""', "$request_id"),
                d("default", f'"{sticky}:{_arg(salt)}"' if salt else sticky),
            ),
            b("split_clients", ["$recserve_split_key", "$recserve_weighted"], *split_entries),
            # A forced-variant header wins over the weighted choice, but only for variants in the plan.
            b("map", [forced, _VARIANT_VAR], *forced_entries, d("default", "$recserve_weighted")),
            *upstreams,
            *_shadow_http(plan.shadow, s),
            b(
                "server",
                [],
                d("listen", str(s.listen_port)),
                b("location", ["=", "/healthz"], d("access_log", "off"), d("return", "200", '"ok\\n"')),
                b("location", ["/"], *_proxy_directives()),
                *_shadow_locations(plan.shadow),
            ),
            *_grpc_server(s),
        ),
    ]
    return render_config(main)


def render_local_nginx_conf(
    plan: TrafficPlan,
    upstreams: Mapping[str, str],
    runtime_dir: str,
    listen_port: int,
    user: str | None = None,
    *,
    grpc_upstreams: Mapping[str, str] | None = None,
    grpc_listen_port: int | None = None,
    shadow_intake: str | None = None,
) -> str:
    """The same config for a local nginx (e.g. Debian's): upstream host:port per variant, files under runtime_dir.

    gRPC is routed only when `grpc_listen_port` is given (with `grpc_upstreams`, the Triton gRPC addresses).
    """
    settings = NginxSettings(
        listen_port=listen_port,
        runtime_dir=runtime_dir,
        error_log=f"{runtime_dir.rstrip('/')}/error.log",
        access_log=f"{runtime_dir.rstrip('/')}/access.log",
        worker_processes="2",
        upstreams=dict(upstreams),
        grpc_listen_port=grpc_listen_port,
        grpc_upstreams=dict(grpc_upstreams or {}),
        user=user,
        **({"shadow_intake": shadow_intake} if shadow_intake else {}),
    )
    return render_nginx_conf(plan, settings)


def config_hash(conf: str) -> str:
    return hashlib.sha256(conf.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- Kubernetes objects


def _meta(model: str, namespace: str, owner_ref: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": router_name(model), "namespace": namespace, "labels": router_labels(model)}
    if owner_ref is not None:
        meta["ownerReferences"] = [dict(owner_ref)]
    return meta


def build_router_configmap(
    model: str, namespace: str, plan: TrafficPlan, owner_ref: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    conf = render_nginx_conf(plan, NginxSettings(namespace=namespace))
    plan_json = json.dumps(plan.to_dict(), sort_keys=True, indent=2)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(model, namespace, owner_ref),
            "data": {CONF_KEY: conf, PLAN_KEY: plan_json}}  # fmt: skip


def build_shadow_container(model: str, namespace: str, plan: TrafficPlan, image: str) -> dict[str, Any] | None:
    """The comparator sidecar for a plan with a shadow target (None without one): RecServe's own image."""
    shadow, stable = plan.shadow, plan.backend(STABLE)
    if shadow is None or stable is None:
        return None

    def url(service: str) -> str:
        return f"http://{_arg(service)}.{_arg(namespace)}.svc:{BACKEND_PORT}"

    return {
        "name": SHADOW_CONTAINER,
        "image": image,
        "command": ["python", "-m", "recserve_operator.shadow"],
        "args": [
            f"--model={model}",
            f"--stable-revision={stable.revision}",
            f"--candidate-revision={shadow.revision}",
            f"--stable-url={url(stable.service)}",
            f"--candidate-url={url(shadow.service)}",
            f"--top-k={shadow.top_k}",
            f"--intake-port={SHADOW_INTAKE_PORT}",
            f"--metrics-port={SHADOW_METRICS_PORT}",
        ],
        "ports": [{"name": "shadow-metrics", "containerPort": SHADOW_METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "shadow-metrics"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def build_router_deployment(
    model: str,
    namespace: str,
    conf_hash: str,
    *,
    image: str = DEFAULT_IMAGE,
    placement: Mapping[str, Any] | None = None,
    replicas: int = 2,
    owner_ref: Mapping[str, Any] | None = None,
    sidecar: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """nginx Deployment; `conf_hash` in the pod template rolls the pods when the routing changes.

    ConfigMap volumes update lazily (up to a minute) and nginx does not watch its config, so a new hash ->
    a rolling update with maxUnavailable 0 is the deterministic way to apply new weights.
    """
    labels = router_labels(model)
    container = {
        "name": "nginx",
        "image": image,
        "command": ["nginx", "-c", f"{CONF_DIR}/{CONF_KEY}", "-g", "daemon off;"],
        "ports": [
            {"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_ROUTER_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
        # A replaced pod keeps accepting connections until every kube-proxy and the API server's endpoint
        # cache have dropped it; only then does nginx stop (gracefully, SIGQUIT is the image's stop signal).
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 101,
            "runAsGroup": 101,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONF_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/var/cache/nginx"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(model, namespace, owner_ref),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": router_selector(model)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {ROUTER_CONFIG_HASH_ANNOTATION: conf_hash}},
                "spec": {
                    **dict(placement or {}),
                    "automountServiceAccountToken": False,
                    # preStop sleep + nginx's graceful stop (SIGQUIT): in-flight requests finish.
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": 101,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container, *([dict(sidecar)] if sidecar else [])],
                    "volumes": [
                        {"name": "config", "configMap": {"name": router_name(model)}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {"name": "cache", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def build_router_service(
    model: str, namespace: str, owner_ref: Mapping[str, Any] | None = None, *, shadow: bool = False
) -> dict[str, Any]:
    """The router's Service; with a shadow target it also names the comparator's metrics port (for Prometheus)."""
    metrics = [{"name": "shadow-metrics", "port": SHADOW_METRICS_PORT, "targetPort": "shadow-metrics",
                "protocol": "TCP"}] if shadow else []  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(model, namespace, owner_ref),
        "spec": {
            "type": "ClusterIP",
            "selector": router_selector(model),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": GRPC_SERVICE_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                *metrics,
            ],
        },
    }
