"""Serving benchmark: the example CTR model served four ways, side by side, on one machine and one workload."""

# (a) naive baseline: Keras behind FastAPI + uvicorn; (b) Triton, default config (one instance, no dynamic batching);
# (c) Triton with the RecServe-built, `profile`-tuned config; (d) ceiling: ONNX Runtime in-process, no network.
# Every request scores `--candidates` items for one user. The load generator (loadgen.py) is a separate process.
# Run: python bench/serving/run.py --out bench/results/serving [--quick]

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
MODEL_NAME = "ctr-dnn"
SYSTEMS = {
    "a": "Keras + FastAPI/uvicorn (naive baseline)",
    "a2": "same Keras server, raw float32 body (no JSON)",
    "b": "Triton, default config (1 instance, no dynamic batching)",
    "c": "Triton, RecServe build + profile-tuned config",
    "d": "ONNX Runtime in-process (ceiling, no network)",
}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run a command, keep its output in log_path, return stdout; raise with the log tail on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}); see {log_path}:\n{proc.stderr[-3000:]}")
    return proc.stdout


# --------------------------------------------------------------------------------------------- model and workload


def ensure_model(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The .keras model and its feature_spec.json: the given one, or a fresh small training run."""
    if args.model:
        model = Path(args.model).resolve()
        return model, model.parent / "feature_spec.json"
    target = out / "model"
    model = target / "1" / "model.keras"
    if not model.exists():
        log("training the example CTR model (examples/ctr-dnn/train.py)")
        sh([sys.executable, str(ROOT / "examples" / "ctr-dnn" / "train.py"), "--out", str(target), "--version", "1"],
           out / "logs" / "train.log")
    return model, model.parent / "feature_spec.json"


def make_requests(spec_path: Path, n_requests: int, candidates: int, seed: int = 0) -> NDArray[Any]:
    """(n_requests, candidates, dim) float32: each request scores `candidates` catalogue items for one user."""
    from ecommerce_data import DataConfig, generate

    spec = json.loads(spec_path.read_text())
    data = generate(DataConfig(**spec["data_config"]))
    rng = np.random.default_rng(seed)
    feats = data.features
    reqs = []
    for _ in range(n_requests):
        user = int(rng.integers(data.config.n_users))
        items = rng.choice(data.config.n_items, size=candidates, replace=candidates > data.config.n_items)
        reqs.append(feats.candidates(user, items, hour=int(rng.integers(24)), device=int(rng.integers(3))))
    stacked: NDArray[Any] = np.stack(reqs).astype(np.float32)
    return stacked


def triton_body(x: NDArray[Any], input_name: str, output_name: str) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request with Triton's binary tensor extension: JSON header, then raw float32 bytes."""
    raw = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def write_spec(out: Path, name: str, url: str, bodies: list[bytes], headers: dict[str, str]) -> Path:
    body_dir = out / "requests" / name
    body_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, b in enumerate(bodies):
        p = body_dir / f"{i:03d}.bin"
        p.write_bytes(b)
        paths.append(str(p))
    spec = out / "requests" / f"{name}.json"
    spec.write_text(json.dumps({"url": url, "headers": headers, "bodies": paths}))
    return spec


def run_loadgen(specs: dict[str, Path], args: argparse.Namespace, log_path: Path) -> list[dict[str, Any]]:
    """One load-generator process measuring every system in `specs` in turn at each concurrency level."""
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--concurrency", args.concurrency,
           "--duration-s", str(args.duration_s), "--warmup-s", str(args.warmup_s)]
    for name, path in specs.items():
        cmd += ["--spec", f"{name}={path}"]
    stdout = sh(cmd, log_path, timeout=3600)
    return [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]


def aggregate(runs: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """Per concurrency level: medians over rounds (throughput, p50, p99), and the throughput spread as a noise gauge."""
    levels: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        if r["system"] == system:
            levels.setdefault(r["concurrency"], []).append(r)
    out = []
    for conc, rs in sorted(levels.items()):
        rps = [r["throughput_rps"] for r in rs]
        out.append({
            "concurrency": conc,
            "rounds": len(rs),
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "throughput_rps": float(np.median(rps)),
            "throughput_rps_min": min(rps),
            "throughput_rps_max": max(rps),
            "p50_ms": float(np.median([r["p50_ms"] for r in rs if r["p50_ms"] is not None] or [np.nan])),
            "p99_ms": float(np.median([r["p99_ms"] for r in rs if r["p99_ms"] is not None] or [np.nan])),
            "client_cpu_share": float(np.median([r["client_cpu_share"] for r in rs])),
        })
    return out


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        # Readiness polling of a process we started; not a timing assumption.
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f}s")


# ------------------------------------------------------------------------------------------------------- systems


@contextlib.contextmanager
def keras_server(model: Path, port: int, call: str, log_path: Path) -> Iterator[str]:
    cmd = [sys.executable, str(HERE / "keras_server.py"), "--model", str(model), "--port", str(port), "--call", call]
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def build_repository(model: Path, repo: Path, out: Path, max_batch_size: int) -> dict[str, Any]:
    """RecServe's builder: Keras -> ONNX -> parity-checked Triton repository (python backend running ONNX Runtime)."""
    if repo.exists():
        shutil.rmtree(repo)
    stdout = sh([sys.executable, "-m", "model_repo_builder", "build", "--source", str(model), "--format", "keras",
                 "--name", MODEL_NAME, "--version", "1", "--repo", str(repo), "--backend", "python",
                 "--precision", "fp32", "--max-batch-size", str(max_batch_size), "--json"],
                out / "logs" / f"build-{repo.name}.log")
    built: dict[str, Any] = json.loads(stdout)
    return built


def write_default_config(repo: Path) -> str:
    """Triton's defaults for a model: one instance and no dynamic batching (max_batch_size kept: requests are 200)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = repo / MODEL_NAME / "config.pbtxt"
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    cfg.ClearField("dynamic_batching")
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    text: str = text_format.MessageToString(cfg)
    path.write_text(text)
    return text


def profile_repository(repo: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`model-repo-builder profile --apply`: sweep instances x dynamic batching under the p99 SLO, keep the best."""
    stdout = sh([sys.executable, "-m", "model_repo_builder", "profile", "--repo", str(repo), "--name", MODEL_NAME,
                 "--candidates", str(args.candidates),
                 *(["--concurrency", str(args.profile_concurrency)] if args.profile_concurrency
                   else ["--concurrency-levels", args.concurrency]),
                 "--slo-p99-ms", str(args.slo_p99_ms), "--duration-s", str(args.profile_duration_s),
                 "--out", str(out / "profile"), "--apply", "--json"], out / "logs" / "profile.log", timeout=1800)
    profiled: dict[str, Any] = json.loads(stdout)
    return profiled


@contextlib.contextmanager
def triton(repo: Path, log_path: Path) -> Iterator[str]:
    from model_repo_builder.triton_local import TritonServer

    with TritonServer(repo, log_path=log_path) as server:
        server.wait_model_ready(MODEL_NAME, timeout_s=120)
        yield f"http://{server.http_url}"


def ort_inprocess(onnx_path: Path, requests: NDArray[Any], batch_sizes: list[int], duration_s: float) -> dict[str, Any]:
    """The ceiling: ONNX Runtime called directly (all cores), per batch size; best samples/s wins."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rows = requests.reshape(-1, requests.shape[-1])
    per_batch = []
    for bs in batch_sizes:
        reps = int(np.ceil(bs / rows.shape[0]))
        x = np.ascontiguousarray(np.tile(rows, (reps, 1))[:bs])
        sess.run(None, {name: x})  # warm-up
        lat: list[float] = []
        t_end = time.perf_counter() + duration_s
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            lat.append(time.perf_counter() - t0)
        lat_ms = np.asarray(lat) * 1e3
        per_batch.append({"batch_size": bs, "calls": len(lat), "samples_per_s": bs * len(lat) / float(np.sum(lat)),
                          "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))})
    best = max(per_batch, key=lambda r: r["samples_per_s"])
    return {"intra_op_threads": "default (all cores)", "per_batch_size": per_batch, "best": best}


# ------------------------------------------------------------------------------------------------------- results


def summarize(results: dict[str, Any], candidates: int) -> dict[str, Any]:
    """samples/s per level, peaks, and the ratios (c)/(a), (c)/(b), (c)/(d)."""
    served = [k for k in ("a", "a2", "b", "c") if k in results["systems"]]
    for key in served:
        for r in results["systems"][key]["levels"]:
            r["samples_per_s"] = r["throughput_rps"] * candidates
    peak = {k: max(results["systems"][k]["levels"], key=lambda r: r["samples_per_s"]) for k in served}
    ceiling = results["systems"]["d"]["best"]["samples_per_s"]
    c_peak = peak["c"]["samples_per_s"]
    per_level = []
    by_c = {k: {r["concurrency"]: r for r in results["systems"][k]["levels"]} for k in served}
    for conc in sorted(by_c["c"]):
        row: dict[str, Any] = {"concurrency": conc}
        for k in [k for k in served if k != "c"]:
            other = by_c[k].get(conc)
            row[f"c_over_{k}"] = by_c["c"][conc]["samples_per_s"] / other["samples_per_s"] if other else None
        b, c = by_c.get("b", {}).get(conc), by_c["c"][conc]
        if b is not None:
            # Overlapping min-max ranges over the rounds: this run cannot tell (b) and (c) apart at this level.
            row["b_c_ranges_overlap"] = bool(c.get("throughput_rps_min", c["throughput_rps"])
                                             <= b.get("throughput_rps_max", b["throughput_rps"])
                                             and b.get("throughput_rps_min", b["throughput_rps"])
                                             <= c.get("throughput_rps_max", c["throughput_rps"]))
        per_level.append(row)
    return {
        "peak_samples_per_s": {k: v["samples_per_s"] for k, v in peak.items()} | {"d": ceiling},
        "peak_at_concurrency": {k: v["concurrency"] for k, v in peak.items()},
        "c_over_a": c_peak / peak["a"]["samples_per_s"],
        "c_over_b": c_peak / peak["b"]["samples_per_s"],
        "c_over_a2": c_peak / peak["a2"]["samples_per_s"] if "a2" in peak else None,
        "c_over_d": c_peak / ceiling,
        "per_level": per_level,
        "max_client_cpu_share": max(r["client_cpu_share"] for k in served for r in results["systems"][k]["levels"]),
    }


def markdown(results: dict[str, Any]) -> str:
    s, summ = results["systems"], results["summary"]
    lines = [
        f"# Serving benchmark ({results['meta']['date']}, {results['meta']['cpu_count']} CPUs, "
        f"{results['meta']['candidates']} candidates/request)",
        "",
        f"Command: `{results['meta']['command']}`",
        "",
        f"Load average (1 min) at start / end: {results['meta'].get('load_average_start', 0):.1f} / "
        f"{results['meta'].get('load_average_end', 0):.1f} on {results['meta']['cpu_count']} CPUs.",
        "",
        f"Servers (a)-(c): median of {results['meta'].get('rounds', 1)} interleaved rounds per level; the range is the "
        "min-max of samples/s over the rounds (a gauge of the noise from other work on the machine).",
        "",
        "| system | concurrency | samples/s | range | req/s | p50 ms | p99 ms | errors | client CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cand = results["meta"]["candidates"]
    for k in [k for k in ("a", "a2", "b", "c") if k in s]:
        for r in s[k]["levels"]:
            lo, hi = r.get("throughput_rps_min", r["throughput_rps"]), r.get("throughput_rps_max", r["throughput_rps"])
            lines.append(f"| ({k}) {SYSTEMS[k]} | {r['concurrency']} | {r['samples_per_s']:,.0f} | "
                         f"{lo * cand:,.0f}-{hi * cand:,.0f} | {r['throughput_rps']:,.1f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['errors']} | {r['client_cpu_share']:.2f} |")
    for r in s["d"]["per_batch_size"]:
        lines.append(f"| (d) {SYSTEMS['d']} | batch {r['batch_size']} | {r['samples_per_s']:,.0f} | - | - | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | 0 | - |")
    pk = summ["peak_samples_per_s"]
    lines += [
        "",
        "Peak samples/s: " + ", ".join(f"({k}) {v:,.0f}" for k, v in pk.items()) + ".",
        f"Ratios at peak: (c)/(a) = {summ['c_over_a']:.2f}x, (c)/(b) = {summ['c_over_b']:.2f}x, "
        f"(c)/(d) = {summ['c_over_d']:.2f}"
        + (f"; (c)/(a2) = {summ['c_over_a2']:.2f}x (baseline without JSON)." if summ.get("c_over_a2") else "."),
        "Per concurrency: " + ", ".join(
            f"{r['concurrency']}: c/a {r['c_over_a']:.2f}x c/b {r['c_over_b']:.2f}x" for r in summ["per_level"]
            if r["c_over_a"] and r["c_over_b"]),
        f"(b) and (c) throughput ranges overlap at {sum(r.get('b_c_ranges_overlap', False) for r in summ['per_level'])}"
        f" of {len(summ['per_level'])} levels (overlap = the difference is within this run's noise).",
        "",
        f"Tuned config (c): {results['systems']['c'].get('chosen', '?')}.",
        "",
        "Notes:",
        *[f"- {n}" for n in results["notes"]],
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for k, color in (("a", "tab:red"), ("a2", "tab:orange"), ("b", "tab:gray"), ("c", "tab:green")):
        if k not in results["systems"]:
            continue
        lv = results["systems"][k]["levels"]
        conc = [r["concurrency"] for r in lv]
        ax1.plot(conc, [r["samples_per_s"] for r in lv], "o-", color=color, label=f"({k}) {SYSTEMS[k]}")
        ax2.plot(conc, [r["p99_ms"] for r in lv], "o-", color=color, label=f"({k})")
    d = results["systems"]["d"]["best"]
    ax1.axhline(d["samples_per_s"], color="tab:blue", ls="--", label=f"(d) ORT in-process, batch {d['batch_size']}")
    levels = sorted({r["concurrency"] for k in ("a", "a2", "b", "c") if k in results["systems"]
                     for r in results["systems"][k]["levels"]})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3, which="both")
    # Log scale: the baseline is ~30x below Triton and would sit on the axis on a linear one.
    ax1.set_yscale("log")
    ax1.set_ylabel("samples/s (candidates scored per second)")
    ax2.set_ylabel("p99 latency per request (ms)")
    ax2.set_yscale("log")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)  # below the plots: no data hidden
    m = results["meta"]
    fig.suptitle(f"CTR model, {m['candidates']} candidates/request, {m['cpu_count']} CPUs shared by client and server")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    p.add_argument("--model", help="model.keras to serve (default: train the example into OUT/model)")
    p.add_argument("--quick", action="store_true", help="short windows and fewer concurrency levels")
    p.add_argument("--concurrency", help="comma-separated levels (default 1,2,4,8,16,32; quick 1,4,16)")
    p.add_argument("--candidates", type=int, default=200, help="items scored per request")
    p.add_argument("--requests", type=int, default=64, help="distinct request bodies cycled by the client")
    p.add_argument("--duration-s", type=float, help="measurement window per level and round (default 5; quick 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds; medians are reported (default 3; quick 2)")
    p.add_argument("--warmup-s", type=float, help="default 1; quick 0.5")
    p.add_argument("--max-batch-size", type=int, default=1024, help="Triton max_batch_size (dynamic batch ceiling)")
    p.add_argument("--profile-concurrency", type=int, default=0,
                   help="tune for this one operating point (default: over every --concurrency level, as a tuner must)")
    p.add_argument("--profile-duration-s", type=float, help="per profiled config (default 3; quick 2)")
    p.add_argument("--slo-p99-ms", type=float, default=50.0)
    p.add_argument("--baseline-payload", choices=("json", "binary", "both"), default="both",
                   help="(a) gets JSON (what teams write); 'both' also runs (a2): the same server fed raw float32")
    p.add_argument("--keras-call", choices=("call", "predict"), default="call")
    p.add_argument("--ort-batch-sizes", default="200,400,1000,2000,4000")
    p.add_argument("--only", default="abcd", help="subset of systems to run, e.g. 'ad'")
    a = p.parse_args(argv)
    a.concurrency = a.concurrency or ("1,4,16" if a.quick else "1,2,4,8,16,32")
    a.duration_s = a.duration_s or (2.0 if a.quick else 5.0)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.warmup_s = a.warmup_s or (0.5 if a.quick else 1.0)
    a.profile_duration_s = a.profile_duration_s or (2.0 if a.quick else 3.0)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "candidates": args.candidates,
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "rounds": args.rounds,
        # Other work on the machine skews every number: the 1-minute load average at start (and end) says how much.
        "load_average_start": os.getloadavg()[0],
        "quick": args.quick,
    }
    results: dict[str, Any] = {"meta": meta, "systems": {}, "notes": [
        f"Clients and servers share the same {os.cpu_count()} CPUs: the client's CPU (client CPU column, in cores) "
        "is taken from the servers; absolute numbers are lower than on a dedicated serving node.",
        "Triton here is the binary shipped in nvidia-pytriton, which has no native onnxruntime backend: (b) and (c) "
        "run the builder's python-backend model (ONNX Runtime inside Triton's python backend, 1 ORT thread per "
        "instance). The cluster image uses Triton's native onnxruntime/TensorRT backends, which skip the python "
        "stub's IPC; these numbers do not measure them.",
        "(a) receives JSON {instances: [[...]]} bodies (the usual hand-written contract), (a2) the same server with "
        "raw float32 bodies, (b)/(c) KServe v2 binary-tensor requests; all bodies are serialised before the run.",
        "(d) has no network, no serialisation and all cores: the ceiling the servers approach.",
    ]}
    model, spec_path = ensure_model(args, out)
    spec = json.loads(spec_path.read_text())
    requests = make_requests(spec_path, args.requests, args.candidates)
    log(f"workload: {args.requests} distinct requests x {args.candidates} candidates x {requests.shape[-1]} features")

    repo_b, repo_c = out / "repo_default", out / "repo_tuned"
    if set("bcd") & set(args.only):
        log("building the Triton repository with model_repo_builder")
        report = build_repository(model, repo_b, out, args.max_batch_size)
        results["build"] = {k: report.get(k) for k in ("backend", "precision", "parity", "build_seconds")}
        if repo_c.exists():
            shutil.rmtree(repo_c)
        shutil.copytree(repo_b, repo_c)
        default_cfg = write_default_config(repo_b)
    if "c" in args.only:
        # Tuning runs first, alone: `profile` starts its own Triton and sweeps the configurations.
        log("(c) tuning with: model_repo_builder profile --apply")
        prof = profile_repository(repo_c, out, args)
        log(f"    chosen: {prof['chosen']['label']}")

    tb = [triton_body(r, spec["input_name"], spec["output_name"]) for r in requests]
    triton_bodies, triton_headers = [b for b, _ in tb], tb[0][1]
    # Every request has the same shapes, hence the same header length: one header set serves all bodies.
    assert all(h == triton_headers for _, h in tb)
    specs: dict[str, Path] = {}
    from model_repo_builder.triton_local import free_port

    with contextlib.ExitStack() as stack:
        # All servers run at once (idle ones cost next to nothing) so the rounds can interleave them.
        if "a" in args.only:
            port = free_port()
            stack.enter_context(keras_server(model, port, args.keras_call, out / "logs" / "keras_server.log"))
            payloads = ["json", "binary"] if args.baseline_payload == "both" else [args.baseline_payload]
            for payload in payloads:
                key = "a2" if payload == "binary" and args.baseline_payload == "both" else "a"
                if payload == "json":
                    bodies = [json.dumps({"instances": r.tolist()}).encode() for r in requests]
                    headers, path = {"Content-Type": "application/json"}, "/predict"
                else:
                    bodies = [r.tobytes() for r in requests]
                    headers, path = {"Content-Type": "application/octet-stream"}, "/predict_binary"
                specs[key] = write_spec(out, key, f"http://127.0.0.1:{port}{path}", bodies, headers)
        for key, repo in (("b", repo_b), ("c", repo_c)):
            if key in args.only:
                url = stack.enter_context(triton(repo, out / "logs" / f"triton-{key}.log"))
                specs[key] = write_spec(out, key, f"{url}/v2/models/{MODEL_NAME}/infer", triton_bodies, triton_headers)
        runs: list[dict[str, Any]] = []
        names = list(specs)
        for rnd in range(args.rounds):
            # Rotate the order each round so no system always runs first (or right after the heaviest one).
            order = names[rnd % len(names):] + names[: rnd % len(names)] if names else []
            log(f"round {rnd + 1}/{args.rounds}: {', '.join(order)} at concurrency {args.concurrency}")
            runs += [r | {"round": rnd} for r in run_loadgen({k: specs[k] for k in order}, args,
                                                              out / "logs" / f"loadgen-round{rnd}.log")]
    results["raw_runs"] = runs
    for key in names:
        results["systems"][key] = {"name": SYSTEMS[key], "levels": aggregate(runs, key)}
    if "a" in results["systems"]:
        results["systems"]["a"] |= {"payload": "json" if args.baseline_payload != "binary" else "binary",
                                    "keras_call": args.keras_call}
    if "b" in results["systems"]:
        results["systems"]["b"]["config"] = default_cfg
    if "c" in results["systems"]:
        results["systems"]["c"] |= {"chosen": prof["chosen"]["label"], "profile": prof,
                                    "config": (repo_c / MODEL_NAME / "config.pbtxt").read_text()}

    if "d" in args.only:
        log("(d) ONNX Runtime in-process")
        sizes = [int(s) for s in args.ort_batch_sizes.split(",")]
        results["systems"]["d"] = {"name": SYSTEMS["d"],
                                   **ort_inprocess(repo_b / MODEL_NAME / "1" / "model.onnx", requests, sizes,
                                                   max(1.0, args.duration_s / 2))}

    meta["load_average_end"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if set("abcd") <= set(results["systems"]):
        results["summary"] = summarize(results, args.candidates)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        md = markdown(results)
        (out / "results.md").write_text(md)
        plot(results, out / "serving.png")
        print(md)
    else:
        print(json.dumps(results["systems"], indent=2, default=str)[:5000])
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
