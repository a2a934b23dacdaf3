"""Build orchestration: fetch -> convert -> optimize -> parity gate -> config -> atomic publication."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_repo_builder import config as cfgmod
from model_repo_builder import convert, parity, repository
from model_repo_builder.cache import BuildCache, cache_key
from model_repo_builder.errors import BadInputError, ParityError, UsageError
from model_repo_builder.fetch import fetch, sha256_of
from model_repo_builder.progress import progress_bar


@dataclass
class BuildRequest:
    source: str
    repo: Path
    name: str | None = None
    version: int | None = None
    format: str | None = None
    sha256: str | None = None
    # None = take it from the config template (or the default when there is none).
    backend: str | None = None
    precision: str | None = None
    max_batch_size: int | None = None
    instance_kind: str | None = None
    instance_count: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None
    tensorrt_accelerator: bool = False
    warmup_batch_size: int | None = None
    calibration: str | Path | None = None  # npz path or URI (any fetch scheme)
    calibration_samples: int | None = None  # use the first N rows (None = all)
    config_template: Path | None = None
    parity_max_abs_error: float | None = None
    parity_samples: int = 512
    parity_data: str | Path | None = None  # npz path or URI (any fetch scheme)
    parity_seed: int = 0
    opset: int = convert.DEFAULT_OPSET
    s3_endpoint: str | None = None
    max_download_bytes: int | None = None
    overwrite: bool = False
    cache_dir: str | None = None  # default: $MODEL_REPO_BUILDER_CACHE_DIR; unset = no cache
    show_progress: bool = False


@dataclass
class BuildResult:
    name: str
    version: int
    model_dir: Path
    version_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("recserve", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime", "tritonclient", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def resolve_options(req: BuildRequest, template: Any | None) -> cfgmod.ServingOptions:
    """Serving options from the template (operator-owned) or from flags; conflicting flags are usage errors."""
    if template is not None:
        opts = cfgmod.options_from_config(template)
        explicit: dict[str, Any] = {
            "backend": req.backend,
            "max_batch_size": req.max_batch_size,
            "instance_kind": req.instance_kind,
            "instance_count": req.instance_count,
            "warmup_batch_size": req.warmup_batch_size,
        }
        if req.preferred_batch_sizes is not None or req.max_queue_delay_us is not None:
            raise UsageError(
                "dynamic batching flags cannot be combined with --config-template",
                "the operator's template owns batching: change the RecommenderModel spec instead",
            )
        if cfgmod.PARAM_PRECISION in template.parameters:
            explicit["precision"] = req.precision
        elif req.precision is not None:
            opts = dataclasses.replace(opts, precision=req.precision)
        for key, value in explicit.items():
            if value is not None and value != getattr(opts, key):
                raise UsageError(
                    f"--{key.replace('_', '-')} {value} conflicts with the config template ({getattr(opts, key)})",
                    "the template written by the operator wins: drop the flag or change the RecommenderModel spec",
                )
        cfgmod.validate_options(opts)
        return opts
    backend = req.backend or "onnxruntime"
    kind = req.instance_kind or ("CPU" if backend == "python" else "GPU")
    db = cfgmod.DynamicBatching(
        preferred_batch_sizes=req.preferred_batch_sizes or (),
        max_queue_delay_microseconds=req.max_queue_delay_us or 0,
    )
    opts = cfgmod.ServingOptions(
        backend=backend,
        precision=req.precision or "fp32",
        max_batch_size=req.max_batch_size if req.max_batch_size is not None else 64,
        dynamic_batching=db,
        instance_kind=kind,
        instance_count=req.instance_count or 1,
        tensorrt_accelerator=req.tensorrt_accelerator,
        warmup_batch_size=req.warmup_batch_size or 0,
    )
    cfgmod.validate_options(opts)
    return opts


def _read_template(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInputError(f"cannot read config template {path}: {exc}", "check --config-template") from exc
    try:
        return cfgmod.parse_pbtxt(text)
    except cfgmod.InvalidModelConfig as exc:
        raise BadInputError(str(exc), "fix the template (it must be a Triton ModelConfig in text format)") from exc


def _fetch_npz(uri: str | Path, req: BuildRequest, staging: Path, what: str) -> Path:
    """Fetch an auxiliary npz (calibration or parity data) with the same schemes as the model source."""
    dest = staging / what
    dest.mkdir(exist_ok=True)
    got = fetch(uri, dest, s3_endpoint=req.s3_endpoint, show_progress=req.show_progress)
    if not got.path.is_file():
        raise BadInputError(f"{what} {uri} is not a file", "pass an .npz written by numpy.savez")
    return got.path


def build(req: BuildRequest) -> BuildResult:
    """Run one build. Raises BuilderError subclasses (with exit codes) or ConfigError; the repo is unchanged then."""
    started = time.monotonic()
    template = _read_template(req.config_template) if req.config_template else None
    name = repository.check_model_name(
        req.name or (template.name if template is not None and template.name else None)
        or repository.default_model_name(req.source)
    )
    options = resolve_options(req, template)
    if options.backend == "tensorrt":
        # Fail before any download or conversion when this host cannot build engines.
        from model_repo_builder.tensorrt_build import import_tensorrt

        import_tensorrt()
    if req.calibration_samples is not None and req.calibration_samples < 1:
        raise UsageError("--calibration-samples must be >= 1", "pass a positive number of rows")
    version = repository.resolve_version(req.repo, name, req.version, req.overwrite)
    report: dict[str, Any] = {"name": name, "version": version, "repository": str(req.repo)}

    with repository.staging_dir(req.repo, name) as staging:
        fetch_kwargs: dict[str, Any] = {}
        if req.max_download_bytes:
            fetch_kwargs["max_bytes"] = req.max_download_bytes
        src = fetch(
            req.source, staging, sha256=req.sha256, s3_endpoint=req.s3_endpoint,
            show_progress=req.show_progress, **fetch_kwargs,
        )
        fmt = convert.detect_format(src.path, req.format)
        cache = BuildCache.from_env(req.cache_dir)
        key = cache_key({
            "source_sha256": src.sha256, "format": fmt, "name": name, "options": dataclasses.asdict(options),
            "template": cfgmod.to_pbtxt(template) if template is not None else None, "opset": req.opset,
            "calibration": [str(req.calibration), req.calibration_samples], "parity_data": str(req.parity_data),
            "parity": [req.parity_max_abs_error, req.parity_samples, req.parity_seed], "tools": tool_versions(),
        })
        cached = cache.lookup(key) if cache is not None else None
        if cache is not None and cached is not None:
            model_tree = staging / "model"
            report = cache.restore(cached, model_tree, version)
            report.update({"name": name, "version": version, "repository": str(req.repo),
                           "cache": {"hit": True, "key": key, "dir": str(cache.root)},
                           "build_seconds": round(time.monotonic() - started, 3)})
            repository.write_json(model_tree / str(version) / "build.json", report)
            published = repository.publish(model_tree, req.repo, name, version, req.overwrite)
            report["path"] = str(published)
            return BuildResult(name, version, req.repo / name, published, report)
        steps = 4 + (options.precision == "int8") + (options.backend == "tensorrt")
        with progress_bar(steps, f"build {name}", req.show_progress, unit="step") as bar:
            t0 = time.monotonic()
            source = convert.load_source(src.path, fmt)
            bar.update()
            fp32_path = staging / "model.fp32.onnx"
            convert.convert_to_onnx(source, src.path, fp32_path, req.opset)
            convert_s = time.monotonic() - t0
            bar.update()
            signature = source.signature

            if req.parity_data is not None:
                feeds, labels = parity.load_parity_data(_fetch_npz(req.parity_data, req, staging, "parity"), signature)
            else:
                feeds, labels = parity.synthesize_inputs(signature, req.parity_samples, req.parity_seed), None

            artifact_onnx, quant_info = fp32_path, None
            if options.precision == "int8":
                calib = None
                if req.calibration:
                    calib, _ = parity.load_parity_data(_fetch_npz(req.calibration, req, staging, "calibration"),
                                                       signature)
                    if req.calibration_samples:
                        calib = {k: v[: req.calibration_samples] for k, v in calib.items()}
                artifact_onnx = staging / "model.int8.onnx"
                from model_repo_builder.quantize import quantize_int8

                quant_info = quantize_int8(fp32_path, artifact_onnx, calib)
                convert.load_onnx_checked(artifact_onnx, source=False)
                bar.update()
            elif req.calibration:
                # Calibration only drives int8; say so in the report rather than failing a valid deployment.
                report["calibration_ignored"] = (
                    f"calibration data is only used for int8 (precision {options.precision})"
                )

            tol = parity.default_tolerance(options.precision, req.parity_max_abs_error)
            optimized = convert.onnx_predictor(artifact_onnx)
            parity_report = parity.compare(source.predict, optimized, feeds, tol, labels=labels)
            bar.update()
            report["parity"] = parity_report.to_dict()
            if options.precision == "fp16" or options.backend == "tensorrt":
                report["parity"]["note"] = (
                    "checked on the ONNX model fed to TensorRT; TensorRT kernels (fp16/int8) are not run by the build"
                )
            if not parity_report.passed:
                raise ParityError(
                    f"parity gate failed for {name} ({options.precision}): " + "; ".join(parity_report.failures),
                    "inspect the figures (--json), relax --parity-max-abs-error if justified, or use higher precision",
                    # A compact summary: the whole JSON error line must fit Kubernetes' 2 KiB termination message.
                    details={"parity": {k: report["parity"][k] for k in (
                        "max_abs_error", "max_rel_error", "topk_overlap", "auc_drop", "failures", "samples"
                    )}},
                )

            model_tree = staging / "model"
            vdir = model_tree / str(version)
            vdir.mkdir(parents=True)
            trt_info = None
            if options.backend == "tensorrt":
                from model_repo_builder.tensorrt_build import build_engine

                artifact = vdir / "model.plan"
                trt_info = build_engine(
                    artifact_onnx, artifact, signature,
                    max_batch_size=options.max_batch_size, precision=options.precision,
                )
                bar.update()
            else:
                artifact = vdir / "model.onnx"
                shutil.copyfile(artifact_onnx, artifact)
                if options.backend == "python":
                    model_py = Path(__file__).with_name("python_backend_model.py")
                    shutil.copyfile(model_py, vdir / "model.py")

            warmup_files: dict[str, str] = {}
            if options.warmup_batch_size:
                # Warmup with a real sample (first parity row) rather than random bytes: realistic ids/values.
                (model_tree / "warmup").mkdir()
                for spec in signature.inputs:
                    (model_tree / "warmup" / spec.name).write_bytes(np.ascontiguousarray(feeds[spec.name][0]).tobytes())
                    warmup_files[spec.name] = spec.name
            if template is not None:
                model_cfg = cfgmod.merge_signature(template, name, signature, warmup_files)
                model_cfg.parameters[cfgmod.PARAM_PRECISION].string_value = options.precision
            else:
                model_cfg = cfgmod.build_model_config(name, options, signature)
                if options.warmup_batch_size:
                    cfgmod.add_warmup(model_cfg, signature, options.warmup_batch_size, warmup_files)
            (model_tree / "config.pbtxt").write_text(cfgmod.to_pbtxt(model_cfg))
            bar.update()

            report.update(
                {
                    "source": {"uri": req.source, "format": fmt, "sha256": src.sha256, "size_bytes": src.size_bytes},
                    "artifact": {
                        "file": artifact.name, "sha256": sha256_of(artifact), "size_bytes": artifact.stat().st_size
                    },
                    "backend": options.backend,
                    "precision": options.precision,
                    "opset": req.opset,
                    "quantization": quant_info,
                    "tensorrt": trt_info,
                    "signature": {
                        "inputs": [dataclasses.asdict(s) for s in signature.inputs],
                        "outputs": [dataclasses.asdict(s) for s in signature.outputs],
                    },
                    "tool_versions": tool_versions(),
                    "convert_seconds": round(convert_s, 3),
                    "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                }
            )
            report["build_seconds"] = round(time.monotonic() - started, 3)
            if cache is not None:
                report["cache"] = {"hit": False, "key": key, "dir": str(cache.root)}
            repository.write_json(vdir / "build.json", report)
            if cache is not None:
                error = cache.store(key, model_tree, version)
                if error:
                    report["cache"]["store_error"] = error
            published = repository.publish(model_tree, req.repo, name, version, req.overwrite)
    report["path"] = str(published)
    return BuildResult(name, version, req.repo / name, published, report)
