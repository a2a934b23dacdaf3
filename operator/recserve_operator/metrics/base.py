"""MetricsProvider protocol, factory, and the collection of analysis inputs through a provider."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from recserve_operator.rollout.analysis import Measurements, ShadowMeasurements
from recserve_operator.rollout.policy import AbTestPolicy, AnalysisPolicy
from recserve_operator.rollout.statistics import Counts

__all__ = [
    "MetricsError",
    "MetricsProvider",
    "TritonSeries",
    "UnknownProviderError",
    "collect_ab_counts",
    "collect_measurements",
    "collect_mirrored",
    "collect_shadow",
    "get_metrics_provider",
    "redact_url",
    "render_query",
    "shadow_queries",
]


class MetricsError(RuntimeError):
    """A metrics backend could not answer (unreachable, bad query, unexpected result shape).

    Its message goes into status conditions and logs: it never carries credentials (see redact_url).
    """


def redact_url(url: str) -> str:
    """The URL without user:password@ (a Prometheus URL may carry basic-auth credentials), for messages."""
    head, sep, tail = url.partition("://")
    if not sep:
        head, tail = "", url
    authority, slash, path = tail.partition("/")
    return f"{head}{sep}{authority.rpartition('@')[2]}{slash}{path}"


class UnknownProviderError(ValueError):
    """Raised for a metrics provider name this operator does not implement."""


@dataclass(frozen=True)
class TritonSeries:
    """Built-in Triton numbers for one revision over one window."""

    requests: float | None
    error_rate: float | None
    p99_ms: float | None
    p99_is_average: bool


class MetricsProvider(Protocol):
    def query_scalar(self, query: str) -> float | None:
        """One number from a query; None when the query matched nothing (or NaN)."""
        ...

    def query_vector(self, query: str) -> list[tuple[dict[str, str], float]]:
        """Every series of an instant-vector query as (labels, value)."""
        ...

    def triton_series(self, revision: str, window_s: float) -> TritonSeries:
        """Request count, error rate and p99 latency of one Triton revision over the window."""
        ...


def _label_value(value: str) -> str:
    # Substituted into PromQL label matchers inside double quotes.
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _range(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def render_query(template: str, *, variant: str, revision: str, window_s: float, elapsed_s: float | None = None) -> str:
    """Fill the placeholders of a user query: {{variant}}, {{revision}}, {{interval}} (the analysis interval)
    and {{elapsed}} (time since the A/B split went live, status.canary.splitStartedAt: counts over the whole
    experiment)."""
    return (
        template.replace("{{variant}}", _label_value(variant))
        .replace("{{revision}}", _label_value(revision))
        .replace("{{interval}}", _range(window_s))
        .replace("{{elapsed}}", _range(window_s if elapsed_s is None else elapsed_s))
    )


def collect_measurements(
    provider: MetricsProvider, policy: AnalysisPolicy, *, variant: str, revision: str
) -> Measurements:
    """Measure the candidate for one analysis interval: built-in Triton numbers plus user checks."""
    series = provider.triton_series(revision, policy.interval_s)
    custom = {
        c.name: provider.query_scalar(
            render_query(c.query, variant=variant, revision=revision, window_s=policy.interval_s)
        )
        for c in policy.checks
    }
    return Measurements(
        requests=series.requests,
        error_rate=series.error_rate,
        p99_ms=series.p99_ms,
        p99_is_average=series.p99_is_average,
        custom=custom,
    )


def _variant_value(
    provider: MetricsProvider, template: str, *, variant: str, revision: str, elapsed_s: float, label: str
) -> float | None:
    query = render_query(template, variant=variant, revision=revision, window_s=elapsed_s, elapsed_s=elapsed_s)
    if "{{variant}}" in template or "{{revision}}" in template:
        return provider.query_scalar(query)
    # A query without placeholders (e.g. `sum by (variant) (...)`) answers for all variants at once.
    values = [v for labels, v in provider.query_vector(query) if labels.get(label) == variant]
    if len(values) > 1:
        raise MetricsError(f"{len(values)} series with {label}={variant!r}; aggregate with sum by ({label}): {query}")
    return values[0] if values else None


def collect_ab_counts(
    provider: MetricsProvider,
    ab: AbTestPolicy,
    *,
    variant: str,
    revision: str,
    elapsed_s: float = 0.0,
    variant_label: str = "variant",
) -> Counts:
    """Clicks and impressions of one variant, from queries with a {{variant}} placeholder or `by (variant)`."""
    clicks, imps = (
        _count(
            _variant_value(provider, q, variant=variant, revision=revision, elapsed_s=elapsed_s, label=variant_label),
            f"{what} of variant {variant!r}",
        )
        for q, what in ((ab.clicks, "clicks"), (ab.impressions, "impressions"))
    )
    return Counts(clicks=clicks, impressions=imps)


def _count(value: float | None, what: str) -> int:
    # The statistics need finite, non-negative counts (round(inf) raises); anything else is a query or backend fault.
    if value is None:
        return 0
    if not math.isfinite(value) or value < 0:
        raise MetricsError(f"{what} is {value}, not a count")
    return round(value)


def shadow_queries(
    model: str, stable: str, candidate: str, window_s: float, namespace: str | None = None
) -> dict[str, str]:
    """PromQL over the shadow comparator's series (recserve_operator.shadow.server) since the phase began."""
    labels = {"model": model, "stable": stable, "candidate": candidate}
    if namespace:
        labels["namespace"] = namespace
    sel = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
    w = _range(window_s)

    def outcome(op: str, value: str) -> str:
        return f'sum(increase(recserve_shadow_requests_total{{{sel},outcome{op}"{value}"}}[{w}]))'

    def mean(metric: str) -> str:
        return f"sum(increase({metric}_sum{{{sel}}}[{w}])) / sum(increase({metric}_count{{{sel}}}[{w}]))"

    return {
        "mirrored": outcome("!=", "dropped"),
        "compared": outcome("=", "compared"),
        "dropped": outcome("=", "dropped"),
        "candidate_errors": outcome("=", "candidate_error"),
        "p99_s": "histogram_quantile(0.99, sum by (le) "
        f"(increase(recserve_shadow_candidate_latency_seconds_bucket{{{sel}}}[{w}])))",
        "overlap": mean("recserve_shadow_topk_overlap"),
        # The comparator exports (tau_b + 1) / 2 (a histogram with negative buckets has no _sum).
        "correlation": f"2 * ({mean('recserve_shadow_rank_concordance')}) - 1",
        "mean_diff": mean("recserve_shadow_score_abs_diff_mean"),
        "max_diff": f"max(max_over_time(recserve_shadow_score_abs_diff_max_seen{{{sel}}}[{w}]))",
    }


def collect_shadow(
    provider: MetricsProvider, *, model: str, stable: str, candidate: str, window_s: float,
    namespace: str | None = None,
) -> ShadowMeasurements:  # fmt: skip
    """The comparator's numbers for one shadow phase (builtin router)."""
    q = shadow_queries(model, stable, candidate, window_s, namespace)
    mirrored = provider.query_scalar(q["mirrored"])
    errors = provider.query_scalar(q["candidate_errors"])
    p99_s = provider.query_scalar(q["p99_s"])
    compared = provider.query_scalar(q["compared"])
    return ShadowMeasurements(
        mirrored=mirrored,
        compared=compared,
        dropped=provider.query_scalar(q["dropped"]),
        error_rate=(errors or 0.0) / mirrored if mirrored else None,
        p99_ms=None if p99_s is None or not math.isfinite(p99_s) else p99_s * 1000.0,
        top_k_overlap=provider.query_scalar(q["overlap"]) if compared else None,
        rank_correlation=provider.query_scalar(q["correlation"]) if compared else None,
        mean_abs_score_diff=provider.query_scalar(q["mean_diff"]) if compared else None,
        max_abs_score_diff=provider.query_scalar(q["max_diff"]) if compared else None,
    )


def collect_mirrored(provider: MetricsProvider, *, candidate: str, window_s: float) -> ShadowMeasurements:
    """Gateway API mirroring: nothing compares answers; the candidate's own Triton series give its load, errors and
    latency under the mirrored share of live traffic."""
    series = provider.triton_series(candidate, window_s)
    return ShadowMeasurements(mirrored=series.requests, compared=series.requests, error_rate=series.error_rate,
                              p99_ms=series.p99_ms)  # fmt: skip


def get_metrics_provider(kind: str, url: str, *, timeout_s: float = 5.0) -> MetricsProvider:
    """Provider by name; only "prometheus" exists today."""
    if kind != "prometheus":
        raise UnknownProviderError(f"unknown metrics provider {kind!r} (known: prometheus)")
    from recserve_operator.metrics.prometheus import PrometheusProvider

    return PrometheusProvider(url, timeout_s=timeout_s)
