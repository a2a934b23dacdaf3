"""The build Job of a revision (with a model store): build once on the target GPU product, publish the artifact."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any

from recserve_operator.builders.common import GRPC_PORT, HTTP_PORT, METRICS_PORT, Ids, owner_reference
from recserve_operator.builders.deployment import (
    BUILDER_COMMAND,
    DSHM_VOLUME,
    GPU_RESOURCE,
    MODELS_DIR,
    builder_container,
    placement,
    pod_basics,
    store_env_from,
    triton_container,
)
from recserve_operator.names import TUNER_CONTAINER, build_job_name, build_labels
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import RecommenderModelSpec, Tuning

TERMINATION_LOG = "/dev/termination-log"
# A build that has not finished in an hour is stuck (a download that hangs, a GPU that never frees).
BUILD_DEADLINE_S = 3600
TUNER_MEMORY, TUNER_MEMORY_LIMIT = "512Mi", "2Gi"


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


def _store_args(key: str, defaults: OperatorDefaults) -> list[str]:
    args = ["--store", defaults.model_store, "--artifact-key", key, "--reuse"]
    return args + (["--store-endpoint", defaults.model_store_endpoint] if defaults.model_store_endpoint else [])


def _publish_args(key: str, ids: Ids, defaults: OperatorDefaults, keep: Iterable[str]) -> list[str]:
    """Publishing: the outcome in the termination log, then the model's unused artifacts collected."""
    args = [*_store_args(key, defaults), "--termination-log", TERMINATION_LOG, "--collect-prefix",
            artifact_prefix(ids), "--keep-recent", str(defaults.model_store_keep)]  # fmt: skip
    for other in sorted(set(keep) - {key}):
        args += ["--keep", other]
    return args


def tuner_args(tuning: Tuning, ids: Ids) -> list[str]:
    """`model-repo-builder profile` against the Job's Triton sidecar, applying the choice to the built tree."""
    def ints(values: tuple[int, ...]) -> str:
        return ",".join(map(str, values))

    return ["profile", "--repo", MODELS_DIR, "--name", ids.name, "--url", f"127.0.0.1:{GRPC_PORT}",
            "--wait-for-server-s", "600", "--slo-p99-ms", str(tuning.slo_p99_ms),
            "--concurrency-levels", ints(tuning.concurrency_levels),
            "--candidates", str(tuning.candidates_per_request),
            "--instance-counts", ints(tuning.instance_counts),
            "--max-queue-delays-us", ints(tuning.max_queue_delays_us),
            "--duration-s", str(tuning.duration_seconds), "--repeats", str(tuning.rounds),
            "--out", "/tmp/profile", "--apply"]  # fmt: skip


def tuning_containers(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, tuning: Tuning, publish: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Triton sidecar, tuner): Triton starts once the builder (an init container) has written /models, serves it
    in explicit model-control mode on the serving pods' resources, and stops when the tuner is done."""
    triton = triton_container(spec, defaults, [
        f"--model-repository={MODELS_DIR}", "--model-control-mode=explicit", "--strict-readiness=true",
        f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}"])  # fmt: skip
    # A native sidecar: an init container that keeps running beside the Job's container and never holds it up.
    triton["restartPolicy"] = "Always"
    triton["startupProbe"] = {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 1,
                              "failureThreshold": 600}  # fmt: skip
    # The load generator needs the CPU the serving pods ask for, little memory, and no GPU (the sidecar holds it).
    requests = {"cpu": triton["resources"]["requests"]["cpu"], "memory": TUNER_MEMORY}
    tuner = {
        "name": TUNER_CONTAINER,
        "image": spec.serving.builder_image or defaults.builder_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": list(BUILDER_COMMAND),
        "args": [*tuner_args(tuning, ids), *publish, "--json"],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MPLCONFIGDIR", "value": "/tmp/.matplotlib"}],
        "envFrom": store_env_from(defaults),
        "resources": {"requests": requests, "limits": {"memory": TUNER_MEMORY_LIMIT}},
        "securityContext": copy.deepcopy(triton["securityContext"]),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return triton, tuner


def build_job(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, *, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """One Job per revision: model-repo-builder with the parity gate, publishing to the model store.

    With spec.serving.tuning the builder is the init container (it builds, publishing nothing), a Triton sidecar
    serves the result and the tuner container measures it, applies the choice and publishes (tuning_containers).

    `keep`: artifact keys the model still uses (its other running revisions); the build then deletes the model's
    other artifacts from the store but the `model_store_keep` most recent. A Job's template is immutable, so the
    operator creates it once and never re-applies it; it goes with its revision.
    """
    key = artifact_key(spec, ids, defaults)
    publish = _publish_args(key, ids, defaults, keep)
    tuning = spec.serving.tuning
    builder_extra = [*_store_args(key, defaults), "--defer-publish"] if tuning is not None else publish
    container, volumes = builder_container(spec, ids, defaults, extra_args=tuple(builder_extra))
    container["envFrom"] = [*container.get("envFrom", []), *store_env_from(defaults)]
    container["resources"] = build_resources(spec, container["resources"])
    pod: dict[str, Any] = {"containers": [container]}
    if tuning is not None:
        triton, tuner = tuning_containers(spec, ids, defaults, tuning, publish)
        pod = {"initContainers": [container, triton], "containers": [tuner]}
        volumes.append(copy.deepcopy(DSHM_VOLUME))
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
                    **pod,
                    "volumes": volumes,
                    **placement(spec),
                },
            },
        },
    }
    return copy.deepcopy(job)
