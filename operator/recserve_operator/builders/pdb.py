"""PodDisruptionBudget per revision: voluntary disruptions (node drains) evict one Triton pod at a time."""

from __future__ import annotations

from typing import Any

from recserve_operator.builders.common import Ids, metadata, revision_selector
from recserve_operator.spec import RecommenderModelSpec


def build_pdb(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
    # maxUnavailable (not minAvailable) so a single-replica model never blocks a drain forever.
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
