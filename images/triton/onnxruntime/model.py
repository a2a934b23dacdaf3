"""Python-based Triton backend named `onnxruntime`: serves a model's model.onnx with ONNX Runtime on CPU."""

# Triton loads this file for every model whose config says `backend: "onnxruntime"` when the backend directory
# holds onnxruntime/model.py instead of libtriton_onnxruntime.so, so production configs load unchanged. It
# runs in the python backend stub and imports only numpy, onnxruntime and triton_python_backend_utils.
# Inputs and outputs are matched by the names in the model config; the config's dtypes are the wire dtypes,
# cast to and from what the ONNX graph declares. With max_batch_size > 0 the requests of one dynamic batch
# run as one ONNX Runtime call (split again per request); with max_batch_size 0 each request runs alone.

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_ONNX_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


# optimization.graph.level as the onnxruntime backend reads it (anything else: ORT_ENABLE_ALL).
_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _session_options(config: dict[str, Any]) -> ort.SessionOptions:
    """The onnxruntime backend's session settings; an unset thread count (0) leaves ONNX Runtime's default."""
    params = _parameters(config)
    opts = ort.SessionOptions()
    level = int(config.get("optimization", {}).get("graph", {}).get("level", 0))
    opts.graph_optimization_level = _GRAPH_LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    mode = params.get("execution_mode", "0") or "0"
    if mode not in ("0", "1"):
        raise pb_utils.TritonModelException(f"execution_mode must be 0 or 1 (got {mode!r})")
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode == "1" else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(params.get("intra_op_thread_count") or 0)
    opts.inter_op_num_threads = int(params.get("inter_op_thread_count") or 0)
    if "enable_mem_arena" in params:
        opts.enable_cpu_mem_arena = _flag(params["enable_mem_arena"])
    if "enable_mem_pattern" in params:
        opts.enable_mem_pattern = _flag(params["enable_mem_pattern"])
    return opts


def _to_onnx(array: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is np.object_:  # Triton hands BYTES tensors over as bytes objects; ONNX strings are str
        return np.char.decode(array.astype(np.bytes_), "utf-8").astype(np.object_)
    return array if array.dtype == dtype else array.astype(dtype)


def _to_triton(array: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is np.object_:
        return np.array([str(v).encode("utf-8") for v in array.ravel()], dtype=np.object_).reshape(array.shape)
    return np.ascontiguousarray(array, dtype=dtype)


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    """One instance per instance_group count; each holds its own ONNX Runtime session."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config.get("name", args.get("model_name", "?"))
        self.max_batch_size = int(config.get("max_batch_size", 0))
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.session = ort.InferenceSession(
            path, sess_options=_session_options(config), providers=["CPUExecutionProvider"]
        )
        graph_inputs = {i.name: i.type for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        wanted_inputs = [i["name"] for i in config.get("input", [])]
        wanted_outputs = [o["name"] for o in config.get("output", [])]
        if not wanted_inputs or not wanted_outputs:
            raise pb_utils.TritonModelException(f"model {self.name}: the config must list its inputs and outputs")
        unknown = [n for n in wanted_inputs if n not in graph_inputs]
        unknown += [n for n in wanted_outputs if n not in graph_outputs]
        absent = [n for n in graph_inputs if n not in wanted_inputs]
        if unknown or absent:
            raise pb_utils.TritonModelException(
                f"model {self.name}: config and {filename} disagree: not in the graph {unknown}, "
                f"graph inputs missing from the config {absent} (graph inputs {sorted(graph_inputs)}, "
                f"outputs {sorted(graph_outputs)})"
            )
        self.inputs = [(n, _ONNX_DTYPES.get(graph_inputs[n], np.float32)) for n in wanted_inputs]
        self.optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None and name in self.optional:
                continue  # as the onnxruntime backend does: an absent optional input is not fed
            if tensor is None:
                raise ValueError(f"request has no input {name!r}")
            feeds[name] = _to_onnx(tensor.as_numpy(), dtype)
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run([n for n, _ in self.outputs], feeds)
        return [_to_triton(np.asarray(r), dtype) for r, (_, dtype) in zip(results, self.outputs, strict=True)]

    def _response(self, arrays: list[np.ndarray]) -> Any:
        tensors = [pb_utils.Tensor(name, a) for (name, _), a in zip(self.outputs, arrays, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        ready: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                ready.append((i, self._feeds(request)))
            except ValueError as exc:  # only this request fails
                responses[i] = _error_response(f"model {self.name}: {exc}")
        feeds = [f for _, f in ready]
        try:
            if self.max_batch_size > 0 and len(feeds) > 1 and self._stackable(feeds):
                results = self._execute_batched(feeds)
            else:
                results = [self._response(self._run(f)) for f in feeds]
        except Exception as exc:  # an ONNX Runtime failure fails these requests, not the model
            # Raised, not returned as error responses: Triton's python backend counts only a raised execute()
            # in nv_inference_request_failure (reason BACKEND), as the onnxruntime backend counts a failed Run;
            # error responses count as successes, and the canary analysis would see a failing model as healthy.
            raise pb_utils.TritonModelException(f"model {self.name}: ONNX Runtime failed: {exc}") from None
        for (i, _), response in zip(ready, results, strict=True):
            responses[i] = response
        return responses

    def _stackable(self, feeds: list[dict[str, np.ndarray]]) -> bool:
        """Requests can share one run when they feed the same inputs, agreeing on all dimensions but the batch one."""
        if len({tuple(sorted(f)) for f in feeds}) != 1:
            return False
        return all(len({f[n].shape[1:] for f in feeds}) == 1 for n in feeds[0])

    def _execute_batched(self, feeds: list[dict[str, np.ndarray]]) -> list[Any]:
        first = next(iter(feeds[0]))
        sizes = [len(f[first]) for f in feeds]
        merged = {n: np.concatenate([f[n] for f in feeds]) for n in feeds[0]}
        results = self._run(merged)
        responses, start = [], 0
        for size in sizes:
            responses.append(self._response([r[start : start + size] for r in results]))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
