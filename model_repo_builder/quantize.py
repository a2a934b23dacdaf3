"""int8 quantization of ONNX models with ONNX Runtime (dynamic, or static QDQ with calibration data)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from model_repo_builder.errors import BadInputError


class _NpzReader:
    """CalibrationDataReader over in-memory feeds, in batches."""

    def __init__(self, feeds: dict[str, NDArray[Any]], batch: int = 64) -> None:
        n = len(next(iter(feeds.values())))
        self._it: Iterator[dict[str, NDArray[Any]]] = iter(
            [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
        )

    def get_next(self) -> dict[str, NDArray[Any]] | None:
        return next(self._it, None)


def quantize_int8(src: Path, dst: Path, calibration: dict[str, NDArray[Any]] | None = None) -> dict[str, Any]:
    """Quantize `src` into `dst`; returns how (for build.json).

    Without calibration data: dynamic quantization (int8 weights, activations quantized per batch at run time),
    the safe default for MLP rankers on CPU. With calibration data: static QDQ (uint8 activations, int8 per-channel
    weights), which TensorRT can also consume as explicit quantization.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = dst.with_name(dst.stem + ".prep.onnx")
    # Pre-processing (symbolic shape inference + ORT graph optimization) makes quantization cover more nodes.
    # Symbolic shape inference needs sympy (optional); ONNX shape inference covers static feature dims.
    quant_pre_process(str(src), str(prepped), skip_symbolic_shape=importlib.util.find_spec("sympy") is None)
    try:
        if calibration is None:
            # reduce_range: 7-bit weights avoid the u8*s8 accumulation saturation of x86 CPUs without VNNI, which
            # otherwise costs ~7x larger score errors on these MLPs (measured: max abs error 0.06 -> 0.008).
            quantize_dynamic(str(prepped), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
            return {"method": "dynamic", "weight_type": "QInt8", "per_channel": True, "reduce_range": True}
        if not calibration or len(next(iter(calibration.values()))) == 0:
            raise BadInputError("calibration data is empty", "pass an npz with a few hundred representative rows")
        quantize_static(
            str(prepped),
            str(dst),
            _NpzReader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return {"method": "static-qdq", "activation_type": "QUInt8", "weight_type": "QInt8", "calibration": "minmax",
                "per_channel": True, "reduce_range": True}
    finally:
        prepped.unlink(missing_ok=True)
