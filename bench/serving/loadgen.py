"""Closed-loop async HTTP load generator (aiohttp), run as its own process; prints one JSON result per concurrency."""

# Bodies are serialised once up front, so the client only sends bytes and times responses: that keeps its own CPU
# use low, and the same client (aiohttp) drives every server. Its CPU share is measured and reported.

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_level(session: aiohttp.ClientSession, url: str, bodies: list[bytes], headers: dict[str, str], *,
                    concurrency: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.perf_counter() + warmup_s + duration_s

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if measuring:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup_s)
    measuring = True
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    lat_ms = np.asarray(latencies) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms.size else None,
        "p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms.size else None,
        "mean_ms": float(lat_ms.mean()) if lat_ms.size else None,
        "client_cpu_s": cpu,
        # Fraction of one core the client used while measuring (1.0 = a whole core of the 2).
        "client_cpu_share": cpu / wall if wall else 0.0,
    }


async def main_async(a: argparse.Namespace) -> None:
    # Several systems are measured in turn at each concurrency level (interleaved), so slow drifts in what else
    # the machine is doing hit every system alike instead of whichever happened to run during the drift.
    systems = []
    for item in a.spec:
        name, _, path = item.rpartition("=")
        spec = json.loads(Path(path).read_text())
        systems.append((name or path, spec, [Path(p).read_bytes() for p in spec["bodies"]]))
    levels = [int(c) for c in a.concurrency.split(",")]
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(levels)), timeout=timeout)
                for _ in systems]
    try:
        for c in levels:
            for (name, spec, bodies), session in zip(systems, sessions, strict=True):
                result = await run_level(session, spec["url"], bodies, dict(spec.get("headers", {})), concurrency=c,
                                         warmup_s=a.warmup_s, duration_s=a.duration_s)
                print(json.dumps({"system": name, **result}), flush=True)
    finally:
        for session in sessions:
            await session.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", required=True, action="append",
                   help='[NAME=]PATH of a JSON {"url": ..., "headers": {...}, "bodies": [paths]}; repeatable')
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    a = p.parse_args()
    try:
        import uvloop  # faster event loop when installed; plain asyncio otherwise

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(a))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
