"""`python -m recserve_operator.shadow`: the comparator sidecar (arguments written by routers.builtin)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from recserve_operator.shadow.server import ComparatorConfig, run


def parse_args(argv: list[str] | None = None) -> ComparatorConfig:
    p = argparse.ArgumentParser(prog="python -m recserve_operator.shadow")
    p.add_argument("--model", required=True)
    p.add_argument("--stable-revision", required=True)
    p.add_argument("--candidate-revision", required=True)
    p.add_argument("--stable-url", required=True)
    p.add_argument("--candidate-url", required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--intake-port", type=int, default=9098)
    p.add_argument("--metrics-port", type=int, default=9099)
    a = p.parse_args(argv)
    return ComparatorConfig(
        model=a.model, stable_revision=a.stable_revision, candidate_revision=a.candidate_revision,
        stable_url=a.stable_url.rstrip("/"), candidate_url=a.candidate_url.rstrip("/"), top_k=a.top_k,
        queue_size=a.queue_size, concurrency=a.concurrency, timeout_s=a.timeout, intake_port=a.intake_port,
        metrics_port=a.metrics_port,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = parse_args(argv)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(config, stop)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
