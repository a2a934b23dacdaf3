"""Build cache (MODEL_REPO_BUILDER_CACHE_DIR): reuse a verified model tree for an identical build request."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV_CACHE_DIR = "MODEL_REPO_BUILDER_CACHE_DIR"
_VERSION_DIR = "version"  # cached trees are version-agnostic; the version is applied on restore

log = logging.getLogger(__name__)


def cache_key(inputs: dict[str, Any]) -> str:
    """Digest of everything that determines the built artifact (source digest, options, template, tools)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


class BuildCache:
    """A directory of `<key>/model/{config.pbtxt, version/, warmup/}` trees, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_env(cls, explicit: str | Path | None = None) -> BuildCache | None:
        root = explicit or os.environ.get(ENV_CACHE_DIR)
        return cls(Path(root)) if root else None

    def lookup(self, key: str) -> Path | None:
        tree = self.root / key / "model"
        return tree if (tree / "config.pbtxt").exists() and (tree / _VERSION_DIR / "build.json").exists() else None

    def restore(self, tree: Path, model_tree: Path, version: int) -> dict[str, Any]:
        """Copy a cached tree into `model_tree` under `version`; returns the cached build report."""
        shutil.copytree(tree, model_tree, ignore=shutil.ignore_patterns(_VERSION_DIR))
        shutil.copytree(tree / _VERSION_DIR, model_tree / str(version))
        return dict(json.loads((model_tree / str(version) / "build.json").read_text()))

    def store(self, key: str, model_tree: Path, version: int) -> str | None:
        """Save a freshly built tree; failures are logged and returned (a cache must never fail a build)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            shutil.copytree(model_tree, tmp / "model", ignore=shutil.ignore_patterns(str(version)))
            shutil.copytree(model_tree / str(version), tmp / "model" / _VERSION_DIR)
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # a concurrent build stored the same key first: identical content
                shutil.rmtree(tmp, ignore_errors=True)
            return None
        except OSError as exc:
            log.warning("build cache %s not updated: %s", self.root, exc)
            return str(exc)
