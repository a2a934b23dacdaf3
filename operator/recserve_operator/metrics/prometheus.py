"""Prometheus HTTP API client and the built-in Triton queries per revision."""

# Series are told apart by a `revision` label that the namespace's ServiceMonitor (builders/servicemonitor.py) adds from
# the pod label `recserve.dev/revision` (endpoint relabeling: source
# `__meta_kubernetes_pod_label_recserve_dev_revision`, target `revision`).
# Revision rather than variant:  a promotion re-labels no pods, the candidate simply becomes stable,
# so "stable"/"canary" are roles that move while a revision's series stay continuous.
#
# Latency: Triton's counters only give the mean (`nv_inference_request_duration_us` / `..._success`);
# with `--metrics-config summary_latencies=true` (checked against the Triton binary in nvidia-pytriton)
# it also exports `nv_inference_request_summary_us{quantile="0.99"}`, which is used when present. Those
# quantiles cover Triton's own sliding window, not exactly the analysis interval. Without them the mean is
# used as a stand-in for p99 and the analysis says so.

from __future__ import annotations

import copy
import math
import re
from typing import Any

import requests

from recserve_operator.metrics.base import MetricsError, TritonSeries, redact_url
from recserve_operator.names import SERIES_REVISION_LABEL

__all__ = ["REVISION_LABEL", "VARIANT_LABEL", "PrometheusProvider", "triton_queries"]

REVISION_LABEL = SERIES_REVISION_LABEL
VARIANT_LABEL = "variant"
_CONNECTION_PREFIX_RE = re.compile(r"^\w*HTTPS?Connection(Pool)?\([^)]*\):\s*")
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def triton_queries(revision: str, window_s: float, label: str = REVISION_LABEL) -> dict[str, str]:
    sel = f'{label}="{revision}"'
    w = f"{max(1, round(window_s))}s"
    success = f"sum(increase(nv_inference_request_success{{{sel}}}[{w}]))"
    failure = f"sum(increase(nv_inference_request_failure{{{sel}}}[{w}]))"
    return {
        "success": success,
        "failure": failure,
        "p99_us": f'max(nv_inference_request_summary_us{{{sel},quantile="0.99"}})',
        "avg_us": f"sum(increase(nv_inference_request_duration_us{{{sel}}}[{w}])) / {success}",
    }


class PrometheusProvider:
    """Instant queries against the Prometheus HTTP API (`/api/v1/query`).

    Every failure is a MetricsError whose message is short, stable between attempts (no object addresses, no
    encoded query strings: it lands in a status condition) and free of the URL's credentials.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise MetricsError(f"prometheus URL must start with http:// or https://, got {redact_url(url)!r}")
        self.url = url.rstrip("/")
        self.shown = redact_url(self.url)
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.evaluation_time: float | None = None  # None: Prometheus' "now" at each query

    def at(self, when: float) -> PrometheusProvider:
        """The same Prometheus (and connection pool) with every query evaluated at `when` (unix seconds). One
        analysis look's numbers then come from one instant: a scrape landing between two of its queries cannot
        pair new errors with an older request count, or new comparisons with an older mirrored count."""
        pinned = copy.copy(self)
        pinned.evaluation_time = when
        return pinned

    def query(self, promql: str) -> dict[str, Any]:
        """The `data` object of an instant query; raises MetricsError with Prometheus' own message."""
        params = {"query": promql}
        if self.evaluation_time is not None:
            params["time"] = f"{self.evaluation_time:.3f}"
        try:
            resp = self.session.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
        except requests.Timeout as exc:
            raise MetricsError(f"prometheus at {self.shown} timed out after {self.timeout_s:g}s") from exc
        except requests.RequestException as exc:
            raise MetricsError(f"prometheus at {self.shown} unreachable: {_cause(exc)}") from exc
        try:
            body = resp.json()
        except ValueError:
            kind = (getattr(resp, "headers", None) or {}).get("Content-Type", "unknown content type")
            raise MetricsError(f"prometheus at {self.shown} answered HTTP {resp.status_code} with a non-JSON body"
                               f" ({kind})") from None  # fmt: skip
        if not isinstance(body, dict):
            raise MetricsError(f"prometheus at {self.shown} answered HTTP {resp.status_code} with JSON that is not"
                               " an API response")  # fmt: skip
        if resp.status_code != 200 or body.get("status") != "success":
            raise MetricsError(
                f"prometheus query failed ({resp.status_code} {body.get('errorType', '')}: {body.get('error', '')}):"
                f" {promql}"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise MetricsError(f"prometheus returned no data object for {promql}")
        return data

    def query_scalar(self, query: str) -> float | None:
        data = self.query(query)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar":
            value = _sample(result, query)
        elif kind == "vector" and isinstance(result, list):
            if not result:
                return None
            if len(result) > 1:
                labels = [_labels(r, query) for r in result[:3]]
                raise MetricsError(f"expected one series, got {len(result)} (e.g. {labels}); use sum(): {query}")
            value = _series_value(result[0], query)
        else:
            raise MetricsError(f"expected a scalar or instant vector, got {_shape(kind, result)}: {query}")
        return None if math.isnan(value) else value

    def query_vector(self, query: str) -> list[tuple[dict[str, str], float]]:
        data = self.query(query)
        kind, result = data.get("resultType"), data.get("result")
        if kind != "vector" or not isinstance(result, list):
            raise MetricsError(f"expected an instant vector, got {_shape(kind, result)}: {query}")
        out = [(_labels(r, query), _series_value(r, query)) for r in result]
        return [(labels, v) for labels, v in out if not math.isnan(v)]

    def triton_series(self, revision: str, window_s: float) -> TritonSeries:
        q = triton_queries(revision, window_s)
        success = self.query_scalar(q["success"])
        failure = self.query_scalar(q["failure"])
        if success is None and failure is None:
            return TritonSeries(None, None, None, False)
        total = (success or 0.0) + (failure or 0.0)
        error_rate = (failure or 0.0) / total if total > 0 else None
        p99_us = self.query_scalar(q["p99_us"])
        is_average = p99_us is None
        if p99_us is None:
            p99_us = self.query_scalar(q["avg_us"])
        return TritonSeries(total, error_rate, None if p99_us is None else p99_us / 1000.0, is_average)


def _cause(exc: requests.RequestException) -> str:
    """The innermost reason a request failed ("[Errno 111] Connection refused"), without the pool, the URL with
    its encoded query, or object addresses that differ between attempts."""
    reason: object = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", None) or reason  # urllib3's MaxRetryError wraps the real error
    text = _ADDRESS_RE.sub("", _CONNECTION_PREFIX_RE.sub("", str(reason)))
    return text or type(exc).__name__


def _shape(kind: object, result: object) -> str:
    return f"resultType {kind!r} with a {type(result).__name__} result"


def _sample(sample: object, query: str) -> float:
    """The value of a `[timestamp, "value"]` pair."""
    if not isinstance(sample, list | tuple) or len(sample) != 2:
        raise MetricsError(f"expected a [timestamp, value] sample, got {type(sample).__name__}: {query}")
    value = sample[1]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MetricsError(f"expected a numeric sample value, got {type(value).__name__}: {query}")
    try:
        return float(value)
    except ValueError:
        raise MetricsError(f"sample value {str(value)[:40]!r} is not a number: {query}") from None


def _series_value(series: object, query: str) -> float:
    if not isinstance(series, dict):
        raise MetricsError(f"expected a series object, got {type(series).__name__}: {query}")
    return _sample(series.get("value"), query)


def _labels(series: object, query: str) -> dict[str, str]:
    metric = series.get("metric", {}) if isinstance(series, dict) else None
    if not isinstance(metric, dict):
        raise MetricsError(f"expected a series with a label object, got {type(metric).__name__}: {query}")
    return {str(k): str(v) for k, v in metric.items()}
