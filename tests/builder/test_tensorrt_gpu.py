"""TensorRT engine builds: only meaningful on a GPU node with the tensorrt package (run with -m gpu there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_repo_builder import config as C
from tests.builder.helpers import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.builder,
    # Without a GPU the exit-5 path is what matters, and test_cli_errors covers it; with one, TensorRT must work.
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU (run with -m gpu on one)"),
]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_build(ctr_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               precision: str) -> None:
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo", "--name", "ctr", "--json",
                "--backend", "tensorrt", "--precision", precision, "--max-batch-size", "256")
    assert r.code == 0, r.err
    vdir = tmp_path / "repo" / "ctr" / "1"
    assert (vdir / "model.plan").stat().st_size > 0
    build = json.loads((vdir / "build.json").read_text())
    assert build["tensorrt"]["profile"]["features"]["max"] == [256, 32]
    cfg = C.parse_pbtxt((tmp_path / "repo" / "ctr" / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
