"""`model-repo-builder` command line: build, profile, serve-local and inspect."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_repo_builder import errors
from model_repo_builder.errors import BuilderError, ConfigError

_DESCRIPTION = "Turn exported recommendation models (Keras, SavedModel, ONNX) into verified Triton model repositories."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 already; keep its message but add the hint
        self.print_usage(sys.stderr)
        self.exit(errors.EXIT_USAGE, f"{self.prog}: error: {message}\nrun '{self.prog} --help' for the options\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated input names, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="model-repo-builder", description=_DESCRIPTION, epilog=errors.EXIT_CODES_HELP, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="build one model version into a Triton repository", epilog=errors.EXIT_CODES_HELP,
                       formatter_class=fmt)
    b.add_argument("--source", required=True, help="path, file://, https://, pvc://claim/path, s3://bucket/key or gs://bucket/key")
    b.add_argument("--format", choices=["keras", "savedmodel", "onnx"], help="source format (default: from the path)")
    b.add_argument("--sha256", help="expected sha256 of the source; a mismatch refuses the build")
    b.add_argument("--name", help="model name (default: template name, else the source file stem)")
    b.add_argument("--version", type=_positive_int, help="model version (default: next free version)")
    b.add_argument("--repo", required=True, type=Path, help="Triton model repository directory")
    b.add_argument("--backend", choices=["onnxruntime", "tensorrt", "python"],
                   help="onnxruntime (default), tensorrt (GPU engine) or python (ONNX Runtime in Triton's python "
                        "backend, for CPU-only local Triton)")
    b.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="fp32 (default); fp16 = TensorRT fp16 on GPU (ONNX stays fp32); int8 = ONNX Runtime "
                        "quantization (dynamic, or static QDQ with --calibration)")
    b.add_argument("--calibration", help="npz (path or URI) of representative inputs: static int8 quantization")
    b.add_argument("--calibration-samples", type=_positive_int, help="use the first N calibration rows")
    b.add_argument("--config-template", type=Path, help="config.pbtxt from the operator: batching/instances kept")
    b.add_argument("--max-batch-size", type=_positive_int)
    b.add_argument("--instance-kind", choices=["GPU", "CPU"])
    b.add_argument("--instance-count", type=_positive_int)
    b.add_argument("--preferred-batch-sizes", type=_int_list, help="comma-separated, e.g. 16,32")
    b.add_argument("--max-queue-delay-us", type=int)
    b.add_argument("--tensorrt-accelerator", action="store_true", help="ONNX Runtime TensorRT execution accelerator")
    b.add_argument("--warmup-batch-size", type=int, help="warm the model up with a sample batch of this size")
    b.add_argument("--parity-max-abs-error", type=float, help="default 1e-5 (fp32/fp16), 0.05 (int8)")
    b.add_argument("--parity-samples", type=_positive_int, default=512, help="synthesized samples (default 512)")
    b.add_argument("--parity-data", help="npz (path or URI) with inputs by name and optional 'labels'")
    b.add_argument("--opset", type=_positive_int, default=17)
    b.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    b.add_argument("--max-download-bytes", type=_positive_int)
    b.add_argument("--download-timeout", type=_positive_float, metavar="SECONDS",
                   help="abandon a download of the source that takes longer (default 1800)")
    b.add_argument("--max-extracted-bytes", type=_positive_int,
                   help="refuse an archive source that extracts to more (default: twice the download limit)")
    b.add_argument("--allow-unsafe-deserialization", action="store_true",
                   help="load a source that runs code it carries (Keras Lambda layers, pickles in the tree): only "
                        "for models from people you trust, since that code runs in the builder")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    b.add_argument("--cache-dir", help="reuse/store verified builds here (default: $MODEL_REPO_BUILDER_CACHE_DIR)")
    _add_store_args(b, "build")
    b.add_argument("--defer-publish", action="store_true",
                   help="with --store: only check --reuse and build into --repo; `profile --apply --store` tunes "
                        "and publishes it afterwards (the operator's build Job with spec.serving.tuning)")
    b.add_argument("--ranking-request-columns",
                   help="add a ranking head: these columns of the model's one input (e.g. 0-9,40-44, zero-based) are "
                        "the request's, sent once as `request [1, U]`; the others arrive per candidate as "
                        "`candidates [N, F-U]`; the model returns the top k `scores` and `indices`")
    b.add_argument("--ranking-request-inputs", type=_name_list,
                   help="add a ranking head to a model with named inputs: these (comma-separated) are per request, "
                        "sent with one row; the others arrive with one row per candidate")
    b.add_argument("--ranking-max-k", type=_positive_int, default=100,
                   help="the largest k a ranking request gets (default 100)")
    b.add_argument("--json", action="store_true", help="print the build report as JSON on stdout")

    pr = sub.add_parser("profile", help="sweep batching/instances on a live Triton under a p99 SLO",
                        epilog=errors.EXIT_CODES_HELP, formatter_class=fmt)
    pr.add_argument("--repo", required=True, type=Path)
    pr.add_argument("--name", required=True)
    pr.add_argument("--url", help="gRPC host:port of a Triton in explicit model-control mode (default: start one)")
    pr.add_argument("--candidates", type=_positive_int, default=64, help="candidates scored per request")
    pr.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight")
    pr.add_argument("--concurrency-levels", type=_int_list, default=(),
                    help="the load range the choice must hold over, e.g. 1,4,16,64: the p99 SLO at every level, "
                         "never slower than Triton's default at any (replaces --concurrency)")
    pr.add_argument("--noise-floor", type=float, default=0.05,
                    help="throughput differences below this share (or the measured spread) count as noise")
    pr.add_argument("--slo-p99-ms", type=float, default=50.0)
    pr.add_argument("--max-queue-delays-us", type=_int_list, default=(0, 1000, 5000))
    pr.add_argument("--instance-counts", type=_int_list, default=(1, 2))
    pr.add_argument("--preferred-batch-sizes", type=_int_list, default=(), help="candidate preferred sizes (and none)")
    pr.add_argument("--duration-s", type=float, default=3.0, help="measurement window per configuration")
    pr.add_argument("--repeats", type=_positive_int, default=1, help="interleaved rounds over the grid (medians)")
    pr.add_argument("--out", type=Path, default=Path("profile-results"))
    pr.add_argument("--apply", action="store_true", help="write the chosen config.pbtxt into the repository")
    pr.add_argument("--wait-for-server-s", type=float, default=0.0,
                    help="with --url: wait this long for that Triton to come up (default: do not wait)")
    _add_store_args(pr, "tune")
    pr.add_argument("--json", action="store_true")

    s = sub.add_parser("serve-local", help="serve a repository with the Triton binary from nvidia-pytriton",
                       epilog=errors.EXIT_CODES_HELP, formatter_class=fmt)
    s.add_argument("--repo", required=True, type=Path)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log-file", type=Path)
    s.add_argument("--check", action="store_true", help="start, score one synthesized batch per model, stop")
    s.add_argument("--json", action="store_true")

    f = sub.add_parser("fetch-artifact", help="install a published artifact into a repository, checking its digest",
                       epilog=errors.EXIT_CODES_HELP, formatter_class=fmt)
    f.add_argument("--store", required=True, help="s3://bucket[/prefix] or file:///dir")
    f.add_argument("--artifact-key", required=True)
    f.add_argument("--digest", required=True, help="sha256 of the artifact's manifest (the build reported it)")
    f.add_argument("--repo", required=True, type=Path, help="Triton model repository directory")
    f.add_argument("--store-endpoint", help="S3 endpoint of --store (default: $AWS_ENDPOINT_URL)")
    f.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout")

    i = sub.add_parser("inspect", help="show a model repository, a model directory or a model file",
                       epilog=errors.EXIT_CODES_HELP, formatter_class=fmt)
    i.add_argument("path", type=Path)
    i.add_argument("--format", choices=["keras", "savedmodel", "onnx"])
    i.add_argument("--allow-unsafe-deserialization", action="store_true",
                   help="load a model file that runs code it carries, as `build` does with this flag")
    i.add_argument("--json", action="store_true")
    return p


def _add_store_args(p: argparse.ArgumentParser, what: str) -> None:
    """Publishing to a model store, shared by `build` and `profile --apply` (which publishes the tuned tree)."""
    p.add_argument("--store", help="publish the built tree to this model store: s3://bucket[/prefix] or file:///dir")
    p.add_argument("--artifact-key", help="the artifact's key in --store (the operator's: <namespace>/<model>/<id>)")
    p.add_argument("--store-endpoint", help="S3 endpoint of --store (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--reuse", action="store_true",
                   help=f"when --store already holds --artifact-key, report it and {what} nothing")
    p.add_argument("--collect-prefix", help="after publishing, delete the artifacts under this key prefix ...")
    p.add_argument("--keep", action="append", default=[], help="... except these keys (repeatable)")
    p.add_argument("--keep-recent", type=int, default=0,
                   help="... and the N most recently published of the others (default 0)")
    p.add_argument("--termination-log", type=Path,
                   help="write the outcome (one JSON line) here too, e.g. /dev/termination-log")


def _open_store(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """(the model store of --store or None, the outcome to report when --reuse finds --artifact-key published)."""
    if (args.store is None) != (args.artifact_key is None):
        raise errors.UsageError("--store and --artifact-key go together", "pass both to publish, neither to not")
    if args.store is None:
        return None, None
    from model_repo_builder.artifact import MANIFEST, Manifest, open_store

    store = open_store(args.store, args.store_endpoint)
    existing = store.read(f"{args.artifact_key}/{MANIFEST}") if args.reuse else None
    if existing is None:
        return store, None
    manifest = Manifest.from_bytes(existing)
    return store, {"artifact": {"key": args.artifact_key, "digest": manifest.digest, "reused": True},
                   "name": manifest.name, "version": manifest.version}  # fmt: skip


def _emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        # One line, printed last: the operator reads the init container's last log line as the build report.
        print(json.dumps({"status": "ok", **data}, sort_keys=True, default=str), flush=True)
    else:
        print(human)


def _cmd_build(args: argparse.Namespace) -> int:
    from model_repo_builder.builder import BuildRequest, build
    from model_repo_builder.progress import progress_enabled

    store, reused = _open_store(args)
    if reused is not None:
        return _done(args, reused, f"reused {args.artifact_key} ({reused['artifact']['digest'][:12]}): "
                                   "nothing to build")
    if args.defer_publish and store is None:
        raise errors.UsageError("--defer-publish needs --store and --artifact-key", "pass them, or drop the flag")

    req = BuildRequest(
        source=args.source, repo=args.repo, name=args.name, version=args.version, format=args.format,
        sha256=args.sha256, backend=args.backend, precision=args.precision, max_batch_size=args.max_batch_size,
        instance_kind=args.instance_kind, instance_count=args.instance_count,
        preferred_batch_sizes=args.preferred_batch_sizes, max_queue_delay_us=args.max_queue_delay_us,
        tensorrt_accelerator=args.tensorrt_accelerator, warmup_batch_size=args.warmup_batch_size,
        calibration=args.calibration, calibration_samples=args.calibration_samples,
        config_template=args.config_template,
        parity_max_abs_error=args.parity_max_abs_error, parity_samples=args.parity_samples,
        parity_data=args.parity_data, opset=args.opset, s3_endpoint=args.s3_endpoint,
        max_download_bytes=args.max_download_bytes, max_extracted_bytes=args.max_extracted_bytes,
        download_timeout_s=args.download_timeout,
        allow_unsafe_deserialization=args.allow_unsafe_deserialization, overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        show_progress=progress_enabled(args.json), ranking=_ranking_spec(args),
    )
    result = build(req)
    if store is not None and not args.defer_publish:
        result.report["artifact"] = _publish(args, store, result.model_dir, result.name, result.version)
    par = result.report["parity"]
    human = (
        f"built {result.name} version {result.version} -> {result.version_dir}\n"
        f"  {result.report['backend']}/{result.report['precision']}, parity: max abs error "
        f"{par['max_abs_error']:.3g}, top-{par['topk']} overlap {par['topk_overlap']:.3f}"
        + (f", AUC drop {par['auc_drop']:.4f}" if par.get("auc_drop") is not None else "")
        + f", {result.report['build_seconds']:.1f}s"
        + (f"\n  published {args.artifact_key} ({result.report['artifact']['digest'][:12]})"
           if store is not None and not args.defer_publish else "")
    )
    # Deferred: nothing is published yet, so `profile --store` writes the outcome the operator reads.
    return _done(args, result.report, human, outcome=not args.defer_publish)


def _ranking_spec(args: argparse.Namespace) -> Any:
    from model_repo_builder.ranking import RankingSpec, parse_columns

    if args.ranking_request_columns is None and not args.ranking_request_inputs:
        return None
    if args.ranking_request_columns is not None and args.ranking_request_inputs:
        raise errors.UsageError("--ranking-request-columns and --ranking-request-inputs exclude each other",
                                "columns for a model with one input, inputs for a model with named inputs")
    columns = parse_columns(args.ranking_request_columns) if args.ranking_request_columns is not None else ()
    return RankingSpec(request_columns=columns, request_inputs=tuple(args.ranking_request_inputs or ()),
                       max_k=args.ranking_max_k)  # fmt: skip


def _publish(args: argparse.Namespace, store: Any, tree: Path, name: str, version: int) -> dict[str, Any]:
    from model_repo_builder.artifact import collect, publish

    published = publish(tree, store, args.artifact_key, name=name, version=version)
    out: dict[str, Any] = {"key": published.key, "digest": published.digest, "reused": published.reused}
    if args.collect_prefix:
        out["collected"] = collect(store, args.collect_prefix, {args.artifact_key, *args.keep},
                                   keep_recent=args.keep_recent)
    return out


def _done(args: argparse.Namespace, report: dict[str, Any], human: str, *, outcome: bool = True) -> int:
    if outcome and args.termination_log is not None:
        # Kubernetes keeps at most 4 KiB of it: the outcome, not the whole report.
        brief: dict[str, Any] = {"status": "ok"}
        brief.update({k: report[k] for k in ("artifact", "name", "version") if k in report})
        if report.get("tuning"):
            tuning = report["tuning"]
            brief["tuning"] = {"chosen": tuning["chosen"], "slo_met": tuning["slo_met"],
                               "slo_p99_ms": tuning["slo_p99_ms"], "concurrency_levels": tuning["concurrency_levels"]}
        args.termination_log.write_text(json.dumps(brief, sort_keys=True) + "\n")
    _emit(report, args.json, human)
    return errors.EXIT_OK


def _cmd_fetch_artifact(args: argparse.Namespace) -> int:
    from model_repo_builder.artifact import fetch_artifact, open_store

    path = fetch_artifact(open_store(args.store, args.store_endpoint), args.artifact_key, args.digest, args.repo)
    _emit({"path": str(path), "key": args.artifact_key, "digest": args.digest}, args.json,
          f"fetched {args.artifact_key} ({args.digest[:12]}) -> {path}")  # fmt: skip
    return errors.EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from model_repo_builder.inspect import inspect_path

    info = inspect_path(args.path, args.format, allow_unsafe=args.allow_unsafe_deserialization)
    _emit(info, args.json, json.dumps(info, indent=2, sort_keys=True, default=str))
    return errors.EXIT_OK


def _cmd_serve_local(args: argparse.Namespace) -> int:
    from model_repo_builder.triton_local import TritonServer

    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, log_path=args.log_file)
    with server:
        info: dict[str, Any] = {"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                                "log": str(server.log_path)}
        if args.check:
            from model_repo_builder.inspect import smoke_test

            info["models"] = smoke_test(server)
            _emit(info, args.json, json.dumps(info, indent=2))
            return errors.EXIT_OK
        _emit(info, args.json, f"Triton serving {args.repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                               f"metrics {server.metrics_url} (log {server.log_path}); Ctrl-C to stop")
        sys.stdout.flush()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                if server.process is None or server.process.poll() is not None:
                    print(f"tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
                    return errors.EXIT_UNEXPECTED
        except KeyboardInterrupt:
            pass
    return errors.EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    from model_repo_builder.profile import ProfileRequest, run_profile
    from model_repo_builder.progress import progress_enabled

    store, reused = _open_store(args)
    if reused is not None:
        return _done(args, reused, f"reused {args.artifact_key} ({reused['artifact']['digest'][:12]}): "
                                   "nothing to tune")
    if store is not None and not args.apply:
        raise errors.UsageError("--store publishes the tuned repository: it needs --apply", "add --apply")
    req = ProfileRequest(
        repo=args.repo, name=args.name, url=args.url, candidates=args.candidates, concurrency=args.concurrency,
        concurrency_levels=tuple(args.concurrency_levels), noise_floor=args.noise_floor, slo_p99_ms=args.slo_p99_ms,
        max_queue_delays_us=tuple(args.max_queue_delays_us),
        instance_counts=tuple(args.instance_counts), preferred_batch_sizes=tuple(args.preferred_batch_sizes),
        duration_s=args.duration_s, repeats=args.repeats, out_dir=args.out, apply=args.apply,
        show_progress=progress_enabled(args.json), server_wait_s=args.wait_for_server_s,
    )
    result = run_profile(req)
    result["tuning"] = {"chosen": result["chosen"]["label"], "slo_met": result["slo_met"],
                        "slo_p99_ms": args.slo_p99_ms, "concurrency_levels": result["levels"]}
    if store is not None:
        version = _latest_version(args.repo / args.name)
        result.update(name=args.name, version=version,
                      artifact=_publish(args, store, args.repo / args.name, args.name, version))
    chosen = result["chosen"]
    rows = "\n".join(f"  concurrency {t['concurrency']:>3}: {t['chosen']['throughput_rps']:8.1f} req/s p99 "
                     f"{t['chosen']['p99_ms']:6.1f} ms | default {t['default']['throughput_rps']:8.1f} req/s p99 "
                     f"{t['default']['p99_ms']:6.1f} ms | {t['ratio']:.2f}x" for t in result["table"])  # fmt: skip
    human = (
        f"chosen: {chosen['label']} -> {chosen['throughput_rps']:.1f} req/s "
        f"({chosen['throughput_rps'] * args.candidates:.0f} candidates/s), p99 {chosen['p99_ms']:.1f} ms "
        f"(SLO {args.slo_p99_ms} ms); results in {args.out}\n{rows}\nwhy: {result['reason']}"
        + (f"\npublished {args.artifact_key} ({result['artifact']['digest'][:12]})" if store is not None else "")
    )
    return _done(args, result, human)


def _latest_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise errors.BadInputError(f"{model_dir} holds no model version", "profile a repository written by `build`")
    return max(versions)


_COMMANDS = {"build": _cmd_build, "fetch-artifact": _cmd_fetch_artifact, "inspect": _cmd_inspect,
             "serve-local": _cmd_serve_local, "profile": _cmd_profile}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RECSERVE_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    as_json = bool(getattr(args, "json", False))
    try:
        return _COMMANDS[args.command](args)
    except BuilderError as exc:
        return _fail(exc.exit_code, type(exc).__name__, exc.message, exc.hint, as_json=as_json, details=exc.details)
    except ConfigError as exc:
        return _fail(errors.EXIT_USAGE, "InvalidOptions", str(exc), "fix the serving options", as_json=as_json)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from model_repo_builder.triton_local import TritonError

        if isinstance(exc, TritonError):
            return _fail(errors.EXIT_UNEXPECTED, "TritonError", str(exc), "see the Triton log", as_json=as_json)
        if os.environ.get("RECSERVE_DEBUG"):
            traceback.print_exc()
        return _fail(
            errors.EXIT_UNEXPECTED, type(exc).__name__, f"unexpected error: {exc}",
            "this is a bug; rerun with RECSERVE_DEBUG=1 for the traceback and report it", as_json=as_json,
        )


def _fail(
    code: int, kind: str, message: str, hint: str, *, as_json: bool, details: dict[str, Any] | None = None
) -> int:
    print(f"error: {message}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr, flush=True)
    if as_json:
        # A single line after the stderr text, so it is the last log line the operator parses; `error` is the
        # human message, the other keys are for machines.
        err = {"status": "failed", "error": message, "hint": hint, "error_type": kind, "exit_code": code,
               **(details or {})}
        print(json.dumps(err, sort_keys=True, default=str), flush=True)
    return code
