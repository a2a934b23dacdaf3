"""ServiceMonitor (Prometheus Operator) scraping Triton metrics of every revision of one model."""

from __future__ import annotations

from typing import Any

from recserve_operator.builders.common import REVISION_LABEL, Ids, instance_labels, metadata
from recserve_operator.spec import RecommenderModelSpec


def build_servicemonitor(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
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
            "targetLabels": [REVISION_LABEL],
            "endpoints": [{"port": "metrics", "interval": "15s", "path": "/metrics"}],
        },
    }
