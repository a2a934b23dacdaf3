"""The add-ons' pure builders: identities, placement, hardening, the adapter rule and the image recipes."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from recserve_operator.builders.hpa import QUEUE_TIME_METRIC
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.names import SERIES_REVISION_LABEL
from recserve_operator.settings import OperatorDefaults

from recserve_cluster import addons, images, tools
from recserve_cluster import nodeconfig as nc
from recserve_cluster.nodes import DEFAULT_NODES, build_node

ROOT = Path(__file__).resolve().parents[3]
CERT = addons.ServingCert("-----CA-----\n", "-----CERT-----\n", "-----KEY-----\n")
OBJECTS = addons.all_objects(CERT, CERT)


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in OBJECTS if o["kind"] == "Deployment"]


def _by(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name)


def _args(deployment: str) -> list[str]:
    return list(_by("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]["args"])


def test_every_object_has_a_unique_identity_and_the_namespace_comes_first() -> None:
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in OBJECTS]
    assert len(keys) == len(set(keys))
    assert OBJECTS[0]["kind"] == "Namespace" and OBJECTS[0]["metadata"]["name"] == addons.NAMESPACE


def test_namespaced_objects_live_only_in_the_namespaces_the_addons_own() -> None:
    namespaces = {o["metadata"].get("namespace") for o in OBJECTS} - {None}
    assert namespaces == {addons.NAMESPACE, "kube-system"}
    in_kube_system = {o["metadata"]["name"] for o in OBJECTS if o["metadata"].get("namespace") == "kube-system"}
    assert all(n.startswith(("metrics-server", "prometheus-adapter-auth-reader")) for n in in_kube_system)


def test_the_builders_are_deterministic() -> None:
    assert addons.all_objects(CERT, CERT) == OBJECTS
    assert yaml.safe_dump_all(OBJECTS) == yaml.safe_dump_all(addons.all_objects(CERT, CERT))


@pytest.mark.parametrize("deployment", ["prometheus-operator", "prometheus-adapter", "metrics-server"])
def test_each_addon_pod_runs_on_the_real_node_as_nobody_with_a_read_only_root(deployment: str) -> None:
    spec = _by("Deployment", deployment)["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": nc.NODE_NAME}
    assert nc.real_pod_placement()["tolerations"][0] in spec["tolerations"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == addons.NONROOT
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        assert c["imagePullPolicy"] == "IfNotPresent"
        assert "memory" in c["resources"]["limits"]


def test_deployments_select_their_own_pod_labels() -> None:
    for name, _ in _pod_specs():
        d = _by("Deployment", name)
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        # The selector is the stable part of the labels (no version: an upgrade must not orphan pods).
        assert "app.kubernetes.io/version" not in selector


def test_the_prometheus_resource_scrapes_every_namespace_with_the_built_server() -> None:
    spec = _by("Prometheus", addons.PROMETHEUS_NAME)["spec"]
    assert spec["image"] == images.normalize(addons.PROMETHEUS_IMAGE)
    assert spec["version"] == addons.PROMETHEUS_VERSION == tools.PROMETHEUS_VERSION
    assert images.normalize(addons.PROMETHEUS_IMAGE).endswith(f":{tools.PROMETHEUS_VERSION}")
    for key in ("serviceMonitorSelector", "serviceMonitorNamespaceSelector", "podMonitorSelector",
                "podMonitorNamespaceSelector"):
        assert spec[key] == {}
    assert spec["scrapeInterval"] == "5s"
    assert spec["storage"] == {"emptyDir": {"sizeLimit": "2Gi"}}
    assert spec["nodeSelector"] == nc.real_pod_placement()["nodeSelector"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_the_config_reloader_polls_often_enough_for_tests() -> None:
    spec = _by("Prometheus", addons.PROMETHEUS_NAME)["spec"]
    assert spec["containers"] == [{"name": "config-reloader", "args": addons.reloader_args()}]
    assert "--watch-interval=10s" in addons.reloader_args()
    assert "--reload-url=http://localhost:9090/-/reload" in addons.reloader_args()


def test_the_prometheus_service_is_where_the_recserve_operator_looks_by_default() -> None:
    svc = _by("Service", addons.PROMETHEUS_SERVICE)
    assert svc["metadata"]["namespace"] == addons.NAMESPACE
    assert svc["spec"]["ports"][0]["port"] == addons.PROMETHEUS_PORT
    assert OperatorDefaults().prometheus_url == addons.PROMETHEUS_URL
    assert svc["spec"]["selector"]["operator.prometheus.io/name"] == addons.PROMETHEUS_NAME


def test_the_operator_starts_the_config_reloader_image_it_is_given() -> None:
    args = _args("prometheus-operator")
    assert f"--prometheus-config-reloader={images.normalize(addons.RELOADER_IMAGE)}" in args
    assert not any(a.startswith("--kubelet-service") for a in args)


def test_the_adapter_config_is_the_charts_rule_file() -> None:
    assert addons.ADAPTER_RULES_FILE == ROOT / "charts" / "recserve" / "files" / "prometheus-adapter-rules.yaml"
    config = yaml.safe_load(addons.ADAPTER_RULES_FILE.read_text())
    assert addons.adapter_config() == config
    # Custom metrics only: metrics-server serves resource metrics, nothing here serves external ones.
    assert list(config) == ["rules"]
    assert [set(r) for r in config["rules"]] == [{"seriesQuery", "resources", "name", "metricsQuery"}]


def test_the_queue_time_rule_serves_the_metric_the_hpa_asks_for_per_pod() -> None:
    rule = addons.queue_time_rule()
    assert rule["name"]["as"] == QUEUE_TIME_METRIC
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    # The adapter serves a pods metric only for a rule that maps both the namespace and the pod label.
    assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
    query = " ".join(rule["metricsQuery"].split())
    # Average queue time per request over a short window: the two counters' rates, summed per pod, divided.
    queued = 'sum by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>,revision!=""}[1m]))'
    served = 'sum by (<<.GroupBy>>) (rate(nv_inference_request_success{<<.LabelMatchers>>,revision!=""}[1m]))'
    assert query == f"{queued} / clamp_min({served}, 1e-9)"
    # Only fields of the adapter's query template (prometheus-adapter docs/config.md, "Querying").
    assert set(re.findall(r"<<\s*(\S+?)\s*>>", rule["metricsQuery"])) <= {".Series", ".LabelMatchers", ".GroupBy"}


def _selectors(promql: str) -> list[tuple[str, str, str]]:
    """(metric, label, operator) of every label matcher in a PromQL expression with `{...}` selectors."""
    out = []
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", promql):
        for label, op in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"[^"]*"', body):
            out.append((metric, label, op))
    return out


def _servicemonitor_series_labels() -> set[str]:
    """The labels a Triton series scraped through the operator's ServiceMonitor carries.

    Prometheus Operator's generated scrape config sets namespace, service, pod, container, endpoint and job on
    every ServiceMonitor target, Prometheus adds instance, the endpoint's relabelings add their target labels,
    and Triton's per-model counters carry model and version.
    """
    monitor = build_servicemonitor("shop")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert "targetLabels" not in monitor["spec"] and "podTargetLabels" not in monitor["spec"]
    relabeled = {r["targetLabel"] for r in endpoint["relabelings"]}
    return {"namespace", "service", "pod", "container", "endpoint", "job", "instance", "model", "version"} | relabeled


def test_the_rule_selects_only_labels_the_servicemonitor_yields() -> None:
    rule = addons.queue_time_rule()
    # What the adapter substitutes for a request about two pods of one namespace.
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="shop",pod=~"ctr-r1-a|ctr-r1-b"')
    query = query.replace("<<.GroupBy>>", "pod")
    series, queried = _selectors(rule["seriesQuery"]), _selectors(query)
    assert {m for m, _, _ in series} == {"nv_inference_queue_duration_us"}
    assert {m for m, _, _ in queried} == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    produced = _servicemonitor_series_labels()
    used = {label for _, label, _ in series + queried} | set(rule["resources"]["overrides"])
    assert used <= produced, f"labels the ServiceMonitor never yields: {sorted(used - produced)}"
    # Only series the RecServe ServiceMonitor scraped (the revision it relabels), per namespace and pod.
    assert {SERIES_REVISION_LABEL, "namespace", "pod"} <= {label for _, label, _ in series}
    assert SERIES_REVISION_LABEL in {label for _, label, _ in queried}


def test_the_adapter_mounts_the_chart_file_verbatim_and_reads_the_prometheus_service() -> None:
    cm = _by("ConfigMap", "prometheus-adapter")
    assert cm["data"]["config.yaml"] == addons.ADAPTER_RULES_FILE.read_text()
    assert f"--prometheus-url={addons.PROMETHEUS_URL}/" in _args("prometheus-adapter")
    assert "--config=/etc/adapter/config.yaml" in _args("prometheus-adapter")


@pytest.mark.parametrize(("apiservice", "service", "namespace"), [
    (addons.CUSTOM_METRICS_APISERVICE, "prometheus-adapter", addons.NAMESPACE),
    (addons.RESOURCE_METRICS_APISERVICE, "metrics-server", "kube-system"),
])
def test_each_apiservice_trusts_the_ca_of_its_servers_certificate(
    apiservice: str, service: str, namespace: str
) -> None:
    api = _by("APIService", apiservice)["spec"]
    assert api["service"] == {"name": service, "namespace": namespace, "port": 443}
    assert "insecureSkipTLSVerify" not in api
    assert base64.b64decode(api["caBundle"]).decode() == CERT.ca_pem
    secret = _by("Secret", f"{service}-tls")
    assert secret["metadata"]["namespace"] == namespace
    assert base64.b64decode(secret["data"]["tls.crt"]).decode() == CERT.cert_pem
    assert secret["metadata"]["annotations"][addons.CERT_NAMES_ANNOTATION].split(",") == addons.service_dns_names(
        service, namespace)
    assert f"{service}.{namespace}.svc" in addons.service_dns_names(service, namespace)


def test_a_new_certificate_rolls_the_pods_that_serve_it() -> None:
    other = addons.ServingCert(CERT.ca_pem, "-----OTHER-----\n", CERT.key_pem)
    for build in (addons.adapter_objects, addons.metrics_server_objects):
        before = next(o for o in build(CERT) if o["kind"] == "Deployment")["spec"]["template"]["metadata"]
        after = next(o for o in build(other) if o["kind"] == "Deployment")["spec"]["template"]["metadata"]
        assert before["annotations"] != after["annotations"]


def test_metrics_server_reads_only_real_kubelets_by_internal_ip() -> None:
    args = _args("metrics-server")
    assert "--kubelet-preferred-address-types=InternalIP" in args
    assert "--kubelet-insecure-tls" in args
    # The selector excludes exactly the simulated nodes.
    key, _, value = addons.METRICS_SERVER_NODE_SELECTOR.partition("!=")
    assert all(build_node(n)["metadata"]["labels"][key] == value for n in DEFAULT_NODES)
    assert f"--node-selector={addons.METRICS_SERVER_NODE_SELECTOR}" in args


def test_uninstall_references_name_each_object_with_its_group() -> None:
    assert addons._ref(_by("Prometheus", "k8s")) == ["prometheus.monitoring.coreos.com/k8s", "-n", "monitoring"]
    assert addons._ref(_by("APIService", addons.CUSTOM_METRICS_APISERVICE)) == [
        "apiservice.apiregistration.k8s.io/v1beta1.custom.metrics.k8s.io"]
    sa = addons._ref(_by("ServiceAccount", "metrics-server"))
    assert sa == ["serviceaccount/metrics-server", "-n", "kube-system"]


def test_images_put_each_binary_where_its_upstream_image_does() -> None:
    bins = {t.name: Path(f"/bin-cache/{t.name}") for t in tools.ADDON_TOOLS}
    imgs = {i.name: i for i in addons.addon_images(bins)}
    expected = {"prometheus-operator": "/bin/operator",
                "prometheus-config-reloader": "/bin/prometheus-config-reloader",
                "prometheus-adapter": "/adapter", "metrics-server": "/metrics-server", "prometheus": "/bin/prometheus"}
    assert set(imgs) == set(expected)
    for name, path in expected.items():
        recipe = imgs[name].recipe
        assert isinstance(recipe, images.Scratch)
        assert recipe.files == ((bins[name], path),)
        assert recipe.config.entrypoint == (path,)
        assert recipe.config.user == "65534:65534"


def test_pods_name_exactly_the_images_install_builds() -> None:
    bins = {t.name: Path(f"/bin-cache/{t.name}") for t in tools.ADDON_TOOLS}
    built = {i.ref for i in addons.addon_images(bins)}
    named = {c["image"] for _, spec in _pod_specs() for c in spec["containers"]}
    named.add(_by("Prometheus", "k8s")["spec"]["image"])
    assert named | {images.normalize(addons.RELOADER_IMAGE)} == built


def test_every_addon_tool_has_a_builder_keyed_by_its_version() -> None:
    for t in tools.ADDON_TOOLS:
        assert t.name in tools.BUILDERS
        assert tools._cached_path(t).parent.name.endswith(t.version)
    assert not set(tools.ADDON_TOOLS) & set(tools.TOOLS)


def test_the_crd_set_is_the_operators_full_one() -> None:
    assert len(addons.CRD_KINDS) == 10
    assert {"servicemonitors", "podmonitors", "prometheuses"} <= set(addons.CRD_KINDS)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_new_serving_certificate_covers_the_service_names_and_is_signed_by_its_ca(tmp_path: Path) -> None:
    import subprocess

    names = addons.service_dns_names("metrics-server", "kube-system")
    cert = addons.new_serving_cert(names, days=2)
    (tmp_path / "ca.crt").write_text(cert.ca_pem)
    (tmp_path / "tls.crt").write_text(cert.cert_pem)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True).stdout
    assert all(f"DNS:{n}" in san for n in names)
    assert addons._valid_for(cert.cert_pem, 86400)
    assert not addons._valid_for(cert.cert_pem, 3 * 86400)
    assert "PRIVATE KEY" in cert.key_pem


@pytest.mark.parametrize(("prometheus", "module"), [("v3.5.1", "v0.305.1"), ("v3.0.0", "v0.300.0"),
                                                    ("v2.53.2", "v0.53.2")])
def test_prometheus_releases_map_to_their_go_module_versions(prometheus: str, module: str) -> None:
    assert tools.prometheus_module_version(prometheus) == module


def test_a_wrapper_keeps_published_replaces_and_drops_local_ones() -> None:
    gomod = """module m

replace (
\tgithub.com/a/b/pkg => ./pkg
\tgithub.com/c/d v1.8.0 => github.com/c/d v1.7.0 // pinned
)

replace github.com/e/f v1.0.0 => github.com/e/f v1.0.1
replace github.com/g/h => ../h
"""
    assert tools.published_replaces(gomod) == ["replace github.com/c/d v1.8.0 => github.com/c/d v1.7.0",
                                               "replace github.com/e/f v1.0.0 => github.com/e/f v1.0.1"]
