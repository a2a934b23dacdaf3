#!/usr/bin/env bash
# GPU check for the serving benchmark (issue part 6): CTR model throughput with ONNX Runtime CUDA EP, TensorRT
# (ORT TensorRT EP and/or the tensorrt Python API) fp32 vs fp16, plus PyTorch CUDA as the always-present reference,
# at batch 200 (one request's candidates) and 1024 (a dynamic batch). Prints one JSON line; finishes in < 5 minutes.
#
# Usage (from anywhere):  bash bench/serving/gpu_check.sh [path/to/model.onnx]
# Model, in order: $1, $CTR_ONNX, bench/results/serving/repo_default/ctr-dnn/1/model.onnx,
#   examples/ctr-dnn/artifacts/*/model.onnx (write one with `python examples/ctr-dnn/train.py --onnx` and carry
#   that folder to the GPU machine). None found: the same MLP trained in place with PyTorch on the generated data
#   (examples/ecommerce_data.py travels with the tree); without torch, random weights (same cost). The JSON says which.
# Assumptions: an NVIDIA driver (nvidia-smi), python3 with numpy. Everything else is optional and probed: onnx,
#   onnxruntime(-gpu), tensorrt, torch. No network is needed; wheels placed in .whl/ at the repository root are
#   installed offline into a temporary directory first. What cannot run is listed under "unavailable" with why.
# Output: the JSON line on stdout, also written to $OUT/gpu_check.json (or bench/results/gpu/gpu_check.json).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
RESULT_DIR="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$RESULT_DIR"

if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl >&2; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: installing .whl/ failed; continuing with what is installed" >&2
  fi
fi

GPU_INFO="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
export GPU_INFO RESULT_DIR
MODEL_ARG="${1:-${CTR_ONNX:-}}"
export MODEL_ARG

# The Python part stops itself after GPU_CHECK_BUDGET_S; `timeout` is the backstop.
timeout "${GPU_CHECK_TIMEOUT_S:-290}" "$PY" - <<'PYEOF'
import glob
import json
import os
import platform
import sys
import time

import numpy as np

BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "240"))
PER_CASE_S = float(os.environ.get("GPU_CHECK_CASE_S", "1.5"))
BATCHES = [int(b) for b in os.environ.get("GPU_CHECK_BATCHES", "200,1024").split(",")]
START = time.perf_counter()
results, unavailable, notes = [], {}, []


def log(msg):
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


def over_budget():
    return time.perf_counter() - START > BUDGET_S


def find_model():
    cands = [os.environ.get("MODEL_ARG", ""), "bench/results/serving/repo_default/ctr-dnn/1/model.onnx",
             *sorted(glob.glob("examples/ctr-dnn/artifacts/*/model.onnx"))]
    return next((c for c in cands if c and os.path.isfile(c)), None)


def weights_from_onnx(path):
    """Dense layers of a tf2onnx/Keras MLP: MatMul(x, W) [+ Add(b)] per layer, in graph order."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(path).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        w = next((init[i] for i in n.input if i in init and init[i].ndim == 2), None)
        if w is None:
            raise ValueError(f"{n.name}: weight is not an initializer")
        if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            w = w.T
        b = next((init[i] for i in n.input if i in init and init[i].ndim == 1), None)
        if b is None:
            add = next((c for c in consumers.get(n.output[0], []) if c.op_type == "Add"), None)
            b = next((init[i] for i in add.input if i in init), None) if add is not None else None
        layers.append((w.astype(np.float32), (b if b is not None else np.zeros(w.shape[1])).astype(np.float32)))
    if not layers:
        raise ValueError("no MatMul/Gemm layers found")
    return layers


def torch_trained_layers():
    """No exported model: train the same MLP in place with PyTorch on the generated data (seconds on a GPU)."""
    import torch

    sys.path.insert(0, "examples")
    from ecommerce_data import DataConfig, generate, roc_auc

    data = generate(DataConfig(n_users=1000, n_items=500, seed=0))
    train, test = data.features.split("train"), data.features.split("test")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    d = train.x.shape[1]
    nn = torch.nn
    model = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 64), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(64, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(train.x).to(dev), torch.from_numpy(train.click).to(dev)
    for _ in range(4):
        for idx in torch.randperm(x.shape[0], device=dev).split(512):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        auc = roc_auc(test.click, model(torch.from_numpy(test.x).to(dev)).squeeze(1).cpu().numpy())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()) for m in linears], auc


def random_layers(dims=(51, 128, 64, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype(np.float32), np.zeros(b, np.float32))
            for a, b in zip(dims[:-1], dims[1:])]


def onnx_bytes(layers, fp16):
    """The MLP as an ONNX graph (relu between layers, sigmoid at the end), fp32 or fp16 end to end."""
    from onnx import TensorProto, helper, numpy_helper

    dt = np.float16 if fp16 else np.float32
    et = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes, inits, x = [], [], "features"
    for k, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(dt), f"W{k}"), numpy_helper.from_array(b.astype(dt), f"b{k}")]
        nodes += [helper.make_node("MatMul", [x, f"W{k}"], [f"m{k}"]), helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"])]
        act = "Relu" if k < len(layers) - 1 else "Sigmoid"
        x = "probability" if act == "Sigmoid" else f"h{k}"
        nodes.append(helper.make_node(act, [f"a{k}"], [x]))
    graph = helper.make_graph(nodes, "ctr_dnn", [helper.make_tensor_value_info("features", et, ["N", layers[0][0].shape[0]])],
                              [helper.make_tensor_value_info("probability", et, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by ONNX Runtime / TensorRT releases from 2022 on
    return model.SerializeToString()


def timed(fn, batch):
    fn()  # warm-up (and engine build / graph capture for lazy engines)
    fn()
    lat = []
    end = time.perf_counter() + PER_CASE_S
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    lat_ms = np.asarray(lat) * 1e3
    return {"batch": batch, "calls": len(lat), "samples_per_s": round(batch * len(lat) / float(np.sum(lat)), 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 4), "p99_ms": round(float(np.percentile(lat_ms, 99)), 4)}


def record(engine, precision, fn_for_batch):
    for batch in BATCHES:
        if over_budget():
            notes.append(f"budget reached before {engine} {precision} batch {batch}")
            return
        try:
            r = timed(fn_for_batch(batch), batch)
        except Exception as exc:  # one engine failing must not lose the others' figures
            unavailable[f"{engine}/{precision}/b{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        results.append({"engine": engine, "precision": precision, **r})
        log(f"{engine:<22} {precision} batch {batch:>5}: {r['samples_per_s']:>14,.0f} samples/s, p50 {r['p50_ms']:.3f} ms")


rng = np.random.default_rng(0)
model_path = find_model()
layers, source = None, None
if model_path:
    try:
        layers, source = weights_from_onnx(model_path), f"trained weights from {model_path}"
    except Exception as exc:
        notes.append(f"could not read {model_path}: {type(exc).__name__}: {exc}")
if layers is None:
    try:
        layers, auc = torch_trained_layers()
        source = f"trained in place with PyTorch on the generated data (test AUC {auc:.3f})"
    except Exception as exc:
        notes.append(f"in-place training failed: {type(exc).__name__}: {exc}"[:300])
if layers is None:
    layers, source = random_layers(), "random weights, same 51-128-64-1 architecture (same cost)"
dim = layers[0][0].shape[0]
inputs = {b: rng.random((b, dim), dtype=np.float32) for b in BATCHES}
log(f"model: {source}")

# ---- ONNX Runtime: CPU (reference), CUDA EP, TensorRT EP. Inputs start on the host, as in a server.
try:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    model32 = onnx_bytes(layers, fp16=False)
    model16 = onnx_bytes(layers, fp16=True)

    def ort_case(model, prov, opts, dtype):
        def make(batch):
            sess = ort.InferenceSession(model, providers=[(prov, opts)] if opts else [prov])
            x = inputs[batch].astype(dtype)
            return lambda: sess.run(None, {"features": x})
        return make

    record("onnxruntime-cpu", "fp32", ort_case(model32, "CPUExecutionProvider", None, np.float32))
    if "CUDAExecutionProvider" in providers:
        record("onnxruntime-cuda", "fp32", ort_case(model32, "CUDAExecutionProvider", {}, np.float32))
        record("onnxruntime-cuda", "fp16", ort_case(model16, "CUDAExecutionProvider", {}, np.float16))
    else:
        unavailable["onnxruntime-cuda"] = f"onnxruntime {ort.__version__} providers: {providers} (needs onnxruntime-gpu)"
    if "TensorrtExecutionProvider" in providers:
        for prec, fp16 in (("fp32", False), ("fp16", True)):
            opts = {"trt_fp16_enable": fp16, "trt_engine_cache_enable": False,
                    "trt_profile_min_shapes": f"features:1x{dim}", "trt_profile_max_shapes": f"features:{max(BATCHES)}x{dim}",
                    "trt_profile_opt_shapes": f"features:{max(BATCHES)}x{dim}"}
            record("onnxruntime-tensorrt", prec, ort_case(model32, "TensorrtExecutionProvider", opts, np.float32))
    else:
        unavailable["onnxruntime-tensorrt"] = f"providers: {providers} (needs onnxruntime-gpu and TensorRT libraries)"
except ImportError as exc:
    unavailable["onnxruntime"] = str(exc)
    model32 = None

# ---- PyTorch CUDA: the reference that is present on most GPU images (cuBLAS; eager and CUDA graphs).
torch = None
try:
    import torch

    if not torch.cuda.is_available():
        unavailable["torch-cuda"] = f"torch {torch.__version__}: no CUDA device"
        torch = None
except ImportError as exc:
    unavailable["torch-cuda"] = str(exc)

if torch is not None:
    dev = torch.device("cuda")

    def pinned(t):
        try:
            return t.pin_memory()
        except RuntimeError:  # some sandboxes refuse page-locked memory: pageable copies still work
            return t

    def torch_case(dtype, graphs):
        params = []

        def forward(x):
            for k, (w, b) in enumerate(params):
                x = torch.addmm(b, x, w)
                x = torch.relu(x) if k < len(params) - 1 else torch.sigmoid(x)
            return x

        def make(batch):
            if not params:
                params.extend((torch.from_numpy(w).to(dev, dtype), torch.from_numpy(b).to(dev, dtype)) for w, b in layers)
            host_in = pinned(torch.from_numpy(inputs[batch]))
            host_out = pinned(torch.empty((batch, 1), dtype=torch.float32))
            dev_in = torch.empty((batch, dim), dtype=dtype, device=dev)
            if not graphs:
                def step():
                    dev_in.copy_(host_in, non_blocking=True)
                    host_out.copy_(forward(dev_in), non_blocking=True)
                    torch.cuda.synchronize()
                return step
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    forward(dev_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dev_out = forward(dev_in)

            def step():
                dev_in.copy_(host_in, non_blocking=True)
                graph.replay()
                host_out.copy_(dev_out, non_blocking=True)
                torch.cuda.synchronize()
            return step
        return make

    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            record("torch-cuda-eager", name, torch_case(dtype, graphs=False))
            record("torch-cuda-graph", name, torch_case(dtype, graphs=True))

# ---- TensorRT Python API: engine from the ONNX graph, fp32 and fp16, dynamic batch; buffers through torch.
try:
    import tensorrt as trt

    if torch is None or model32 is None:
        raise ImportError("the TensorRT run needs torch (CUDA buffers) and the ONNX graph (onnx package)")
    trt_logger = trt.Logger(trt.Logger.ERROR)

    def trt_case(fp16):
        builder = trt.Builder(trt_logger)
        # TensorRT 10 networks are always explicit-batch; 8.x needs the flag for ONNX models.
        major = int(trt.__version__.split(".")[0])
        network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse(model32):
            raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape("features", (1, dim), (max(BATCHES), dim), (max(BATCHES), dim))
        config.add_optimization_profile(profile)
        engine = trt.Runtime(trt_logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
        context = engine.create_execution_context()

        def make(batch):
            host_in = pinned(torch.from_numpy(inputs[batch]))
            host_out = pinned(torch.empty((batch, 1), dtype=torch.float32))
            dev_in = torch.empty((batch, dim), dtype=torch.float32, device="cuda")
            dev_out = torch.empty((batch, 1), dtype=torch.float32, device="cuda")
            context.set_input_shape("features", (batch, dim))
            context.set_tensor_address("features", dev_in.data_ptr())
            context.set_tensor_address("probability", dev_out.data_ptr())
            stream = torch.cuda.current_stream()

            def step():
                dev_in.copy_(host_in, non_blocking=True)
                context.execute_async_v3(stream.cuda_stream)
                host_out.copy_(dev_out, non_blocking=True)
                torch.cuda.synchronize()
            return step
        return make

    record("tensorrt", "fp32", trt_case(False))
    record("tensorrt", "fp16", trt_case(True))
except ImportError as exc:
    unavailable["tensorrt"] = str(exc)
except Exception as exc:
    unavailable["tensorrt"] = f"{type(exc).__name__}: {exc}"[:300]

gpu = os.environ.get("GPU_INFO", "")
out = {
    "check": "recserve-ctr-gpu",
    "gpu": gpu.split(",")[0].strip() if gpu else None,
    "nvidia_smi": gpu or "nvidia-smi not found or failed",
    "model": source,
    "python": platform.python_version(),
    "batches": BATCHES,
    "results": results,
    "best": {f"{r['engine']}/{r['precision']}": max((x["samples_per_s"] for x in results
                                                     if (x["engine"], x["precision"]) == (r["engine"], r["precision"])))
             for r in results},
    "unavailable": unavailable,
    "notes": notes + ["latency is one call from host input to host output (copies included), single stream"],
    "seconds": round(time.perf_counter() - START, 1),
}
line = json.dumps(out)
with open(os.path.join(os.environ["RESULT_DIR"], "gpu_check.json"), "w") as f:
    f.write(line + "\n")
print(line)
PYEOF
