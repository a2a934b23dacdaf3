"""The build Job of a revision (with a model store): build once on the target GPU product, publish the artifact."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any

from recserve_operator.builders.common import Ids, owner_reference
from recserve_operator.builders.deployment import (
    GPU_RESOURCE,
    builder_container,
    placement,
    pod_basics,
    store_env_from,
)
from recserve_operator.names import build_job_name, build_labels
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import RecommenderModelSpec

TERMINATION_LOG = "/dev/termination-log"
# A build that has not finished in an hour is stuck (a download that hangs, a GPU that never frees).
BUILD_DEADLINE_S = 3600


def artifact_prefix(ids: Ids) -> str:
    """Every artifact of one model lives under this key prefix (what the build's collection sweeps)."""
    return f"{ids.namespace}/{ids.name}/"


def artifact_key(spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults) -> str:
    """Content-addressed: the revision (model, optimize, serving, GPU product) plus the images that build and
    load the engine (a TensorRT plan is tied to the Triton release). Same inputs, same key: a re-applied spec, a
    restarted operator or a second cluster reuse what the store holds."""
    images = "|".join((spec.serving.builder_image or defaults.builder_image,
                       spec.serving.triton_image or defaults.triton_image))  # fmt: skip
    return f"{artifact_prefix(ids)}{ids.revision}-{hashlib.sha256(images.encode()).hexdigest()[:8]}"


def build_resources(spec: RecommenderModelSpec, serving: dict[str, Any]) -> dict[str, Any]:
    """A TensorRT engine is built on the GPU it will run on, so that build holds one GPU of the spec's product.
    Every other build (ONNX conversion, quantization, the parity gate on ONNX Runtime's CPU provider) runs on
    the node's CPU: it must not wait for, or take, a GPU the serving pods hold (a full node would never build)."""
    if spec.resolved_backend == "tensorrt":
        return copy.deepcopy(serving)
    return {part: {k: v for k, v in (serving.get(part) or {}).items() if k != GPU_RESOURCE}
            for part in ("requests", "limits")}  # fmt: skip


def build_job(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, *, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """One Job per revision: model-repo-builder with the parity gate, publishing to the model store.

    `keep`: artifact keys the model still uses (its other running revisions); the build then deletes the model's
    other artifacts from the store but the `model_store_keep` most recent. A Job's template is immutable, so the
    operator creates it once and never re-applies it; it goes with its revision.
    """
    key = artifact_key(spec, ids, defaults)
    store_args = ["--store", defaults.model_store, "--artifact-key", key, "--reuse",
                  "--termination-log", TERMINATION_LOG, "--collect-prefix", artifact_prefix(ids),
                  "--keep-recent", str(defaults.model_store_keep)]  # fmt: skip
    for other in sorted(set(keep) - {key}):
        store_args += ["--keep", other]
    if defaults.model_store_endpoint:
        store_args += ["--store-endpoint", defaults.model_store_endpoint]
    container, volumes = builder_container(spec, ids, defaults, extra_args=tuple(store_args))
    container["envFrom"] = [*container.get("envFrom", []), *store_env_from(defaults)]
    container["resources"] = build_resources(spec, container["resources"])
    credentials = spec.model.credentials
    labels = build_labels(ids.name, ids.revision)
    meta = {"name": build_job_name(ids.name, ids.revision), "namespace": ids.namespace, "labels": labels,
            "ownerReferences": [owner_reference(ids)]}  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            # A parity failure or a bad source fails the same way twice: no retries, the status says why.
            "backoffLimit": 0,
            "activeDeadlineSeconds": BUILD_DEADLINE_S,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    **pod_basics(credentials.service_account_name if credentials is not None else None),
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": volumes,
                    **placement(spec),
                },
            },
        },
    }
    return copy.deepcopy(job)
