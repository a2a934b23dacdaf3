"""HorizontalPodAutoscaler per revision, on CPU utilization or on Triton's average queue time per pod."""

from __future__ import annotations

from typing import Any

from recserve_operator.builders.common import Ids, metadata
from recserve_operator.spec import RecommenderModelSpec

# Pods metric served by a metrics adapter: the prometheus-adapter rule in
# charts/recserve/files/prometheus-adapter-rules.yaml (nv_inference_queue_duration_us over
# nv_inference_request_success per pod), shipped by the chart and documented in docs/autoscaling.md.
QUEUE_TIME_METRIC = "triton_queue_time_us"


def build_hpa(
    spec: RecommenderModelSpec, ids: Ids, *, bounds: tuple[int, int] | None = None
) -> dict[str, Any] | None:
    """`bounds` (minReplicas, maxReplicas) replace the spec's while a rollout splits the model's capacity.

    Nothing here is particular to a revision (autoscaling stays out of the revision hash), so the stable revision's
    autoscaler is built from the current spec too, while the spec already names a candidate.
    """
    a = spec.serving.autoscaling
    if a is None:
        return None
    low, high = bounds if bounds is not None else (a.min_replicas, a.max_replicas)
    metrics: list[dict[str, Any]] = []
    if a.target_cpu_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": a.target_cpu_utilization},
                },
            }
        )
    if a.target_queue_time_microseconds is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": QUEUE_TIME_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(a.target_queue_time_microseconds)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(ids, ids.revision_name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ids.revision_name},
            "minReplicas": low,
            "maxReplicas": max(low, high),
            "metrics": metrics,
            # GPU pods take minutes to become ready: scale down slowly to avoid flapping.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
