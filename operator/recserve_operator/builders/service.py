"""Services: one per revision (canary/A-B backends) and a stable front Service selecting the stable revision."""

from __future__ import annotations

from typing import Any

from recserve_operator.builders.common import GRPC_PORT, HTTP_PORT, METRICS_PORT, Ids, metadata, revision_selector
from recserve_operator.spec import RecommenderModelSpec


def _ports() -> list[dict[str, Any]]:
    return [
        {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"},
    ]


def build_revision_service(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
    """The backend of one revision: routers and HTTPRoutes point at it by name."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ids, ids.revision_name),
        "spec": {"type": "ClusterIP", "selector": revision_selector(ids), "ports": _ports()},
    }


def build_stable_service(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
    """`<name>`: the endpoint clients use; `ids.revision` is the stable revision it selects."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        # No revision label: the front Service outlives every revision.
        "metadata": metadata(ids, ids.name, revision=False),
        # Metrics are scraped per revision; the front Service carries only traffic ports.
        "spec": {"type": "ClusterIP", "selector": revision_selector(ids), "ports": _ports()[:2]},
    }
