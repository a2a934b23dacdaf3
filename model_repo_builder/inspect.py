"""Describe repositories, model directories and model files; smoke-test models served by a local Triton."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from model_repo_builder import config as cfgmod
from model_repo_builder.errors import BadInputError


def _model_dir_info(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.pbtxt"
    info: dict[str, Any] = {"name": model_dir.name, "path": str(model_dir)}
    if cfg_path.exists():
        cfg = cfgmod.parse_pbtxt(cfg_path.read_text())
        info["options"] = dataclasses.asdict(cfgmod.options_from_config(cfg))
        sig = cfgmod.signature_from_config(cfg)
        info["signature"] = dataclasses.asdict(sig) if sig else None
    versions: dict[str, dict[str, Any]] = {}
    builds: list[dict[str, Any]] = []
    for vdir in sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        build_json = vdir / "build.json"
        build = json.loads(build_json.read_text()) if build_json.exists() else None
        versions[vdir.name] = {"files": sorted(p.name for p in vdir.iterdir()), "build": build}
        if isinstance(build, dict):
            builds.append(build)
    info["versions"] = versions
    tuned = [b["tuning"] for b in builds if b.get("tuning")]
    if tuned:
        info["tuning"] = tuned[-1]  # `profile --apply`'s choice over the load range, and why
    return info


def inspect_path(path: Path, fmt: str | None = None, *, allow_unsafe: bool = False) -> dict[str, Any]:
    """A JSON-able description of a repository, a model directory, or a source/ONNX model file (loaded as a build
    loads it: `allow_unsafe` as --allow-unsafe-deserialization)."""
    if not path.exists():
        raise BadInputError(f"{path} does not exist", "pass a repository, a model directory or a model file")
    if path.is_dir() and (path / "config.pbtxt").exists():
        return {"model": _model_dir_info(path)}
    if path.is_dir() and not (path / "saved_model.pb").exists():
        models = [_model_dir_info(p) for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return {"repository": str(path), "models": models}
    from model_repo_builder import convert

    detected = convert.detect_format(path, fmt)
    source = convert.load_source(path, detected, allow_unsafe=allow_unsafe)
    return {"file": str(path), "format": detected, "signature": dataclasses.asdict(source.signature)}


def smoke_test(server: Any, batch: int = 4) -> dict[str, Any]:
    """Score one synthesized batch with every ready model over HTTP; returns output shapes per model."""
    import tritonclient.http as httpclient

    from model_repo_builder.parity import synthesize_inputs

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        results: dict[str, Any] = {}
        for entry in client.get_model_repository_index():
            if entry.get("state") != "READY":
                results[entry["name"]] = {"state": entry.get("state"), "reason": entry.get("reason")}
                continue
            cfg = client.get_model_config(entry["name"])
            sig = cfgmod.ModelSignature(
                inputs=tuple(
                    cfgmod.TensorSpec(i["name"], np.dtype(httpclient_dtype(i["data_type"])).name,
                                      tuple(int(d) for d in i["dims"]))
                    for i in cfg["input"]
                ),
                outputs=(),
            )
            feeds = synthesize_inputs(sig, batch)
            inputs = []
            for name, arr in feeds.items():
                inp = httpclient.InferInput(name, list(arr.shape), _triton_type(arr.dtype))
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            res = client.infer(entry["name"], inputs)
            results[entry["name"]] = {o["name"]: list(res.as_numpy(o["name"]).shape) for o in cfg["output"]}
        return results
    finally:
        client.close()


def httpclient_dtype(config_type: str) -> str:
    """numpy dtype for a data_type string of the JSON model config (e.g. TYPE_FP32)."""
    return cfgmod.numpy_dtype(mc.DataType.Value(config_type))


def _triton_type(dtype: np.dtype[Any]) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(dtype))
