"""Typed, validated model of a RecommenderModel spec and the revision hash over its serving-relevant parts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recserve_operator.errors import InvalidSpec
from recserve_operator.rollout.policy import RolloutPolicy

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Autoscaling",
    "Calibration",
    "DynamicBatchingSpec",
    "InvalidSpec",
    "ModelCredentials",
    "ModelRef",
    "Optimize",
    "RecommenderModelSpec",
    "Resources",
    "Serving",
    "parse_spec",
    "pvc_claim",
    "revision_of",
]

GROUP = "recserve.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RecommenderModel"
PLURAL = "recommendermodels"

FORMATS = ("keras", "savedmodel", "onnx")
BACKENDS = ("onnxruntime", "tensorrt", "auto")
PRECISIONS = ("fp32", "fp16", "int8")
_URI_RE = re.compile(r"^(pvc|https?|s3|gs|file)://.+")
# \Z, not $: Python's $ also matches before a trailing newline, which the API server takes literally (a label value
# or image "x\n" is refused when the Deployment is applied, not here).
# A PersistentVolumeClaim or Secret name: a DNS-1123 subdomain.
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_PVC_URI_RE = re.compile(r"^pvc://(?P<claim>[^/]+)/(?P<path>.+)\Z")
_ENDPOINT_RE = re.compile(r"^https?://[^\s/]+(/\S*)?\Z")
_SHA_RE = re.compile(r"^[a-f0-9]{64}\Z")
_COLUMNS_RE = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*\Z")
_CPU_RE = re.compile(r"^([0-9]+(\.[0-9]+)?|[0-9]+m)\Z")
_MEM_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?\Z")
# Kubernetes label values: the GPU product goes into a nodeSelector.
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_IMAGE_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/:@+-]*\Z")


@dataclass(frozen=True)
class ModelCredentials:
    """How the builder init container authenticates to the model store (never part of the revision)."""

    secret_name: str | None = None  # its keys become the init container's environment (AWS_ACCESS_KEY_ID ...)
    service_account_name: str | None = None  # workload identity (IRSA, EKS Pod Identity)


@dataclass(frozen=True)
class ModelRef:
    uri: str
    format: str
    version: int
    sha256: str | None = None
    # Added after v0.1: left out of the revision hash while unset, so existing models keep their revision.
    endpoint: str | None = field(default=None, metadata={"revision": "unless-default"})
    # Rotating a key or changing identity fetches the same model: the pods roll, the revision stays.
    credentials: ModelCredentials | None = field(default=None, metadata={"revision": False})
    # The builder loads a model that runs code it carries (Keras Lambda layers, pickles): a different build, so a
    # new revision; added later, so the default stays out of the revision hash.
    allow_unsafe_deserialization: bool = field(default=False, metadata={"revision": "unless-default"})


@dataclass(frozen=True)
class Calibration:
    uri: str
    samples: int = 512


@dataclass(frozen=True)
class Optimize:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    parity_max_abs_error: float = 1e-4
    parity_samples: int = 512
    calibration: Calibration | None = None


@dataclass(frozen=True)
class DynamicBatchingSpec:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 100
    preserve_ordering: bool = False


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_cpu_utilization: int | None = None
    target_queue_time_microseconds: int | None = None


@dataclass(frozen=True)
class Resources:
    gpu: int = 1
    cpu: str = "2"
    memory: str = "4Gi"


@dataclass(frozen=True)
class Ranking:
    """Serve the model as a ranker: the builder adds a ranking head (one request, N candidates, top-k in the
    engine). `request_columns` ("0-15,28-31") for a model with one input, or `request_inputs` for named inputs."""

    request_columns: str | None = None
    request_inputs: tuple[str, ...] = ()
    max_k: int = 100


@dataclass(frozen=True)
class Tuning:
    """Choose dynamic batching and the instance count by measurement in the revision's build Job, on its GPU
    product against the built engine (model_repo_builder.profile): the most throughput at the range's peak
    among the configurations whose p99 meets the SLO at every concurrency level and that are never slower
    than Triton's default at any level beyond the measured noise."""

    slo_p99_ms: int
    concurrency_levels: tuple[int, ...] = (1, 4, 16, 64)
    candidates_per_request: int = 64
    instance_counts: tuple[int, ...] = (1, 2)
    max_queue_delays_us: tuple[int, ...] = (0, 1000, 5000)
    duration_seconds: int = 3
    rounds: int = 1


@dataclass(frozen=True)
class Serving:
    max_batch_size: int = 256
    dynamic_batching: DynamicBatchingSpec | None = None
    instance_kind: str = "GPU"
    instance_count: int = 1
    # Scaling is applied to the running revision in place, so it stays out of the revision hash.
    replicas: int = field(default=1, metadata={"revision": False})
    autoscaling: Autoscaling | None = field(default=None, metadata={"revision": False})
    resources: Resources = field(default_factory=Resources)
    gpu_product: str | None = None
    triton_image: str | None = None
    builder_image: str | None = None
    build_cache_claim: str | None = None
    # Triton warms the model up (batch 1 and maxBatchSize) before it reports ready; added after v0.1, so the
    # default stays out of the revision hash.
    warmup: bool = field(default=True, metadata={"revision": "unless-default"})
    # A different served graph (a new revision); added later, so unset stays out of the revision hash.
    ranking: Ranking | None = field(default=None, metadata={"revision": "unless-default"})
    # Tuning changes the served configuration (a new revision); unset stays out of the revision hash.
    tuning: Tuning | None = field(default=None, metadata={"revision": "unless-default"})


@dataclass(frozen=True)
class RecommenderModelSpec:
    model: ModelRef
    optimize: Optimize
    serving: Serving
    rollout: RolloutPolicy  # not part of the revision: a new rollout policy changes how, not what, is served

    @property
    def resolved_backend(self) -> str:
        """The Triton backend actually used: `auto` picks TensorRT on GPU instances, ONNX Runtime on CPU."""
        if self.optimize.backend == "auto":
            return "tensorrt" if self.serving.instance_kind == "GPU" else "onnxruntime"
        return self.optimize.backend


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"{path} must be an object")
    return value


def _int(m: Mapping[str, Any], key: str, path: str, default: int | None, lo: int, hi: int | None = None) -> int:  # noqa: PLR0917
    value = m.get(key, default)
    if value is None:
        raise InvalidSpec(f"{path}.{key} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{path}.{key} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidSpec(f"{path}.{key} must be {bound}, got {value}")
    return value


def _opt_int(m: Mapping[str, Any], key: str, path: str, lo: int, hi: int | None = None) -> int | None:
    return _int(m, key, path, None, lo, hi) if m.get(key) is not None else None


def _str(m: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = m.get(key, default)
    if not isinstance(value, str) or not value:
        raise InvalidSpec(f"{path}.{key} is required and must be a non-empty string")
    return value


def _opt_str(m: Mapping[str, Any], key: str, path: str) -> str | None:
    value = m.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidSpec(f"{path}.{key} must be a string")
    return value


def _enum(m: Mapping[str, Any], key: str, path: str, default: str, allowed: tuple[str, ...]) -> str:
    value = m.get(key, default)
    if value not in allowed:
        raise InvalidSpec(f"{path}.{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return str(value)


def _bool(m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = m.get(key, default)
    if not isinstance(value, bool):
        raise InvalidSpec(f"{path}.{key} must be a boolean, got {value!r}")
    return value


def pvc_claim(uri: str) -> str | None:
    """The PersistentVolumeClaim a pvc://<claim>/<path> URI names, or None for other schemes."""
    match = _PVC_URI_RE.match(uri)
    return match.group("claim") if match else None


def _check_uri(uri: str, path: str) -> str:
    if not _URI_RE.match(uri):
        raise InvalidSpec(f"{path} must start with pvc://, http://, https://, s3://, gs:// or file://")
    if uri.startswith("pvc://"):
        match = _PVC_URI_RE.match(uri)
        claim = match.group("claim") if match else ""
        rel = match.group("path").split("/") if match else []
        if not match or len(claim) > 253 or not _DNS_SUBDOMAIN_RE.match(claim) or ".." in rel or not rel[0]:
            raise InvalidSpec(
                f"{path} pvc:// URIs must be pvc://<claim>/<path>: the claim a PersistentVolumeClaim name in the "
                f"model's namespace (lowercase DNS subdomain), the path inside the volume without '..', got {uri!r}"
            )
    return uri


def _opt_name(m: Mapping[str, Any], key: str, path: str) -> str | None:
    name = _opt_str(m, key, path)
    if name is not None and (len(name) > 253 or not _DNS_SUBDOMAIN_RE.match(name)):
        raise InvalidSpec(f"{path}.{key} must be a Kubernetes object name (lowercase DNS subdomain), got {name!r}")
    return name


def _parse_credentials(value: object) -> ModelCredentials | None:
    p = "spec.model.credentials"
    if value is None:
        return None
    c = _obj(value, p)
    secret = _opt_name(_obj(c.get("secretRef"), f"{p}.secretRef"), "name", f"{p}.secretRef")
    if c.get("secretRef") is not None and secret is None:
        raise InvalidSpec(f"{p}.secretRef.name is required")
    account = _opt_name(c, "serviceAccountName", p)
    if secret is None and account is None:
        raise InvalidSpec(f"{p} needs secretRef.name or serviceAccountName")
    return ModelCredentials(secret_name=secret, service_account_name=account)


def _parse_model(m: Mapping[str, Any]) -> ModelRef:
    uri = _check_uri(_str(m, "uri", "spec.model"), "spec.model.uri")
    sha = _opt_str(m, "sha256", "spec.model")
    if sha is not None and not _SHA_RE.match(sha):
        raise InvalidSpec("spec.model.sha256 must be 64 lowercase hex digits")
    endpoint = _opt_str(m, "endpoint", "spec.model")
    if endpoint is not None and not _ENDPOINT_RE.match(endpoint):
        raise InvalidSpec(f"spec.model.endpoint must be an http:// or https:// URL, got {endpoint!r}")
    return ModelRef(
        uri=uri,
        format=_enum(m, "format", "spec.model", "", FORMATS),
        version=_int(m, "version", "spec.model", None, 1),
        sha256=sha,
        endpoint=endpoint,
        credentials=_parse_credentials(m.get("credentials")),
        allow_unsafe_deserialization=_bool(m, "allowUnsafeDeserialization", "spec.model", False),
    )


def _parse_optimize(m: Mapping[str, Any]) -> Optimize:
    parity = _obj(m.get("parity"), "spec.optimize.parity")
    cal = m.get("calibration")
    calibration = None
    if cal is not None:
        c = _obj(cal, "spec.optimize.calibration")
        calibration = Calibration(
            uri=_check_uri(_str(c, "uri", "spec.optimize.calibration"), "spec.optimize.calibration.uri"),
            samples=_int(c, "samples", "spec.optimize.calibration", 512, 1),
        )
    max_err = parity.get("maxAbsError", 1e-4)
    if isinstance(max_err, bool) or not isinstance(max_err, int | float) or not 0 <= max_err < math.inf:
        raise InvalidSpec(f"spec.optimize.parity.maxAbsError must be a number >= 0, got {max_err!r}")
    return Optimize(
        backend=_enum(m, "backend", "spec.optimize", "onnxruntime", BACKENDS),
        precision=_enum(m, "precision", "spec.optimize", "fp32", PRECISIONS),
        parity_max_abs_error=float(max_err),
        parity_samples=_int(parity, "samples", "spec.optimize.parity", 512, 1, 100000),
        calibration=calibration,
    )


def _parse_serving(m: Mapping[str, Any]) -> Serving:
    p = "spec.serving"
    max_batch = _int(m, "maxBatchSize", p, 256, 1, 65536)
    db = None
    if m.get("dynamicBatching") is not None:
        d = _obj(m["dynamicBatching"], f"{p}.dynamicBatching")
        sizes = d.get("preferredBatchSizes") or []
        if not isinstance(sizes, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise InvalidSpec(f"{p}.dynamicBatching.preferredBatchSizes must be a list of integers >= 1")
        if any(s > max_batch for s in sizes):
            raise InvalidSpec(f"{p}.dynamicBatching.preferredBatchSizes must not exceed {p}.maxBatchSize")
        if len(set(sizes)) != len(sizes):
            raise InvalidSpec(f"{p}.dynamicBatching.preferredBatchSizes must not repeat")
        preserve = d.get("preserveOrdering", False)
        if not isinstance(preserve, bool):
            raise InvalidSpec(f"{p}.dynamicBatching.preserveOrdering must be a boolean")
        db = DynamicBatchingSpec(
            preferred_batch_sizes=tuple(sizes),
            max_queue_delay_microseconds=_int(d, "maxQueueDelayMicroseconds", f"{p}.dynamicBatching", 100, 0),
            preserve_ordering=preserve,
        )
    inst = _obj(m.get("instances"), f"{p}.instances")
    res = _obj(m.get("resources"), f"{p}.resources")
    resources = Resources(
        gpu=_int(res, "gpu", f"{p}.resources", 1, 0, 16),
        cpu=_str(res, "cpu", f"{p}.resources", "2"),
        memory=_str(res, "memory", f"{p}.resources", "4Gi"),
    )
    if not _CPU_RE.match(resources.cpu):
        raise InvalidSpec(f'{p}.resources.cpu must be a CPU quantity like "2" or "500m", got {resources.cpu!r}')
    if not _MEM_RE.match(resources.memory):
        raise InvalidSpec(f"{p}.resources.memory must be a memory quantity like 4Gi, got {resources.memory!r}")
    autoscaling = None
    if m.get("autoscaling") is not None:
        a = _obj(m["autoscaling"], f"{p}.autoscaling")
        autoscaling = Autoscaling(
            min_replicas=_int(a, "minReplicas", f"{p}.autoscaling", None, 1),
            max_replicas=_int(a, "maxReplicas", f"{p}.autoscaling", None, 1, 1000),
            target_cpu_utilization=_opt_int(a, "targetCPUUtilization", f"{p}.autoscaling", 1, 100),
            target_queue_time_microseconds=_opt_int(a, "targetQueueTimeMicroseconds", f"{p}.autoscaling", 1),
        )
        if autoscaling.min_replicas > autoscaling.max_replicas:
            raise InvalidSpec(f"{p}.autoscaling.minReplicas must not exceed maxReplicas")
        if autoscaling.target_cpu_utilization is None and autoscaling.target_queue_time_microseconds is None:
            raise InvalidSpec(f"{p}.autoscaling needs targetCPUUtilization or targetQueueTimeMicroseconds")
    default_replicas = autoscaling.min_replicas if autoscaling else 1
    replicas = _int(m, "replicas", p, default_replicas, 0, 1000)
    if autoscaling and not autoscaling.min_replicas <= replicas <= autoscaling.max_replicas:
        raise InvalidSpec(f"{p}.replicas must lie within {p}.autoscaling minReplicas..maxReplicas")
    kind = _enum(inst, "kind", f"{p}.instances", "GPU", ("GPU", "CPU"))
    if (kind == "GPU") != (resources.gpu > 0):
        raise InvalidSpec(
            f"{p}.instances.kind GPU needs {p}.resources.gpu >= 1, and kind CPU needs {p}.resources.gpu 0"
        )
    gpu_product = _opt_str(m, "gpuProduct", p)
    if gpu_product is not None:
        if resources.gpu == 0:
            raise InvalidSpec(f"{p}.gpuProduct selects GPU nodes: it needs {p}.resources.gpu >= 1")
        if len(gpu_product) > 63 or not _LABEL_VALUE_RE.match(gpu_product):
            raise InvalidSpec(f"{p}.gpuProduct must be a valid label value (node label nvidia.com/gpu.product)")
    images = {}
    for key in ("tritonImage", "builderImage"):
        image = _opt_str(m, key, p)
        if image is not None and not _IMAGE_RE.match(image):
            raise InvalidSpec(f"{p}.{key} is not a valid image reference: {image!r}")
        images[key] = image
    warmup = m.get("warmup", True)
    if not isinstance(warmup, bool):
        raise InvalidSpec(f"{p}.warmup must be a boolean, got {warmup!r}")
    cache = m.get("buildCache")
    claim = _str(_obj(cache, f"{p}.buildCache"), "claimName", f"{p}.buildCache") if cache is not None else None
    if claim is not None and (len(claim) > 253 or not _DNS_SUBDOMAIN_RE.match(claim)):
        raise InvalidSpec(f"{p}.buildCache.claimName must be a PersistentVolumeClaim name (lowercase DNS subdomain), "
                          f"got {claim!r}")  # fmt: skip
    ranking = _parse_ranking(_obj(m["ranking"], f"{p}.ranking")) if m.get("ranking") is not None else None
    tuning = _parse_tuning(_obj(m["tuning"], f"{p}.tuning"), max_batch) if m.get("tuning") is not None else None
    return Serving(
        max_batch_size=max_batch,
        dynamic_batching=db,
        instance_kind=kind,
        instance_count=_int(inst, "count", f"{p}.instances", 1, 1, 16),
        replicas=replicas,
        autoscaling=autoscaling,
        resources=resources,
        gpu_product=gpu_product,
        triton_image=images["tritonImage"],
        builder_image=images["builderImage"],
        build_cache_claim=claim,
        warmup=warmup,
        ranking=ranking,
        tuning=tuning,
    )


def _int_set(m: Mapping[str, Any], key: str, path: str, default: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:  # noqa: PLR0917
    """A list of distinct integers in lo..hi, sorted; `default` when absent."""
    values = m.get(key)
    if values is None:
        return default
    if (not isinstance(values, list) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in values)):  # fmt: skip
        raise InvalidSpec(f"{path}.{key} must be a non-empty list of integers in {lo}..{hi}, got {values!r}")
    if len(set(values)) != len(values):
        raise InvalidSpec(f"{path}.{key} must not repeat")
    return tuple(sorted(values))


def _parse_tuning(m: Mapping[str, Any], max_batch: int) -> Tuning:
    p = "spec.serving.tuning"
    tuning = Tuning(
        slo_p99_ms=_int(m, "sloP99Milliseconds", p, None, 1, 60000),
        concurrency_levels=_int_set(m, "concurrencyLevels", p, Tuning.concurrency_levels, 1, 1024),
        candidates_per_request=_int(m, "candidatesPerRequest", p, 64, 1, 65536),
        instance_counts=_int_set(m, "instanceCounts", p, Tuning.instance_counts, 1, 16),
        max_queue_delays_us=_int_set(m, "maxQueueDelaysMicroseconds", p, Tuning.max_queue_delays_us, 0, 1_000_000),
        duration_seconds=_int(m, "durationSeconds", p, 3, 1, 60),
        rounds=_int(m, "rounds", p, 1, 1, 5),
    )
    if tuning.candidates_per_request > max_batch:
        raise InvalidSpec(f"{p}.candidatesPerRequest must not exceed spec.serving.maxBatchSize ({max_batch})")
    return tuning


def _parse_ranking(m: Mapping[str, Any]) -> Ranking:
    p = "spec.serving.ranking"
    columns = _opt_str(m, "requestColumns", p)
    inputs = m.get("requestInputs") or []
    if not isinstance(inputs, list) or any(not isinstance(i, str) or not i for i in inputs):
        raise InvalidSpec(f"{p}.requestInputs must be a list of input names")
    if (columns is None) == (not inputs):
        raise InvalidSpec(f"{p} needs requestColumns (a model with one input) or requestInputs (named inputs), "
                          "not both")  # fmt: skip
    if columns is not None and not _COLUMNS_RE.match(columns):
        raise InvalidSpec(f'{p}.requestColumns must list zero-based columns and ranges like "0-15,28-31", '
                          f"got {columns!r}")  # fmt: skip
    if len(set(inputs)) != len(inputs):
        raise InvalidSpec(f"{p}.requestInputs must not repeat")
    return Ranking(request_columns=columns, request_inputs=tuple(inputs), max_k=_int(m, "maxK", p, 100, 1, 10000))


def parse_spec(spec: Mapping[str, Any], *, default_prometheus: str = "") -> RecommenderModelSpec:
    """Parse and cross-check a spec dict (as stored, with CRD defaults) into a RecommenderModelSpec; any fault
    raises InvalidSpec naming the field. `default_prometheus` (the operator's setting) serves a rollout analysis
    that names no Prometheus of its own."""
    root = _obj(spec, "spec")
    if "model" not in root:
        raise InvalidSpec("spec.model is required")
    if "serving" not in root:
        raise InvalidSpec("spec.serving is required")
    parsed = RecommenderModelSpec(
        model=_parse_model(_obj(root["model"], "spec.model")),
        optimize=_parse_optimize(_obj(root.get("optimize"), "spec.optimize")),
        serving=_parse_serving(_obj(root["serving"], "spec.serving")),
        rollout=RolloutPolicy.from_spec(_obj(root.get("rollout"), "spec.rollout"), default_prometheus),
    )
    o, s = parsed.optimize, parsed.serving
    # Repeated here from the CRD's CEL rules: a spec can predate the rules, and unit tests bypass the apiserver.
    if o.precision == "int8" and o.calibration is None:
        raise InvalidSpec("spec.optimize.precision int8 needs calibration data: set spec.optimize.calibration.uri")
    if o.backend == "tensorrt" and s.instance_kind != "GPU":
        raise InvalidSpec("spec.optimize.backend tensorrt needs a GPU: set spec.serving.instances.kind to GPU")
    if o.precision == "fp16" and s.instance_kind != "GPU":
        raise InvalidSpec("spec.optimize.precision fp16 runs on GPU kernels: set spec.serving.instances.kind to GPU")
    if s.ranking is not None and parsed.resolved_backend == "tensorrt":
        raise InvalidSpec("spec.serving.ranking is served by ONNX Runtime (its head is not built into TensorRT plans "
                          "yet): set spec.optimize.backend to onnxruntime (fp16 on GPUs through its TensorRT "
                          "accelerator)")  # fmt: skip
    if s.ranking is not None and s.tuning is not None:
        raise InvalidSpec("spec.serving.tuning measures batched requests, and a ranking model has no batch "
                          "dimension (a request's candidates are its batch): drop tuning, or set "
                          "spec.serving.instances.count")  # fmt: skip
    return parsed


def _in_revision(obj: object, f: dataclasses.Field[Any]) -> bool:
    mode = f.metadata.get("revision", True)
    if mode == "unless-default":
        return bool(getattr(obj, f.name) != f.default)
    return bool(f.compare and mode)


def _canonical(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if _in_revision(value, f)}
    if isinstance(value, tuple | list):
        return [_canonical(v) for v in value]
    return value


def revision_of(spec: RecommenderModelSpec) -> str:
    """Short stable hash of model + optimize + serving: any change there is a new revision; rollout is not."""
    payload = {
        "model": _canonical(spec.model),
        "optimize": _canonical(spec.optimize),
        "serving": _canonical(spec.serving),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    # 10 hex digits keep "<name>-<rev>" within the 63-character Service name limit for names up to 52.
    return digest[:10]
