"""ServiceMonitor (Prometheus Operator) scraping Triton metrics of every revision of one model."""

from __future__ import annotations

import re
from typing import Any

from recserve_operator.builders.common import Ids, instance_labels, metadata
from recserve_operator.names import REVISION_LABEL, SERIES_REVISION_LABEL, router_name, router_selector
from recserve_operator.spec import RecommenderModelSpec

__all__ = ["build_servicemonitor", "build_shadow_servicemonitor", "pod_label_meta"]


def pod_label_meta(label: str) -> str:
    """The discovery meta label Prometheus gives a pod label: non-[a-zA-Z0-9_] characters become `_`."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def build_servicemonitor(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
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
        "metadata": metadata(ids, ids.name, revision=False),
        "spec": {
            # Only per-revision Services (they carry the revision label), so the front Service is not scraped twice.
            "selector": {
                "matchLabels": instance_labels(ids),
                "matchExpressions": [{"key": REVISION_LABEL, "operator": "Exists"}],
            },
            "endpoints": [
                {"port": "metrics", "interval": "15s", "path": "/metrics", "relabelings": [revision]},
            ],
        },
    }


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
