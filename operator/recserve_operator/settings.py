"""Operator-wide defaults read from the environment (the chart's ConfigMap sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
DEFAULT_BUILDER_IMAGE = "ghcr.io/recserve/model-repo-builder:0.1.0"


@dataclass(frozen=True)
class OperatorDefaults:
    """Values a RecommenderModel may leave unset, plus how the operator itself runs."""

    triton_image: str = DEFAULT_TRITON_IMAGE
    builder_image: str = DEFAULT_BUILDER_IMAGE
    prometheus_url: str = "http://prometheus.monitoring:9090"
    cluster_domain: str = "cluster.local"
    image_pull_policy: str = "IfNotPresent"
    # Namespaces to watch; empty means the whole cluster.
    watch_namespaces: tuple[str, ...] = ()
    metrics_port: int = 9090
    # Drift and readiness resync period: the timer only reads the watch caches, so it is cheap.
    resync_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorDefaults:
        e = os.environ if env is None else env
        namespaces = tuple(n.strip() for n in e.get("RECSERVE_WATCH_NAMESPACES", "").split(",") if n.strip())
        return cls(
            triton_image=e.get("RECSERVE_TRITON_IMAGE", DEFAULT_TRITON_IMAGE),
            builder_image=e.get("RECSERVE_BUILDER_IMAGE", DEFAULT_BUILDER_IMAGE),
            prometheus_url=e.get("RECSERVE_PROMETHEUS_URL", cls.prometheus_url),
            cluster_domain=e.get("RECSERVE_CLUSTER_DOMAIN", cls.cluster_domain),
            image_pull_policy=e.get("RECSERVE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            watch_namespaces=namespaces,
            metrics_port=int(e.get("RECSERVE_METRICS_PORT", str(cls.metrics_port))),
            resync_seconds=float(e.get("RECSERVE_RESYNC_SECONDS", str(cls.resync_seconds))),
        )
