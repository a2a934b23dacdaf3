"""Tune dynamic batching and instance counts against a live Triton under a p99 latency SLO, over a load range.

Every candidate configuration is measured at every concurrency level of the declared range (interleaved rounds,
medians). The choice (`choose_for_range`, pure) maximises throughput at the range's peak among the candidates
whose p99 meets the SLO at every level and that never lose to Triton's default (one instance, no batching) at
any level by more than the measured noise. A configuration that wins at peak load but makes quiet hours slower is
not chosen; when nothing qualifies the default is kept, and the reason says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from numpy.typing import NDArray
from tritonclient.grpc import model_config_pb2 as mc

from model_repo_builder import config as cfgmod
from model_repo_builder.errors import BadInputError, UsageError
from model_repo_builder.progress import progress_bar


@dataclass(frozen=True)
class Candidate:
    instance_count: int
    dynamic_batching: bool
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        if not self.dynamic_batching:
            return f"inst={self.instance_count} no-batching"
        pref = "/".join(map(str, self.preferred_batch_sizes)) or "-"
        return f"inst={self.instance_count} delay={self.max_queue_delay_us}us pref={pref}"


@dataclass
class Measurement:
    label: str
    candidate: dict[str, Any]
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    slo_met: bool = False
    concurrency: int = 0
    throughput_rps_min: float = 0.0  # range over the rounds: the noise of this measurement
    throughput_rps_max: float = 0.0


@dataclass
class ProfileRequest:
    repo: Path
    name: str
    url: str | None = None
    candidates: int = 64
    concurrency: int = 8
    # The load range the choice must hold over (requests in flight); empty: `concurrency` alone.
    concurrency_levels: tuple[int, ...] = ()
    slo_p99_ms: float = 50.0
    # A candidate "loses" to the default at a level when its throughput is below the default's by more than the
    # measured spread of both (over the rounds), and never by less than this share.
    noise_floor: float = 0.05
    max_queue_delays_us: tuple[int, ...] = (0, 1000, 5000)
    instance_counts: tuple[int, ...] = (1, 2)
    preferred_batch_sizes: tuple[int, ...] = ()
    duration_s: float = 3.0
    warmup_s: float = 0.5
    # Rounds over the whole grid; medians per configuration. Rounds interleave the candidates so that drifting
    # host load (shared CI machines) does not favour whichever configuration happened to run in a quiet moment.
    repeats: int = 1
    out_dir: Path = Path("profile-results")
    apply: bool = False
    show_progress: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # With `url`: how long to wait for that server to come up (a build Job's Triton sidecar); 0 = not at all.
    server_wait_s: float = 0.0


def candidate_grid(
    instance_counts: tuple[int, ...], delays_us: tuple[int, ...], preferred: tuple[int, ...]
) -> list[Candidate]:
    """Triton's default (one instance, no batching) first, then every instance count x batching setting."""
    grid = [Candidate(1, False)]
    prefs: list[tuple[int, ...]] = [()] + ([preferred] if preferred else [])
    for count in instance_counts:
        if count != 1:
            grid.append(Candidate(count, False))
        for delay in delays_us:
            grid += [Candidate(count, True, delay, p) for p in prefs]
    return list(dict.fromkeys(grid))


def apply_candidate(base: mc.ModelConfig, cand: Candidate) -> mc.ModelConfig:
    """Copy of `base` with the candidate's instance count and dynamic batching."""
    cfg = mc.ModelConfig()
    cfg.CopyFrom(base)
    if not cfg.instance_group:
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU)
    for group in cfg.instance_group:
        group.count = cand.instance_count
    cfg.ClearField("dynamic_batching")
    if cand.dynamic_batching:
        cfg.dynamic_batching.SetInParent()
        cfg.dynamic_batching.max_queue_delay_microseconds = cand.max_queue_delay_us
        sizes = [p for p in cand.preferred_batch_sizes if p <= cfg.max_batch_size]
        cfg.dynamic_batching.preferred_batch_size.extend(sizes)
    return cfg


def aggregate(ms: list[Measurement]) -> Measurement:
    """Median figures over repeated measurements of one configuration at one level, with the throughput range."""
    first = ms[0]
    rps = [m.throughput_rps for m in ms]
    return Measurement(
        label=first.label, candidate=first.candidate, requests=sum(m.requests for m in ms),
        errors=sum(m.errors for m in ms),
        throughput_rps=float(np.median(rps)),
        p50_ms=float(np.median([m.p50_ms for m in ms])), p90_ms=float(np.median([m.p90_ms for m in ms])),
        p99_ms=float(np.median([m.p99_ms for m in ms])), concurrency=first.concurrency,
        throughput_rps_min=min(rps), throughput_rps_max=max(rps),
    )  # fmt: skip


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1e3, q)) if latencies_s else float("inf")


def choose(results: list[Measurement], slo_p99_ms: float) -> Measurement:
    """Highest throughput among configurations meeting the SLO; if none does, the lowest p99."""
    for r in results:
        r.slo_met = r.errors == 0 and r.p99_ms <= slo_p99_ms
    ok = [r for r in results if r.slo_met]
    if ok:
        return max(ok, key=lambda r: r.throughput_rps)
    return min(results, key=lambda r: r.p99_ms)


@dataclass(frozen=True)
class RangeChoice:
    label: str
    reason: str
    slo_met: bool  # the chosen configuration meets the SLO at every level
    table: list[dict[str, Any]]  # per level: the chosen and the default side by side


def _noise(m: Measurement, floor: float) -> float:
    """Relative spread of one measurement over its rounds (0 with one round), at least `floor`."""
    if m.throughput_rps <= 0:
        return floor
    return max(floor, (m.throughput_rps_max - m.throughput_rps_min) / m.throughput_rps)


def choose_for_range(
    results: dict[str, dict[int, Measurement]], default: str, slo_p99_ms: float, *, noise_floor: float = 0.05
) -> RangeChoice:
    """The best configuration over a load range (see the module docstring); `results[label][level]`."""
    base = results[default]
    levels = sorted(base)
    peak = levels[-1]
    for by_level in results.values():
        for m in by_level.values():
            m.slo_met = m.errors == 0 and m.p99_ms <= slo_p99_ms

    def loses(label: str) -> list[str]:
        out = []
        for c in levels:
            m, d = results[label][c], base[c]
            margin = _noise(m, noise_floor) + _noise(d, noise_floor)
            if m.throughput_rps < d.throughput_rps * (1 - margin):
                out.append(f"{d.throughput_rps / max(m.throughput_rps, 1e-9):.2f}x slower at concurrency {c}")
        return out

    def misses(label: str) -> list[str]:
        return [f"p99 {results[label][c].p99_ms:.1f} ms at concurrency {c}" if results[label][c].errors == 0
                else f"{results[label][c].errors} errors at concurrency {c}"
                for c in levels if not results[label][c].slo_met]  # fmt: skip

    rejected: dict[str, str] = {}
    eligible = []
    for label in results:
        why = misses(label) + ([] if label == default else loses(label))
        if why:
            rejected[label] = "; ".join(why)
        else:
            eligible.append(label)
    span = f"concurrency {levels[0]}-{peak}" if len(levels) > 1 else f"concurrency {peak}"
    if eligible:
        label = max(eligible, key=lambda lb: (results[lb][peak].throughput_rps, -results[lb][levels[0]].p99_ms))
        gain = results[label][peak].throughput_rps / max(base[peak].throughput_rps, 1e-9)
        reason = (f"{label}: {gain:.2f}x the default's throughput at concurrency {peak}, p99 within "
                  f"{slo_p99_ms:g} ms and no slower than the default (beyond noise) at every level of {span}")
        slo_met = True
    else:
        # Nothing meets the SLO everywhere without losing to the default: the default is never worse than itself.
        label, slo_met = default, False
        reason = (f"kept the default ({default}): no configuration met the p99 SLO of {slo_p99_ms:g} ms at every "
                  f"level of {span} without losing to the default; the default: {rejected.get(default, '')}")
    if label == default and eligible:
        reason = (f"kept the default ({default}): it meets the SLO at every level of {span} and nothing beats it "
                  "there without losing elsewhere")  # fmt: skip
    table = [{"concurrency": c,
              "chosen": {k: getattr(results[label][c], k) for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")},
              "default": {k: getattr(base[c], k) for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")},
              "ratio": results[label][c].throughput_rps / max(base[c].throughput_rps, 1e-9)}
             for c in levels]  # fmt: skip
    rejected.pop(label, None)
    return RangeChoice(label, reason + (f". Rejected: {', '.join(f'{k} ({v})' for k, v in rejected.items())}"
                                        if rejected else ""), slo_met, table)


async def _load(
    url: str, name: str, *, feeds: dict[str, NDArray[Any]], concurrency: int, warmup_s: float, duration_s: float
) -> tuple[list[float], int, float]:
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import np_to_triton_dtype

    client = grpcaio.InferenceServerClient(url)
    inputs = []
    for k, v in feeds.items():
        inp = grpcaio.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
        inp.set_data_from_numpy(v)
        inputs.append(inp)
    latencies: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s

    async def worker() -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await client.infer(name, inputs)
            except Exception:
                if t0 >= t_measure:
                    errors += 1
                continue
            if t0 >= t_measure:
                latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        await client.close()
    return latencies, errors, duration_s


def measure(url: str, name: str, *, feeds: dict[str, NDArray[Any]], concurrency: int, warmup_s: float,
            duration_s: float, cand: Candidate) -> Measurement:
    """Closed-loop load at `concurrency` for `duration_s` (after a discarded warmup)."""
    lat, errors, dur = asyncio.run(
        _load(url, name, feeds=feeds, concurrency=concurrency, warmup_s=warmup_s, duration_s=duration_s)
    )
    return Measurement(
        label=cand.label, candidate=asdict(cand), requests=len(lat), errors=errors,
        throughput_rps=len(lat) / dur, p50_ms=percentile_ms(lat, 50), p90_ms=percentile_ms(lat, 90),
        p99_ms=percentile_ms(lat, 99), concurrency=concurrency,
        throughput_rps_min=len(lat) / dur, throughput_rps_max=len(lat) / dur,
    )


def served_config(url: str, name: str, timeout_s: float = 120.0) -> mc.ModelConfig:
    """Load the model as its repository declares it and return the configuration the server runs.

    Candidates are measured on this view, not on the file: the server has filled in its defaults, and a CPU
    server (the test cluster's Triton stand-in) serves a KIND_GPU file as KIND_CPU. The configuration written
    back is the file's with the chosen batching and instance count (`run_profile`)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(name, client_timeout=timeout_s)
        served = client.get_model_config(name, as_json=True, client_timeout=timeout_s)["config"]
    finally:
        client.close()
    return json_format.ParseDict(served, mc.ModelConfig(), ignore_unknown_fields=True)


def wait_for_server(url: str, timeout_s: float) -> None:
    """Wait until the Triton at `url` is live (a build Job's sidecar starts beside the tuner)."""
    import tritonclient.grpc as grpcclient

    from model_repo_builder.triton_local import poll_until

    last = ["no answer"]

    def live() -> bool:
        client = grpcclient.InferenceServerClient(url)
        try:
            return bool(client.is_server_live(client_timeout=5))
        except Exception as exc:  # connection refused while the server starts
            last[0] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return False
        finally:
            client.close()

    if not poll_until(live, timeout_s, 0.5):
        raise BadInputError(f"no Triton answered at {url} within {timeout_s:.0f}s ({last[0]})",
                            "check the Triton container's log")


def load_with_config(url: str, cfg: mc.ModelConfig, timeout_s: float = 120.0) -> None:
    """(Re)load the model with `cfg` through Triton's repository API (explicit model-control mode)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(cfg.name, config=json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                          client_timeout=timeout_s)
        if not client.is_model_ready(cfg.name):
            raise BadInputError(f"model {cfg.name} did not become ready with the candidate config", "see Triton log")
    finally:
        client.close()


def write_outputs(out_dir: Path, results: list[Measurement], chosen: Measurement, *, chosen_cfg: mc.ModelConfig,
                  slo_p99_ms: float, meta: dict[str, Any]) -> dict[str, str]:
    """results.json, results.csv, throughput-vs-p99 PNG and the chosen config.pbtxt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out_dir / "results.json").write_text(
        json.dumps({"meta": meta, "slo_p99_ms": slo_p99_ms, "chosen": chosen.label, "results": rows}, indent=2)
    )
    with (out_dir / "results.csv").open("w", newline="") as f:
        fields = ["label", "concurrency", "requests", "errors", "throughput_rps", "throughput_rps_min",
                  "throughput_rps_max", "p50_ms", "p90_ms", "p99_ms", "slo_met"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        color = "tab:green" if r.slo_met else "tab:red"
        ax.scatter(r.p99_ms, r.throughput_rps, c=color, s=80 if r is chosen else 30,
                   edgecolors="black" if r is chosen else "none")
        ax.annotate(f"{r.label} @{r.concurrency}", (r.p99_ms, r.throughput_rps), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axvline(slo_p99_ms, color="gray", linestyle="--", label=f"p99 SLO {slo_p99_ms} ms")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"{meta.get('model')}: {meta.get('candidates')} candidates/request, concurrency "
                 f"{meta.get('concurrency')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_p99.png", dpi=110)
    plt.close(fig)
    (out_dir / "config.pbtxt").write_text(cfgmod.to_pbtxt(chosen_cfg))
    return {k: str(out_dir / v) for k, v in
            {"json": "results.json", "csv": "results.csv", "plot": "throughput_vs_p99.png",
             "config": "config.pbtxt"}.items()}


@contextlib.contextmanager
def _triton(req: ProfileRequest) -> Iterator[str]:
    if req.url:
        if req.server_wait_s > 0:
            wait_for_server(req.url, req.server_wait_s)
        yield req.url
        return
    from model_repo_builder.triton_local import TritonServer

    log = req.out_dir / "tritonserver.log"
    req.out_dir.mkdir(parents=True, exist_ok=True)
    with TritonServer(req.repo, model_control_mode="explicit", log_path=log) as server:
        yield server.grpc_url


def run_profile(req: ProfileRequest) -> dict[str, Any]:
    """Sweep the candidate grid, choose under the SLO, write the outputs; returns a JSON-able summary."""
    cfg_path = req.repo / req.name / "config.pbtxt"
    if not cfg_path.exists():
        raise BadInputError(f"no model {req.name!r} in {req.repo} ({cfg_path} missing)", "build it first")
    base = cfgmod.parse_pbtxt(cfg_path.read_text())
    sig = cfgmod.signature_from_config(base)
    if sig is None:
        raise BadInputError(f"{cfg_path} declares no inputs", "profile a repository written by `build`")
    if req.candidates > base.max_batch_size:
        raise UsageError(f"--candidates {req.candidates} > max_batch_size {base.max_batch_size}",
                         "score fewer candidates per request or rebuild with a larger --max-batch-size")
    from model_repo_builder.parity import synthesize_inputs

    feeds = synthesize_inputs(sig, req.candidates, req.seed)
    grid = candidate_grid(req.instance_counts, req.max_queue_delays_us, req.preferred_batch_sizes)
    levels = tuple(sorted(set(req.concurrency_levels))) or (req.concurrency,)
    raw: dict[tuple[str, int], list[Measurement]] = {}
    configs: dict[str, mc.ModelConfig] = {}
    total = len(grid) * len(levels) * max(1, req.repeats)
    with _triton(req) as url, progress_bar(total, "profile", req.show_progress, unit="run") as bar:
        served = served_config(url, req.name)
        # Rounds interleave the configurations, so drifting host load does not favour one of them.
        for _ in range(max(1, req.repeats)):
            for cand in grid:
                load_with_config(url, apply_candidate(served, cand))
                configs[cand.label] = apply_candidate(base, cand)
                for level in levels:
                    m = measure(url, req.name, feeds=feeds, concurrency=level, warmup_s=req.warmup_s,
                                duration_s=req.duration_s, cand=cand)
                    raw.setdefault((m.label, level), []).append(m)
                    bar.update()
                    bar.set_postfix_str(f"{m.label} @{level}: {m.throughput_rps:.0f} rps p99 {m.p99_ms:.1f} ms")
    table: dict[str, dict[int, Measurement]] = {}
    for (label, level), ms in raw.items():
        table.setdefault(label, {})[level] = aggregate(ms)
    default_label = grid[0].label
    choice = choose_for_range(table, default_label, req.slo_p99_ms, noise_floor=req.noise_floor)
    results = [m for by_level in table.values() for m in by_level.values()]
    chosen, default = table[choice.label][levels[-1]], table[default_label][levels[-1]]
    chosen_cfg = configs[choice.label]
    meta = {"model": req.name, "candidates": req.candidates, "concurrency": ",".join(map(str, levels)),
            "duration_s": req.duration_s, "repeats": req.repeats, "cpu_count": os.cpu_count()}
    files = write_outputs(req.out_dir, results, chosen, chosen_cfg=chosen_cfg, slo_p99_ms=req.slo_p99_ms, meta=meta)
    tuning = {"slo_p99_ms": req.slo_p99_ms, "concurrency_levels": list(levels), "candidates": req.candidates,
              "chosen": choice.label, "default": default_label, "reason": choice.reason, "slo_met": choice.slo_met,
              "table": choice.table, "repeats": req.repeats, "duration_s": req.duration_s}  # fmt: skip
    if req.apply:
        tmp = cfg_path.with_name(".config.pbtxt.tmp")
        tmp.write_text(cfgmod.to_pbtxt(chosen_cfg))
        os.replace(tmp, cfg_path)
        _record_tuning(req.repo / req.name, tuning)
    return {
        "chosen": asdict(chosen),
        "default": asdict(default),
        "throughput_ratio_vs_default": (
            chosen.throughput_rps / default.throughput_rps if default.throughput_rps else None
        ),
        "slo_met": choice.slo_met,
        "reason": choice.reason,
        "levels": list(levels),
        "table": choice.table,
        "results": [asdict(r) for r in results],
        "files": files,
        "applied": req.apply,
    }


def _record_tuning(model_dir: Path, tuning: dict[str, Any]) -> None:
    """The choice and why, in each version's build.json (what `inspect` shows)."""
    for build_json in sorted(model_dir.glob("*/build.json")):
        report = json.loads(build_json.read_text())
        report["tuning"] = tuning
        tmp = build_json.with_name(".build.json.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, build_json)
