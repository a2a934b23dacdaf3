"""The shadow comparator: a sidecar of the builtin router's nginx.

nginx mirrors a sampled share of live infer requests to the intake (127.0.0.1 only). The intake answers at once
(204) and queues the request: nginx holds a keepalive connection's next request until its mirror subrequests end,
so a comparator that waited for the models would add their latency to users' requests. Workers send each queued
request to the stable's and the candidate's Services at the same time, compare the two answers
(shadow.compare) and export the results on /metrics (a separate port, scraped by Prometheus). A full queue drops
the request and counts it: the comparator never pushes back on the router.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from recserve_operator.shadow.compare import Ranking, UnsupportedAnswer, compare, parse_answer

__all__ = ["Comparator", "ComparatorConfig", "IntakeProtocol", "ShadowMetrics", "run"]

logger = logging.getLogger("recserve.shadow")

LABELS = ("model", "stable", "candidate")
FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5, 1.0, 10.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Headers of the original request worth forwarding to the models (others: hop-by-hop or the router's own).
FORWARDED = ("content-type", "inference-header-content-length", "x-user-id")


@dataclass(frozen=True)
class ComparatorConfig:
    model: str
    stable_revision: str
    candidate_revision: str
    stable_url: str  # http://host:port of the stable revision's Service
    candidate_url: str
    top_k: int = 10
    queue_size: int = 256
    concurrency: int = 16
    timeout_s: float = 5.0
    intake_host: str = "127.0.0.1"
    intake_port: int = 9098
    metrics_host: str = "0.0.0.0"  # Prometheus scrapes it from outside the pod
    metrics_port: int = 9099

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "stable": self.stable_revision, "candidate": self.candidate_revision}


class ShadowMetrics:
    """The comparator's Prometheus series, labelled model/stable/candidate (names in docs/rollouts.md)."""

    def __init__(self, labels: Mapping[str, str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, ln = self.registry, LABELS

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, ln, buckets=buckets, registry=r).labels(**labels)

        self.mirrored = Counter("recserve_shadow_mirrored_total", "Mirrored requests received", ln, registry=r).labels(
            **labels
        )
        outcome = Counter(
            "recserve_shadow_requests_total", "Mirrored requests by outcome", (*ln, "outcome"), registry=r
        )
        self.outcomes = {
            o: outcome.labels(**labels, outcome=o)
            for o in ("compared", "dropped", "candidate_error", "stable_error", "unsupported")
        }
        self.overlap = hist("recserve_shadow_topk_overlap", "Top-k overlap per compared request", FRACTION_BUCKETS)
        # (tau_b + 1) / 2 rather than tau_b: a histogram with negative buckets exports no _sum (prometheus_client,
        # OpenMetrics), and the analysis needs the mean. The mean tau_b is 2 * mean - 1.
        self.correlation = hist(
            "recserve_shadow_rank_concordance",
            "(Kendall tau-b + 1) / 2 of the top-k lists per request",
            FRACTION_BUCKETS,
        )
        self.max_diff = hist(
            "recserve_shadow_score_abs_diff_max", "Largest |score difference| per request", DIFF_BUCKETS
        )
        self.mean_diff = hist(
            "recserve_shadow_score_abs_diff_mean", "Mean |score difference| per request", DIFF_BUCKETS
        )
        self.max_diff_seen = Gauge(
            "recserve_shadow_score_abs_diff_max_seen", "Largest |score difference| seen", ln, registry=r
        ).labels(**labels)
        self.candidate_latency = hist(
            "recserve_shadow_candidate_latency_seconds", "Candidate latency on mirrored requests", LATENCY_BUCKETS
        )
        self.stable_latency = hist(
            "recserve_shadow_stable_latency_seconds", "Stable latency on mirrored requests", LATENCY_BUCKETS
        )
        self.queue = Gauge("recserve_shadow_queue_depth", "Requests waiting for comparison", ln, registry=r).labels(
            **labels
        )
        self._max_seen = 0.0

    def record(self, stable: Ranking, candidate: Ranking, top_k: int) -> None:
        c = compare(stable, candidate, top_k)
        self.overlap.observe(c.overlap)
        if c.rank_correlation is not None:
            self.correlation.observe((c.rank_correlation + 1.0) / 2.0)
        if c.max_abs_score_diff is not None and c.mean_abs_score_diff is not None:
            self.max_diff.observe(c.max_abs_score_diff)
            self.mean_diff.observe(c.mean_abs_score_diff)
            if c.max_abs_score_diff > self._max_seen:
                self._max_seen = c.max_abs_score_diff
                self.max_diff_seen.set(c.max_abs_score_diff)
        self.outcomes["compared"].inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class _Mirrored:
    path: str
    body: bytes
    headers: Mapping[str, str]


class Comparator:
    def __init__(self, config: ComparatorConfig, metrics: ShadowMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ShadowMetrics(config.labels)
        self.queue: asyncio.Queue[_Mirrored] = asyncio.Queue(config.queue_size)
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.concurrency * 2, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.config.concurrency)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def accept(self, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Queue one mirrored request, or drop it when the queue is full: never wait."""
        self.metrics.mirrored.inc()
        try:
            self.queue.put_nowait(_Mirrored(path, body, headers))
        except asyncio.QueueFull:
            self.metrics.outcomes["dropped"].inc()
        self.metrics.queue.set(self.queue.qsize())

    async def _call(self, base: str, item: _Mirrored) -> tuple[Ranking | None, float, bool]:
        """(ranking, seconds, ok): ok False is a failed request; a ranking of None with ok True is unreadable."""
        assert self._session is not None
        start = time.perf_counter()
        try:
            async with self._session.post(base + item.path, data=item.body, headers=dict(item.headers)) as resp:
                raw = await resp.read()
                elapsed = time.perf_counter() - start
                if resp.status != 200:
                    return None, elapsed, False
        except (aiohttp.ClientError, TimeoutError):
            return None, time.perf_counter() - start, False
        try:
            return parse_answer(json.loads(raw)), elapsed, True
        except (ValueError, UnsupportedAnswer, TypeError, AttributeError):
            return None, elapsed, True

    async def handle(self, item: _Mirrored) -> str:
        """Send one mirrored request to both revisions and record the outcome; returns it (for tests)."""
        (stable, s_time, s_ok), (cand, c_time, c_ok) = await asyncio.gather(
            self._call(self.config.stable_url, item), self._call(self.config.candidate_url, item)
        )
        m = self.metrics
        m.candidate_latency.observe(c_time)
        if s_ok:
            m.stable_latency.observe(s_time)
        if not c_ok:
            outcome = "candidate_error"
        elif not s_ok:
            outcome = "stable_error"
        elif stable is None or cand is None:
            outcome = "unsupported"
        else:
            m.record(stable, cand, self.config.top_k)
            return "compared"
        m.outcomes[outcome].inc()
        return outcome

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                await self.handle(item)
            except Exception:  # one bad request must not stop a worker
                logger.exception("shadow comparison failed")
            finally:
                self.metrics.queue.set(self.queue.qsize())


_NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_BODY = 64 * 1024 * 1024


class IntakeProtocol(asyncio.Protocol):
    """The mirror intake: a minimal HTTP/1.1 server that answers 204 as soon as a request's body is in.

    nginx holds a keep-alive connection's next request until the mirror subrequest of the previous one ends, so
    the intake's per-request cost is added to users' requests on that connection: it parses the request line,
    Content-Length and the forwarded headers, and nothing else (a general HTTP server costs ~10x more per request
    in Python). nginx sends mirrored bodies with Content-Length; anything else is refused and the connection closed.
    """

    def __init__(self, comparator: Comparator) -> None:
        self.comparator = comparator
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            parts = head[0].split(" ")
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if len(parts) != 3 or "transfer-encoding" in headers or not 0 <= length <= MAX_BODY:
                self.transport.write(_BAD)
                self.transport.close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.transport.write(_NO_CONTENT)
            forwarded = {k: v for k, v in headers.items() if k in FORWARDED}
            if parts[0] == "POST":
                self.comparator.accept(parts[1], body, forwarded)


def build_metrics_app(comparator: Comparator) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=comparator.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    served = web.Application()
    served.router.add_get("/metrics", metrics)
    served.router.add_get("/healthz", healthz)
    return served


async def run(config: ComparatorConfig, stop: asyncio.Event | None = None) -> None:
    comparator = Comparator(config)
    await comparator.start()
    loop = asyncio.get_running_loop()
    intake = await loop.create_server(lambda: IntakeProtocol(comparator), config.intake_host, config.intake_port,
                                      backlog=1024)  # fmt: skip
    runner = web.AppRunner(build_metrics_app(comparator), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.metrics_host, config.metrics_port).start()
    logger.info("shadow comparator for %s: stable %s vs candidate %s, top-%d", config.model,
                config.stable_revision, config.candidate_revision, config.top_k)  # fmt: skip
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        intake.close()
        await runner.cleanup()
        await comparator.stop()
