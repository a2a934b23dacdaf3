"""bench/serving/gpu_check.sh without a GPU: its CPU cases run, the ranking head's included, and report honestly.

The script is run as on a GPU machine (bash, its own Python part), with `nvidia-smi` failing and small cases.
Where ONNX Runtime has no CUDA/TensorRT provider (this machine), the GPU ranking cases must be listed under
`unavailable` with why; on a machine that has them, they must run and match instead.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path("bench") / "serving" / "gpu_check.sh"
EXAMPLE_REQUEST_COLUMNS = "0-17,42-47"  # examples/ctr-dnn/ranking.yaml, train.py's feature_spec.json
GPU_RANKING = {"onnxruntime-cuda/fp32": "CUDAExecutionProvider",
               "onnxruntime-tensorrt/fp16": "TensorrtExecutionProvider"}  # fmt: skip


def write_mlp(path: Path, dims: tuple[int, ...], seed: int = 0) -> Path:
    """A Keras-like exported MLP (MatMul + Add per layer, ReLU, Sigmoid), what the script reads weights from."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for k, (a, b) in enumerate(itertools.pairwise(dims)):
        inits += [numpy_helper.from_array(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, b).astype(np.float32), f"b{k}")]  # fmt: skip
        nodes += [
            helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
            helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"]),
        ]
        x = f"h{k}" if k < len(dims) - 2 else "out"
        nodes.append(helper.make_node("Relu" if x != "out" else "Sigmoid", [f"a{k}"], [x]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dims[0]])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1])], inits)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run_check(tmp: Path, model: Path, root: Path = ROOT, pythonpath: str = "") -> dict[str, Any]:
    stub = tmp / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # no driver here, whatever the host has
    (stub / "nvidia-smi").chmod(0o755)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("CTR_ONNX", "PYTHONPATH")
    }
    env.update(
        PATH=f"{stub}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        OUT=str(out),
        GPU_CHECK_CASE_S="0.2",
        GPU_CHECK_BATCHES="200",
        GPU_CHECK_BUDGET_S="90",
        GPU_CHECK_TIMEOUT_S="120",
    )
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(["bash", str(root / SCRIPT), str(model)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=150)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    report = json.loads(line)
    assert json.loads((out / "gpu_check.json").read_text()) == report
    return report


def ranking_results(report: dict[str, Any], case: str) -> dict[str, dict[str, Any]]:
    engine, precision = case.split("/")
    return {r["graph"]: r for r in report["results"]
            if (r["engine"], r["precision"]) == (engine, precision) and "candidates" in r}  # fmt: skip


def assert_cpu_ranking_matches(report: dict[str, Any]) -> None:
    got = ranking_results(report, "onnxruntime-cpu/fp32")
    assert set(got) == {"ranking", "plain"}, report["unavailable"]
    rank, plain = got["ranking"], got["plain"]
    assert rank["topk_match"] is True and rank["topk_match_cpu_fp32"] is True and rank["topk_overlap"] == 10
    assert rank["max_abs_error"] < 1e-5 and plain["max_abs_error"] == 0.0
    for r in (rank, plain):
        assert r["candidates"] == r["batch"] == 200 and r["calls"] > 0
        assert r["requests_per_s"] > 0 and r["candidates_per_s"] == pytest.approx(200 * r["requests_per_s"], rel=1e-3)
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert rank["k"] == 10
    assert report["ranking"]["vs_plain"]["onnxruntime-cpu/fp32"]["topk_match"] is True


def assert_gpu_ranking_reported(report: dict[str, Any]) -> None:
    providers = ort.get_available_providers()
    for case, provider in GPU_RANKING.items():
        key = f"{case}/ranking-n200"
        if provider in providers:  # a GPU host: the case runs (or says why it failed)
            assert "ranking" in ranking_results(report, case) or key in report["unavailable"]
        else:
            assert provider in report["unavailable"][key], report["unavailable"]
            assert not ranking_results(report, case)


def test_cpu_ranking_cases_with_the_models_feature_spec(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "artifacts" / "1" / "model.onnx", (51, 32, 16, 1))
    (model.parent / "feature_spec.json").write_text(json.dumps({"request_columns": "0-9,40-45"}))
    report = run_check(tmp_path, model)
    assert report["gpu"] is None and "not found or failed" in report["nvidia_smi"]
    assert str(model) in report["model"]
    info = report["ranking"]
    assert info["request_columns"] == "0-9,40-45" and "feature_spec.json" in info["request_columns_from"]
    assert (info["request_width"], info["candidate_width"], info["first_layer_split"]) == (16, 35, True)
    assert_cpu_ranking_matches(report)
    assert_gpu_ranking_reported(report)
    plain_batch = [r for r in report["results"] if "candidates" not in r]
    assert plain_batch and all(r["graph"] == "plain" for r in plain_batch)
    assert report["best"]["onnxruntime-cpu/fp32"] == max(r["samples_per_s"] for r in plain_batch
                                                         if r["engine"] == "onnxruntime-cpu")  # fmt: skip


def test_example_layout_and_no_tritonclient(tmp_path: Path) -> None:
    """No feature_spec.json: a 51-column model gets the example CTR layout; a GPU image without tritonclient
    still builds the head (model_repo_builder.config imports it; a stand-in replaces it)."""
    blocked = tmp_path / "blocked" / "tritonclient"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('tritonclient is not installed (test)')\n")
    model = write_mlp(tmp_path / "m" / "model.onnx", (51, 32, 1), seed=3)
    report = run_check(tmp_path, model, pythonpath=str(blocked.parent))
    assert report["ranking"]["request_columns"] == EXAMPLE_REQUEST_COLUMNS
    assert any("stand-in for tritonclient" in n for n in report["notes"]), report["notes"]
    assert_cpu_ranking_matches(report)
    assert_gpu_ranking_reported(report)


def test_a_wrong_ranking_head_is_reported(tmp_path: Path) -> None:
    """A copy of the tree whose ranking head returns the lowest scores: topk_match false, the script still ends well.
    Also: a model of unknown layout takes the first half of its columns as per request, and says so."""
    tree = tmp_path / "tree"
    (tree / SCRIPT).parent.mkdir(parents=True)
    shutil.copy2(ROOT / SCRIPT, tree / SCRIPT)
    shutil.copytree(ROOT / "model_repo_builder", tree / "model_repo_builder",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (tree / "examples").mkdir()
    shutil.copy2(ROOT / "examples" / "ecommerce_data.py", tree / "examples")
    ranking_py = tree / "model_repo_builder" / "ranking.py"
    text = ranking_py.read_text()
    assert text.count("largest=1") == 1, "ranking.py changed: update this test's fault"
    ranking_py.write_text(text.replace("largest=1", "largest=0"))
    model = write_mlp(tmp_path / "m" / "model.onnx", (10, 8, 1), seed=5)
    report = run_check(tmp_path, model, root=tree)
    assert report["ranking"]["request_columns"] == "0-4"
    assert any("first half" in n for n in report["notes"]), report["notes"]
    rank = ranking_results(report, "onnxruntime-cpu/fp32")["ranking"]
    assert rank["topk_match"] is False and rank["topk_overlap"] < 10
    assert report["ranking"]["vs_plain"]["onnxruntime-cpu/fp32"]["topk_match"] is False
