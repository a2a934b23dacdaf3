"""Real data-plane processes for rollout tests: Triton x2, nginx, Prometheus, a click exporter, a load generator."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
from google.protobuf import text_format
from recserve_operator.metrics.base import collect_ab_counts, collect_measurements
from recserve_operator.rollout.analysis import evaluate
from recserve_operator.rollout.machine import Action, Decision, Observation, next_step
from recserve_operator.rollout.policy import ManualAction, RolloutPolicy, Strategy
from recserve_operator.rollout.state import RolloutState
from recserve_operator.rollout.statistics import ab_verdict
from recserve_operator.routers.plan import TrafficPlan, build_traffic_plan
from tritonclient.grpc import model_config_pb2 as mc

from model_repo_builder.triton_local import TritonServer, free_ports
from recserve_cluster.dataplane import ClickExporter, Nginx, Prometheus, prometheus_config

T = TypeVar("T")
MODEL = "scorer"
CANDIDATE_OFFSET = 100.0  # candidate scores are >= 100, so a response shows which Triton really served it


class DeadlineError(AssertionError):
    """A condition did not hold before its deadline."""


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `predicate` until truthy (and return it) or raise DeadlineError naming `what` and the last value."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except (requests.RequestException, OSError) as exc:  # a server still starting up
            last = exc
        if time.monotonic() >= deadline:
            raise DeadlineError(f"timed out after {timeout_s:.1f}s waiting for {what}; last: {last!r}")
        tick.wait(interval_s)


def wait_seconds(seconds: float) -> None:
    """Let wall time pass (a rollout pause) as a deadline on the monotonic clock."""
    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= end, seconds + 5.0, f"{seconds:.1f}s to pass", interval_s=0.05)


# ---------------------------------------------------------------- Triton with a deterministic python model

MODEL_PY = '''\
"""Deterministic scorer for data-plane tests: score = (user_id % 1000) / 1000 + OFFSET; fails a share on demand."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.offset = float(params["OFFSET"]["string_value"])
        self.control = params["CONTROL_FILE"]["string_value"]
        self.n = 0

    def _fail_share(self):
        # Read on every batch so a test can turn failures on and off without restarting Triton.
        try:
            with open(self.control) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    def execute(self, requests):
        share = self._fail_share()
        out = []
        for r in requests:
            self.n += 1
            # Deterministic: exactly floor(n * share) of the first n requests fail. Raising (not returning an
            # error response) is what Triton counts in nv_inference_request_failure; error responses from the
            # python backend are counted as successes. Without dynamic batching each call holds one request.
            if int(self.n * share) > int((self.n - 1) * share):
                raise pb_utils.TritonModelException("injected failure")
            uid = pb_utils.get_input_tensor_by_name(r, "USER_ID").as_numpy()
            score = ((uid % 1000) / 1000.0 + self.offset).astype(np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SCORE", score)]))
        return out
'''


def scorer_config(offset: float, control_file: Path) -> str:
    """config.pbtxt via Triton's own ModelConfig proto (tritonclient), rendered with protobuf text_format."""
    cfg = mc.ModelConfig(name=MODEL, backend="python", max_batch_size=64)
    cfg.input.add(name="USER_ID", data_type=mc.TYPE_INT64, dims=[1])
    cfg.output.add(name="SCORE", data_type=mc.TYPE_FP32, dims=[1])
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.parameters["OFFSET"].string_value = str(offset)
    cfg.parameters["CONTROL_FILE"].string_value = str(control_file)
    return str(text_format.MessageToString(cfg))


def write_scorer_repo(root: Path, offset: float, control_file: Path) -> Path:
    """A one-model repository (python backend) scoring users deterministically."""
    repo = root / "repo"
    (repo / MODEL / "1").mkdir(parents=True, exist_ok=True)
    (repo / MODEL / "1" / "model.py").write_text(MODEL_PY)
    (repo / MODEL / "config.pbtxt").write_text(scorer_config(offset, control_file))
    control_file.write_text("0")
    return repo


@dataclass
class Backend:
    name: str  # "stable" | "candidate"
    revision: str
    triton: TritonServer
    control_file: Path

    @property
    def address(self) -> str:
        return self.triton.http_url

    def set_fail_share(self, share: float) -> None:
        self.control_file.write_text(str(share))

    def available(self) -> bool:
        return self.triton.model_ready(MODEL)


# ---------------------------------------------------------------- load through nginx


@dataclass
class LoadStats:
    sent: Tally[str] = field(default_factory=Tally)  # by variant header
    errors: Tally[str] = field(default_factory=Tally)
    mismatched: int = 0  # header said canary but the stable Triton answered
    retried: int = 0  # connection closed under a keep-alive request (nginx reload); retried once, as clients do
    failures: list[str] = field(default_factory=list)  # the first few failure descriptions, for assertion messages
    last_seen: dict[str, float] = field(default_factory=dict)  # variant -> time.monotonic() of its last answer


def infer_body(user_id: int) -> dict[str, Any]:
    return {"inputs": [{"name": "USER_ID", "shape": [1, 1], "datatype": "INT64", "data": [user_id]}]}


def infer(session: requests.Session, url: str, user_id: int, headers: Mapping[str, str]) -> tuple[str, bool, bool]:
    """(variant header, ok, score agrees with that variant)."""
    resp = session.post(f"{url}/v2/models/{MODEL}/infer", data=json.dumps(infer_body(user_id)),
                        headers={"Content-Type": "application/json", **headers}, timeout=10)  # fmt: skip
    variant = resp.headers.get("X-RecServe-Variant", "?")
    if resp.status_code != 200:
        return variant, False, True
    score = resp.json()["outputs"][0]["data"][0]
    # Only "canary" is tied to one Triton here: after a promotion "stable" is the candidate's Triton.
    return variant, True, variant != "canary" or score >= CANDIDATE_OFFSET


class LoadGenerator:
    """Background traffic through nginx at about `rps` requests/s from a fixed user population."""

    def __init__(self, url: str, rps: float = 80.0, users: int = 5000, threads: int = 2, seed: int = 1) -> None:
        self.url = url
        self.period = threads / rps
        self.users = users
        self.stats = LoadStats()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        session = requests.Session()
        while not self.stop_event.is_set():
            uid = int(rng.integers(self.users))
            retried, failure = False, ""
            try:
                variant, ok, agrees = infer(session, self.url, uid, {"x-user-id": f"user-{uid}"})
            except requests.ConnectionError:
                retried = True
                try:
                    variant, ok, agrees = infer(session, self.url, uid, {"x-user-id": f"user-{uid}"})
                except requests.RequestException as exc:
                    variant, ok, agrees, failure = "?", False, True, repr(exc)
            except requests.RequestException as exc:
                variant, ok, agrees, failure = "?", False, True, repr(exc)
            with self.lock:
                self.stats.last_seen[variant] = time.monotonic()
                self.stats.retried += retried
                if failure and len(self.stats.failures) < 5:
                    self.stats.failures.append(failure)
                self.stats.sent[variant] += 1
                if not ok:
                    self.stats.errors[variant] += 1
                if not agrees:
                    self.stats.mismatched += 1
            self.stop_event.wait(self.period)

    def snapshot(self) -> LoadStats:
        with self.lock:
            st = self.stats
            return LoadStats(Tally(st.sent), Tally(st.errors), st.mismatched, st.retried, list(st.failures),
                             dict(st.last_seen))

    def __enter__(self) -> LoadGenerator:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=15)


# ---------------------------------------------------------------- the whole stack and the rollout driver


@dataclass
class Stack:
    workdir: Path
    stable: Backend
    candidate: Backend
    nginx: Nginx
    prometheus: Prometheus
    exporter: ClickExporter

    @property
    def addresses(self) -> dict[str, str]:
        return {self.stable.revision: self.stable.address, self.candidate.revision: self.candidate.address}

    def route(self, plan: TrafficPlan) -> None:
        self.nginx.apply(plan, self.addresses)


@contextlib.contextmanager
def data_plane(true_ctr: Mapping[str, float] | None = None, seed: int = 2026) -> Iterator[Stack]:
    """Start everything on free ports under a temp dir; stop everything (reverse order) on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="recserve-dataplane-"))
    stack_items: list[Callable[[], None]] = []
    try:
        backends: dict[str, Backend] = {}
        for name, revision, offset in (("stable", "rev-a", 0.0), ("candidate", "rev-b", CANDIDATE_OFFSET)):
            root = workdir / name
            root.mkdir()
            control = root / "fail_share"
            repo = write_scorer_repo(root, offset, control)
            http, grpc, metrics = free_ports(3)
            triton = TritonServer(repo, http, grpc, metrics, log_path=root / "triton.log",
                                  extra_args=["--metrics-config=summary_latencies=true"])  # fmt: skip
            triton.start()
            stack_items.append(triton.stop)
            backends[name] = Backend(name, revision, triton, control)
        nginx_port, prom_port, exporter_port = free_ports(3)
        (workdir / "nginx").mkdir()
        nginx = Nginx(workdir / "nginx", nginx_port)
        stack_items.append(nginx.stop)
        exporter = ClickExporter(exporter_port, true_ctr or {"stable": 0.05, "canary": 0.056}, seed)
        stack_items.append(exporter.stop)
        targets = {
            "triton-stable": (f"127.0.0.1:{backends['stable'].triton.metrics_port}",
                              {"variant": "stable", "revision": "rev-a"}),
            "triton-candidate": (f"127.0.0.1:{backends['candidate'].triton.metrics_port}",
                                 {"variant": "canary", "revision": "rev-b"}),
            "clicks": (f"127.0.0.1:{exporter_port}", {}),
        }  # fmt: skip
        (workdir / "prometheus").mkdir()
        prometheus = Prometheus(workdir / "prometheus", prom_port, prometheus_config(targets))
        stack_items.append(prometheus.stop)
        prometheus.wait_targets_up(list(targets))
        yield Stack(workdir, backends["stable"], backends["candidate"], nginx, prometheus, exporter)
    finally:
        for stop in reversed(stack_items):
            with contextlib.suppress(Exception):
                stop()
        if os.environ.get("RECSERVE_KEEP_DATAPLANE") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Step:
    at_s: float  # seconds since the drive started
    action: Action
    canary_weight: int
    reason: str


@dataclass
class Drive:
    decisions: list[Step]
    final: Decision
    started: float  # time.monotonic() at the first decision


def observe(stack: Stack, policy: RolloutPolicy, state: RolloutState, desired: str,
            action: ManualAction = ManualAction.NONE) -> Observation:  # fmt: skip
    """What the operator would observe: candidate readiness and real Prometheus analysis."""
    available = stack.candidate.available()
    analysis = ab = None
    if policy.analysis.enabled and state.active and state.revision is not None and state.weight > 0:
        m = collect_measurements(stack.prometheus.provider, policy.analysis, variant="canary", revision=state.revision)
        analysis = evaluate(policy.analysis, m)
        ab_policy = policy.analysis.ab_test
        if policy.strategy is Strategy.AB_TEST and ab_policy is not None:
            prom = stack.prometheus.provider
            started = state.started_at or datetime.now(UTC)
            elapsed = (datetime.now(UTC) - started).total_seconds()
            s = collect_ab_counts(prom, ab_policy, variant="stable", revision=state.stable_revision or "",
                                  elapsed_s=elapsed)  # fmt: skip
            c = collect_ab_counts(prom, ab_policy, variant="canary", revision=state.revision, elapsed_s=elapsed)
            ab = ab_verdict(s, c, ab_policy, state.ab)
    return Observation(desired_revision=desired, candidate_available=available, analysis=analysis, ab=ab, action=action)


def drive(
    stack: Stack,
    policy: RolloutPolicy,
    state: RolloutState,
    desired: str,
    *,
    until: Callable[[Decision], bool],
    timeout_s: float,
    before_look: Callable[[RolloutState], None] | None = None,
) -> Drive:
    """Run the operator loop against the real data plane: observe, decide, route, wait requeue_after."""
    start = time.monotonic()
    steps: list[Step] = []
    while True:
        if before_look is not None:
            before_look(state)
        d = next_step(policy, state, observe(stack, policy, state, desired), datetime.now(UTC))
        plan = build_traffic_plan("model", d.state, d.weights, policy.routing, lambda _m, rev: rev)
        stack.route(plan)
        steps.append(Step(time.monotonic() - start, d.action, d.weights.canary, d.reason))
        state = d.state
        if until(d):
            return Drive(steps, d, start)
        if time.monotonic() - start > timeout_s:
            trail = "\n".join(f"{s.at_s:6.1f}s {s.action.value} {s.canary_weight}% {s.reason}" for s in steps)
            raise DeadlineError(f"rollout did not finish within {timeout_s}s:\n{trail}")
        wait_seconds(min(d.requeue_after or 1.0, policy.analysis.interval_s))
