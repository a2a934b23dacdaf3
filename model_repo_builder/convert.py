"""Load Keras/SavedModel/ONNX sources, convert TF models to ONNX with tf2onnx, and read model signatures."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_repo_builder import safety
from model_repo_builder.config import ModelSignature, TensorSpec
from model_repo_builder.errors import BadInputError, UsageError

FORMATS = ("keras", "savedmodel", "onnx")
DEFAULT_OPSET = 17

Predict = Callable[[dict[str, NDArray[Any]]], dict[str, NDArray[Any]]]


@dataclass
class SourceModel:
    """A loaded source model: its signature and a predict function over named numpy arrays."""

    format: str
    signature: ModelSignature
    predict: Predict
    tf_function: Any = None  # the tf.function with a None-batch input signature (TF sources only)
    tf_specs: tuple[Any, ...] = ()
    keepalive: Any = None  # owner of the TF variables (a loaded SavedModel frees them when collected)


def detect_format(path: Path, declared: str | None = None) -> str:
    """The source format: the declared one (checked against the file) or guessed from the path."""
    if declared is not None and declared not in FORMATS:
        raise UsageError(f"unsupported format {declared!r}", f"use one of: {', '.join(FORMATS)}")
    if path.is_dir():
        guessed = "savedmodel" if (path / "saved_model.pb").exists() else None
    elif path.suffix.lower() == ".keras":
        guessed = "keras"
    elif path.suffix.lower() == ".onnx":
        guessed = "onnx"
    else:
        guessed = None
    if declared is None and guessed is None:
        raise BadInputError(
            f"cannot tell the format of {path.name!r} (supported: .keras files, SavedModel directories, .onnx files)",
            "pass --format keras|savedmodel|onnx, or export the model in one of these formats",
        )
    fmt = declared or guessed
    if fmt == "savedmodel" and not (path.is_dir() and (path / "saved_model.pb").exists()):
        raise BadInputError(f"{path} is not a SavedModel directory (no saved_model.pb)", "check --source/--format")
    if fmt in ("keras", "onnx") and path.is_dir():
        raise BadInputError(f"{path} is a directory, not a .{fmt} file", "check --source/--format")
    return str(fmt)


def _quiet_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf


def _tf_dtype_name(dtype: Any) -> str:
    return str(np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).name)


def _check_batch_dim(name: str, shape: Any, what: str) -> tuple[int, ...]:
    dims = list(shape)
    if not dims:
        raise BadInputError(f"{what} {name!r} is a scalar: there is no batch dimension", _BATCH_HINT)
    if dims[0] is not None:
        raise BadInputError(f"{what} {name!r} has a fixed batch dimension of {dims[0]} (shape {dims})", _BATCH_HINT)
    return tuple(-1 if d is None else int(d) for d in dims[1:])


_BATCH_HINT = "re-export the model with a dynamic (None) leading batch dimension, e.g. keras.Input(shape=(n,))"


def _load_keras(path: Path, *, safe_mode: bool) -> SourceModel:
    tf = _quiet_tf()
    import keras

    try:
        # safe_mode is Keras' own refusal of Lambda bytecode, kept on beneath safety.check_source's wider one.
        model = keras.models.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types for corrupt archives; all mean the same to the user
        raise BadInputError(f"cannot load Keras model {path.name}: {exc}", "re-export it with model.save()") from exc
    specs, inputs = [], []
    for t in model.inputs:
        name = t.name
        shape = _check_batch_dim(name, t.shape, "input")
        specs.append(tf.TensorSpec((None, *[None if d < 0 else d for d in shape]), t.dtype, name=name))
        inputs.append(TensorSpec(name, _tf_dtype_name(t.dtype), shape))
    out_names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(model.outputs))])
    outputs = tuple(
        TensorSpec(n, _tf_dtype_name(t.dtype), tuple(-1 if d is None else int(d) for d in list(t.shape)[1:]))
        for n, t in zip(out_names, model.outputs, strict=True)
    )
    names = [s.name for s in inputs]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def serve(*args: Any) -> dict[str, Any]:
        result = model(list(args) if len(args) > 1 else args[0], training=False)
        flat = result if isinstance(result, (list, tuple)) else [result]
        return dict(zip(out_names, flat, strict=True))

    def predict(feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        out = serve(*[tf.constant(feeds[n]) for n in names])
        return {k: v.numpy() for k, v in out.items()}

    return SourceModel("keras", ModelSignature(tuple(inputs), outputs), predict, serve, tuple(specs))


def _load_savedmodel(path: Path) -> SourceModel:
    tf = _quiet_tf()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise BadInputError(f"cannot load SavedModel {path}: {exc}", "re-export it with model.export()") from exc
    sigs = getattr(loaded, "signatures", {})
    if "serving_default" not in sigs:
        raise BadInputError(f"SavedModel {path} has no serving_default signature", "export with a serving signature")
    sig = sigs["serving_default"]
    in_specs = sig.structured_input_signature[1]
    names = sorted(in_specs)
    inputs, specs = [], []
    for n in names:
        s = in_specs[n]
        inputs.append(TensorSpec(n, _tf_dtype_name(s.dtype), _check_batch_dim(n, s.shape, "input")))
        specs.append(tf.TensorSpec(s.shape, s.dtype, name=n))
    out_struct = sig.structured_outputs
    outputs = tuple(
        TensorSpec(k, _tf_dtype_name(v.dtype), tuple(-1 if d is None else int(d) for d in list(v.shape)[1:]))
        for k, v in sorted(out_struct.items())
    )

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def serve(*args: Any) -> dict[str, Any]:
        return dict(sig(**dict(zip(names, args, strict=True))))

    def predict(feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        out = serve(*[tf.constant(feeds[n]) for n in names])
        return {k: v.numpy() for k, v in out.items()}

    return SourceModel("savedmodel", ModelSignature(tuple(inputs), outputs), predict, serve, tuple(specs), loaded)


def onnx_signature(model: Any) -> ModelSignature:
    """Signature of an ONNX model; every input must have a dynamic leading batch dimension."""
    import onnx

    initializers = {i.name for i in model.graph.initializer}

    def spec(v: Any, what: str, check_batch: bool) -> TensorSpec:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise BadInputError(f"{what} {v.name!r} is not a tensor", "only tensor inputs/outputs are supported")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if check_batch:
            shape = _check_batch_dim(v.name, dims, what)
        else:
            shape = tuple(-1 if d is None else int(d) for d in dims[1:])
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return TensorSpec(v.name, dtype, shape)

    ins = tuple(spec(v, "input", True) for v in model.graph.input if v.name not in initializers)
    outs = tuple(spec(v, "output", False) for v in model.graph.output)
    return ModelSignature(ins, outs)


def load_onnx_checked(path: Path, *, source: bool) -> Any:
    """Load, check and shape-infer an ONNX file; corrupt sources are bad input, corrupt outputs are bugs."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (DecodeError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        if not source:
            raise
        raise BadInputError(
            f"{path.name} is not a valid ONNX model ({type(exc).__name__}: {str(exc)[:300]})",
            "re-export the model; check that the upload was not truncated",
        ) from exc


def ort_session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_predictor(path: Path, threads: int = 0) -> Predict:
    sess = ort_session(path, threads)
    out_names = [o.name for o in sess.get_outputs()]

    def predict(feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        return dict(zip(out_names, sess.run(out_names, feeds), strict=True))

    return predict


def load_source(path: Path, fmt: str, *, allow_unsafe: bool = False) -> SourceModel:
    """Load a source model for conversion and as the parity reference. A source whose loading would run code it
    carries is refused first (safety.check_source) unless `allow_unsafe`."""
    if fmt == "keras" and not zipfile.is_zipfile(path):
        raise BadInputError(f"{path.name} is not a valid .keras archive (truncated or corrupt)", "re-export the model")
    safety.check_source(path, fmt, allow_unsafe=allow_unsafe)
    if fmt == "keras":
        return _load_keras(path, safe_mode=not allow_unsafe)
    if fmt == "savedmodel":
        return _load_savedmodel(path)
    model = load_onnx_checked(path, source=True)
    sig = onnx_signature(model)
    try:
        predict = onnx_predictor(path)
    except Exception as exc:
        raise BadInputError(f"ONNX Runtime cannot load {path.name}: {exc}", "check the opset and operators") from exc
    return SourceModel("onnx", sig, predict)


def _rename_outputs(model: Any, names: list[str]) -> None:
    """Give graph outputs the source model's output names (tf2onnx may name them after TF tensors)."""
    if {o.name for o in model.graph.output} == set(names):
        return
    for out, new in zip(model.graph.output, names, strict=True):
        old = out.name
        if old == new:
            continue
        for node in model.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        out.name = new


def convert_to_onnx(source: SourceModel, source_path: Path, out_path: Path, opset: int = DEFAULT_OPSET) -> Any:
    """Write the source as a checked ONNX model at `out_path` (ONNX sources are copied after checking)."""
    import onnx

    if source.format == "onnx":
        model = load_onnx_checked(source_path, source=True)
    else:
        import tf2onnx

        try:
            model, _ = tf2onnx.convert.from_function(source.tf_function, input_signature=source.tf_specs, opset=opset)
        except Exception as exc:
            raise BadInputError(
                f"tf2onnx cannot convert the model at opset {opset}: {str(exc)[:500]}",
                "try another --opset, or export the model to ONNX yourself and build from the .onnx",
            ) from exc
        # The tf.function returns a dict, flattened in sorted-key order by TF: name outputs accordingly.
        _rename_outputs(model, sorted(o.name for o in source.signature.outputs))
        model.producer_name = "recserve-model-repo-builder"
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.save(model, str(out_path))
    return model
