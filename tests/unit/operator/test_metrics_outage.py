"""reconcile() while Prometheus is down or answers garbage: drift is still corrected, nothing advances, one log line
per outage, a MetricsAvailable condition, and the progressDeadline ends a rollout nobody can measure."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from operator_samples import minimal_spec, model_body
from recserve_operator.reconcile import Reconciler
from recserve_operator.settings import OperatorDefaults
from test_operator_reconcile import FakeKube, FakeLive

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
STEPS = [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}]


class Prometheus:
    """A Prometheus HTTP API on 127.0.0.1 that serves a healthy candidate, or breaks on demand (`broken`)."""

    HEALTHY = {"nv_inference_request_success": "5000", "nv_inference_request_failure": "0",
               "nv_inference_request_summary_us": "4000"}  # fmt: skip

    def __init__(self) -> None:
        self.broken: tuple[int, bytes, str] | None = None
        prometheus = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, ctype = prometheus.broken or (200, prometheus.answer(self.path), "application/json")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, path: str) -> bytes:
        query = parse_qs(urlsplit(path).query)["query"][0]
        value = next((v for metric, v in self.HEALTHY.items() if metric in query), None)
        result = [] if value is None else [{"metric": {}, "value": [0, value]}]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    server = Prometheus()
    yield server
    server.close()


class Model:
    """One RecommenderModel reconciled at chosen times against the in-memory API of test_operator_reconcile."""

    def __init__(self, rollout: dict[str, Any]) -> None:
        self.kube = FakeKube()
        self.rec = Reconciler(self.kube, OperatorDefaults(), FakeLive(self.kube))  # type: ignore[arg-type]
        self.rollout = rollout
        self.version = 3

    def reconcile(self, seconds: float) -> dict[str, int]:
        spec = minimal_spec(rollout=self.rollout, model={"uri": f"pvc://models/ctr-dnn/{self.version}",
                                                         "format": "keras", "version": self.version})  # fmt: skip
        body = model_body(spec, generation=self.version, status=self.kube.status)
        return self.rec.reconcile(body, lambda *e: self.kube.events.append(e), now=T0 + timedelta(seconds=seconds))

    def start_canary(self) -> tuple[str, str]:
        """Stable v3 Available, then v4 as a canary at its first step (10%) from t=20s."""
        self.reconcile(0)
        stable = self.kube.status["stable"]["revision"]
        self.kube.make_available(stable)
        self.version = 4
        self.reconcile(10)
        candidate = self.kube.status["latestRevision"]
        self.kube.make_available(candidate)
        self.reconcile(20)
        assert self.canary["weight"] == 10
        return stable, candidate

    @property
    def canary(self) -> dict[str, Any]:
        return dict(self.kube.status["canary"])

    def condition(self, type_: str) -> tuple[str, str, str] | None:
        c = next((x for x in self.kube.status["conditions"] if x["type"] == type_), None)
        return (c["status"], c["reason"], c["message"]) if c else None

    def events(self, reason: str) -> list[tuple[str, str, str]]:
        return [e for e in self.kube.events if e[1] == reason]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rollout(prometheus_url: str, **extra: Any) -> dict[str, Any]:
    analysis = {"interval": "1m", "prometheus": prometheus_url, "maxErrorRate": 0.01, "minRequests": 100}
    return {"strategy": "canary", "steps": STEPS, "analysis": analysis, **extra}


def _outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Metrics ")]


def test_an_outage_holds_the_step_corrects_drift_logs_once_and_the_rollout_resumes_when_metrics_return(
    prometheus: Prometheus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="recserve.reconcile")
    m = Model(_rollout(prometheus.url))
    stable, candidate = m.start_canary()
    assert m.condition("MetricsAvailable") == ("Unknown", "NotMeasured", "no analysis has queried prometheus yet")

    prometheus.broken = (503, b"<html>upstream down</html>", "text/html")
    m.reconcile(90)  # the step's pause is over and a look is due: it gets HTML
    assert (m.canary["phase"], m.canary["step"], m.canary["weight"]) == ("Progressing", 0, 10)
    status, reason, message = m.condition("MetricsAvailable") or ("", "", "")
    assert (status, reason) == ("False", "MetricsUnavailable")
    assert message == f"prometheus at {prometheus.url} answered HTTP 503 with a non-JSON body (text/html)"
    assert m.canary["lastAnalysis"]["verdict"] == "inconclusive"
    assert m.events("MetricsUnavailable")[0][0] == "Warning"

    # Drift is still corrected during the outage: deleted children come back, the router keeps the split.
    del m.kube.objects[("Service", "shop", f"ctr-dnn-{candidate}")]
    del m.kube.objects[("Service", "shop", "ctr-dnn")]
    assert m.reconcile(100)["applied"] == 2
    assert ("Service", "shop", f"ctr-dnn-{candidate}") in m.kube.objects
    plan = json.loads(m.kube.objects[("ConfigMap", "shop", "ctr-dnn-router")]["data"]["plan.json"])
    assert {b["revision"]: b["weight"] for b in plan["backends"]} == {stable: 90, candidate: 10}
    assert m.reconcile(110) == {"applied": 0, "deleted": 0, "status": 0}, "between looks an outage writes nothing"
    for seconds in (150, 210, 270):
        m.reconcile(seconds)
        assert (m.canary["step"], m.canary["weight"]) == (0, 10)
    assert _outage_lines(caplog) == [
        f"Metrics unavailable namespace=shop name=ctr-dnn error={message}"
    ], "one line per outage, not one per look"
    assert not [r for r in caplog.records if r.exc_info]

    prometheus.broken = None
    m.reconcile(330)
    assert m.condition("MetricsAvailable") == ("True", "MetricsAvailable", f"prometheus at {prometheus.url} answered")
    assert (m.canary["step"], m.canary["weight"]) == (1, 50)
    assert _outage_lines(caplog)[1:] == ["Metrics available again namespace=shop name=ctr-dnn"]


@pytest.mark.parametrize(
    "broken",
    [(500, b"Internal Server Error", "text/plain"), (200, b'{"status": "success"}', "application/json"),
     (200, b'{"status": "success", "data": {"resultType": "vector", "result": "x"}}', "application/json")],
    ids=["HTTP 500", "JSON without data", "a string where the vector should be"],
)  # fmt: skip
def test_a_garbage_answer_is_an_outage_not_an_error_of_the_reconcile(
    prometheus: Prometheus, broken: tuple[int, bytes, str]
) -> None:
    m = Model(_rollout(prometheus.url))
    m.start_canary()
    prometheus.broken = broken
    m.reconcile(90)
    assert (m.condition("MetricsAvailable") or ("",))[0] == "False"
    assert (m.canary["step"], m.canary["weight"]) == (0, 10)


def test_an_outage_past_the_progress_deadline_rolls_the_candidate_back_and_says_why() -> None:
    m = Model(_rollout(f"http://127.0.0.1:{_closed_port()}", progressDeadline="3m"))
    stable, candidate = m.start_canary()
    for seconds in (90, 150, 199):
        m.reconcile(seconds)
        assert m.canary["phase"] == "Progressing"
    m.reconcile(200)  # 3m after the step started at t=20s
    assert m.canary["phase"] == "RolledBack" and m.canary["reason"] == "ProgressDeadlineExceeded"
    assert m.kube.status["stable"]["revision"] == stable
    progressing, degraded = m.condition("Progressing"), m.condition("Degraded")
    assert progressing is not None and progressing[:2] == ("False", "ProgressDeadlineExceeded")
    assert degraded is not None and degraded[:2] == ("True", "ProgressDeadlineExceeded")
    assert "metrics unavailable" in progressing[2] and "Connection refused" in progressing[2]
    assert (m.condition("Ready") or ("",))[0] == "True"
    assert m.events("ProgressDeadlineExceeded")[0][0] == "Warning"
    plan = json.loads(m.kube.objects[("ConfigMap", "shop", "ctr-dnn-router")]["data"]["plan.json"])
    assert {b["revision"]: b["weight"] for b in plan["backends"]} == {stable: 100}
    m.kube.roll_router()
    m.reconcile(210)
    assert not [k for k in m.kube.objects if k[2] == f"ctr-dnn-{candidate}"]


def test_hold_keeps_the_weight_past_the_deadline_and_resumes_when_metrics_return(prometheus: Prometheus) -> None:
    m = Model(_rollout(prometheus.url, progressDeadline="3m", onProgressDeadline="hold"))
    m.start_canary()
    prometheus.broken = (500, b"down", "text/plain")
    for seconds in (90, 150, 200):
        m.reconcile(seconds)
    canary = m.canary
    assert (canary["phase"], canary["weight"], canary["reason"]) == ("Progressing", 10, "ProgressDeadlineExceeded")
    assert (m.condition("Progressing") or ("",))[:2] == ("False", "ProgressDeadlineExceeded")
    assert m.kube.status["phase"] == "Degraded"
    posted = len(m.events("ProgressDeadlineExceeded"))
    m.reconcile(260)
    assert len(m.events("ProgressDeadlineExceeded")) == posted, "a held step does not repeat its events"
    assert m.canary["weight"] == 10
    prometheus.broken = None
    m.reconcile(320)
    assert (m.canary["step"], m.canary["weight"], m.canary.get("reason")) == (1, 50, None)
    assert (m.condition("Progressing") or ("",))[:2] == ("True", "RollingOut")
    assert m.kube.status["phase"] == "Progressing"


def test_metrics_available_is_set_only_where_a_rollout_queries_prometheus(prometheus: Prometheus) -> None:
    immediate = Model({"strategy": "immediate"})
    immediate.reconcile(0)
    assert immediate.condition("MetricsAvailable") is None
    no_analysis = Model({"strategy": "canary", "steps": STEPS})
    no_analysis.start_canary()
    assert no_analysis.condition("MetricsAvailable") is None
    analysed = Model(_rollout(prometheus.url))
    analysed.start_canary()
    analysed.rollout = {"strategy": "canary", "steps": STEPS}  # analysis removed from the spec
    analysed.reconcile(30)
    assert analysed.condition("MetricsAvailable") is None
