"""Operator-wide defaults read from the environment (the chart's ConfigMap sets them)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
DEFAULT_BUILDER_IMAGE = "ghcr.io/recserve/model-repo-builder:0.1.0"
# Serving pods fetch a built artifact with the operator's image (Python, boto3, no TensorFlow): a scale-out pulls
# nothing the size of the builder.
DEFAULT_FETCHER_IMAGE = "ghcr.io/recserve/operator:0.1.0"
# The built-in router's nginx (public, unprivileged: uid 101, read-only root); the chart's defaults.routerImage.
DEFAULT_ROUTER_IMAGE = "nginxinc/nginx-unprivileged:1.27-alpine"


@dataclass(frozen=True)
class OperatorDefaults:
    """Values a RecommenderModel may leave unset, plus how the operator itself runs."""

    triton_image: str = DEFAULT_TRITON_IMAGE
    builder_image: str = DEFAULT_BUILDER_IMAGE
    router_image: str = DEFAULT_ROUTER_IMAGE
    # Where the builtin router's nginx pods run (CPU nodes): pod nodeSelector and tolerations.
    router_node_selector: Mapping[str, str] = field(default_factory=dict)
    router_tolerations: tuple[Mapping[str, Any], ...] = ()
    prometheus_url: str = "http://prometheus.monitoring:9090"
    cluster_domain: str = "cluster.local"
    image_pull_policy: str = "IfNotPresent"
    # Namespaces to watch; empty means the whole cluster.
    watch_namespaces: tuple[str, ...] = ()
    metrics_port: int = 9090
    # Drift and readiness resync period: the timer only reads the watch caches, so it is cheap.
    resync_seconds: float = 10.0
    # Build once per revision: a build Job publishes to this model store (s3://bucket[/prefix]) and serving pods
    # only fetch and verify the artifact. Empty: every pod builds in its init container.
    model_store: str = ""
    model_store_endpoint: str = ""  # S3 endpoint of a non-AWS store
    # The Secret (in each model's namespace) with the store's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    model_store_secret: str = ""
    # "namespace/name" of a Secret holding those keys that the operator copies, as model_store_secret, into each
    # model's namespace before its build (cluster mode with the chart's embedded store: the chart cannot know the
    # namespaces). Empty: model_store_secret is put in each namespace by someone else (the chart, in namespaced
    # mode, or the user).
    model_store_secret_source: str = ""
    fetcher_image: str = DEFAULT_FETCHER_IMAGE
    # Artifacts no running revision uses that a build keeps (the most recent), so a quick return fetches.
    model_store_keep: int = 2

    def __post_init__(self) -> None:
        source = self.model_store_secret_source
        if source and (source.count("/") != 1 or not all(source.split("/")) or not self.model_store_secret):
            raise ValueError(f"RECSERVE_MODEL_STORE_SECRET_SOURCE must be namespace/name, with "
                             f"RECSERVE_MODEL_STORE_SECRET naming the copies, got {source!r}")  # fmt: skip

    @property
    def builds_once(self) -> bool:
        return bool(self.model_store)

    @property
    def store_secret_source(self) -> tuple[str, str] | None:
        """(namespace, name) of the keys Secret the operator copies into model namespaces, if it does."""
        if not self.model_store_secret_source:
            return None
        namespace, name = self.model_store_secret_source.split("/")
        return namespace, name

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorDefaults:
        e = os.environ if env is None else env
        namespaces = tuple(n.strip() for n in e.get("RECSERVE_WATCH_NAMESPACES", "").split(",") if n.strip())
        return cls(
            triton_image=e.get("RECSERVE_TRITON_IMAGE", DEFAULT_TRITON_IMAGE),
            builder_image=e.get("RECSERVE_BUILDER_IMAGE", DEFAULT_BUILDER_IMAGE),
            router_image=e.get("RECSERVE_ROUTER_IMAGE", DEFAULT_ROUTER_IMAGE),
            router_node_selector=_json_env(e, "RECSERVE_ROUTER_NODE_SELECTOR", dict),
            router_tolerations=tuple(_json_env(e, "RECSERVE_ROUTER_TOLERATIONS", list)),
            prometheus_url=e.get("RECSERVE_PROMETHEUS_URL", cls.prometheus_url),
            cluster_domain=e.get("RECSERVE_CLUSTER_DOMAIN", cls.cluster_domain),
            image_pull_policy=e.get("RECSERVE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            watch_namespaces=namespaces,
            metrics_port=int(e.get("RECSERVE_METRICS_PORT", str(cls.metrics_port))),
            resync_seconds=float(e.get("RECSERVE_RESYNC_SECONDS", str(cls.resync_seconds))),
            model_store=e.get("RECSERVE_MODEL_STORE", ""),
            model_store_endpoint=e.get("RECSERVE_MODEL_STORE_ENDPOINT", ""),
            model_store_secret=e.get("RECSERVE_MODEL_STORE_SECRET", ""),
            model_store_secret_source=e.get("RECSERVE_MODEL_STORE_SECRET_SOURCE", "").strip(),
            fetcher_image=e.get("RECSERVE_FETCHER_IMAGE", DEFAULT_FETCHER_IMAGE),
            model_store_keep=int(e.get("RECSERVE_MODEL_STORE_KEEP", str(cls.model_store_keep))),
        )

    def router_placement(self) -> dict[str, Any]:
        """Pod-spec fields for the router pods (empty when unset)."""
        out: dict[str, Any] = {}
        if self.router_node_selector:
            out["nodeSelector"] = dict(self.router_node_selector)
        if self.router_tolerations:
            out["tolerations"] = [dict(t) for t in self.router_tolerations]
        return out


@dataclass(frozen=True)
class Runtime:
    """How the operator process runs (not model defaults): its workers, resync periods and leader election."""

    # Worker threads reconciling model keys from the work queue (one key is never reconciled twice at once).
    workers: int = 8
    # A model whose strategy acts on time (canary, abTest: steps, pauses, analysis) is reconciled every
    # OperatorDefaults.resync_seconds; an `immediate` model whose last reconcile changed nothing waits this long
    # (its changes arrive as watch events; the resync only covers what no watch shows, e.g. a ServiceMonitor).
    idle_resync_seconds: float = 300.0
    # Leader election (coordination.k8s.io Lease): on with more than one replica. Off: this process reconciles.
    leader_election: bool = False
    lease_name: str = "recserve-operator"
    lease_namespace: str = ""
    identity: str = ""
    lease_duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0
    # While the installed RecommenderModel CRD is not the one this operator expects (crd_schema.py), look again
    # this often, so the error and the metric clear once the CRD is applied (a current CRD is not looked at again).
    crd_recheck_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"RECSERVE_WORKERS must be at least 1, got {self.workers}")
        if self.leader_election and not self.lease_namespace:
            raise ValueError("leader election needs RECSERVE_LEASE_NAMESPACE (or POD_NAMESPACE)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, watch_namespaces: tuple[str, ...] = ()) -> Runtime:
        e = os.environ if env is None else env
        election = e.get("RECSERVE_LEADER_ELECTION", "false").strip().lower() in ("1", "true", "yes")
        namespace = e.get("RECSERVE_LEASE_NAMESPACE") or e.get("POD_NAMESPACE") or _service_account_namespace()
        return cls(
            workers=int(e.get("RECSERVE_WORKERS", str(cls.workers))),
            idle_resync_seconds=float(e.get("RECSERVE_IDLE_RESYNC_SECONDS", str(cls.idle_resync_seconds))),
            leader_election=election,
            lease_name=e.get("RECSERVE_LEASE_NAME", cls.lease_name),
            lease_namespace=namespace or (watch_namespaces[0] if watch_namespaces else ""),
            identity=e.get("RECSERVE_IDENTITY") or e.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            lease_duration_seconds=float(e.get("RECSERVE_LEASE_DURATION_SECONDS", str(cls.lease_duration_seconds))),
            renew_deadline_seconds=float(e.get("RECSERVE_RENEW_DEADLINE_SECONDS", str(cls.renew_deadline_seconds))),
            retry_period_seconds=float(e.get("RECSERVE_RETRY_PERIOD_SECONDS", str(cls.retry_period_seconds))),
            crd_recheck_seconds=float(e.get("RECSERVE_CRD_RECHECK_SECONDS", str(cls.crd_recheck_seconds))),
        )


def _service_account_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


J = TypeVar("J", dict, list)  # type: ignore[type-arg]


def _json_env(env: Mapping[str, str], key: str, kind: type[J]) -> J:
    raw = env.get(key, "").strip()
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{key} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value
