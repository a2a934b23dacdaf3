"""Pure construction, validation and round-tripping of Triton `config.pbtxt` as ModelConfig protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model_repo_builder.errors import ConfigError

BACKENDS = ("onnxruntime", "tensorrt", "python")
PRECISIONS = ("fp32", "fp16", "int8")
INSTANCE_KINDS = ("GPU", "CPU")

# Model-level parameters the builder writes so that the serving options round-trip exactly through
# config.pbtxt (Triton backends ignore parameters they do not know).
PARAM_PRECISION = "recserve_precision"
# Read only: templates from older operators asked for warmup with this parameter instead of model_warmup entries.
PARAM_WARMUP_BATCH = "recserve_warmup_batch_size"

MODEL_FILENAMES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}

_NP_TO_TRITON = {
    "bool": mc.TYPE_BOOL,
    "uint8": mc.TYPE_UINT8,
    "uint16": mc.TYPE_UINT16,
    "uint32": mc.TYPE_UINT32,
    "uint64": mc.TYPE_UINT64,
    "int8": mc.TYPE_INT8,
    "int16": mc.TYPE_INT16,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "float64": mc.TYPE_FP64,
    "object": mc.TYPE_STRING,
    "bytes": mc.TYPE_STRING,
}
_TRITON_TO_NP = {v: k for k, v in _NP_TO_TRITON.items() if k != "bytes"}


class InvalidServingOptions(ConfigError):
    """Serving options that cannot produce a valid Triton configuration."""


class InvalidModelConfig(ConfigError):
    """A config.pbtxt that does not parse or does not describe a model this builder can produce."""


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False
    # Queue policy: requests waiting longer than this are rejected (0 = wait forever).
    default_queue_timeout_microseconds: int = 0


@dataclass(frozen=True)
class ServingOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_batch_size: int = 64
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_kind: str = "GPU"
    instance_count: int = 1
    gpus: tuple[int, ...] = ()
    tensorrt_accelerator: bool = False
    version_policy_latest: int = 1
    warmup_batch_size: int = 0  # the largest warmup batch (a batch of 1 is warmed up too); 0 = no warmup
    # ONNX Runtime graph optimization level (None = backend default, -1 = disabled, 1 = extended).
    graph_optimization_level: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]  # without the batch dimension; -1 = dynamic


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def triton_dtype(np_dtype: str) -> int:
    """Triton DataType enum value for a numpy dtype name."""
    try:
        return int(_NP_TO_TRITON[np.dtype(np_dtype).name if np_dtype not in ("bytes", "object") else np_dtype])
    except (KeyError, TypeError) as exc:
        raise InvalidServingOptions(f"dtype {np_dtype!r} has no Triton equivalent") from exc


def numpy_dtype(triton_type: int) -> str:
    """Numpy dtype name for a Triton DataType enum value."""
    try:
        return str(_TRITON_TO_NP[triton_type])
    except KeyError as exc:
        raise InvalidModelConfig(f"Triton data type {mc.DataType.Name(triton_type)} is not supported") from exc


def validate_options(options: ServingOptions) -> None:
    """Raise InvalidServingOptions with an actionable message when `options` are inconsistent."""
    if options.backend not in BACKENDS:
        raise InvalidServingOptions(f"unknown backend {options.backend!r}: use one of {', '.join(BACKENDS)}")
    if options.precision not in PRECISIONS:
        raise InvalidServingOptions(f"unknown precision {options.precision!r}: use one of {', '.join(PRECISIONS)}")
    if options.instance_kind not in INSTANCE_KINDS:
        raise InvalidServingOptions(
            f"unknown instance kind {options.instance_kind!r}: use one of {', '.join(INSTANCE_KINDS)}"
        )
    if options.max_batch_size < 1:
        raise InvalidServingOptions(
            f"max_batch_size must be >= 1 (got {options.max_batch_size}): recommendation models score "
            "candidate lists in batches, so the batch dimension is required"
        )
    if options.instance_count < 1:
        raise InvalidServingOptions(f"instance_count must be >= 1 (got {options.instance_count})")
    if any(g < 0 for g in options.gpus):
        raise InvalidServingOptions(f"gpu ids must be >= 0 (got {list(options.gpus)})")
    if options.gpus and options.instance_kind != "GPU":
        raise InvalidServingOptions("gpus can only be set with instance_kind GPU")
    if options.version_policy_latest < 1:
        raise InvalidServingOptions(f"version_policy_latest must be >= 1 (got {options.version_policy_latest})")
    if not 0 <= options.warmup_batch_size <= options.max_batch_size:
        raise InvalidServingOptions(
            f"warmup_batch_size must be between 0 and max_batch_size={options.max_batch_size} "
            f"(got {options.warmup_batch_size})"
        )
    if options.graph_optimization_level not in (None, -1, 0, 1, 2):
        raise InvalidServingOptions(
            f"graph_optimization_level must be -1, 0, 1 or 2 (got {options.graph_optimization_level})"
        )
    db = options.dynamic_batching
    if db is not None:
        for size in db.preferred_batch_sizes:
            if not 1 <= size <= options.max_batch_size:
                raise InvalidServingOptions(
                    f"preferred batch size {size} must be between 1 and max_batch_size={options.max_batch_size}"
                )
        if len(set(db.preferred_batch_sizes)) != len(db.preferred_batch_sizes):
            raise InvalidServingOptions(f"preferred batch sizes repeat: {list(db.preferred_batch_sizes)}")
        if db.max_queue_delay_microseconds < 0 or db.default_queue_timeout_microseconds < 0:
            raise InvalidServingOptions("queue delays and timeouts must be >= 0 microseconds")
    if options.backend == "python":
        if options.instance_kind != "CPU":
            raise InvalidServingOptions("the python backend runs ONNX Runtime on CPU here: use instance_kind CPU")
        if options.precision == "fp16":
            raise InvalidServingOptions("fp16 needs GPU execution: use backend tensorrt or onnxruntime")
        if options.tensorrt_accelerator:
            raise InvalidServingOptions("the TensorRT accelerator applies to the onnxruntime backend only")
    if options.backend == "tensorrt" and options.instance_kind != "GPU":
        raise InvalidServingOptions("TensorRT engines run on GPUs only: use instance_kind GPU")
    if options.backend == "tensorrt" and options.tensorrt_accelerator:
        raise InvalidServingOptions("tensorrt_accelerator is for the onnxruntime backend; backend tensorrt is TensorRT")
    if options.precision == "fp16" and options.instance_kind != "GPU":
        raise InvalidServingOptions(
            "fp16 is executed by TensorRT kernels on a GPU; on CPU use fp32 or int8 (or instance_kind GPU)"
        )
    if options.tensorrt_accelerator and options.instance_kind != "GPU":
        raise InvalidServingOptions("the TensorRT execution accelerator needs instance_kind GPU")


def _uses_tensorrt_accelerator(options: ServingOptions) -> bool:
    # fp16 on the onnxruntime backend is delivered by TensorRT's fp16 kernels: the shipped ONNX stays fp32
    # (portable, and CPU parity can be checked against it) and TensorRT casts at engine build time.
    return options.backend == "onnxruntime" and (options.tensorrt_accelerator or options.precision == "fp16")


def _dims(shape: tuple[int, ...]) -> list[int]:
    return [int(d) if d is not None and d >= 0 else -1 for d in shape]


def build_model_config(name: str, options: ServingOptions, signature: ModelSignature | None = None) -> mc.ModelConfig:
    """Build the Triton ModelConfig for `options`; without `signature`, inputs/outputs are left to auto-complete."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidServingOptions(f"invalid model name {name!r}: use a non-empty name without '/'")
    validate_options(options)
    cfg = mc.ModelConfig(name=name, max_batch_size=options.max_batch_size)
    if options.backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.backend = "tensorrt"
        cfg.default_model_filename = MODEL_FILENAMES["tensorrt"]
    else:
        cfg.backend = options.backend
    cfg.version_policy.latest.num_versions = options.version_policy_latest

    if signature is not None:
        _set_signature(cfg, signature)

    db = options.dynamic_batching
    if db is not None:
        cfg.dynamic_batching.SetInParent()
        cfg.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_microseconds
        cfg.dynamic_batching.preserve_ordering = db.preserve_ordering
        if db.default_queue_timeout_microseconds:
            policy = cfg.dynamic_batching.default_queue_policy
            policy.timeout_action = mc.ModelQueuePolicy.REJECT
            policy.default_timeout_microseconds = db.default_queue_timeout_microseconds

    group = cfg.instance_group.add()
    group.kind = mc.ModelInstanceGroup.KIND_GPU if options.instance_kind == "GPU" else mc.ModelInstanceGroup.KIND_CPU
    group.count = options.instance_count
    group.gpus.extend(options.gpus)

    if options.graph_optimization_level is not None:
        cfg.optimization.graph.level = options.graph_optimization_level
    if _uses_tensorrt_accelerator(options):
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        acc.name = "tensorrt"
        acc.parameters["precision_mode"] = "FP16" if options.precision == "fp16" else "FP32"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)

    cfg.parameters[PARAM_PRECISION].string_value = options.precision
    if options.warmup_batch_size:
        if signature is None:
            # Warmup needs the inputs: the entries name their batch sizes now, and the builder fills in the inputs
            # (merge_signature) once the converted model's signature is known.
            for size in warmup_batch_sizes(options.warmup_batch_size):
                cfg.model_warmup.add(name=f"warmup_batch_{size}", batch_size=size, count=1)
        else:
            add_warmup(cfg, signature, options.warmup_batch_size)
    return cfg


def _set_signature(cfg: mc.ModelConfig, signature: ModelSignature) -> None:
    if not signature.inputs or not signature.outputs:
        raise InvalidServingOptions("a model signature needs at least one input and one output")
    del cfg.input[:]
    del cfg.output[:]
    for spec in signature.inputs:
        cfg.input.add(name=spec.name, data_type=triton_dtype(spec.dtype), dims=_dims(spec.shape))
    for spec in signature.outputs:
        cfg.output.add(name=spec.name, data_type=triton_dtype(spec.dtype), dims=_dims(spec.shape))


def warmup_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """The warmup batches for a largest size: one sample (the latency path) and the full batch (the memory peak)."""
    return tuple(sorted({1, batch_size})) if batch_size > 0 else ()


def warmup_batch_size_of(cfg: mc.ModelConfig) -> int:
    """The largest warmup batch `cfg` asks for (0 = none); reads the parameter older operators wrote, too."""
    if PARAM_WARMUP_BATCH in cfg.parameters:
        return int(cfg.parameters[PARAM_WARMUP_BATCH].string_value)
    return max((w.batch_size for w in cfg.model_warmup), default=0)


def add_warmup(
    cfg: mc.ModelConfig, signature: ModelSignature, batch_size: int, data_files: dict[str, str] | None = None
) -> None:
    """Warm up with batches of 1 and `batch_size`: inputs from files under `<model>/warmup/` when given, else zeros.

    Triton runs these requests before it reports the model ready, so the first real request does not pay for
    lazy allocations or engine tuning. Zeros rather than random data: random bytes in an id input index outside
    the embedding tables, and a failing warmup fails the model load.
    """
    del cfg.model_warmup[:]
    for size in warmup_batch_sizes(batch_size):
        # Triton repeats each input `batch_size` times, so the inputs describe one sample.
        warm = cfg.model_warmup.add(name=f"warmup_batch_{size}", batch_size=size, count=1)
        for spec in signature.inputs:
            entry = warm.inputs[spec.name]
            entry.data_type = triton_dtype(spec.dtype)
            # Dynamic non-batch dims need a concrete size for warmup; 1 is always valid.
            entry.dims.extend([d if d >= 0 else 1 for d in spec.shape])
            if data_files and spec.name in data_files:
                entry.input_data_file = data_files[spec.name]
            else:
                entry.zero_data = True
    if PARAM_WARMUP_BATCH in cfg.parameters:
        del cfg.parameters[PARAM_WARMUP_BATCH]


def signature_from_config(cfg: mc.ModelConfig) -> ModelSignature | None:
    """The model signature declared in `cfg`, or None when inputs/outputs are left to auto-complete."""
    if not cfg.input or not cfg.output:
        return None
    return ModelSignature(
        inputs=tuple(TensorSpec(i.name, numpy_dtype(i.data_type), tuple(i.dims)) for i in cfg.input),
        outputs=tuple(TensorSpec(o.name, numpy_dtype(o.data_type), tuple(o.dims)) for o in cfg.output),
    )


def merge_signature(
    template: mc.ModelConfig, name: str, signature: ModelSignature, warmup_files: dict[str, str] | None = None
) -> mc.ModelConfig:
    """Copy of an operator-written `template` with `name` and the built model's signature (and warmup) filled in."""
    cfg = mc.ModelConfig()
    cfg.CopyFrom(template)
    cfg.name = name
    _set_signature(cfg, signature)
    warm_batch = warmup_batch_size_of(cfg)
    if warm_batch:
        add_warmup(cfg, signature, warm_batch, warmup_files)
    return cfg


def options_from_config(cfg: mc.ModelConfig) -> ServingOptions:
    """Recover ServingOptions from a ModelConfig (inverse of build_model_config)."""
    backend = cfg.backend or ("tensorrt" if cfg.platform == "tensorrt_plan" else "onnxruntime")
    accelerators = list(cfg.optimization.execution_accelerators.gpu_execution_accelerator)
    trt = next((a for a in accelerators if a.name == "tensorrt"), None)
    precision = cfg.parameters[PARAM_PRECISION].string_value if PARAM_PRECISION in cfg.parameters else ""
    if not precision:
        precision = "fp16" if trt is not None and trt.parameters.get("precision_mode") == "FP16" else "fp32"
    db: DynamicBatching | None = None
    if cfg.HasField("dynamic_batching"):
        d = cfg.dynamic_batching
        db = DynamicBatching(
            preferred_batch_sizes=tuple(d.preferred_batch_size),
            max_queue_delay_microseconds=d.max_queue_delay_microseconds,
            preserve_ordering=d.preserve_ordering,
            default_queue_timeout_microseconds=d.default_queue_policy.default_timeout_microseconds,
        )
    kind, count, gpus = "CPU", 1, ()
    if cfg.instance_group:
        g = cfg.instance_group[0]
        kind = "CPU" if g.kind == mc.ModelInstanceGroup.KIND_CPU else "GPU"
        count, gpus = max(g.count, 1), tuple(g.gpus)
    warmup = warmup_batch_size_of(cfg)
    latest = cfg.version_policy.latest.num_versions if cfg.version_policy.HasField("latest") else 1
    return ServingOptions(
        backend=backend,
        precision=precision,
        max_batch_size=cfg.max_batch_size,
        dynamic_batching=db,
        instance_kind=kind,
        instance_count=count,
        gpus=gpus,
        # fp16 on onnxruntime implies the accelerator, so it reads back as enabled.
        tensorrt_accelerator=trt is not None,
        version_policy_latest=latest,
        warmup_batch_size=warmup,
        graph_optimization_level=cfg.optimization.graph.level if cfg.optimization.HasField("graph") else None,
    )


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    """Serialize a ModelConfig in protobuf text format (what Triton reads as config.pbtxt)."""
    return str(text_format.MessageToString(cfg))


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text; raises InvalidModelConfig with the parser's location on error."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise InvalidModelConfig(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc
