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
from recserve_operator.settings import OperatorDefaults

from recserve_cluster import addons, images, tools
from recserve_cluster import nodeconfig as nc
from recserve_cluster.nodes import DEFAULT_NODES, build_node

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


def test_the_queue_time_rule_serves_the_metric_the_hpa_asks_for_per_pod() -> None:
    rule = addons.queue_time_rule()
    assert rule["name"]["as"] == QUEUE_TIME_METRIC
    assert re.match(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])" in query
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>}[1m])" in query
    assert query.count("by (<<.GroupBy>>)") == 2
    assert addons.adapter_config() == {"rules": [rule]}


def test_the_adapter_ships_the_config_and_reads_the_prometheus_service() -> None:
    cm = _by("ConfigMap", "prometheus-adapter")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == addons.adapter_config()
    assert f"--prometheus-url={addons.PROMETHEUS_URL}/" in _args("prometheus-adapter")


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
