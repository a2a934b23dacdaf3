"""PodDisruptionBudget per revision: voluntary disruptions (node drains) evict one Triton pod at a time."""

from __future__ import annotations

from typing import Any

from recserve_operator.builders.common import Ids, metadata, revision_selector
from recserve_operator.spec import RecommenderModelSpec


def build_pdb(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any] | None:
    """None where the revision never runs more than one pod: a budget of one unavailable pod then allows every
    eviction, so it would protect nothing and cost a write (and the disruption controller's status writes) per
    revision. With replicas or maxReplicas above one, drains take the pods one at a time."""
    autoscaling = spec.serving.autoscaling
    most = autoscaling.max_replicas if autoscaling is not None else spec.serving.replicas
    if most <= 1:
        return None
    # maxUnavailable (not minAvailable) so a single-ready-replica model never blocks a drain forever.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ids, ids.revision_name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": revision_selector(ids)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
