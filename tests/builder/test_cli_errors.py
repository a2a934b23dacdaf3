"""CLI exit codes and messages for bad inputs that are refused before any TensorFlow work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_repo_builder.fetch import sha256_of
from tests.builder.helpers import run_cli, snapshot


@pytest.fixture
def repo_with_version(tmp_path: Path) -> Path:
    """A repository that already holds version 1 of model `m` (stands in for a production repository)."""
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.onnx").write_bytes(b"previous artifact")
    (repo / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "onnxruntime"\nmax_batch_size: 8\n')
    return repo


def test_help_documents_exit_codes() -> None:
    out = subprocess.run([sys.executable, "-m", "model_repo_builder", "build", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for line in ("0  ok", "2  usage error", "3  bad input", "4  parity failure", "5  missing runtime"):
        assert line in out


def test_unknown_precision_is_usage_error(repo_with_version: Path, tmp_path: Path) -> None:
    before = snapshot(repo_with_version)
    proc = subprocess.run(
        [sys.executable, "-m", "model_repo_builder", "build", "--source", str(tmp_path / "x.onnx"), "--repo",
         str(repo_with_version), "--name", "m", "--precision", "int4"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'int4'" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(repo_with_version) == before


def test_missing_file(capsys: pytest.CaptureFixture[str], repo_with_version: Path, tmp_path: Path) -> None:
    before = snapshot(repo_with_version)
    r = run_cli(capsys, "build", "--source", tmp_path / "nope.keras", "--repo", repo_with_version, "--name", "m")
    assert r.code == 3
    assert "does not exist" in r.err and "hint:" in r.err and "Traceback" not in r.err
    assert snapshot(repo_with_version) == before


def test_unsupported_format(capsys: pytest.CaptureFixture[str], repo_with_version: Path, tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(b"\x80\x02torch")
    before = snapshot(repo_with_version)
    r = run_cli(capsys, "build", "--source", src, "--repo", repo_with_version, "--name", "m", "--json")
    assert r.code == 3
    err = r.json
    assert err["status"] == "failed" and err["error_type"] == "BadInputError"
    assert "cannot tell the format" in err["error"] and "--format" in err["hint"] and err["exit_code"] == 3
    assert r.out.count("\n") == 1  # one line: the operator parses the last log line
    assert snapshot(repo_with_version) == before


def test_digest_mismatch(capsys: pytest.CaptureFixture[str], repo_with_version: Path, tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"not really onnx")
    before = snapshot(repo_with_version)
    r = run_cli(capsys, "build", "--source", src, "--repo", repo_with_version, "--name", "m", "--sha256", "ab" * 32)
    assert r.code == 3 and "sha256 mismatch" in r.err and sha256_of(src) in r.err
    assert snapshot(repo_with_version) == before


def test_http_404(capsys: pytest.CaptureFixture[str], repo_with_version: Path, http_dir: tuple[str, Path]) -> None:
    base, _ = http_dir
    before = snapshot(repo_with_version)
    r = run_cli(capsys, "build", "--source", f"{base}/models/ctr.keras", "--repo", repo_with_version, "--name", "m")
    assert r.code == 3 and "HTTP 404" in r.err
    assert snapshot(repo_with_version) == before


def test_existing_version_needs_overwrite(capsys: pytest.CaptureFixture[str], repo_with_version: Path) -> None:
    r = run_cli(capsys, "build", "--source", "x.onnx", "--repo", repo_with_version, "--name", "m", "--version", "1")
    assert r.code == 2 and "already exists" in r.err and "--overwrite" in r.err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is present: the gpu suite builds engines")
def test_tensorrt_without_runtime_is_exit_5(capsys: pytest.CaptureFixture[str], repo_with_version: Path) -> None:
    before = snapshot(repo_with_version)
    r = run_cli(capsys, "build", "--source", "x.onnx", "--repo", repo_with_version, "--name", "m2",
                "--backend", "tensorrt", "--precision", "fp16")
    assert r.code == 5 and "TensorRT" in r.err and "--backend onnxruntime" in r.err
    assert snapshot(repo_with_version) == before


def test_conflicting_options_are_usage_errors(capsys: pytest.CaptureFixture[str], repo_with_version: Path) -> None:
    r = run_cli(capsys, "build", "--source", "x.onnx", "--repo", repo_with_version, "--name", "m2",
                "--backend", "python", "--precision", "fp16")
    assert r.code == 2 and "fp16" in r.err
    r = run_cli(capsys, "build", "--source", "x.onnx", "--repo", repo_with_version, "--name", "m2",
                "--max-batch-size", "8", "--preferred-batch-sizes", "16")
    assert r.code == 2 and "preferred batch size 16" in r.err


def test_a_download_timeout_must_be_a_positive_number(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for bad in ("0", "-3", "soon", "inf"):
        r = run_cli(capsys, "build", "--source", "x.onnx", "--repo", tmp_path, "--name", "m", "--download-timeout", bad)
        assert r.code == 2 and "--download-timeout" in r.err, (bad, r.err)
