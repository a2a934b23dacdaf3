"""Prometheus down or answering garbage, over real HTTP on 127.0.0.1: always a short, secret-free MetricsError."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from recserve_operator.metrics.base import MetricsError, collect_ab_counts, collect_measurements, redact_url
from recserve_operator.metrics.prometheus import PrometheusProvider

from .helpers import AB_SPEC, CANARY_SPEC, policy


class Answer:
    """What the server answers to every request: status, content type, body; `delay_s` before answering."""

    def __init__(self) -> None:
        self.status, self.content_type, self.body, self.delay_s = 200, "application/json", b"{}", 0.0

    def set(self, status: int, body: Any, content_type: str = "application/json") -> None:
        self.status, self.content_type = status, content_type
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture
def server() -> Iterator[tuple[str, Answer]]:
    answer = Answer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(answer.delay_s)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the timeout test's client left
                self.wfile.write(answer.body)

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answer
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vector(result: Any) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@dataclass(frozen=True)
class Garbage:
    name: str
    status: int
    body: Any
    message: str  # part of the MetricsError's message
    content_type: str = "application/json"


GARBAGE = [
    Garbage("an HTML page with HTTP 200", 200, b"<html><body>Sign in</body></html>",
            "answered HTTP 200 with a non-JSON body (text/html", "text/html"),
    Garbage("a plain-text HTTP 500", 500, b"Internal Server Error", "answered HTTP 500 with a non-JSON body",
            "text/plain"),
    Garbage("an HTTP 500 with Prometheus' error object", 500,
            {"status": "error", "errorType": "internal", "error": "boom"},
            "prometheus query failed (500 internal: boom)"),
    Garbage("a 503 claiming success", 503, _vector([]), "prometheus query failed (503"),
    Garbage("a JSON list", 200, [1, 2], "JSON that is not an API response"),
    Garbage("a JSON string", 200, "ok", "JSON that is not an API response"),
    Garbage("success without data", 200, {"status": "success"}, "no data object"),
    Garbage("a string where the vector should be", 200, _vector("oops"), "got resultType 'vector' with a str result"),
    Garbage("a matrix", 200, {"status": "success", "data": {"resultType": "matrix", "result": []}},
            "got resultType 'matrix'"),
    Garbage("a series that is not an object", 200, _vector(["x"]), "expected a series object"),
    Garbage("a series without a value", 200, _vector([{"metric": {}}]),
            "expected a [timestamp, value] sample, got NoneType"),
    Garbage("a value that is not a number", 200, _vector([{"metric": {}, "value": [0, "lots"]}]),
            "sample value 'lots' is not a number"),
    Garbage("a null value", 200, _vector([{"metric": {}, "value": [0, None]}]),
            "expected a numeric sample value, got NoneType"),
    Garbage("a scalar that is not a pair", 200, {"status": "success", "data": {"resultType": "scalar", "result": "5"}},
            "expected a [timestamp, value] sample, got str"),
]  # fmt: skip


@pytest.mark.parametrize("case", GARBAGE, ids=[g.name for g in GARBAGE])
def test_a_garbage_answer_is_a_metrics_error(server: tuple[str, Answer], case: Garbage) -> None:
    url, answer = server
    answer.set(case.status, case.body, case.content_type)
    with pytest.raises(MetricsError) as err:
        PrometheusProvider(url).query_scalar("sum(up)")
    assert case.message in str(err.value)


def test_garbage_series_labels_in_a_vector_query_are_a_metrics_error(server: tuple[str, Answer]) -> None:
    url, answer = server
    answer.set(200, _vector([{"metric": "variant=canary", "value": [0, "1"]}]))
    with pytest.raises(MetricsError, match="label object"):
        PrometheusProvider(url).query_vector("sum by (variant) (x)")


def test_the_analysis_inputs_fail_as_metrics_errors_not_key_or_type_errors(server: tuple[str, Answer]) -> None:
    url, answer = server
    answer.set(200, _vector([{"metric": {}}]))
    with pytest.raises(MetricsError):
        collect_measurements(PrometheusProvider(url), policy().analysis, variant="canary", revision="abc")
    ab = policy(AB_SPEC).analysis.ab_test
    assert ab is not None
    answer.set(200, _vector("oops"))
    with pytest.raises(MetricsError):
        collect_ab_counts(PrometheusProvider(url), ab, variant="canary", revision="abc", elapsed_s=60)


@pytest.mark.parametrize("value", ["+Inf", "-5"])
def test_a_count_that_is_not_a_count_is_a_metrics_error(server: tuple[str, Answer], value: str) -> None:
    url, answer = server
    answer.set(200, _vector([{"metric": {}, "value": [0, value]}]))
    ab = policy(AB_SPEC).analysis.ab_test
    assert ab is not None
    with pytest.raises(MetricsError, match="not a count"):
        collect_ab_counts(PrometheusProvider(url), ab, variant="canary", revision="abc", elapsed_s=60)


def test_an_unreachable_prometheus_gives_the_same_short_message_every_time() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    messages = []
    for _ in range(2):
        with pytest.raises(MetricsError) as err:
            PrometheusProvider(url).query_scalar('sum(increase(nv_inference_request_success{revision="a"}[60s]))')
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"prometheus at {url} unreachable: ")
    assert "Connection refused" in messages[0]
    assert "0x" not in messages[0] and "query=" not in messages[0] and "HTTPConnection" not in messages[0]


def test_a_slow_prometheus_times_out_as_a_metrics_error(server: tuple[str, Answer]) -> None:
    url, answer = server
    answer.delay_s = 1.0
    with pytest.raises(MetricsError, match=r"timed out after 0.2s"):
        PrometheusProvider(url, timeout_s=0.2).query_scalar("sum(up)")


def test_credentials_in_the_prometheus_url_never_reach_a_message(server: tuple[str, Answer]) -> None:
    url, answer = server
    answer.set(502, b"<html>bad gateway</html>", "text/html")
    with_secret = url.replace("http://", "http://admin:s3cret@")
    down = f"http://admin:s3cret@127.0.0.1:{_closed_port()}"
    for target in (with_secret, down):
        with pytest.raises(MetricsError) as err:
            PrometheusProvider(target).query_scalar("sum(up)")
        assert "s3cret" not in str(err.value) and "admin" not in str(err.value), err.value
    with pytest.raises(MetricsError) as err:
        PrometheusProvider("admin:s3cret@prometheus:9090")
    assert "s3cret" not in str(err.value)
    assert redact_url("https://u:p@prom.example:9443/prefix") == "https://prom.example:9443/prefix"
    assert redact_url("http://prom:9090/a@b") == "http://prom:9090/a@b"
    assert redact_url(CANARY_SPEC["analysis"]["prometheus"]) == CANARY_SPEC["analysis"]["prometheus"]


class _Response:
    def __init__(self, body: Any) -> None:
        self.status_code, self._body, self.headers = 200, body, {"Content-Type": "application/json"}

    def json(self) -> Any:
        return self._body


class _Session:
    def __init__(self, body: Any) -> None:
        self.body = body

    def get(self, url: str, params: dict[str, str], timeout: float) -> _Response:
        return _Response(self.body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {"status": st.just("success"), "data": st.fixed_dictionaries(
        {"resultType": st.sampled_from(["vector", "scalar", "matrix", "string"]),
         "result": st.lists(st.fixed_dictionaries({"metric": json_values, "value": json_values}), max_size=2)
         | json_values})},
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(body=json_values | shaped)
def test_any_json_answer_is_a_number_no_data_or_a_metrics_error(body: Any) -> None:
    prometheus = PrometheusProvider("http://prom:9090", session=_Session(body))  # type: ignore[arg-type]
    for query in (prometheus.query_scalar, prometheus.query_vector):
        try:
            result = query("q")
        except MetricsError:
            continue
        assert result is None or isinstance(result, float | list)
