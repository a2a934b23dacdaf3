"""Build orchestration: fetch -> convert -> optimize -> parity gate -> config -> atomic publication."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_repo_builder import config as cfgmod
from model_repo_builder import convert, parity, repository
from model_repo_builder.cache import BuildCache, cache_key
from model_repo_builder.errors import BadInputError, ParityError, UsageError
from model_repo_builder.fetch import FetchedSource, fetch, sha256_of
from model_repo_builder.progress import progress_bar
from model_repo_builder.ranking import RankingLayout, RankingSpec

# config.pbtxt parameter recording a ranking model's layout (what clients send); its warmup request's candidates.
PARAM_RANKING = "recserve_ranking"
RANKING_WARMUP_CANDIDATES = 200


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
    max_extracted_bytes: int | None = None  # an archive source's extracted size (None: twice the download limit)
    download_timeout_s: float | None = None  # None: fetch.DEFAULT_DOWNLOAD_TIMEOUT_S
    # Load sources whose loading runs code they carry (Keras Lambda layers, pickles): see safety.check_source.
    allow_unsafe_deserialization: bool = False
    overwrite: bool = False
    cache_dir: str | None = None  # default: $MODEL_REPO_BUILDER_CACHE_DIR; unset = no cache
    show_progress: bool = False
    # A ranking head (one request, N candidates, top-k in the engine) added to the exported graph: see ranking.py.
    ranking: RankingSpec | None = None


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


@dataclass(frozen=True)
class _Plan:
    """What one build makes, settled before anything is downloaded."""

    name: str
    version: int
    options: cfgmod.ServingOptions
    template: Any | None


@dataclass
class _Build:
    """One build in progress: the request, its plan, the staging directory and the report its stages fill."""

    req: BuildRequest
    plan: _Plan
    staging: Path
    report: dict[str, Any]
    started: float
    bar: Any = None  # the progress bar of the steps that take time


@dataclass(frozen=True)
class _Converted:
    source: convert.SourceModel
    onnx: Path  # the fp32 ONNX export
    seconds: float


@dataclass(frozen=True)
class _Optimized:
    onnx: Path  # the ONNX model the engine is built from (fp32, or int8 after quantization)
    quantization: dict[str, Any] | None


@dataclass(frozen=True)
class _Ranked:
    onnx: Path  # the optimized model with the ranking head
    layout: RankingLayout


@dataclass(frozen=True)
class _Written:
    tree: Path  # the staged <name> tree: config.pbtxt, <version>/, warmup/
    artifact: Path
    tensorrt: dict[str, Any] | None


def build(req: BuildRequest) -> BuildResult:
    """Run one build: plan -> fetch -> (cache) -> convert -> optimize -> parity gate -> write -> publish.

    Raises BuilderError subclasses (with exit codes) or ConfigError; the repository is unchanged then.
    """
    started = time.monotonic()
    plan = _plan(req)
    report: dict[str, Any] = {"name": plan.name, "version": plan.version, "repository": str(req.repo)}
    with repository.staging_dir(req.repo, plan.name) as staging:
        b = _Build(req, plan, staging, report, started)
        src = _fetch_source(b)
        fmt = convert.detect_format(src.path, req.format)
        cache = BuildCache.from_env(req.cache_dir)
        key = _cache_key(b, src, fmt)
        cached = cache.lookup(key) if cache is not None else None
        if cache is not None and cached is not None:
            return _restore_cached(b, cache, cached, key)
        steps = (4 + (plan.options.precision == "int8") + (plan.options.backend == "tensorrt")
                 + (req.ranking is not None))  # fmt: skip
        with progress_bar(steps, f"build {plan.name}", req.show_progress, unit="step") as b.bar:
            converted = _convert(b, src, fmt)
            feeds, labels = _parity_inputs(b, converted.source.signature)
            optimized = _optimize(b, converted)
            _parity_gate(b, converted, optimized, feeds, labels)
            ranked = _rank(b, converted, optimized, feeds) if req.ranking is not None else None
            written = _write_model(b, converted.source.signature, optimized, feeds, ranked)
        report.update(_provenance(b, src=src, fmt=fmt, converted=converted, optimized=optimized, written=written))
        report["build_seconds"] = round(time.monotonic() - started, 3)
        if cache is not None:
            report["cache"] = {"hit": False, "key": key, "dir": str(cache.root)}
        repository.write_json(written.tree / str(plan.version) / "build.json", report)
        if cache is not None:
            error = cache.store(key, written.tree, plan.version)
            if error:
                report["cache"]["store_error"] = error
        published = repository.publish(written.tree, req.repo, plan.name, plan.version, req.overwrite)
    report["path"] = str(published)
    return BuildResult(plan.name, plan.version, req.repo / plan.name, published, report)


def _plan(req: BuildRequest) -> _Plan:
    """Name, version and serving options; every check that needs no download fails here, before any."""
    template = _read_template(req.config_template) if req.config_template else None
    name = repository.check_model_name(
        req.name or (template.name if template is not None and template.name else None)
        or repository.default_model_name(req.source)
    )
    options = resolve_options(req, template)
    if req.ranking is not None and options.backend == "tensorrt":
        raise UsageError(
            "a ranking head is not built into TensorRT plans yet (a runtime k needs TensorRT shape tensors)",
            "serve it with --backend onnxruntime: on GPU instances, with --precision fp16 through its TensorRT "
            "accelerator")  # fmt: skip
    if options.backend == "tensorrt":
        # Fail before any download or conversion when this host cannot build engines.
        from model_repo_builder.tensorrt_build import import_tensorrt

        import_tensorrt()
    if req.calibration_samples is not None and req.calibration_samples < 1:
        raise UsageError("--calibration-samples must be >= 1", "pass a positive number of rows")
    version = repository.resolve_version(req.repo, name, req.version, req.overwrite)
    return _Plan(name, version, options, template)


def _fetch_source(b: _Build) -> FetchedSource:
    req = b.req
    kwargs: dict[str, Any] = {"max_bytes": req.max_download_bytes} if req.max_download_bytes else {}
    if req.download_timeout_s:
        kwargs["download_timeout_s"] = req.download_timeout_s
    return fetch(req.source, b.staging, sha256=req.sha256, s3_endpoint=req.s3_endpoint,
                 max_extracted_bytes=req.max_extracted_bytes, show_progress=req.show_progress, **kwargs)  # fmt: skip


def _cache_key(b: _Build, src: FetchedSource, fmt: str) -> str:
    """Everything the built tree depends on: the source's digest, the options, the template and the tools."""
    req, plan = b.req, b.plan
    return cache_key({
        "source_sha256": src.sha256, "format": fmt, "name": plan.name, "options": dataclasses.asdict(plan.options),
        "template": cfgmod.to_pbtxt(plan.template) if plan.template is not None else None, "opset": req.opset,
        "calibration": [str(req.calibration), req.calibration_samples], "parity_data": str(req.parity_data),
        "parity": [req.parity_max_abs_error, req.parity_samples, req.parity_seed], "tools": tool_versions(),
        "ranking": dataclasses.asdict(req.ranking) if req.ranking is not None else None,
        # Only when set (earlier keys stay valid): an unsafe load is never the hit of a build that would refuse it.
        **({"allow_unsafe_deserialization": True} if req.allow_unsafe_deserialization else {}),
    })  # fmt: skip


def _restore_cached(b: _Build, cache: BuildCache, cached: Path, key: str) -> BuildResult:
    """A cache hit: the tree an earlier build of the same inputs made, with a fresh build.json."""
    req, plan, started = b.req, b.plan, b.started
    model_tree = b.staging / "model"
    report = cache.restore(cached, model_tree, plan.version)
    report.update({"name": plan.name, "version": plan.version, "repository": str(req.repo),
                   "cache": {"hit": True, "key": key, "dir": str(cache.root)},
                   "build_seconds": round(time.monotonic() - started, 3)})  # fmt: skip
    repository.write_json(model_tree / str(plan.version) / "build.json", report)
    published = repository.publish(model_tree, req.repo, plan.name, plan.version, req.overwrite)
    report["path"] = str(published)
    return BuildResult(plan.name, plan.version, req.repo / plan.name, published, report)


def _convert(b: _Build, src: FetchedSource, fmt: str) -> _Converted:
    """The source model loaded (safely: see convert.load_source) and exported to fp32 ONNX."""
    t0 = time.monotonic()
    source = convert.load_source(src.path, fmt, allow_unsafe=b.req.allow_unsafe_deserialization)
    if b.req.allow_unsafe_deserialization:
        b.report["unsafe_deserialization"] = True  # build.json records that the source's own code may have run
    b.bar.update()
    fp32_path = b.staging / "model.fp32.onnx"
    convert.convert_to_onnx(source, src.path, fp32_path, b.req.opset)
    b.bar.update()
    return _Converted(source, fp32_path, time.monotonic() - t0)


def _parity_inputs(
    b: _Build, signature: cfgmod.ModelSignature
) -> tuple[dict[str, NDArray[Any]], NDArray[Any] | None]:
    """The parity set: the user's rows (with labels, when given) or synthesized inputs of the model's signature."""
    req = b.req
    if req.parity_data is not None:
        return parity.load_parity_data(_fetch_npz(req.parity_data, req, b.staging, "parity"), signature)
    return parity.synthesize_inputs(signature, req.parity_samples, req.parity_seed), None


def _optimize(b: _Build, converted: _Converted) -> _Optimized:
    """int8: quantize with the calibration rows; other precisions build from the fp32 export."""
    req, plan, staging = b.req, b.plan, b.staging
    if plan.options.precision != "int8":
        if req.calibration:
            # Calibration only drives int8; say so in the report rather than failing a valid deployment.
            b.report["calibration_ignored"] = (
                f"calibration data is only used for int8 (precision {plan.options.precision})"
            )
        return _Optimized(converted.onnx, None)
    calib = None
    if req.calibration:
        calib, _ = parity.load_parity_data(_fetch_npz(req.calibration, req, staging, "calibration"),
                                           converted.source.signature)  # fmt: skip
        if req.calibration_samples:
            calib = {k: v[: req.calibration_samples] for k, v in calib.items()}
    int8_path = staging / "model.int8.onnx"
    from model_repo_builder.quantize import quantize_int8

    info = quantize_int8(converted.onnx, int8_path, calib)
    convert.load_onnx_checked(int8_path, source=False)
    b.bar.update()
    return _Optimized(int8_path, info)


def _parity_gate(
    b: _Build, converted: _Converted, optimized: _Optimized, feeds: dict[str, NDArray[Any]], labels: NDArray[Any] | None
) -> None:
    """The optimized model against its source on the parity set; a failure stops the build (ParityError)."""
    plan, report, options = b.plan, b.report, b.plan.options
    tol = parity.default_tolerance(options.precision, b.req.parity_max_abs_error)
    result = parity.compare(converted.source.predict, convert.onnx_predictor(optimized.onnx), feeds, tol,
                            labels=labels)  # fmt: skip
    b.bar.update()
    report["parity"] = result.to_dict()
    if options.precision == "fp16" or options.backend == "tensorrt":
        report["parity"]["note"] = (
            "checked on the ONNX model fed to TensorRT; TensorRT kernels (fp16/int8) are not run by the build"
        )
    if not result.passed:
        raise ParityError(
            f"parity gate failed for {plan.name} ({options.precision}): " + "; ".join(result.failures),
            "inspect the figures (--json), relax --parity-max-abs-error if justified, or use higher precision",
            # A compact summary: the whole JSON error line must fit Kubernetes' 2 KiB termination message.
            details={"parity": {k: report["parity"][k] for k in (
                "max_abs_error", "max_rel_error", "topk_overlap", "auc_drop", "failures", "samples"
            )}},
        )  # fmt: skip


def _rank(b: _Build, converted: _Converted, optimized: _Optimized, feeds: dict[str, NDArray[Any]]) -> _Ranked:
    """The ranking head on the optimized model, checked against the source model: the same top-k on requests made
    of the parity rows (a failure stops the build like the parity gate's)."""
    import onnx

    from model_repo_builder import ranking

    assert b.req.ranking is not None
    layout = ranking.plan_ranking(converted.source.signature, b.req.ranking)
    path = b.staging / "model.ranking.onnx"
    onnx.save(ranking.add_ranking_head(onnx.load(optimized.onnx), layout), path)
    tol = parity.default_tolerance(b.plan.options.precision, b.req.parity_max_abs_error)
    check = ranking.check_head(converted.source.predict, convert.onnx_predictor(path), layout, feeds,
                               tol.max_abs_error, k=min(10, layout.max_k))  # fmt: skip
    b.report["ranking"] = {**layout.to_dict(), "parity": check.to_dict()}
    b.bar.update()
    if not check.passed:
        raise ParityError(f"the ranking head of {b.plan.name} does not rank like the source model: "
                          + "; ".join(check.failures),
                          "inspect the figures (--json); with int8, relax --parity-max-abs-error if justified",
                          details={"ranking": check.to_dict()})  # fmt: skip
    return _Ranked(path, layout)


def _write_model(
    b: _Build, signature: cfgmod.ModelSignature, optimized: _Optimized, feeds: dict[str, NDArray[Any]],
    ranked: _Ranked | None = None,
) -> _Written:  # fmt: skip
    """The staged repository tree: the engine (TensorRT plan or ONNX), warmup samples and config.pbtxt."""
    plan, options = b.plan, b.plan.options
    model_tree = b.staging / "model"
    vdir = model_tree / str(plan.version)
    vdir.mkdir(parents=True)
    trt_info = None
    if options.backend == "tensorrt":
        from model_repo_builder.tensorrt_build import build_engine

        artifact = vdir / "model.plan"
        trt_info = build_engine(optimized.onnx, artifact, signature, max_batch_size=options.max_batch_size,
                                precision=options.precision)  # fmt: skip
        b.bar.update()
    else:
        artifact = vdir / "model.onnx"
        shutil.copyfile(ranked.onnx if ranked is not None else optimized.onnx, artifact)
        if options.backend == "python":
            shutil.copyfile(Path(__file__).with_name("python_backend_model.py"), vdir / "model.py")
    if ranked is not None:
        model_cfg = _ranking_config(plan, ranked.layout, _write_ranking_warmup(model_tree, ranked.layout, feeds))
    else:
        warmup_files = _write_warmup(model_tree, signature, feeds) if options.warmup_batch_size else {}
        model_cfg = _model_config(plan, signature, warmup_files)
    (model_tree / "config.pbtxt").write_text(cfgmod.to_pbtxt(model_cfg))
    b.bar.update()
    return _Written(model_tree, artifact, trt_info)


def _write_warmup(model_tree: Path, signature: cfgmod.ModelSignature, feeds: dict[str, NDArray[Any]]) -> dict[str, str]:
    """Warmup with a real sample (the first parity row) rather than random bytes: realistic ids and values."""
    (model_tree / "warmup").mkdir()
    for spec in signature.inputs:
        (model_tree / "warmup" / spec.name).write_bytes(np.ascontiguousarray(feeds[spec.name][0]).tobytes())
    return {spec.name: spec.name for spec in signature.inputs}


def _write_ranking_warmup(model_tree: Path, layout: RankingLayout, feeds: dict[str, NDArray[Any]]) -> dict[str, Any]:
    """One real ranking request (parity rows: the first row's request part, RANKING_WARMUP_CANDIDATES candidates)
    and k = max_k: Triton runs it before it reports the model ready."""
    from model_repo_builder import ranking

    total = len(next(iter(feeds.values())))
    rows = np.arange(min(RANKING_WARMUP_CANDIDATES, total), dtype=np.int64)
    head, _ = ranking.requests_from_rows(layout, feeds, 0, rows)
    head[ranking.K_INPUT] = np.array([layout.max_k], np.int64)
    (model_tree / "warmup").mkdir()
    out: dict[str, Any] = {}
    for name, value in head.items():
        arr = np.ascontiguousarray(value)
        (model_tree / "warmup" / name).write_bytes(arr.tobytes())
        out[name] = (name, arr.shape)
    return out


def _ranking_config(plan: _Plan, layout: RankingLayout, warmup: dict[str, Any]) -> Any:
    """config.pbtxt of a ranking model: its own inputs and outputs, no batch dimension (a request's candidates
    are its batch, of any size), so no dynamic batching; instances, backend and accelerators as configured."""
    if plan.template is not None:
        model_cfg = cfgmod.merge_signature(plan.template, plan.name, layout.signature)
        model_cfg.parameters[cfgmod.PARAM_PRECISION].string_value = plan.options.precision
    else:
        model_cfg = cfgmod.build_model_config(plan.name, plan.options, layout.signature)
    model_cfg.max_batch_size = 0
    model_cfg.ClearField("dynamic_batching")
    del model_cfg.model_warmup[:]
    if cfgmod.PARAM_WARMUP_BATCH in model_cfg.parameters:
        del model_cfg.parameters[cfgmod.PARAM_WARMUP_BATCH]
    warm = model_cfg.model_warmup.add(name="warmup_ranking_request", batch_size=1, count=1)
    for spec in layout.signature.inputs:
        entry = warm.inputs[spec.name]
        entry.data_type = cfgmod.triton_dtype(spec.dtype)
        file_name, shape = warmup[spec.name]
        entry.dims.extend(int(d) for d in shape)
        entry.input_data_file = file_name
    model_cfg.parameters[PARAM_RANKING].string_value = json.dumps(layout.to_dict(), sort_keys=True)
    return model_cfg


def _model_config(plan: _Plan, signature: cfgmod.ModelSignature, warmup_files: dict[str, str]) -> Any:
    """config.pbtxt: the operator's template with the model's signature merged in, or one built from the flags."""
    if plan.template is not None:
        model_cfg = cfgmod.merge_signature(plan.template, plan.name, signature, warmup_files)
        model_cfg.parameters[cfgmod.PARAM_PRECISION].string_value = plan.options.precision
        return model_cfg
    model_cfg = cfgmod.build_model_config(plan.name, plan.options, signature)
    if plan.options.warmup_batch_size:
        cfgmod.add_warmup(model_cfg, signature, plan.options.warmup_batch_size, warmup_files)
    return model_cfg


def _provenance(
    b: _Build, *, src: FetchedSource, fmt: str, converted: _Converted, optimized: _Optimized, written: _Written
) -> dict[str, Any]:
    """build.json's record of where the model came from, what was built and with which tools."""
    req, plan = b.req, b.plan
    signature, artifact = converted.source.signature, written.artifact
    return {
        "source": {"uri": req.source, "format": fmt, "sha256": src.sha256, "size_bytes": src.size_bytes},
        "artifact": {"file": artifact.name, "sha256": sha256_of(artifact), "size_bytes": artifact.stat().st_size},
        "backend": plan.options.backend,
        "precision": plan.options.precision,
        "opset": req.opset,
        "quantization": optimized.quantization,
        "tensorrt": written.tensorrt,
        "signature": {
            "inputs": [dataclasses.asdict(s) for s in signature.inputs],
            "outputs": [dataclasses.asdict(s) for s in signature.outputs],
        },
        "tool_versions": tool_versions(),
        "convert_seconds": round(converted.seconds, 3),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
