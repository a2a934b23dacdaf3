"""Sample RecommenderModel specs for the operator unit tests (the examples, plus small variations)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))


def example_objects() -> dict[str, dict[str, Any]]:
    """Every RecommenderModel example, keyed by its path relative to examples/."""
    out = {}
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RecommenderModel":
                out[str(path.relative_to(ROOT / "examples"))] = doc
    return out


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "pvc://models/ctr-dnn/3", "format": "keras", "version": 3},
        "serving": {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G"},
    }
    for key, value in overrides.items():
        spec[key] = copy.deepcopy(value)
    return spec


def model_body(
    spec: dict[str, Any],
    *,
    name: str = "ctr-dnn",
    namespace: str = "shop",
    generation: int = 1,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "recserve.dev/v1alpha1",
        "kind": "RecommenderModel",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "0b0c0d0e-1111-2222-3333-444455556666",
            "generation": generation,
        },
        "spec": spec,
        "status": status or {},
    }
