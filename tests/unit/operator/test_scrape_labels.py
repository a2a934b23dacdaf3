"""The labels a scrape really produces, checked against every query: rollout analysis, Grafana, the HPA adapter."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import pytest
from operator_samples import ROOT, example_objects
from prometheus_client import Counter, Histogram
from recserve_operator import telemetry
from recserve_operator.builders.common import Ids, labels
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.metrics.prometheus import REVISION_LABEL, triton_queries
from recserve_operator.names import REVISION_LABEL as POD_REVISION_LABEL
from recserve_operator.names import router_labels
from recserve_operator.spec import parse_spec, revision_of

from recserve_cluster.addons import adapter_config

DASHBOARD = ROOT / "charts" / "recserve" / "dashboards" / "recserve-overview.json"

# Target labels Prometheus Operator's generated scrape config gives every ServiceMonitor target before the
# endpoint's own relabelings (pkg/prometheus/promcfg.go: namespace, service, pod, container, endpoint, job),
# plus Prometheus' own `instance`.
OPERATOR_TARGET_LABELS = frozenset({"namespace", "service", "pod", "container", "endpoint", "job", "instance"})
# Labels Triton itself puts on its series (Triton's metrics docs): per-model counters and summaries carry
# model and version, the summaries a quantile, the GPU gauges the GPU's UUID.
TRITON_LABELS = {
    "nv_inference_request_summary_us": frozenset({"model", "version", "quantile"}),
    "nv_inference_": frozenset({"model", "version"}),
    "nv_gpu_": frozenset({"gpu_uuid"}),
}


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabel(rules: Iterable[Mapping[str, Any]], target: dict[str, str]) -> dict[str, str]:
    """Prometheus' `replace` relabeling (the only action the builders use): regex anchored, default `(.*)`."""
    out = dict(target)
    for rule in rules:
        action = rule.get("action", "replace")
        assert action == "replace", f"unsupported relabel action {action!r} in this check"
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match is not None:
            out[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
    return out


def scrape_target(monitor: Mapping[str, Any], pod_labels: Mapping[str, str], service_labels: Mapping[str, str],
                  *, namespace: str, pod: str, service: str) -> dict[str, str]:
    """The labels of one ServiceMonitor target, as Prometheus Operator's config and Prometheus compute them."""
    meta = {
        "__address__": "10.0.0.7:8002",
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_service_name": service,
        **{f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in pod_labels.items()},
        **{f"__meta_kubernetes_service_label_{_sanitize(k)}": v for k, v in service_labels.items()},
    }
    target = {**meta, "namespace": namespace, "pod": pod, "service": service, "container": "triton",
              "endpoint": "metrics", "job": service, "instance": meta["__address__"]}  # fmt: skip
    spec = monitor["spec"]
    for name in spec.get("targetLabels", []):
        if name in service_labels:
            target[_sanitize(name)] = service_labels[name]
    for name in spec.get("podTargetLabels", []):
        if name in pod_labels:
            target[_sanitize(name)] = pod_labels[name]
    (endpoint,) = spec["endpoints"]
    target = _relabel(endpoint.get("relabelings", []), target)
    return {k: v for k, v in target.items() if not k.startswith("__")}


def _ids() -> tuple[Any, Ids]:
    spec = parse_spec(example_objects()["ctr-dnn/cpu-only.yaml"]["spec"])
    return spec, Ids(name="ctr-dnn-cpu", namespace="shop", uid="uid-1", revision=revision_of(spec))


def _target() -> dict[str, str]:
    _, ids = _ids()
    pod_labels = labels(ids)
    return scrape_target(build_servicemonitor(ids.namespace), pod_labels, pod_labels, namespace=ids.namespace,
                         pod=f"{ids.revision_name}-abc12", service=ids.revision_name)  # fmt: skip


def _scrape_labels() -> frozenset[str]:
    """Every label a Triton series scraped through the ServiceMonitor can carry besides Triton's own."""
    return frozenset(_target()) | OPERATOR_TARGET_LABELS


def _ab_metrics() -> ModuleType:
    path = ROOT / "examples" / "ctr-dnn" / "ab_metrics.py"
    spec = importlib.util.spec_from_file_location("ab_metrics_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AB_METRICS = _ab_metrics()


def _operator_metric_labels() -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for value in vars(telemetry).values():
        if isinstance(value, Counter):
            out[f"{value._name}_total"] = frozenset(value._labelnames)
        elif isinstance(value, Histogram):
            for suffix, extra in (("_bucket", {"le"}), ("_sum", set()), ("_count", set())):
                out[f"{value._name}{suffix}"] = frozenset(value._labelnames) | extra
    return out


def allowed_labels(metric: str) -> frozenset[str]:
    """The labels a series of `metric` really has, or an empty set for a metric nothing here produces."""
    if metric.startswith("nv_"):
        own = next((v for prefix, v in TRITON_LABELS.items() if metric.startswith(prefix)), frozenset())
        return own | _scrape_labels() if own else frozenset()
    if metric in {"recserve_clicks_total", "recserve_impressions_total"}:
        # The application's counters, scraped from its own pods (examples/ctr-dnn/ab_metrics.py).
        return frozenset(AB_METRICS.LABELS) | OPERATOR_TARGET_LABELS
    shadow = _shadow_metric_labels()
    if metric in shadow:
        # The shadow comparator's series, scraped from the router pods (builders.servicemonitor, shadow ServiceMonitor).
        return shadow[metric] | OPERATOR_TARGET_LABELS
    operator = _operator_metric_labels()
    return operator[metric] | OPERATOR_TARGET_LABELS if metric in operator else frozenset()


def _shadow_metric_labels() -> dict[str, frozenset[str]]:
    from recserve_operator.shadow.compare import Ranking
    from recserve_operator.shadow.server import ShadowMetrics

    metrics = ShadowMetrics({"model": "m", "stable": "s", "candidate": "c"})
    answer = Ranking((1,), (0.5,))
    metrics.record(answer, answer, 1)
    return {sample.name: frozenset(sample.labels) for family in metrics.registry.collect()
            for sample in family.samples}  # fmt: skip


# ---------------------------------------------------------------- a small PromQL label reader

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[\[{]")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$")


def _grafana_variables(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Textbox variables (metric names) at their defaults; `$x`/`${x}` inside strings are left alone."""
    return {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "textbox"}


def promql_labels(expr: str, variables: Mapping[str, str] | None = None) -> tuple[set[str], set[str]]:
    """(metric names, label names used in selectors and grouping clauses) of a PromQL expression."""
    for name, value in (variables or {}).items():
        expr = expr.replace(f"${{{name}}}", value)
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\[[^\]]*\]", "[1m]", bare)  # ranges hold Grafana variables such as $__rate_interval
    used: set[str] = set()
    for group in _GROUPING.findall(bare):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    for _, body in _SELECTOR.findall(bare):
        used |= set(_MATCHER.findall(body))
    metrics = {m for m in _METRIC.findall(bare)} - {"by", "without", "on", "ignoring"}
    return metrics, used


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']} [{t.get('refId', i)}]", t)
            for p in _dashboard()["panels"] for i, t in enumerate(p.get("targets", []))]  # fmt: skip


# ---------------------------------------------------------------- tests

TARGET_CASES = [
    ("the pod's revision reaches every series under the label the rollout queries select", REVISION_LABEL, "rev"),
    ("the namespace reaches every series for the adapter rule and the dashboard", "namespace", "shop"),
    ("the pod name reaches every series for the adapter rule", "pod", "pod"),
]


@pytest.mark.parametrize(("name", "label", "expected"), TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_the_servicemonitor_target_carries(name: str, label: str, expected: str) -> None:
    _, ids = _ids()
    want = {"rev": ids.revision, "shop": ids.namespace, "pod": f"{ids.revision_name}-abc12"}[expected]
    assert _target().get(label) == want, _target()


def test_the_servicemonitor_yields_no_label_named_after_the_raw_pod_label() -> None:
    assert _sanitize(POD_REVISION_LABEL) not in _target()
    assert "targetLabels" not in build_servicemonitor(_ids()[1].namespace)["spec"]


def _selects(selector: Mapping[str, Any], labels_: Mapping[str, str]) -> bool:
    """A LabelSelector's matchLabels and matchExpressions (Exists/In/NotIn/DoesNotExist), as the API server reads it."""
    if not dict(selector.get("matchLabels") or {}).items() <= labels_.items():
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"Exists": key in labels_, "DoesNotExist": key not in labels_,
              "In": labels_.get(key) in values, "NotIn": labels_.get(key) not in values}[op]  # fmt: skip
        if not ok:
            return False
    return True


def test_the_namespace_servicemonitor_selects_every_revision_service_of_every_model_and_nothing_else() -> None:
    """One ServiceMonitor per namespace: it must find each model's revision Services (whatever the model's name),
    and neither a front Service (it would scrape each pod twice) nor a router's Service."""
    spec, ids = _ids()
    selector = build_servicemonitor(ids.namespace)["spec"]["selector"]
    for model in ("ctr-dnn-cpu", "two-tower", "m" * 63):
        for revision in ("r1", "0123456789"):
            other = Ids(name=model, namespace=ids.namespace, uid="u", revision=revision)
            service = build_revision_service(spec, other)
            assert _selects(selector, service["metadata"]["labels"]), (model, revision)
            assert {p["name"] for p in service["spec"]["ports"]} >= {"metrics"}
            assert not _selects(selector, build_stable_service(spec, other)["metadata"]["labels"]), model
        assert not _selects(selector, router_labels(model)), model


def _triton_query_labels() -> set[str]:
    used: set[str] = set()
    for query in triton_queries("r1", 60).values():
        used |= promql_labels(query)[1]
    return used


def _dashboard_variable_labels() -> set[str]:
    out = set()
    for v in _dashboard()["templating"]["list"]:
        if v["type"] == "query":
            match = _LABEL_VALUES.match(v["definition"])
            assert match, v["definition"]
            out.add(match.group(2))
    return out


def _adapter_labels() -> set[str]:
    (rule,) = adapter_config()["rules"]
    return set(rule["resources"]["overrides"]) | promql_labels(rule["seriesQuery"])[1]


CONSUMER_CASES = [
    ("the rollout analysis queries select the revision label the ServiceMonitor yields",
     _triton_query_labels, {REVISION_LABEL}),
    ("the dashboard variables read the revision, namespace and model labels the scrape yields",
     _dashboard_variable_labels, {REVISION_LABEL, "namespace", "model"}),
    ("the HPA adapter rule maps the namespace and pod labels the scrape yields", _adapter_labels, {"namespace", "pod"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "used", "must_include"), CONSUMER_CASES, ids=[c[0] for c in CONSUMER_CASES])
def test_consumers_select_labels_the_scrape_produces(name: str, used: Any, must_include: set[str]) -> None:
    labels_used = used()
    assert must_include <= labels_used
    produced = _scrape_labels() | TRITON_LABELS["nv_inference_request_summary_us"]
    assert labels_used <= produced, f"labels no scrape produces: {sorted(labels_used - produced)}"


@pytest.mark.parametrize(("panel", "target"), _targets(), ids=[name for name, _ in _targets()])
def test_every_dashboard_query_groups_and_selects_by_labels_its_series_have(panel: str, target: dict[str, Any]) -> None:
    metrics, used = promql_labels(target["expr"], _grafana_variables(_dashboard()))
    assert metrics, f"{panel}: no metric found in {target['expr']}"
    unknown_metrics = {m for m in metrics if not allowed_labels(m)}
    assert not unknown_metrics, f"{panel}: series nothing here produces: {sorted(unknown_metrics)}"
    allowed = frozenset().union(*(allowed_labels(m) for m in metrics))
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    assert used | legend <= allowed, f"{panel}: labels its series lack: {sorted((used | legend) - allowed)}"


LABEL_READER_CASES = [
    ("a label in a by clause is read", 'sum by (recserve_dev_revision) (rate(nv_inference_count{a="1"}[5m]))',
     {"recserve_dev_revision", "a"}),
    ("a matcher inside a quoted regex value is not a label", 'x{v=~"a=b|c"}', {"v"}),
    ("ignoring and group_left labels are read", "a{} / ignoring(revision) group_left(model) b{}",
     {"revision", "model"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "expr", "expected"), LABEL_READER_CASES, ids=[c[0] for c in LABEL_READER_CASES])
def test_the_label_reader(name: str, expr: str, expected: set[str]) -> None:
    assert promql_labels(expr)[1] == expected


def test_a_dashboard_query_grouping_by_a_label_the_scrape_lacks_is_caught() -> None:
    metrics, used = promql_labels("sum by (recserve_dev_revision) (rate(nv_inference_request_success{}[5m]))")
    assert not used <= frozenset().union(*(allowed_labels(m) for m in metrics))
