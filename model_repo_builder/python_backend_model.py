"""Triton python-backend model that serves the model.onnx next to it with ONNX Runtime (copied as model.py)."""

# This file is copied verbatim into <repo>/<name>/<version>/model.py; it runs inside Triton's python backend stub
# and must import only numpy, onnxruntime and triton_python_backend_utils.

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Scores requests with ONNX Runtime, concatenating the requests of one dynamic batch into one run (a model
    without a batch dimension, such as a ranking model, runs each request alone)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        params = config.get("parameters", {})
        threads = int(params.get("intra_op_thread_count", {}).get("string_value", "0") or 0)
        # Several instances share the host: one thread per instance unless configured, so counts scale cleanly.
        opts.intra_op_num_threads = threads or 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        # max_batch_size 0 (a ranking model): a request's first dimension is its own (candidates), not a batch
        # Triton assembled, so requests never share a run.
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        if not self.batched:
            return [self._run_one(r) for r in requests]
        return self._run_batch(requests)

    def _run(self, feeds: dict[str, Any]) -> list[Any]:
        try:
            return list(self.session.run([n for n, _ in self.outputs], feeds))
        except Exception as exc:
            # Raised: Triton counts only a raised execute() in nv_inference_request_failure; error responses
            # would count as successes and hide a failing model from the rollout analysis.
            raise pb_utils.TritonModelException(f"ONNX Runtime failed: {exc}") from None

    def _run_one(self, request: Any) -> Any:
        results = self._run({n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs})
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(res).astype(dtype, copy=False))
                   for (name, dtype), res in zip(self.outputs, results, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_batch(self, requests: list[Any]) -> list[Any]:
        feeds_per_request = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests
        ]
        sizes = [len(f[self.inputs[0]]) for f in feeds_per_request]
        feeds = {n: np.concatenate([f[n] for f in feeds_per_request]) for n in self.inputs}
        results = self._run(feeds)
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(res[start : start + size]).astype(dtype, copy=False))
                for (name, dtype), res in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
