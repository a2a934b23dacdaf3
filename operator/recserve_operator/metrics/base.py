"""MetricsProvider protocol, factory, and the collection of analysis inputs through a provider."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from recserve_operator.rollout.analysis import Measurements
from recserve_operator.rollout.policy import AbTestPolicy, AnalysisPolicy
from recserve_operator.rollout.statistics import Counts

__all__ = [
    "MetricsError",
    "MetricsProvider",
    "TritonSeries",
    "UnknownProviderError",
    "collect_ab_counts",
    "collect_measurements",
    "get_metrics_provider",
    "redact_url",
    "render_query",
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


def render_query(
    template: str, *, variant: str, revision: str, window_s: float, elapsed_s: float | None = None
) -> str:
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


def get_metrics_provider(kind: str, url: str, *, timeout_s: float = 5.0) -> MetricsProvider:
    """Provider by name; only "prometheus" exists today."""
    if kind != "prometheus":
        raise UnknownProviderError(f"unknown metrics provider {kind!r} (known: prometheus)")
    from recserve_operator.metrics.prometheus import PrometheusProvider

    return PrometheusProvider(url, timeout_s=timeout_s)
