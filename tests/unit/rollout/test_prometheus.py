"""Prometheus client and metric collection, against a fake HTTP session (no network)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from recserve_operator.metrics.base import (
    MetricsError,
    UnknownProviderError,
    collect_ab_counts,
    collect_measurements,
    get_metrics_provider,
    render_query,
)
from recserve_operator.metrics.prometheus import PrometheusProvider, triton_queries
from recserve_operator.rollout.analysis import Verdict, evaluate

from .helpers import AB_SPEC, CANARY_SPEC, policy


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        self._body = body

    def json(self) -> Any:
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


class FakeSession:
    """Answers queries from a dict of PromQL -> result list (vector) or raises a given exception."""

    def __init__(self, answers: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        self.answers = answers or {}
        self.error = error
        self.queries: list[str] = []

    def get(self, url: str, params: dict[str, str], timeout: float) -> FakeResponse:
        assert url.endswith("/api/v1/query") and timeout > 0
        if self.error is not None:
            raise self.error
        q = params["query"]
        self.queries.append(q)
        if q not in self.answers:
            return FakeResponse(200, {"status": "success", "data": {"resultType": "vector", "result": []}})
        value = self.answers[q]
        if isinstance(value, FakeResponse):
            return value
        result = [{"metric": {}, "value": [0, str(v)]} for v in (value if isinstance(value, list) else [value])]
        return FakeResponse(200, {"status": "success", "data": {"resultType": "vector", "result": result}})


def provider(session: FakeSession) -> PrometheusProvider:
    return PrometheusProvider("http://prom:9090/", session=session)  # type: ignore[arg-type]


def test_scalar_and_vector_results() -> None:
    s = FakeSession({"one": 3.5})
    assert provider(s).query_scalar("one") == 3.5
    assert provider(s).query_scalar("none") is None


def test_scalar_result_type() -> None:
    s = FakeSession({"q": FakeResponse(200, {"status": "success", "data": {"resultType": "scalar",
                                                                            "result": [0, "2"]}})})  # fmt: skip
    assert provider(s).query_scalar("q") == 2.0


def test_nan_is_no_data() -> None:
    assert provider(FakeSession({"q": "NaN"})).query_scalar("q") is None


def test_several_series_is_a_clear_error() -> None:
    with pytest.raises(MetricsError, match="expected one series, got 2"):
        provider(FakeSession({"q": [1, 2]})).query_scalar("q")


def test_prometheus_errors_are_reported_with_their_message() -> None:
    bad = FakeResponse(400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"})
    with pytest.raises(MetricsError, match="bad_data: parse error at char 3"):
        provider(FakeSession({"q": bad})).query_scalar("q")


def test_timeouts_and_connection_errors_are_metrics_errors() -> None:
    with pytest.raises(MetricsError, match="timed out"):
        provider(FakeSession(error=requests.Timeout())).query_scalar("q")
    with pytest.raises(MetricsError, match="unreachable"):
        provider(FakeSession(error=requests.ConnectionError("refused"))).query_scalar("q")


def test_non_json_body_is_a_metrics_error() -> None:
    with pytest.raises(MetricsError, match="non-JSON"):
        provider(FakeSession({"q": FakeResponse(502, ValueError("html"))})).query_scalar("q")


def test_bad_url_is_rejected() -> None:
    with pytest.raises(MetricsError):
        PrometheusProvider("prom:9090")


def test_factory() -> None:
    assert isinstance(get_metrics_provider("prometheus", "http://p:9090"), PrometheusProvider)
    with pytest.raises(UnknownProviderError):
        get_metrics_provider("datadog", "http://x")


def test_triton_series_uses_the_p99_summary_when_present() -> None:
    q = triton_queries("r2", 60)
    s = FakeSession({q["success"]: 990, q["failure"]: 10, q["p99_us"]: 12000})
    series = provider(s).triton_series("r2", 60)
    assert (series.requests, series.error_rate, series.p99_ms, series.p99_is_average) == (1000, 0.01, 12.0, False)
    assert 'revision="r2"' in q["success"] and "[60s]" in q["success"]


def test_triton_series_falls_back_to_mean_latency_without_summaries() -> None:
    q = triton_queries("r2", 60)
    s = FakeSession({q["success"]: 1000, q["failure"]: 0, q["avg_us"]: 8000})
    series = provider(s).triton_series("r2", 60)
    assert (series.p99_ms, series.p99_is_average) == (8.0, True)


def test_no_triton_series_means_no_requests() -> None:
    series = provider(FakeSession()).triton_series("r2", 60)
    assert series.requests is None


def test_collect_measurements_feeds_the_analysis() -> None:
    checks = [{"name": "drift", "query": 'max(drift{revision="{{revision}}"}[{{interval}}])', "max": 0.5}]
    p = policy(CANARY_SPEC, analysis__checks=checks).analysis
    q = triton_queries("r2", 60)
    s = FakeSession({q["success"]: 980, q["failure"]: 20, q["p99_us"]: 9000, 'max(drift{revision="r2"}[60s])': 0.1})
    m = collect_measurements(provider(s), p, variant="canary", revision="r2")
    r = evaluate(p, m)
    assert r.verdict is Verdict.FAIL
    assert [c.name for c in r.failed_checks] == ["errorRate"]


def test_collect_ab_counts_renders_the_variant() -> None:
    ab = policy(AB_SPEC).analysis.ab_test
    assert ab is not None
    s = FakeSession({'sum(clicks_total{variant="canary"})': 56, 'sum(impressions_total{variant="canary"})': 1000})
    c = collect_ab_counts(provider(s), ab, variant="canary", revision="r2")
    assert (c.clicks, c.impressions) == (56, 1000)


def test_render_query_escapes_label_values() -> None:
    assert render_query('x{v="{{variant}}"}', variant='a"b', revision="r", window_s=30) == 'x{v="a\\"b"}'


def test_collect_ab_counts_picks_the_variant_from_a_by_variant_query() -> None:
    """The examples' form: `sum by (variant) (increase(...[{{elapsed}}]))`, one query for both variants."""
    ab = policy(AB_SPEC, analysis__abTest={
        "clicks": "sum by (variant) (increase(recserve_clicks_total[{{elapsed}}]))",
        "impressions": "sum by (variant) (increase(recserve_impressions_total[{{elapsed}}]))",
    }).analysis.ab_test  # fmt: skip
    assert ab is not None
    clicks = FakeResponse(200, {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"variant": "stable"}, "value": [0, "50"]}, {"metric": {"variant": "canary"}, "value": [0, "61"]},
    ]}})  # fmt: skip
    imps = FakeResponse(200, {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"variant": "stable"}, "value": [0, "1000"]}, {"metric": {"variant": "canary"}, "value": [0, "990"]},
    ]}})  # fmt: skip
    s = FakeSession({"sum by (variant) (increase(recserve_clicks_total[3600s]))": clicks,
                     "sum by (variant) (increase(recserve_impressions_total[3600s]))": imps})  # fmt: skip
    c = collect_ab_counts(provider(s), ab, variant="canary", revision="r2", elapsed_s=3600)
    assert (c.clicks, c.impressions) == (61, 990)


def test_default_prometheus_applies_only_when_analysis_is_configured() -> None:
    from recserve_operator.rollout.policy import RolloutPolicy

    with_analysis = RolloutPolicy.from_spec({**CANARY_SPEC, "analysis": {"interval": "1m"}}, "http://prom:9090")
    empty = RolloutPolicy.from_spec({**CANARY_SPEC, "analysis": {}}, "http://prom:9090")
    without = RolloutPolicy.from_spec({k: v for k, v in CANARY_SPEC.items() if k != "analysis"}, "http://prom:9090")
    assert with_analysis.analysis.enabled and with_analysis.analysis.prometheus == "http://prom:9090"
    assert empty.analysis.prometheus == "http://prom:9090"  # a section, even empty, is analysed
    assert not without.analysis.enabled


class _ParamsSession:
    def __init__(self) -> None:
        self.params: list[dict[str, str]] = []

    def get(self, url: str, params: dict[str, str], timeout: float) -> FakeResponse:
        self.params.append(dict(params))
        return FakeResponse(200, {"status": "success", "data": {"resultType": "vector", "result": []}})


def test_a_pinned_provider_evaluates_every_query_at_one_instant_and_leaves_the_original_live() -> None:
    session = _ParamsSession()
    live = PrometheusProvider("http://prom:9090", session=session)  # type: ignore[arg-type]
    pinned = live.at(1796700000.25)
    pinned.query_scalar("sum(a)")
    pinned.query_vector("sum by (variant) (b)")
    live.query_scalar("sum(c)")
    assert session.params == [{"query": "sum(a)", "time": "1796700000.250"},
                              {"query": "sum by (variant) (b)", "time": "1796700000.250"},
                              {"query": "sum(c)"}]  # fmt: skip
    assert pinned.session is live.session and live.evaluation_time is None
