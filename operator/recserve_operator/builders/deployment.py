"""Deployment per revision: model-repo-builder init container + Triton, on the requested GPU product."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from recserve_operator.builders.common import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    Ids,
    labels,
    metadata,
    revision_selector,
)
from recserve_operator.builders.configmap import CONFIG_KEY, build_configmap, config_checksum
from recserve_operator.names import BUILDER_CONTAINER, CONFIG_CHECKSUM_ANNOTATION, MODEL_VERSION_ANNOTATION
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import RecommenderModelSpec, pvc_claim

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
MODELS_DIR = "/models"
CONFIG_DIR = "/config"
CACHE_DIR = "/cache"
# pvc:// sources: each claim is mounted read-only at SOURCES_DIR/<claim>, where the builder resolves the URI.
SOURCES_DIR = "/sources"
# The builder image's entry point (Dockerfile `builder` stage ENTRYPOINT): the package runs as a module from
# PYTHONPATH=/opt/app, so no console script has to be installed for it.
BUILDER_COMMAND = ("python", "-m", "model_repo_builder")
# model_repo_builder.fetch.PVC_ROOT_ENV (a test ties them): fetch imports boto3, which the operator image lacks.
PVC_ROOT_ENV = "RECSERVE_PVC_ROOT"
# Triton's image runs as triton-server (uid 1000); a numeric uid lets runAsNonRoot be verified.
TRITON_UID = 1000
TRITON_CONTAINER = "triton"
PRESTOP_SLEEP_S = 5


def _fmt(value: float) -> str:
    return format(value, "g")


def build_cache_key(spec: RecommenderModelSpec, triton_image: str) -> str:
    """TensorRT engines depend on the model, the GPU product and the TensorRT version (the Triton image)."""
    model = spec.model.sha256 or f"{spec.model.uri}#{spec.model.version}"
    parts = [model, spec.serving.gpu_product or "any", triton_image, spec.resolved_backend, spec.optimize.precision]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def builder_args(spec: RecommenderModelSpec, ids: Ids) -> list[str]:
    m, o = spec.model, spec.optimize
    args = ["build", "--source", m.uri, "--format", m.format]
    if m.sha256:
        args += ["--sha256", m.sha256]
    args += [
        "--name", ids.name,
        "--version", str(m.version),
        "--repo", MODELS_DIR,
        "--backend", spec.resolved_backend,
        "--precision", o.precision,
        "--config-template", f"{CONFIG_DIR}/{CONFIG_KEY}",
        "--parity-max-abs-error", _fmt(o.parity_max_abs_error),
        "--parity-samples", str(o.parity_samples),
    ]  # fmt: skip
    if o.calibration is not None:
        args += ["--calibration", o.calibration.uri, "--calibration-samples", str(o.calibration.samples)]
    if m.endpoint:
        # An endpoint is an address, not a secret; keys only ever arrive through the Secret's environment.
        args += ["--s3-endpoint", m.endpoint]
    return [*args, "--json"]


def triton_args(ids: Ids) -> list[str]:
    # Explicit mode loads exactly the model the init container verified and never polls the filesystem.
    return [
        f"--model-repository={MODELS_DIR}",
        "--model-control-mode=explicit",
        f"--load-model={ids.name}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        # Latency summaries (nv_inference_request_summary_us{quantile=...}) give the rollout analysis a real p99;
        # without them only cumulative counters exist and p99 degrades to a mean.
        "--metrics-config=summary_latencies=true",
        "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001",
    ]


def source_claims(spec: RecommenderModelSpec) -> list[str]:
    """The PersistentVolumeClaims the model and calibration URIs read from, each once, in a stable order."""
    uris = [spec.model.uri] + ([spec.optimize.calibration.uri] if spec.optimize.calibration else [])
    return sorted({c for c in map(pvc_claim, uris) if c})


def _source_volumes(spec: RecommenderModelSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, builder mounts) for pvc:// sources; volume names are indexed, since claim names can be too long."""
    volumes, mounts = [], []
    for i, claim in enumerate(source_claims(spec)):
        name = f"source-{i}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": f"{SOURCES_DIR}/{claim}", "readOnly": True})
    return volumes, mounts


def _resources(spec: RecommenderModelSpec) -> dict[str, Any]:
    r = spec.serving.resources
    requests: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    limits: dict[str, Any] = {"memory": r.memory}
    if r.gpu:
        # Extended resources cannot be overcommitted: requests must equal limits.
        requests[GPU_RESOURCE] = str(r.gpu)
        limits[GPU_RESOURCE] = str(r.gpu)
    return {"requests": requests, "limits": limits}


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRITON_UID,
        "runAsGroup": TRITON_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def build_deployment(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, *, replicas: int | None = None
) -> dict[str, Any]:
    """`replicas` replaces spec.serving.replicas (a rollout's split gives the candidate its share); with
    autoscaling it is ignored: the HorizontalPodAutoscaler's bounds carry the share (build_hpa)."""
    s = spec.serving
    triton_image = s.triton_image or defaults.triton_image
    builder_image = s.builder_image or defaults.builder_image
    checksum = config_checksum(build_configmap(spec, ids))
    resources = _resources(spec)
    model_ready = f"/v2/models/{ids.name}/ready"

    mounts = [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    builder_mounts = [*mounts, {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    # The root filesystem is read-only: libraries that cache under $HOME (TensorRT, ONNX, Keras) use /tmp.
    builder_env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "config", "configMap": {"name": ids.revision_name}},
        # Triton's shared-memory pools live in /dev/shm; the default 64 MiB is too small for large batches.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    source_volumes, source_mounts = _source_volumes(spec)
    if source_mounts:
        volumes += source_volumes
        builder_mounts += source_mounts
        builder_env.append({"name": PVC_ROOT_ENV, "value": SOURCES_DIR})
    if s.build_cache_claim:
        volumes.append({"name": "build-cache", "persistentVolumeClaim": {"claimName": s.build_cache_claim}})
        builder_mounts.append({"name": "build-cache", "mountPath": CACHE_DIR})
        builder_env.append(
            {"name": "MODEL_REPO_BUILDER_CACHE_DIR", "value": f"{CACHE_DIR}/{build_cache_key(spec, triton_image)}"}
        )

    init_container: dict[str, Any] = {
        "name": BUILDER_CONTAINER,
        "image": builder_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": list(BUILDER_COMMAND),
        "args": builder_args(spec, ids),
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": builder_mounts,
        # A failed build's last log lines (the JSON report) become the termination message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    credentials = spec.model.credentials
    if credentials is not None and credentials.secret_name:
        # Only the builder fetches, so only it sees the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
        # AWS_SESSION_TOKEN / AWS_ENDPOINT_URL / AWS_DEFAULT_REGION); `env` below wins over a Secret key of the same
        # name, so the Secret cannot move HOME or the PVC root.
        init_container["envFrom"] = [{"secretRef": {"name": credentials.secret_name}}]
    init_container["env"] = builder_env

    triton: dict[str, Any] = {
        "name": TRITON_CONTAINER,
        "image": triton_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["tritonserver"],
        "args": triton_args(ids),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": resources,
        "securityContext": _container_security(),
        # Loading a large engine (and its warmup: Triton reports ready only after the config's model_warmup
        # requests ran) takes minutes; the startup probe holds liveness off until the model is ready.
        "startupProbe": _probe(model_ready, 10, 60),
        "readinessProbe": _probe(model_ready, 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        # A revision leaving the Service (promotion, rollback, scale-down) keeps serving until every
        # kube-proxy and router has dropped its endpoint; Triton then finishes in-flight requests on SIGTERM.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    account = credentials.service_account_name if credentials is not None else None
    pod_spec: dict[str, Any] = {
        # Workload identity (a projected token the cloud SDK exchanges) needs the token; otherwise keep it out.
        "automountServiceAccountToken": account is not None,
        # Namespaces with many revisions would otherwise inject thousands of env vars.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRITON_UID,
            "runAsGroup": TRITON_UID,
            "fsGroup": TRITON_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [init_container],
        "containers": [triton],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if account is not None:
        pod_spec["serviceAccountName"] = account
    if s.resources.gpu:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        if s.gpu_product:
            pod_spec["nodeSelector"] = {GPU_PRODUCT_LABEL: s.gpu_product}

    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": revision_selector(ids)},
        # GPU capacity is scarce: surge one pod, never drop below the serving capacity.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 2,
        "progressDeadlineSeconds": 1800,
        "template": {
            "metadata": {
                "labels": labels(ids),
                "annotations": {
                    CONFIG_CHECKSUM_ANNOTATION: checksum,
                    MODEL_VERSION_ANNOTATION: str(spec.model.version),
                },
            },
            "spec": pod_spec,
        },
    }
    if s.autoscaling is None:
        # With autoscaling the HPA owns replicas; applying a value here would fight it on every reconcile.
        deployment_spec["replicas"] = s.replicas if replicas is None else replicas
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ids, ids.revision_name),
        "spec": deployment_spec,
    }
    deployment["metadata"]["annotations"] = {MODEL_VERSION_ANNOTATION: str(spec.model.version)}
    # Containers share sub-dicts (resources, mounts) while building; callers get an unaliased tree.
    return copy.deepcopy(deployment)
