"""The shadow comparator as a process would run it, and behind Debian's nginx with the generated mirror config.

Fake KServe v2 backends (aiohttp, on 127.0.0.1) stand in for the stable and candidate Tritons: the stable answers
a fixed top 10, the candidate the same, a shuffled one, or HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from recserve_operator.rollout.machine import TrafficWeights
from recserve_operator.rollout.policy import RoutingPolicy
from recserve_operator.rollout.state import Phase, RolloutState
from recserve_operator.routers.builtin import render_local_nginx_conf
from recserve_operator.routers.plan import build_traffic_plan
from recserve_operator.shadow.server import ComparatorConfig, run

from model_repo_builder.triton_local import free_ports
from recserve_cluster.waiting import wait_for
from tests.unit.rollout.test_routers import NGINX

MODEL = "shop"
PATH = f"/v2/models/{MODEL}/infer"
TOP = list(range(10))


def answer(items: list[int]) -> dict[str, object]:
    scores = [1.0 - r / 20 for r in range(len(items))]
    return {"model_name": MODEL, "outputs": [
        {"name": "scores", "datatype": "FP32", "shape": [len(items)], "data": scores},
        {"name": "indices", "datatype": "INT64", "shape": [len(items)], "data": items}]}  # fmt: skip


@dataclass
class Backend:
    """A fake Triton: `mode` is same | shuffled | error; `delay_s` before answering."""

    mode: str = "same"
    delay_s: float = 0.0
    calls: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    async def infer(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        items = TOP if self.mode == "same" else self.rng.sample(range(300), 10)
        return web.json_response(answer(items), headers={"X-Backend": self.mode})


class Servers:
    """Backends and (optionally) the comparator, on one event loop in a background thread."""

    def __init__(self, stable: Backend, candidate: Backend, config: ComparatorConfig | None) -> None:
        self.stable, self.candidate, self.config = stable, candidate, config
        self.ports = free_ports(2)
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        runners = []
        for backend, port in ((self.stable, self.ports[0]), (self.candidate, self.ports[1])):
            app = web.Application()
            app.router.add_post(PATH, backend.infer)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        comparator = asyncio.create_task(run(self.config, self.stop)) if self.config else None
        self.ready.set()
        await self.stop.wait()
        if comparator is not None:
            await comparator
        for runner in runners:
            await runner.cleanup()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10)
        if self.config is not None:
            wait_for(lambda: requests.get(f"{self.metrics_url}/healthz", timeout=1).ok, 10, 0.05, "comparator")

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)
        self.loop.close()

    @property
    def metrics_url(self) -> str:
        assert self.config is not None
        return f"http://127.0.0.1:{self.config.metrics_port}"


def config(**kw: object) -> ComparatorConfig:
    intake, metrics = free_ports(2)
    base = ComparatorConfig(model=MODEL, stable_revision="r1", candidate_revision="r2", stable_url="",
                            candidate_url="", intake_port=intake, metrics_port=metrics,
                            metrics_host="127.0.0.1")  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


@contextmanager
def servers(stable: Backend, candidate: Backend, cfg: ComparatorConfig | None) -> Iterator[Servers]:
    s = Servers(stable, candidate, None)
    if cfg is not None:
        s.config = replace(cfg, stable_url=f"http://127.0.0.1:{s.ports[0]}",
                           candidate_url=f"http://127.0.0.1:{s.ports[1]}")  # fmt: skip
    s.start()
    try:
        yield s
    finally:
        s.close()


def series(s: Servers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{s.metrics_url}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(s: Servers, name: str, **labels: str) -> float:
    want = {"model": MODEL, "stable": "r1", "candidate": "r2", **labels}
    return series(s).get((name, tuple(sorted(want.items()))), 0.0)


def outcome(s: Servers, what: str) -> float:
    return value(s, "recserve_shadow_requests_total", outcome=what)


def post_intake(s: Servers, n: int) -> list[int]:
    assert s.config is not None
    with requests.Session() as session:
        return [session.post(f"http://127.0.0.1:{s.config.intake_port}{PATH}", data=b'{"inputs": []}',
                             headers={"Content-Type": "application/json"}, timeout=5).status_code
                for _ in range(n)]  # fmt: skip


def settle(s: Servers, what: Callable[[], bool], name: str) -> None:
    wait_for(what, 20, 0.05, name)


def test_an_equal_candidate_agrees_on_every_request() -> None:
    with servers(Backend("same"), Backend("same"), config()) as s:
        assert post_intake(s, 40) == [204] * 40
        settle(s, lambda: outcome(s, "compared") == 40, "40 comparisons")
        assert value(s, "recserve_shadow_topk_overlap_sum") == 40.0
        assert value(s, "recserve_shadow_rank_concordance_sum") == pytest.approx(40.0)  # (tau + 1) / 2 = 1
        assert value(s, "recserve_shadow_score_abs_diff_max_seen") == 0.0
        assert value(s, "recserve_shadow_candidate_latency_seconds_count") == 40
        assert s.stable.calls == s.candidate.calls == 40


def test_a_shuffled_candidate_disagrees() -> None:
    with servers(Backend("same"), Backend("shuffled"), config()) as s:
        post_intake(s, 40)
        settle(s, lambda: outcome(s, "compared") == 40, "40 comparisons")
        assert value(s, "recserve_shadow_topk_overlap_sum") / 40 < 0.2
        assert value(s, "recserve_shadow_rank_concordance_sum") / 40 < 0.5  # mean tau < 0


def test_candidate_errors_are_counted_not_compared() -> None:
    with servers(Backend("same"), Backend("error"), config()) as s:
        post_intake(s, 10)
        settle(s, lambda: outcome(s, "candidate_error") == 10, "10 candidate errors")
        assert outcome(s, "compared") == 0


def test_a_full_queue_drops_and_never_holds_the_mirror() -> None:
    cfg = config(queue_size=2, concurrency=1)
    with servers(Backend("same"), Backend("same", delay_s=0.5), cfg) as s:
        assert post_intake(s, 30) == [204] * 30
        assert outcome(s, "dropped") >= 20
        settle(s, lambda: outcome(s, "compared") + outcome(s, "dropped") == 30, "every request accounted for")
        assert value(s, "recserve_shadow_mirrored_total") == 30


# ---------------------------------------------------------------- behind nginx


SHADOWING = RolloutState(phase=Phase.PROGRESSING, stable_revision="r1", revision="r2", shadowing=True)


@contextmanager
def nginx(tmp: Path, s: Servers, percent: int, intake_port: int) -> Iterator[str]:
    plan = build_traffic_plan(MODEL, SHADOWING, TrafficWeights(100, 0, False, mirror=percent), RoutingPolicy())
    (port,) = free_ports(1)
    user = "root" if os.geteuid() == 0 else None
    conf = render_local_nginx_conf(plan, {"stable": f"127.0.0.1:{s.ports[0]}"}, str(tmp), port, user=user,
                                   shadow_intake=f"127.0.0.1:{intake_port}")  # fmt: skip
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX, "-p", f"{tmp}/", "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/healthz", timeout=1).ok, 15, 0.05, "nginx")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def users(url: str, n: int) -> list[tuple[int, str, list[int]]]:
    """n keep-alive requests as users send them: (status, backend that answered, top items)."""
    out = []
    with requests.Session() as session:
        for i in range(n):
            r = session.post(f"{url}{PATH}", data=json.dumps({"inputs": []}), timeout=10,
                             headers={"Content-Type": "application/json", "x-user-id": f"u{i}"})  # fmt: skip
            items = r.json()["outputs"][1]["data"] if r.status_code == 200 else []
            out.append((r.status_code, r.headers.get("X-Backend", ""), items))
    return out


needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason=f"{NGINX} is absent (apt-get install nginx)")


@needs_nginx
def test_behind_nginx_users_get_the_stables_answer_while_every_request_is_compared(tmp_path: Path) -> None:
    with servers(Backend("same"), Backend("shuffled"), config()) as s:
        assert s.config is not None
        with nginx(tmp_path, s, 100, s.config.intake_port) as url:
            got = users(url, 60)
        assert got == [(200, "same", TOP)] * 60
        settle(s, lambda: outcome(s, "compared") == 60, "60 comparisons")
        assert value(s, "recserve_shadow_topk_overlap_sum") / 60 < 0.2
        assert s.stable.calls == 120  # the users' 60 and the comparator's 60


@needs_nginx
def test_behind_nginx_only_the_sampled_share_is_mirrored(tmp_path: Path) -> None:
    with servers(Backend("same"), Backend("same"), config()) as s:
        assert s.config is not None
        with nginx(tmp_path, s, 30, s.config.intake_port) as url:
            assert all(status == 200 for status, _, _ in users(url, 400))
        # Binomial(400, 0.3): mean 120, sd 9.2; the bounds are more than 5 sd away.
        settle(s, lambda: s.candidate.calls == value(s, "recserve_shadow_mirrored_total") > 0, "mirrors compared")
        assert 70 <= s.candidate.calls <= 170


@needs_nginx
def test_behind_nginx_a_dead_comparator_fails_no_user_request(tmp_path: Path) -> None:
    (nobody,) = free_ports(1)
    with servers(Backend("same"), Backend("same"), None) as s, nginx(tmp_path, s, 100, nobody) as url:
        assert users(url, 50) == [(200, "same", TOP)] * 50
        assert s.candidate.calls == 0


def test_the_intake_answers_pipelined_requests_and_refuses_what_it_cannot_frame() -> None:
    import socket

    with servers(Backend("same"), Backend("same"), config()) as s:
        assert s.config is not None
        body = b'{"inputs": []}'
        one = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
        with socket.create_connection(("127.0.0.1", s.config.intake_port), timeout=5) as sock:
            sock.sendall(one * 3)  # three requests in one segment, the last one's body split below
            sock.sendall(one[:-4])
            sock.sendall(one[-4:])
            got = b""
            while got.count(b"204 No Content") < 4:
                got += sock.recv(4096)
        settle(s, lambda: outcome(s, "compared") == 4, "4 comparisons")
        with socket.create_connection(("127.0.0.1", s.config.intake_port), timeout=5) as sock:
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400")


@needs_nginx
def test_behind_nginx_a_hung_comparator_fails_no_user_request(tmp_path: Path) -> None:
    """A comparator that accepts and never answers: nginx gives the mirror up after its timeout; users still get
    every answer (delayed by at most that timeout on a keep-alive connection)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with servers(Backend("same"), Backend("same"), None) as s, \
                nginx(tmp_path, s, 100, listener.getsockname()[1]) as url:  # fmt: skip
            assert users(url, 10) == [(200, "same", TOP)] * 10
        assert held, "nginx never reached the hung comparator"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
