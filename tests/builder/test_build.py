"""Real Keras/SavedModel/ONNX -> Triton repository builds: parity, quantization, configs, bad inputs, S3."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from model_repo_builder import config as C
from model_repo_builder import convert
from model_repo_builder.fetch import sha256_of
from tests.builder.conftest import S3Server
from tests.builder.helpers import run_cli, snapshot

pytestmark = pytest.mark.builder

# Documented ranking tolerance for int8 (see parity.default_tolerance): AUC within 0.01, >= 80% top-10 overlap.
INT8_MAX_AUC_DROP = 0.01
INT8_MIN_TOPK = 0.8


@pytest.fixture(scope="session")
def session_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="session")
def ctr_build(ctr_keras: Path, session_repo: Path) -> dict[str, Any]:
    """The seed CTR DNN built once (fp32, onnxruntime backend, batching tuned for candidate lists)."""
    from model_repo_builder.cli import main

    args = ["build", "--source", str(ctr_keras), "--repo", str(session_repo), "--name", "ctr", "--json",
            "--max-batch-size", "256", "--preferred-batch-sizes", "64,128", "--max-queue-delay-us", "200",
            "--instance-count", "2", "--warmup-batch-size", "8"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    return dict(json.loads(buf.getvalue()))


def test_ctr_fp32_parity_layout_and_build_json(ctr_build: dict[str, Any], session_repo: Path, ctr_keras: Path) -> None:
    assert ctr_build["parity"]["max_abs_error"] <= 1e-5 and ctr_build["parity"]["passed"]
    vdir = session_repo / "ctr" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["build.json", "model.onnx"]
    assert (session_repo / "ctr" / "warmup" / "features").stat().st_size == 32 * 4
    build = json.loads((vdir / "build.json").read_text())
    assert build["source"]["sha256"] == sha256_of(ctr_keras) and build["source"]["uri"] == str(ctr_keras)
    assert build["artifact"]["sha256"] == hashlib.sha256((vdir / "model.onnx").read_bytes()).hexdigest()
    assert {"tf2onnx", "onnxruntime", "tensorflow-cpu"} <= set(build["tool_versions"])
    assert build["precision"] == "fp32" and build["build_seconds"] > 0
    assert not [p for p in session_repo.iterdir() if p.name.startswith(".staging")]


def test_generated_config_matches_model_and_batching(ctr_build: dict[str, Any], session_repo: Path) -> None:
    cfg = C.parse_pbtxt((session_repo / "ctr" / "config.pbtxt").read_text())
    model = onnx.load(str(session_repo / "ctr" / "1" / "model.onnx"))
    sig = convert.onnx_signature(model)
    assert C.signature_from_config(cfg) == sig
    assert [i.name for i in cfg.input] == ["features"] and list(cfg.input[0].dims) == [32]
    assert [o.name for o in cfg.output] == ["ctr"]
    # The ONNX batch dimension is dynamic.
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    opts = C.options_from_config(cfg)
    assert opts.max_batch_size == 256 and opts.instance_count == 2
    assert opts.dynamic_batching == C.DynamicBatching((64, 128), 200)
    assert cfg.model_warmup[0].inputs["features"].input_data_file == "features"


def test_next_version_and_inspect(ctr_build: dict[str, Any], session_repo: Path, ctr_keras: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = session_repo.parent / "repo_versions"
    shutil.copytree(session_repo, repo)
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", repo, "--name", "ctr", "--json",
                "--max-batch-size", "256")
    assert r.code == 0 and r.json["version"] == 2
    assert (repo / "ctr" / "1" / "model.onnx").exists() and (repo / "ctr" / "2" / "model.onnx").exists()
    info = run_cli(capsys, "inspect", repo / "ctr", "--json").json
    assert sorted(info["model"]["versions"]) == ["1", "2"]
    old = (repo / "ctr" / "1" / "model.onnx").read_bytes()
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", repo, "--name", "ctr", "--json", "--version", "1",
                "--overwrite", "--precision", "int8", "--max-batch-size", "256")
    assert r.code == 0, r.err
    assert (repo / "ctr" / "1" / "model.onnx").read_bytes() != old and (repo / "ctr" / "2" / "model.onnx").exists()
    assert not [p for p in repo.iterdir() if p.name.startswith(".staging")]
    assert info["model"]["signature"]["inputs"][0]["name"] == "features"


def test_two_input_model(two_tower_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "build", "--source", two_tower_keras, "--repo", tmp_path / "repo", "--json",
                "--backend", "python", "--max-batch-size", "128")
    assert r.code == 0, r.err
    assert r.json["parity"]["max_abs_error"] <= 1e-5
    cfg = C.parse_pbtxt((tmp_path / "repo" / "two_tower" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    assert {(i.name, tuple(i.dims)) for i in cfg.input} == {("user", (16,)), ("item", (12,))}
    assert sorted(p.name for p in (tmp_path / "repo" / "two_tower" / "1").iterdir()) == [
        "build.json", "model.onnx", "model.py"
    ]


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_dynamic_within_ranking_tolerance(ctr_keras: Path, ctr_parity_npz: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo", "--name", "ctr", "--json",
                "--precision", "int8", "--parity-data", ctr_parity_npz)
    assert r.code == 0, r.err
    par = r.json["parity"]
    assert par["auc_drop"] is not None and abs(par["auc_drop"]) <= INT8_MAX_AUC_DROP
    assert par["topk_overlap"] >= INT8_MIN_TOPK
    assert par["auc_source"] > 0.6  # the planted signal was learned, so AUC agreement is meaningful
    assert r.json["quantization"]["method"] == "dynamic"
    artifact = tmp_path / "repo" / "ctr" / "1" / "model.onnx"
    assert "MatMulInteger" in _op_types(artifact) or "DynamicQuantizeMatMul" in _op_types(artifact)
    cfg = C.parse_pbtxt((tmp_path / "repo" / "ctr" / "config.pbtxt").read_text())
    assert C.options_from_config(cfg).precision == "int8"


def test_int8_static_with_calibration(ctr_keras: Path, ctr_parity_npz: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo", "--name", "ctr", "--json",
                "--precision", "int8", "--calibration", ctr_parity_npz, "--parity-data", ctr_parity_npz)
    assert r.code == 0, r.err
    assert r.json["quantization"]["method"] == "static-qdq"
    assert "QuantizeLinear" in _op_types(tmp_path / "repo" / "ctr" / "1" / "model.onnx")
    assert abs(r.json["parity"]["auc_drop"]) <= INT8_MAX_AUC_DROP


def test_parity_failure_is_exit_4_and_repo_unchanged(ctr_keras: Path, ctr_build: dict[str, Any], session_repo: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(session_repo, repo)
    before = snapshot(repo)
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", repo, "--name", "ctr", "--json",
                "--precision", "int8", "--parity-max-abs-error", "1e-9")
    assert r.code == 4
    err = r.json
    assert "parity gate failed" in err["error"] and err["parity"]["max_abs_error"] > 1e-9
    assert len(r.out.encode()) < 2048  # fits the Kubernetes termination message
    assert snapshot(repo) == before


def test_config_template_from_operator_is_kept(ctr_keras: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    opts = C.ServingOptions("python", "fp32", 64, C.DynamicBatching((32,), 1500, False, 20_000), "CPU", 3,
                            warmup_batch_size=2)
    template = tmp_path / "template.pbtxt"
    template.write_text(C.to_pbtxt(C.build_model_config("ranker", opts)))
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo", "--config-template", template,
                "--json")
    assert r.code == 0, r.err
    cfg = C.parse_pbtxt((tmp_path / "repo" / "ranker" / "config.pbtxt").read_text())
    got = C.options_from_config(cfg)
    assert got == opts
    assert [i.name for i in cfg.input] == ["features"] and [w.batch_size for w in cfg.model_warmup] == [1, 2]
    assert (tmp_path / "repo" / "ranker" / "1" / "model.py").exists()
    r = run_cli(capsys, "build", "--source", ctr_keras, "--repo", tmp_path / "repo2", "--config-template", template,
                "--max-batch-size", "8")
    assert r.code == 2 and "conflicts with the config template" in r.err


def test_savedmodel_and_onnx_sources(ctr_keras: Path, ctr_build: dict[str, Any], session_repo: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import keras

    saved = tmp_path / "ctr_savedmodel"
    keras.models.load_model(ctr_keras).export(str(saved), verbose=False)
    r = run_cli(capsys, "build", "--source", saved, "--repo", tmp_path / "repo", "--name", "sm", "--json")
    assert r.code == 0, r.err
    assert r.json["source"]["format"] == "savedmodel" and r.json["parity"]["max_abs_error"] <= 1e-5

    onnx_src = session_repo / "ctr" / "1" / "model.onnx"
    r = run_cli(capsys, "build", "--source", onnx_src.as_uri(), "--repo", tmp_path / "repo", "--name", "fromonnx",
                "--json", "--opset", "17")
    assert r.code == 0, r.err
    assert r.json["source"]["format"] == "onnx" and r.json["parity"]["max_abs_error"] == 0.0
    feeds = {"features": np.ones((3, 32), np.float32)}
    a = convert.onnx_predictor(onnx_src)(feeds)["ctr"]
    b = convert.onnx_predictor(tmp_path / "repo" / "fromonnx" / "1" / "model.onnx")(feeds)["ctr"]
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def prod_repo(ctr_build: dict[str, Any], session_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "prod"
    shutil.copytree(session_repo, repo)
    return repo


def test_truncated_keras(ctr_keras: Path, prod_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ctr.keras"
    bad.write_bytes(ctr_keras.read_bytes()[: ctr_keras.stat().st_size // 2])
    before = snapshot(prod_repo)
    r = run_cli(capsys, "build", "--source", bad, "--repo", prod_repo, "--name", "ctr")
    assert r.code == 3 and "ctr.keras" in r.err and "re-export" in r.err
    assert snapshot(prod_repo) == before


def test_keras_archive_with_garbage_weights(ctr_keras: Path, prod_repo: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ctr.keras"
    with zipfile.ZipFile(ctr_keras) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, b"garbage" if item.filename.endswith(".h5") else data)
    before = snapshot(prod_repo)
    r = run_cli(capsys, "build", "--source", bad, "--repo", prod_repo, "--name", "ctr")
    assert r.code == 3 and "cannot load Keras model" in r.err
    assert snapshot(prod_repo) == before


def test_corrupt_onnx(session_repo: Path, prod_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = (session_repo / "ctr" / "1" / "model.onnx").read_bytes()
    before = snapshot(prod_repo)
    for i, payload in enumerate((good[: len(good) // 3], b"\x08\x07garbage" * 50)):
        bad = tmp_path / f"bad{i}.onnx"
        bad.write_bytes(payload)
        r = run_cli(capsys, "build", "--source", bad, "--repo", prod_repo, "--name", "ctr", "--json")
        assert r.code == 3, r.err
        assert "not a valid ONNX model" in r.json["error"]
    assert snapshot(prod_repo) == before


def test_model_without_batch_dimension(prod_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.builder import models

    src = models.fixed_batch(tmp_path / "fixed.keras")
    before = snapshot(prod_repo)
    r = run_cli(capsys, "build", "--source", src, "--repo", prod_repo, "--name", "ctr")
    assert r.code == 3 and "fixed batch dimension of 1" in r.err and "dynamic (None)" in r.err
    assert snapshot(prod_repo) == before


def test_build_from_s3(ctr_keras: Path, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    s3_server.client().upload_file(str(ctr_keras), s3_server.bucket, "teams/ranking/ctr.keras")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    r = run_cli(capsys, "build", "--source", f"s3://{s3_server.bucket}/teams/ranking/ctr.keras",
                "--repo", tmp_path / "repo", "--sha256", sha256_of(ctr_keras), "--json")
    assert r.code == 0, r.err
    assert r.json["name"] == "ctr" and r.json["parity"]["max_abs_error"] <= 1e-5
    r = run_cli(capsys, "build", "--source", f"s3://{s3_server.bucket}/teams/ranking/missing.keras",
                "--repo", tmp_path / "repo")
    assert r.code == 3 and "not found" in r.err


def test_calibration_uri_and_build_cache(ctr_keras: Path, ctr_parity_npz: Path, tmp_path: Path,
                                         http_dir: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, root = http_dir
    shutil.copyfile(ctr_parity_npz, root / "calib.npz")
    args: list[str | Path] = ["build", "--source", ctr_keras, "--name", "ctr", "--json", "--precision", "int8",
            "--calibration", f"{base}/calib.npz", "--calibration-samples", "128", "--cache-dir", tmp_path / "cache"]
    first = run_cli(capsys, *args, "--repo", tmp_path / "a")
    assert first.code == 0, first.err
    assert first.json["status"] == "ok" and first.json["quantization"]["method"] == "static-qdq"
    assert first.json["cache"]["hit"] is False

    second = run_cli(capsys, *args, "--repo", tmp_path / "b")  # an identical request: served from the cache
    assert second.code == 0, second.err
    assert second.json["cache"] == {**first.json["cache"], "hit": True}
    assert second.json["artifact"]["sha256"] == first.json["artifact"]["sha256"]
    assert json.loads((tmp_path / "b" / "ctr" / "1" / "build.json").read_text())["cache"]["hit"] is True
    assert snapshot(tmp_path / "a" / "ctr") == {
        k: v for k, v in snapshot(tmp_path / "b" / "ctr").items() if k != "1/build.json"
    } | {"1/build.json": snapshot(tmp_path / "a" / "ctr")["1/build.json"]}

    fp32 = run_cli(capsys, "build", "--source", ctr_keras, "--name", "ctr", "--json", "--repo", tmp_path / "c",
                   "--calibration", f"{base}/calib.npz", "--cache-dir", tmp_path / "cache")
    assert fp32.code == 0, fp32.err
    assert fp32.json["cache"]["hit"] is False and "only used for int8" in fp32.json["calibration_ignored"]
