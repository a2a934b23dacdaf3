"""ConfigMap per revision: the generated Triton config.pbtxt and the build spec for model-repo-builder."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from model_repo_builder.config import DynamicBatching, ServingOptions, build_model_config, to_pbtxt
from recserve_operator.builders.common import Ids, metadata
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec

CONFIG_KEY = "config.pbtxt"
BUILD_SPEC_KEY = "build-spec.json"


def serving_options(spec: RecommenderModelSpec) -> ServingOptions:
    s = spec.serving
    db = None
    if s.dynamic_batching is not None:
        db = DynamicBatching(
            preferred_batch_sizes=s.dynamic_batching.preferred_batch_sizes,
            max_queue_delay_microseconds=s.dynamic_batching.max_queue_delay_microseconds,
            preserve_ordering=s.dynamic_batching.preserve_ordering,
        )
    return ServingOptions(
        backend=spec.resolved_backend,
        precision=spec.optimize.precision,
        max_batch_size=s.max_batch_size,
        dynamic_batching=db,
        instance_kind=s.instance_kind,
        instance_count=s.instance_count,
        # Warm up a single sample and a full batch, so the first requests after "ready" pay no lazy setup.
        warmup_batch_size=s.max_batch_size if s.warmup else 0,
    )


def config_pbtxt(spec: RecommenderModelSpec, model_name: str) -> str:
    """config.pbtxt from the ModelConfig protobuf; the builder's refusals become InvalidSpec."""
    try:
        return to_pbtxt(build_model_config(model_name, serving_options(spec)))
    except ValueError as exc:  # the builder's ConfigError family; ValueError keeps kopf/tf out of this layer
        raise InvalidSpec(f"spec.serving/optimize cannot produce a Triton config: {exc}") from exc


def build_spec(spec: RecommenderModelSpec, model_name: str) -> dict[str, Any]:
    """What the init container builds, recorded beside the config for humans and the build report."""
    o = spec.optimize
    return {
        "name": model_name,
        "source": spec.model.uri,
        "format": spec.model.format,
        "sha256": spec.model.sha256,
        "version": spec.model.version,
        "backend": spec.resolved_backend,
        "precision": o.precision,
        "parity": {"maxAbsError": o.parity_max_abs_error, "samples": o.parity_samples},
        "calibration": None if o.calibration is None else {"uri": o.calibration.uri, "samples": o.calibration.samples},
        "gpuProduct": spec.serving.gpu_product,
        "warmup": spec.serving.warmup,
    }


def build_configmap(spec: RecommenderModelSpec, ids: Ids) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ids, ids.revision_name),
        "data": {
            CONFIG_KEY: config_pbtxt(spec, ids.name),
            BUILD_SPEC_KEY: json.dumps(build_spec(spec, ids.name), indent=2, sort_keys=True) + "\n",
        },
    }


def config_checksum(configmap: dict[str, Any]) -> str:
    """Checksum of the ConfigMap data: put on the pod template so a config change rolls the pods."""
    data = json.dumps(configmap["data"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]
