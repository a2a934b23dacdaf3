"""ServiceMonitors (Prometheus Operator): one per namespace scraping the Triton metrics of every revision of every
model there, and a model's shadow comparator during a shadow phase.

One per namespace, not one per model: Prometheus Operator turns every ServiceMonitor into a scrape job with its own
service discovery and regenerates and reloads Prometheus' configuration whenever one is added or removed, so one per
model cost a write and a reload per model (Prometheus used 58 CPU-s while 500 models came up) and left Prometheus
with one scrape job per model. The revision Services all carry the same labels besides their model's and revision's,
so one selector finds them all; series still name their model through `namespace`, `service` and `pod`, and their
revision through the relabeling below.
"""

from __future__ import annotations

import re
from typing import Any

from recserve_operator.builders.common import Ids, metadata
from recserve_operator.names import (
    APP_NAME,
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    NAME_LABEL,
    PREDICTOR,
    REVISION_LABEL,
    REVISIONS_SERVICEMONITOR,
    SERIES_REVISION_LABEL,
    router_name,
    router_selector,
)

__all__ = ["build_servicemonitor", "build_shadow_servicemonitor", "is_per_model_servicemonitor", "pod_label_meta"]

# What every revision Service carries whatever its model (builders.service: the revision's labels).
REVISION_SERVICE_LABELS = {NAME_LABEL: APP_NAME, COMPONENT_LABEL: PREDICTOR, MANAGED_BY_LABEL: MANAGER}


def pod_label_meta(label: str) -> str:
    """The discovery meta label Prometheus gives a pod label: non-[a-zA-Z0-9_] characters become `_`."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def build_servicemonitor(namespace: str) -> dict[str, Any]:
    """The namespace's ServiceMonitor for every revision Service (of every model) in it."""
    # `targetLabels: [recserve.dev/revision]` would name the label `recserve_dev_revision`; the rollout queries,
    # the dashboard and the adapter rule select `revision`, so the endpoint relabels the pod label to that
    # name. Prometheus Operator's own relabelings already add `namespace`, `service`, `pod` and `container`.
    revision = {
        "action": "replace",
        "sourceLabels": [pod_label_meta(REVISION_LABEL)],
        "targetLabel": SERIES_REVISION_LABEL,
    }
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        # No owner: it outlives any one model; the operator deletes it with the namespace's last model.
        "metadata": {
            "name": REVISIONS_SERVICEMONITOR,
            "namespace": namespace,
            "labels": {NAME_LABEL: APP_NAME, MANAGED_BY_LABEL: MANAGER},
        },
        "spec": {
            # Only per-revision Services (they carry the revision label), so a model's front Service is not
            # scraped twice.
            "selector": {
                "matchLabels": dict(REVISION_SERVICE_LABELS),
                "matchExpressions": [{"key": REVISION_LABEL, "operator": "Exists"}],
            },
            "endpoints": [
                {"port": "metrics", "interval": "15s", "path": "/metrics", "relabelings": [revision]},
            ],
        },
    }


def is_per_model_servicemonitor(obj: dict[str, Any]) -> bool:
    """A ServiceMonitor an earlier operator version made for one model's revisions (named after the model, which its
    instance label names): the namespace's ServiceMonitor replaces it, and both would scrape every target twice."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    model = labels.get(INSTANCE_LABEL)
    return (
        labels.get(MANAGED_BY_LABEL) == MANAGER
        and model is not None
        and meta.get("name") == model
        and any(e.get("port") == "metrics" for e in (obj.get("spec") or {}).get("endpoints") or [])
    )


def build_shadow_servicemonitor(ids: Ids) -> dict[str, Any]:
    """Scrapes the shadow comparator sidecars of the builtin router (the router Service's `shadow-metrics` port,
    present only during a shadow phase). Their series carry model/stable/candidate labels of their own."""
    meta = metadata(ids, router_name(ids.name), revision=False)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": router_selector(ids.name)},
            "endpoints": [{"port": "shadow-metrics", "interval": "15s", "path": "/metrics"}],
        },
    }
