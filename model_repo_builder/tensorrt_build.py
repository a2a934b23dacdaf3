"""TensorRT engine building (GPU nodes only): optimization profiles and a lazily imported TensorRT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_repo_builder.config import ModelSignature
from model_repo_builder.errors import BadInputError, MissingRuntimeError


@dataclass(frozen=True)
class ProfileShape:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(
    signature: ModelSignature, max_batch_size: int, opt_batch_size: int | None = None, dynamic_dim: int = 1
) -> dict[str, ProfileShape]:
    """min/opt/max shapes per input: batch 1 / opt (default: half of max, rounded up) / max_batch_size.

    Dynamic non-batch dimensions (rare in rankers) are pinned to `dynamic_dim`, since one profile needs fixed bounds.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size})")
    opt = opt_batch_size if opt_batch_size is not None else max(1, (max_batch_size + 1) // 2)
    if not 1 <= opt <= max_batch_size:
        raise ValueError(f"opt batch size {opt} must be between 1 and max_batch_size={max_batch_size}")
    shapes = {}
    for spec in signature.inputs:
        rest = tuple(d if d >= 0 else dynamic_dim for d in spec.shape)
        shapes[spec.name] = ProfileShape((1, *rest), (opt, *rest), (max_batch_size, *rest))
    return shapes


def import_tensorrt() -> Any:
    """Import TensorRT and check that a CUDA device is usable, or raise MissingRuntimeError (exit code 5)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingRuntimeError(
            "backend tensorrt needs the TensorRT Python package, which is not installed here",
            "run the build on a GPU node of the builder image (pip install tensorrt), or use --backend onnxruntime",
        ) from exc
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        if builder is None:
            raise RuntimeError("no CUDA device")
    except Exception as exc:
        raise MissingRuntimeError(
            f"TensorRT is installed but cannot use a GPU: {exc}", "run the build on a node with an NVIDIA GPU"
        ) from exc
    return trt


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    signature: ModelSignature,
    *,
    max_batch_size: int,
    precision: str,
    workspace_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine with one optimization profile; int8 expects a QDQ (static) ONNX."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInputError(f"TensorRT cannot parse the ONNX model: {errors}", "check the opset and operators")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        cfg.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        cfg.set_flag(trt.BuilderFlag.INT8)
        cfg.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(signature, max_batch_size)
    for name, s in shapes.items():
        profile.set_shape(name, s.min, s.opt, s.max)
    cfg.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, cfg)
    if engine is None:
        raise MissingRuntimeError("TensorRT failed to build an engine (see its log above)", "check GPU memory")
    plan_path.write_bytes(bytes(engine))
    return {
        "tensorrt_version": str(trt.__version__),
        "profile": {k: {"min": v.min, "opt": v.opt, "max": v.max} for k, v in shapes.items()},
    }
