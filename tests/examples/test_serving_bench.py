"""The serving benchmark's request encoding, default-config rewrite and report (no servers started)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("recserve_bench_serving_run", ROOT / "bench" / "serving" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_triton_body_is_kserve_v2_binary(bench: ModuleType) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    body, headers = bench.triton_body(x, "features", "probability")
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    assert header["inputs"][0] == {"name": "features", "shape": [3, 2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 24}}
    assert header["outputs"][0]["parameters"]["binary_data"] is True
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype=np.float32).reshape(3, 2), x)


def test_default_config_drops_dynamic_batching(bench: ModuleType, tmp_path: Path) -> None:
    model_dir = tmp_path / bench.MODEL_NAME
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(
        'name: "ctr-dnn"\nmax_batch_size: 1024\ninstance_group { count: 2 kind: KIND_CPU }\n'
        "dynamic_batching { max_queue_delay_microseconds: 500 }\nbackend: \"python\"\n")
    text = bench.write_default_config(tmp_path)
    assert "dynamic_batching" not in text and "count: 1" in text and "max_batch_size: 1024" in text


def _levels(rps: list[float]) -> list[dict[str, float]]:
    return [{"concurrency": c, "requests": 100, "errors": 0, "wall_s": 1.0, "throughput_rps": r, "p50_ms": 1.0,
             "p99_ms": 2.0, "client_cpu_share": 0.1} for c, r in zip((1, 4), rps, strict=True)]


def test_summary_ratios_and_report(bench: ModuleType, tmp_path: Path) -> None:
    results = {
        "meta": {"date": "2026-11-29", "cpu_count": 2, "candidates": 200, "command": "run.py --quick"},
        "systems": {"a": {"levels": _levels([10, 12])}, "b": {"levels": _levels([100, 150])},
                    "c": {"levels": _levels([90, 300]), "chosen": "inst=1 delay=0us"},
                    "d": {"best": {"batch_size": 1000, "samples_per_s": 120_000.0, "p50_ms": 1, "p99_ms": 2},
                          "per_batch_size": [{"batch_size": 1000, "samples_per_s": 120_000.0, "p50_ms": 1,
                                              "p99_ms": 2}]}},
        "notes": ["shared CPUs"],
    }
    summary = bench.summarize(results, 200)
    assert summary["peak_samples_per_s"] == {"a": 2400, "b": 30000, "c": 60000, "d": 120_000.0}
    assert summary["c_over_a"] == pytest.approx(25.0) and summary["c_over_b"] == pytest.approx(2.0)
    assert summary["c_over_d"] == pytest.approx(0.5)
    assert summary["per_level"][0] == {"concurrency": 1, "c_over_a": 9.0, "c_over_b": 0.9, "b_c_ranges_overlap": False}
    results["summary"] = summary
    md = bench.markdown(results)
    assert "(c)/(a) = 25.00x" in md and "shared CPUs" in md
    bench.plot(results, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 0
