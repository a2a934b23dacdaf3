"""spec.rollout parsing: defaults, durations and validation errors."""

from __future__ import annotations

import pytest
from recserve_operator.errors import InvalidSpec
from recserve_operator.rollout.policy import (
    ManualAction,
    RolloutPolicy,
    RoutingProvider,
    Strategy,
    parse_duration,
)

from .helpers import AB_SPEC, CANARY_SPEC, spec


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("250ms", 0.25), ("1.5m", 90), (45, 45), ("2d", 172800)],
)
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "-1s", "1y", True, None, "5m3"])
def test_invalid_durations_are_rejected(text: object) -> None:
    with pytest.raises(InvalidSpec):
        parse_duration(text)


def test_canary_spec_parses_into_typed_policy() -> None:
    p = RolloutPolicy.from_spec(CANARY_SPEC)
    assert p.strategy is Strategy.CANARY
    assert [(s.weight, s.pause_s) for s in p.steps] == [(10, 300.0), (50, 600.0)]
    assert p.routing.provider is RoutingProvider.BUILTIN
    assert p.analysis.interval_s == 60.0
    assert p.analysis.max_p99_latency_ms == 25
    assert p.analysis.enabled
    assert p.action is ManualAction.NONE


def test_ab_spec_parses_with_alpha_from_confidence() -> None:
    p = RolloutPolicy.from_spec(AB_SPEC)
    ab = p.analysis.ab_test
    assert ab is not None
    assert ab.split == 50
    assert ab.max_duration_s == 86400
    assert ab.alpha == pytest.approx(0.05)


def test_empty_rollout_defaults_to_immediate_like_the_crd() -> None:
    assert RolloutPolicy.from_spec({}).strategy is Strategy.IMMEDIATE


def test_canary_without_steps_is_rejected() -> None:
    with pytest.raises(InvalidSpec, match="at least one step"):
        RolloutPolicy.from_spec({"strategy": "canary"})


def test_failure_limit_zero_means_the_first_failure_rolls_back() -> None:
    assert RolloutPolicy.from_spec(spec(CANARY_SPEC, analysis__failureLimit=0)).analysis.failure_limit == 1


def test_zero_minimum_detectable_effect_is_rejected() -> None:
    bad = spec(AB_SPEC)
    bad["analysis"]["abTest"]["minDetectableEffect"] = 0
    with pytest.raises(InvalidSpec, match="minDetectableEffect"):
        RolloutPolicy.from_spec(bad)


def test_immediate_needs_nothing_else() -> None:
    p = RolloutPolicy.from_spec({"strategy": "immediate"})
    assert p.strategy is Strategy.IMMEDIATE
    assert not p.analysis.enabled


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"steps": [{"weight": 50, "pause": "1m"}, {"weight": 50, "pause": "1m"}]}, "strictly increasing"),
        ({"steps": [{"weight": 0, "pause": "1m"}]}, r"steps\[0\].weight"),
        ({"steps": [{"weight": 101, "pause": "1m"}]}, r"steps\[0\].weight"),
        ({"steps": [{"weight": 10, "pause": "soon"}]}, r"steps\[0\].pause"),
        ({"strategy": "blueGreen"}, "rollout.strategy"),
        ({"routing__provider": "istio"}, "rollout.routing.provider"),
        ({"routing__provider": "gatewayAPI"}, "parentRef"),
        ({"routing__stickyHeader": "x user"}, "stickyHeader"),
        ({"routing__variantHeader": "x-user-id"}, "must differ"),
        ({"analysis__failureLimit": -1}, "failureLimit"),
        ({"analysis__checks": [{"name": "q", "query": "up"}]}, "min and/or max"),
        ({"analysis__checks": [{"name": "q", "query": "up", "min": 2, "max": 1}]}, "min 2.0 > max 1.0"),
        ({"control__action": "restart"}, "rollout.control.action"),
    ],
)
def test_invalid_specs_name_the_field(patch: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        RolloutPolicy.from_spec(spec(CANARY_SPEC, **patch))


def test_ab_test_without_queries_is_rejected() -> None:
    with pytest.raises(InvalidSpec, match="clicks and impressions"):
        RolloutPolicy.from_spec(spec(AB_SPEC, analysis__abTest={"split": 50}))


def test_gateway_parent_ref_is_parsed() -> None:
    p = RolloutPolicy.from_spec(
        spec(CANARY_SPEC, routing__provider="gatewayAPI", routing__parentRef={"name": "gw", "sectionName": "http"})
    )
    assert p.routing.parent_ref is not None
    assert (p.routing.parent_ref.name, p.routing.parent_ref.section_name) == ("gw", "http")


SLIDING_AB_QUERIES = [
    ("an increase over a fixed hour", "sum by (variant) (increase(recserve_clicks_total[1h]))"),
    ("a rate over the analysis interval", "sum by (variant) (rate(recserve_clicks_total[{{interval}}]))"),
    ("a subquery over a fixed window", "sum by (variant) (max_over_time(recserve_clicks_total[30m:1m]))"),
    ("a fixed window with spaces", 'sum(increase(recserve_clicks_total{variant="{{variant}}"}[ 5m ]))'),
]
CUMULATIVE_AB_QUERIES = [
    ("an increase since the test started", "sum by (variant) (increase(recserve_clicks_total[{{elapsed}}]))"),
    ("a raw cumulative counter", 'sum(recserve_clicks_total{variant="{{variant}}"})'),
    ("a regex matcher with brackets in its value", 'sum(increase(clicks_total{variant=~"[a-z]+"}[{{elapsed}}]))'),
]


@pytest.mark.parametrize(("name", "query"), SLIDING_AB_QUERIES, ids=[n for n, _ in SLIDING_AB_QUERIES])
@pytest.mark.parametrize("key", ["clicks", "impressions"])
def test_an_ab_query_over_a_sliding_window_is_rejected(name: str, query: str, key: str) -> None:
    with pytest.raises(InvalidSpec, match=rf"abTest\.{key}: range .* is a sliding window"):
        RolloutPolicy.from_spec(spec(AB_SPEC, **{f"analysis__abTest__{key}": query}))


@pytest.mark.parametrize(("name", "query"), CUMULATIVE_AB_QUERIES, ids=[n for n, _ in CUMULATIVE_AB_QUERIES])
def test_an_ab_query_counting_since_the_test_started_is_accepted(name: str, query: str) -> None:
    ab = RolloutPolicy.from_spec(spec(AB_SPEC, analysis__abTest__clicks=query)).analysis.ab_test
    assert ab is not None and ab.clicks == query
