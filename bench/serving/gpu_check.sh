#!/usr/bin/env bash
# GPU check for the serving benchmark (issue part 6): CTR model throughput with ONNX Runtime CUDA EP, TensorRT
# (ORT TensorRT EP and/or the tensorrt Python API) fp32 vs fp16, plus PyTorch CUDA as the always-present reference,
# at batch 200 (one request's candidates) and 1024 (a dynamic batch). Prints one JSON line; finishes in < 5 minutes.
# Ranking head (issue 13, docs/ranking.md): the same graph with the head added by the repository's own
# model_repo_builder.ranking (needs onnx), one request of 200 candidates, top 10 in the engine, on ORT CUDA EP fp32,
# ORT TensorRT EP fp16 (trt_fp16_enable; nodes TensorRT does not take run on the CUDA EP) and ORT CPU fp32 (the
# reference), each next to the same 200 rows sent plain (request columns duplicated into every row). Results carry
# "graph": "ranking" | "plain"; a ranking case records topk_match (its top-10 indices == the stable argsort of the
# plain graph's scores on the same rows and provider). The request columns: feature_spec.json next to the model
# (request_columns, as examples/ctr-dnn/train.py writes it), else the example CTR layout when the width matches
# (examples/ecommerce_data.py), else the first half of the columns (said in "notes"); GPU_CHECK_REQUEST_COLUMNS
# overrides. Without tritonclient (model_repo_builder.config imports it) a stand-in for its config types is used.
#
# Usage (from anywhere):  bash bench/serving/gpu_check.sh [path/to/model.onnx]
# Model, in order: $1, $CTR_ONNX, bench/results/serving/repo_default/ctr-dnn/1/model.onnx,
#   examples/ctr-dnn/artifacts/*/model.onnx (write one with `python examples/ctr-dnn/train.py --onnx` and carry
#   that folder to the GPU machine). None found: the same MLP trained in place with PyTorch on the generated data
#   (examples/ecommerce_data.py travels with the tree); without torch, random weights (same cost). The JSON says which.
# Assumptions: an NVIDIA driver (nvidia-smi), python3 with numpy. Everything else is optional and probed: onnx,
#   onnxruntime(-gpu), tensorrt, torch. No network is needed; wheels placed in .whl/ at the repository root are
#   installed offline into a temporary directory first. What cannot run is listed under "unavailable" with why
#   (without a GPU the CPU cases, ranking included, still run).
# Tunables: GPU_CHECK_BATCHES=200,1024 GPU_CHECK_CASE_S=1.5 GPU_CHECK_BUDGET_S=240 GPU_CHECK_TIMEOUT_S=290
#   GPU_CHECK_CANDIDATES=200 GPU_CHECK_K=10 GPU_CHECK_REQUEST_COLUMNS (e.g. 0-17,42-47) PYTHON=python3.
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
        results.append({"engine": engine, "precision": precision, "graph": "plain", **r})
        log(f"{engine:<22} {precision} batch {batch:>5}: {r['samples_per_s']:>14,.0f} samples/s, p50 {r['p50_ms']:.3f} ms")


rng = np.random.default_rng(0)
model_path = find_model()
layers, source, layers_from_file = None, None, False
if model_path:
    try:
        layers, source = weights_from_onnx(model_path), f"trained weights from {model_path}"
        layers_from_file = True
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
    ort, model32 = None, None

# ---- Ranking head: one request of CANDIDATES candidates, top K inside the engine, vs the same rows sent plain.
CANDIDATES = int(os.environ.get("GPU_CHECK_CANDIDATES", "200"))
TOP_K = int(os.environ.get("GPU_CHECK_K", "10"))
RANKING_CASES = (("onnxruntime-cpu", "fp32"), ("onnxruntime-cuda", "fp32"), ("onnxruntime-tensorrt", "fp16"))
ranking = {"candidates": CANDIDATES, "k": TOP_K, "module": "model_repo_builder.ranking"}


def column_ranges(cols):
    parts = []
    for c in sorted(cols):
        if parts and c == parts[-1][1] + 1:
            parts[-1][1] = c
        else:
            parts.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in parts)


def import_ranking():
    """The repository's own model_repo_builder.ranking. Its config module imports tritonclient's protobuf types,
    which the head never uses: when tritonclient (or its grpc) is missing, a stand-in module takes their place."""
    import importlib
    import types

    root = os.getcwd()  # the shell cd'ed to the repository root
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("model_repo_builder.ranking")
    except ImportError as exc:
        first = f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m == "model_repo_builder" or m.startswith("model_repo_builder.")]:
        del sys.modules[name]
    mc = types.ModuleType("tritonclient.grpc.model_config_pb2")
    mc.__getattr__ = lambda attr: f"stand-in:{attr}"  # module-level __getattr__ (PEP 562): any enum name resolves
    grpc_pkg = types.ModuleType("tritonclient.grpc")
    grpc_pkg.model_config_pb2 = mc
    saved = {n: sys.modules.get(n) for n in ("tritonclient", "tritonclient.grpc", "tritonclient.grpc.model_config_pb2")}
    sys.modules.setdefault("tritonclient", types.ModuleType("tritonclient"))
    sys.modules["tritonclient.grpc"], sys.modules["tritonclient.grpc.model_config_pb2"] = grpc_pkg, mc
    try:
        module = importlib.import_module("model_repo_builder.ranking")
    except ImportError as exc:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        raise ImportError(f"{first}; with a tritonclient stand-in: {type(exc).__name__}: {exc}") from exc
    notes.append(f"model_repo_builder.ranking imported with a stand-in for tritonclient's model_config_pb2 ({first})")
    return module


def onnx_signature(model, config):
    """ModelSignature (no batch dimension) of an ONNX graph's inputs (initializers aside) and outputs."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:
            dtype = "float32"
        return config.TensorSpec(v.name, dtype, dims[1:])

    return config.ModelSignature(tuple(spec(v) for v in model.graph.input if v.name not in inits),
                                 tuple(spec(v) for v in model.graph.output))


def example_request_columns(width):
    """The example CTR model's per-request columns (user and context blocks), from its own feature code."""
    if "examples" not in sys.path:
        sys.path.insert(0, "examples")
    from ecommerce_data import DataConfig, generate

    features = generate(DataConfig(n_users=50, n_items=50, days=8, history_days=2, test_days=1)).features
    return features.request_columns() if features.dim == width else None


def request_columns(rk, width):
    text = os.environ.get("GPU_CHECK_REQUEST_COLUMNS", "")
    if text:
        return rk.parse_columns(text), "GPU_CHECK_REQUEST_COLUMNS"
    if model_path and layers_from_file:
        spec_path = os.path.join(os.path.dirname(model_path), "feature_spec.json")
        if os.path.isfile(spec_path):
            with open(spec_path) as f:
                text = json.load(f).get("request_columns", "")
            if text:
                return rk.parse_columns(text), f"request_columns of {spec_path}"
    try:
        cols = example_request_columns(width)
    except Exception as exc:
        cols = None
        notes.append(f"example CTR layout unavailable: {type(exc).__name__}: {exc}"[:300])
    if cols:
        return tuple(cols), "the example CTR model's layout (examples/ecommerce_data.py request_columns)"
    notes.append(f"ranking: no request columns known for this {width}-column model; the first half "
                 f"(0-{width // 2 - 1}) is taken as per request")
    return tuple(range(width // 2)), "the first half of the columns (no feature_spec.json, not the example layout)"


def ranking_cases():
    def all_unavailable(why):
        for engine, prec in RANKING_CASES:
            unavailable[f"{engine}/{prec}/ranking-n{CANDIDATES}"] = why[:300]

    if ort is None or model32 is None:
        return all_unavailable("needs onnxruntime and onnx (the graphs are written with onnx)")
    try:
        import onnx

        rk = import_ranking()
        import model_repo_builder.config as rk_config

        plain = onnx.load_from_string(model32)
        cols, cols_from = request_columns(rk, dim)
        layout = rk.plan_ranking(onnx_signature(plain, rk_config),
                                 rk.RankingSpec(request_columns=cols, max_k=max(rk.DEFAULT_MAX_K, TOP_K)))
        head_model = rk.add_ranking_head(plain, layout)
        head = head_model.SerializeToString()
    except Exception as exc:  # no onnx, no module, a layout that does not fit: the other cases still count
        return all_unavailable(f"ranking head not built: {type(exc).__name__}: {exc}")
    req, cand = list(layout.request_columns), list(layout.candidate_columns)
    rows = np.random.default_rng(1).random((CANDIDATES, dim), dtype=np.float32)
    rows[:, req] = rows[0, req]  # one request: the same user and context in every row
    plain_feeds = {"features": rows}
    try:
        reference = ort.InferenceSession(model32, providers=["CPUExecutionProvider"]).run(None, plain_feeds)[0]
    except Exception as exc:
        return all_unavailable(f"the plain graph's CPU reference failed: {type(exc).__name__}: {exc}")
    ranking.update(graph_source="the fp32 graph the plain cases run (" + str(source) + ")",
                   request_columns=column_ranges(req), request_columns_from=cols_from,
                   request_width=len(req), candidate_width=len(cand),
                   first_layer_split=any(i.name.endswith("request_weights") for i in head_model.graph.initializer))
    head_feeds = {rk.REQUEST_INPUT: np.ascontiguousarray(rows[:1, req]),
                  rk.CANDIDATES_INPUT: np.ascontiguousarray(rows[:, cand]),
                  rk.K_INPUT: np.array([TOP_K], np.int64)}
    want = min(TOP_K, CANDIDATES)
    reference = np.asarray(reference, np.float64).reshape(-1)
    ref_order = np.argsort(-reference, kind="stable")[:want]
    providers = ort.get_available_providers()
    trt_opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": False}
    setups = {"onnxruntime-cpu": (["CPUExecutionProvider"], "CPUExecutionProvider"),
              "onnxruntime-cuda": ([("CUDAExecutionProvider", {})], "CUDAExecutionProvider"),
              "onnxruntime-tensorrt": ([("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", {})],
                                       "TensorrtExecutionProvider")}
    by_case = {}
    for engine, prec in RANKING_CASES:
        provs, needed = setups[engine]
        if needed not in providers:
            unavailable[f"{engine}/{prec}/ranking-n{CANDIDATES}"] = \
                f"onnxruntime {ort.__version__} providers: {providers} (needs {needed}: onnxruntime-gpu" + \
                (" and TensorRT libraries)" if engine.endswith("tensorrt") else ")")
            continue
        plain_scores = None
        for graph in ("plain", "ranking"):
            key = f"{engine}/{prec}/{graph}-n{CANDIDATES}"
            if over_budget():
                notes.append(f"budget reached before {key}")
                break
            try:
                model, feeds = (head, head_feeds) if graph == "ranking" else (model32, plain_feeds)
                sess = ort.InferenceSession(model, providers=provs)
                extra = {}
                if graph == "plain":
                    scores = np.asarray(sess.run(None, feeds)[0], np.float64).reshape(-1)
                    extra["max_abs_error"] = float(np.max(np.abs(scores - reference)))
                    plain_scores = scores
                else:
                    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
                    idx = np.asarray(got[rk.INDICES_OUTPUT], np.int64)
                    top = np.asarray(got[rk.SCORES_OUTPUT], np.float64)
                    same = plain_scores  # the plain graph's scores on the same rows and provider
                    if same is None:
                        same = np.asarray(ort.InferenceSession(model32, providers=provs).run(None, plain_feeds)[0],
                                          np.float64).reshape(-1)
                    order = np.argsort(-same, kind="stable")[:want]
                    extra = {"k": TOP_K, "topk_match": bool(np.array_equal(idx, order)),
                             "topk_match_cpu_fp32": bool(np.array_equal(idx, ref_order)),
                             "topk_overlap": int(len(set(idx.tolist()) & set(order.tolist()))),
                             "max_abs_error": float(np.max(np.abs(top - reference[idx]))) if idx.size else 0.0}
                    if idx.shape != (want,) or idx.size and (idx.min() < 0 or idx.max() >= CANDIDATES):
                        extra["topk_match"] = False
                r = timed(lambda s=sess, f=feeds: s.run(None, f), CANDIDATES)
            except Exception as exc:  # one case failing must not lose the others' figures
                unavailable[key] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            r = {"engine": engine, "precision": prec, "graph": graph, **r, "candidates": CANDIDATES,
                 "requests_per_s": round(r["samples_per_s"] / CANDIDATES, 1), "candidates_per_s": r["samples_per_s"],
                 **{k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in extra.items()}}
            results.append(r)
            by_case.setdefault(f"{engine}/{prec}", {})[graph] = r
            log(f"{engine:<22} {prec} {graph:<7} n={CANDIDATES}: {r['requests_per_s']:>10,.0f} requests/s, "
                f"{r['candidates_per_s']:>12,.0f} candidates/s, p50 {r['p50_ms']:.3f} ms"
                + (f", top-{TOP_K} match {r['topk_match']}" if graph == "ranking" else ""))
    ranking["vs_plain"] = {
        case: {"ranking_candidates_per_s": g["ranking"]["candidates_per_s"],
               "plain_candidates_per_s": g["plain"]["candidates_per_s"],
               "ranking_over_plain": round(g["ranking"]["candidates_per_s"] / g["plain"]["candidates_per_s"], 3),
               "topk_match": g["ranking"]["topk_match"]}
        for case, g in by_case.items() if {"ranking", "plain"} <= set(g)}


try:
    ranking_cases()
except Exception as exc:  # the ranking section must never cost the other figures
    unavailable["ranking"] = f"the ranking section stopped: {type(exc).__name__}: {exc}"[:300]

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
plain_results = [r for r in results if "candidates" not in r]  # the batch cases; the ranking section has its own
out = {
    "check": "recserve-ctr-gpu",
    "gpu": gpu.split(",")[0].strip() if gpu else None,
    "nvidia_smi": gpu or "nvidia-smi not found or failed",
    "model": source,
    "python": platform.python_version(),
    "batches": BATCHES,
    "results": results,
    "best": {f"{r['engine']}/{r['precision']}": max((x["samples_per_s"] for x in plain_results
                                                     if (x["engine"], x["precision"]) == (r["engine"], r["precision"])))
             for r in plain_results},
    "ranking": ranking,
    "unavailable": unavailable,
    "notes": notes + ["latency is one call from host input to host output (copies included), single stream",
                      f"ranking section: one request = {CANDIDATES} candidates; graph ranking answers the top "
                      f"{TOP_K} (scores, indices), graph plain every row's score (a client then sorts); "
                      "max_abs_error is against the plain graph on ORT CPU fp32"],
    "seconds": round(time.perf_counter() - START, 1),
}
line = json.dumps(out)
with open(os.path.join(os.environ["RESULT_DIR"], "gpu_check.json"), "w") as f:
    f.write(line + "\n")
print(line)
PYEOF
