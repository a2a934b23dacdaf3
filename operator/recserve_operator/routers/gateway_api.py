"""Gateway API router: an HTTPRoute with forced-variant header rules and weighted backendRefs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recserve_operator.names import STICKY_HEADER_ANNOTATION, router_labels, router_name
from recserve_operator.rollout.policy import ParentRef
from recserve_operator.routers.plan import TrafficPlan

__all__ = ["BACKEND_PORT", "build_httproute"]

BACKEND_PORT = 8000


def _parent_ref(ref: ParentRef) -> dict[str, Any]:
    out: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref.name}
    if ref.namespace:
        out["namespace"] = ref.namespace
    if ref.section_name:
        out["sectionName"] = ref.section_name
    return out


def build_httproute(
    plan: TrafficPlan,
    model: str,
    namespace: str,
    parent_ref: ParentRef,
    *,
    owner_ref: Mapping[str, Any] | None = None,
    hostnames: tuple[str, ...] = (),
) -> dict[str, Any]:
    """HTTPRoute (gateway.networking.k8s.io/v1).

    Rules for the forced-variant header come first (header matches outrank a bare path match anyway, but
    the order keeps the intent readable); the last rule splits the rest by weight. Standard Gateway API has
    no consistent hashing on a header, so the sticky header is recorded as an annotation only: per-user
    stickiness needs the builtin router or an implementation-specific session-persistence policy.
    """
    rules: list[dict[str, Any]] = []
    for be in plan.backends:
        rules.append(
            {
                "matches": [{"headers": [{"type": "Exact", "name": plan.variant_header, "value": be.variant}]}],
                "backendRefs": [{"kind": "Service", "name": be.service, "port": BACKEND_PORT, "weight": 1}],
            }
        )
    weighted = [
        {"kind": "Service", "name": be.service, "port": BACKEND_PORT, "weight": be.weight}
        for be in plan.backends
        if be.weight > 0
    ]
    last: dict[str, Any] = {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": weighted}
    if plan.shadow is not None:
        # Shadow phase: the gateway mirrors `percent` of the requests to the candidate and discards its answers
        # (Gateway API v1.2+ RequestMirror `percent`; an implementation must support the extended features
        # HTTPRouteRequestMirror and HTTPRouteRequestPercentageMirror). Nothing sees both answers, so only the
        # candidate's latency and errors under live load are analysed (docs/rollouts.md).
        mirror = {"backendRef": {"kind": "Service", "name": plan.shadow.service, "port": BACKEND_PORT},
                  "percent": plan.shadow.percent}  # fmt: skip
        last["filters"] = [{"type": "RequestMirror", "requestMirror": mirror}]
    rules.append(last)
    metadata: dict[str, Any] = {
        "name": router_name(model),
        "namespace": namespace,
        "labels": router_labels(model),
        "annotations": {STICKY_HEADER_ANNOTATION: plan.sticky_header},
    }
    if owner_ref is not None:
        metadata["ownerReferences"] = [dict(owner_ref)]
    spec: dict[str, Any] = {"parentRefs": [_parent_ref(parent_ref)], "rules": rules}
    if hostnames:
        spec["hostnames"] = list(hostnames)
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata, "spec": spec}
