"""Builder benchmark: conversion time, ONNX Runtime fp32 vs int8, and profiled vs default Triton config."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model_repo_builder import config as C  # noqa: E402
from model_repo_builder import convert, parity  # noqa: E402
from model_repo_builder.builder import BuildRequest, build  # noqa: E402
from model_repo_builder.profile import Candidate, ProfileRequest, apply_candidate, measure, run_profile  # noqa: E402
from model_repo_builder.triton_local import TritonServer  # noqa: E402
from tests.builder import models  # noqa: E402


def ort_throughput(path: Path, feeds: dict[str, Any], seconds: float, threads: int) -> float:
    """Candidates scored per second by one ONNX Runtime session (batch = len(feeds))."""
    predict = convert.onnx_predictor(path, threads=threads)
    n = len(next(iter(feeds.values())))
    predict(feeds)  # warm up allocations
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predict(feeds)
        done += n
    return done / (time.perf_counter() - t0)


def ab_sweep(url: str, names: tuple[str, str], *, feeds: dict[str, Any], concurrencies: list[int], rounds: int,
             seconds: float) -> dict[str, list[dict[str, Any]]]:
    """Alternate the two models (both loaded) round by round so host noise hits both alike; medians per point."""
    raw: dict[tuple[str, int], list[Any]] = {}
    for _ in range(rounds):
        for conc in concurrencies:
            for name in names:
                m = measure(url, name, feeds=feeds, concurrency=conc, warmup_s=0.3, duration_s=seconds,
                            cand=Candidate(conc, False))
                raw.setdefault((name, conc), []).append(m)
    out: dict[str, list[dict[str, Any]]] = {}
    for (name, conc), ms in raw.items():
        out.setdefault(name, []).append({
            "concurrency": conc,
            "throughput_rps": float(np.median([m.throughput_rps for m in ms])),
            "p99_ms": float(np.median([m.p99_ms for m in ms])),
            "throughput_spread": [min(m.throughput_rps for m in ms), max(m.throughput_rps for m in ms)],
            "errors": sum(m.errors for m in ms),
        })
    return out


def best_under_slo(rows: list[dict[str, Any]], slo_ms: float) -> dict[str, Any] | None:
    ok = [r for r in rows if r["p99_ms"] <= slo_ms and r["errors"] == 0]
    return max(ok, key=lambda r: r["throughput_rps"]) if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--candidates", type=int, default=128, help="candidates per request")
    ap.add_argument("--slo-p99-ms", type=float, default=25.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="profile and A/B rounds (medians reported)")
    ap.add_argument("--concurrency", type=int, default=4, help="workload concurrency the profile tunes for")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "candidates_per_request": args.candidates,
    }

    # 1. Conversion time (Keras -> ONNX inside a full fp32 build, and the whole build).
    src = models.ctr_dnn(work / "ctr.keras")
    data = models.ctr_parity_data(work / "parity.npz", n=4096)
    repo = work / "repo"
    t0 = time.perf_counter()
    fp32 = build(BuildRequest(source=str(src), repo=repo, name="ctr", backend="python", max_batch_size=512,
                              parity_data=data))
    results["conversion"] = {"build_seconds": time.perf_counter() - t0,
                             "convert_seconds": fp32.report["convert_seconds"]}
    int8 = build(BuildRequest(source=str(src), repo=work / "repo8", name="ctr", backend="python", precision="int8",
                              max_batch_size=512, parity_data=data))
    static8 = build(BuildRequest(source=str(src), repo=work / "repo8s", name="ctr", backend="python",
                                 precision="int8", max_batch_size=512, parity_data=data, calibration=data))

    # 2. ONNX Runtime fp32 vs int8: single-thread throughput at one request's batch, and accuracy difference.
    feeds = {"features": np.load(data)["features"][: args.candidates]}
    f32 = ort_throughput(fp32.version_dir / "model.onnx", feeds, args.seconds, 1)
    i8 = ort_throughput(int8.version_dir / "model.onnx", feeds, args.seconds, 1)
    s8 = ort_throughput(static8.version_dir / "model.onnx", feeds, args.seconds, 1)
    par, spar = int8.report["parity"], static8.report["parity"]
    results["ort_fp32_vs_int8"] = {
        "fp32_candidates_per_s": f32, "int8_candidates_per_s": i8, "int8_speedup": i8 / f32,
        "fp32_size_bytes": fp32.report["artifact"]["size_bytes"],
        "int8_size_bytes": int8.report["artifact"]["size_bytes"],
        "int8_max_abs_error": par["max_abs_error"], "int8_auc_drop": par["auc_drop"],
        "int8_top10_overlap": par["topk_overlap"], "auc_fp32": par["auc_source"],
        "int8_static_candidates_per_s": s8, "int8_static_speedup": s8 / f32,
        "int8_static_max_abs_error": spar["max_abs_error"], "int8_static_auc_drop": spar["auc_drop"],
        "int8_static_top10_overlap": spar["topk_overlap"],
    }

    # 3. Profile (choose under the SLO), then default vs chosen: best throughput within the same p99 budget.
    prof = run_profile(ProfileRequest(
        repo=repo, name="ctr", candidates=args.candidates, concurrency=args.concurrency, slo_p99_ms=args.slo_p99_ms,
        repeats=args.rounds,
        max_queue_delays_us=(0, 500, 2000), instance_counts=(1, 2), duration_s=args.seconds, out_dir=work / "profile",
        preferred_batch_sizes=tuple(n for n in (2 * args.candidates, 4 * args.candidates) if n <= 512),
    ))
    chosen = Candidate(**prof["chosen"]["candidate"])
    base = C.parse_pbtxt((repo / "ctr" / "config.pbtxt").read_text())
    ab_repo = work / "ab"
    for name, cand in (("ctr_default", Candidate(1, False)), ("ctr_profiled", chosen)):
        shutil.copytree(repo / "ctr", ab_repo / name)
        cfg = apply_candidate(base, cand)
        cfg.name = name
        (ab_repo / name / "config.pbtxt").write_text(C.to_pbtxt(cfg))
    req_feeds = parity.synthesize_inputs(C.signature_from_config(base) or fp32_sig(fp32), args.candidates)
    with TritonServer(ab_repo, log_path=work / "triton.log") as server:
        rows = ab_sweep(server.grpc_url, ("ctr_default", "ctr_profiled"), feeds=req_feeds,
                        concurrencies=sorted({1, 2, 4, 8, args.concurrency}), rounds=args.rounds, seconds=args.seconds)
    d, t = best_under_slo(rows["ctr_default"], args.slo_p99_ms), best_under_slo(rows["ctr_profiled"], args.slo_p99_ms)
    default = {"config": Candidate(1, False).label, "sweep": rows["ctr_default"], "best_under_slo": d}
    tuned = {"config": chosen.label, "sweep": rows["ctr_profiled"], "best_under_slo": t}
    results["triton_default_vs_profiled"] = {
        "slo_p99_ms": args.slo_p99_ms, "default": default, "profiled": tuned,
        "profile_sweep": prof["results"], "profile_chosen": prof["chosen"]["label"],
        "throughput_ratio": (t["throughput_rps"] / d["throughput_rps"]) if d and t else None,
        "at_workload_concurrency": {
            "concurrency": args.concurrency,
            "default": next(r for r in rows["ctr_default"] if r["concurrency"] == args.concurrency),
            "profiled": next(r for r in rows["ctr_profiled"] if r["concurrency"] == args.concurrency),
        },
    }

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"builder-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    o = results["ort_fp32_vs_int8"]
    print(f"conversion: convert {results['conversion']['convert_seconds']:.2f}s, "
          f"full fp32 build {results['conversion']['build_seconds']:.2f}s")
    print(f"ORT 1 thread, batch {args.candidates}: fp32 {o['fp32_candidates_per_s']:.0f} cand/s, int8 "
          f"{o['int8_candidates_per_s']:.0f} cand/s -> int8/fp32 = {o['int8_speedup']:.2f}x; size "
          f"{o['int8_size_bytes'] / o['fp32_size_bytes']:.2f}x; int8 AUC drop {o['int8_auc_drop']:+.4f}, "
          f"top-10 overlap {o['int8_top10_overlap']:.3f}, max abs err {o['int8_max_abs_error']:.4f} (dynamic); "
          f"static QDQ int8 {o['int8_static_candidates_per_s']:.0f} cand/s = {o['int8_static_speedup']:.2f}x, AUC drop "
          f"{o['int8_static_auc_drop']:+.4f}, top-10 overlap {o['int8_static_top10_overlap']:.3f}")
    tri = results["triton_default_vs_profiled"]
    fmt = "{:.0f} req/s (p99 {:.1f} ms, conc {})"
    print(f"Triton at p99 <= {args.slo_p99_ms} ms: default (1 instance, no batching) "
          + (fmt.format(d["throughput_rps"], d["p99_ms"], d["concurrency"]) if d else "never meets the SLO")
          + f"; profiled [{tuned['config']}] "
          + (fmt.format(t["throughput_rps"], t["p99_ms"], t["concurrency"]) if t else "never meets the SLO")
          + (f" -> ratio {tri['throughput_ratio']:.2f}x" if tri["throughput_ratio"] else ""))
    w = tri["at_workload_concurrency"]
    print(f"Triton at the profiled workload (concurrency {w['concurrency']}): default "
          f"{w['default']['throughput_rps']:.0f} req/s p99 {w['default']['p99_ms']:.1f} ms; profiled "
          f"{w['profiled']['throughput_rps']:.0f} req/s p99 {w['profiled']['p99_ms']:.1f} ms -> ratio "
          f"{w['profiled']['throughput_rps'] / w['default']['throughput_rps']:.2f}x")
    print(f"saved {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def fp32_sig(result: Any) -> C.ModelSignature:
    return C.ModelSignature(
        inputs=tuple(C.TensorSpec(**s) for s in result.report["signature"]["inputs"]),
        outputs=tuple(C.TensorSpec(**s) for s in result.report["signature"]["outputs"]),
    )


if __name__ == "__main__":
    raise SystemExit(main())
