"""Deployment per revision: an init container that builds (or, with a model store, fetches) the model + Triton."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from model_repo_builder.artifact import STORE_ENV_PREFIX
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
from recserve_operator.names import (
    ARTIFACT_DIGEST_ANNOTATION,
    ARTIFACT_KEY_ANNOTATION,
    BUILDER_CONTAINER,
    CONFIG_CHECKSUM_ANNOTATION,
    FETCH_CONTAINER,
    MODEL_VERSION_ANNOTATION,
)
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
    if m.allow_unsafe_deserialization:
        args.append("--allow-unsafe-deserialization")  # the spec's owner trusts the model's code to run here
    r = spec.serving.ranking
    if r is not None:
        args += (["--ranking-request-columns", r.request_columns] if r.request_columns is not None
                 else ["--ranking-request-inputs", ",".join(r.request_inputs)])  # fmt: skip
        args += ["--ranking-max-k", str(r.max_k)]
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


def builder_container(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, *, extra_args: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model-repo-builder container (an init container, or a build Job's container) and the volumes it mounts
    (the repository it writes, /tmp, the config template, pvc:// sources, the build cache)."""
    s = spec.serving
    triton_image = s.triton_image or defaults.triton_image
    mounts = [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"},
              {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]  # fmt: skip
    # The root filesystem is read-only: libraries that cache under $HOME (TensorRT, ONNX, Keras) use /tmp.
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "config", "configMap": {"name": ids.revision_name}},
    ]
    source_volumes, source_mounts = _source_volumes(spec)
    if source_mounts:
        volumes += source_volumes
        mounts += source_mounts
        env.append({"name": PVC_ROOT_ENV, "value": SOURCES_DIR})
    if s.build_cache_claim:
        volumes.append({"name": "build-cache", "persistentVolumeClaim": {"claimName": s.build_cache_claim}})
        mounts.append({"name": "build-cache", "mountPath": CACHE_DIR})
        cache_dir = f"{CACHE_DIR}/{build_cache_key(spec, triton_image)}"
        env.append({"name": "MODEL_REPO_BUILDER_CACHE_DIR", "value": cache_dir})
    container: dict[str, Any] = {
        "name": BUILDER_CONTAINER,
        "image": s.builder_image or defaults.builder_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": list(BUILDER_COMMAND),
        "args": [*builder_args(spec, ids), *extra_args],
        "resources": _resources(spec),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        # A failed build's last log lines (the JSON report) become the termination message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    credentials = spec.model.credentials
    if credentials is not None and credentials.secret_name:
        # Only the builder fetches, so only it sees the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
        # AWS_SESSION_TOKEN / AWS_ENDPOINT_URL / AWS_DEFAULT_REGION); `env` below wins over a Secret key of the same
        # name, so the Secret cannot move HOME or the PVC root.
        container["envFrom"] = [{"secretRef": {"name": credentials.secret_name}}]
    container["env"] = env
    return container, volumes


def store_env_from(defaults: OperatorDefaults) -> list[dict[str, Any]]:
    """The model store's Secret, its keys prefixed (STORE_AWS_ACCESS_KEY_ID ...) so they never meet the source's."""
    if not defaults.model_store_secret:
        return []
    return [{"prefix": STORE_ENV_PREFIX, "secretRef": {"name": defaults.model_store_secret}}]


def fetch_container(defaults: OperatorDefaults, key: str, digest: str) -> dict[str, Any]:
    """Install the revision's built artifact into /models after checking its digest: no build, no TensorFlow."""
    args = ["fetch-artifact", "--store", defaults.model_store, "--artifact-key", key, "--digest", digest,
            "--repo", MODELS_DIR, "--json"]  # fmt: skip
    if defaults.model_store_endpoint:
        args += ["--store-endpoint", defaults.model_store_endpoint]
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": defaults.fetcher_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": list(BUILDER_COMMAND),
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    env_from = store_env_from(defaults)
    if env_from:
        container["envFrom"] = env_from
    return container


def triton_container(spec: RecommenderModelSpec, defaults: OperatorDefaults, args: list[str]) -> dict[str, Any]:
    """Triton serving /models with the serving pods' resources (a build Job's tuning sidecar is the same server)."""
    return {
        "name": TRITON_CONTAINER,
        "image": spec.serving.triton_image or defaults.triton_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["tritonserver"],
        "args": args,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": _resources(spec),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


# Triton's shared-memory pools live in /dev/shm; the default 64 MiB is too small for large batches.
DSHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}


def pod_basics(account: str | None) -> dict[str, Any]:
    """Service account token, environment and security context shared by serving and build pods."""
    basics: dict[str, Any] = {
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
    }
    if account is not None:
        basics["serviceAccountName"] = account
    return basics


def placement(spec: RecommenderModelSpec) -> dict[str, Any]:
    """GPU pods tolerate the GPU taint and run on the spec's GPU product (a TensorRT engine is built where it runs)."""
    if not spec.serving.resources.gpu:
        return {}
    out: dict[str, Any] = {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]}
    if spec.serving.gpu_product:
        out["nodeSelector"] = {GPU_PRODUCT_LABEL: spec.serving.gpu_product}
    return out


def build_deployment(
    spec: RecommenderModelSpec, ids: Ids, defaults: OperatorDefaults, *, replicas: int | None = None,
    artifact: tuple[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`replicas` replaces spec.serving.replicas (a rollout's split gives the candidate its share); with
    autoscaling it is ignored: the HorizontalPodAutoscaler's bounds carry the share (build_hpa).

    `artifact` (key, digest): the revision was built once and published to the model store; the pods' init
    container only fetches and verifies it. Without it every pod builds the model in its init container."""
    s = spec.serving
    checksum = config_checksum(build_configmap(spec, ids))
    model_ready = f"/v2/models/{ids.name}/ready"
    template_annotations = {CONFIG_CHECKSUM_ANNOTATION: checksum, MODEL_VERSION_ANNOTATION: str(spec.model.version)}
    dshm = copy.deepcopy(DSHM_VOLUME)
    if artifact is None:
        init_container, volumes = builder_container(spec, ids, defaults)
        volumes.insert(3, dshm)  # after models, tmp and config: the order pod templates have always had
        credentials = spec.model.credentials
    else:
        init_container = fetch_container(defaults, *artifact)
        volumes = [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, dshm]
        template_annotations.update({ARTIFACT_KEY_ANNOTATION: artifact[0], ARTIFACT_DIGEST_ANNOTATION: artifact[1]})
        credentials = None  # the pods never read the model source: no keys, no workload identity

    triton: dict[str, Any] = {
        **triton_container(spec, defaults, triton_args(ids)),
        # Loading a large engine (and its warmup: Triton reports ready only after the config's model_warmup
        # requests ran) takes minutes; the startup probe holds liveness off until the model is ready (10 min).
        # Both probes look every 2 s: a pod is Ready within 2-4 s of its model (a 10 s startup period held a
        # fetched model, loaded in 2 s, 9 s longer out of service: bench/builder/scale_out.py); a pod leaves the
        # Service after 16 s of failed looks, as tolerant of a busy moment as the 3 x 5 s it replaced.
        "startupProbe": _probe(model_ready, 2, 300),
        "readinessProbe": _probe(model_ready, 2, 8),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        # A revision leaving the Service (promotion, rollback, scale-down) keeps serving until every
        # kube-proxy and router has dropped its endpoint; Triton then finishes in-flight requests on SIGTERM.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
    }

    account = credentials.service_account_name if credentials is not None else None
    pod_spec: dict[str, Any] = {
        **pod_basics(account),
        "initContainers": [init_container],
        "containers": [triton],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
        **placement(spec),
    }

    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": revision_selector(ids)},
        # GPU capacity is scarce: surge one pod, never drop below the serving capacity.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 2,
        "progressDeadlineSeconds": 1800,
        "template": {
            "metadata": {
                "labels": labels(ids),
                "annotations": template_annotations,
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
