"""Triton model repository layout and atomic publication of a model version."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model_repo_builder.errors import BadInputError, UsageError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STAGING_PREFIX = ".staging-"  # hidden: Triton skips dot-directories when it scans a repository


def check_model_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid model name {name!r}", "use letters, digits, '_', '-', '.' (max 128 chars, no leading dot)"
        )
    return name


def default_model_name(source_uri: str) -> str:
    stem = Path(source_uri.rstrip("/").split("?")[0]).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip", ".keras", ".onnx"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "model"
    return name[:128]


def existing_versions(repo: Path, name: str) -> list[int]:
    model_dir = repo / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(repo: Path, name: str, version: int | None, overwrite: bool) -> int:
    """The version to build: the requested one (refusing to clobber unless `overwrite`) or the next free one."""
    versions = existing_versions(repo, name)
    if version is None:
        return (versions[-1] + 1) if versions else 1
    if version < 1:
        raise UsageError(f"--version must be >= 1 (got {version})", "Triton versions are positive integers")
    if version in versions and not overwrite:
        raise UsageError(
            f"{repo / name / str(version)} already exists",
            "pass another --version, omit it to use the next one, or --overwrite to replace it",
        )
    return version


@contextlib.contextmanager
def staging_dir(repo: Path, name: str) -> Iterator[Path]:
    """A scratch directory inside the repository root (same filesystem, so publication is a rename); always removed."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create repository {repo}: {exc}", "check --repo and its permissions") from exc
    path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=repo))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged_model: Path, repo: Path, name: str, version: int, overwrite: bool = False) -> Path:
    """Move a staged `<name>` tree (config.pbtxt, <version>/, optional warmup/) into `repo` atomically.

    A new model is one rename. For an existing model, the version directory is renamed in first, then
    warmup/ and config.pbtxt are swapped by rename, so each step is atomic and a reader never sees a partial file.
    """
    target = repo / name
    if not target.exists():
        os.rename(staged_model, target)
        return target / str(version)
    trash = staged_model.parent / "replaced"
    trash.mkdir(exist_ok=True)
    vdir = target / str(version)
    if vdir.exists():
        if not overwrite:
            raise UsageError(f"{vdir} already exists", "pass --overwrite or another --version")
        os.rename(vdir, trash / "version")
    os.rename(staged_model / str(version), vdir)
    if (staged_model / "warmup").exists():
        if (target / "warmup").exists():
            os.rename(target / "warmup", trash / "warmup")
        os.rename(staged_model / "warmup", target / "warmup")
    os.replace(staged_model / "config.pbtxt", target / "config.pbtxt")
    return vdir


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
