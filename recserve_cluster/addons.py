"""In-cluster add-ons on the real node: Prometheus Operator with a Prometheus, prometheus-adapter, metrics-server.

Each is the real component built here, nothing is pulled: the Go programs, the Prometheus server included,
from their modules (`tools.ADDON_TOOLS`, CGO_ENABLED=0), each alone in a scratch image tagged as its upstream
image. The `*_objects` builders are pure (data in, manifests out, no clocks; the adapter's rules are read from
the chart's files/prometheus-adapter-rules.yaml); `install` builds and loads the images, applies everything
server-side and waits until each add-on serves; `uninstall` deletes what `install` applied (the CRDs stay:
deleting them would delete every ServiceMonitor in the cluster).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from recserve_operator.builders.hpa import QUEUE_TIME_METRIC

from . import images, tools
from . import nodeconfig as nc
from .errors import ClusterError
from .tools import _log
from .waiting import wait_for

if TYPE_CHECKING:
    from .cluster import Cluster

Obj = dict[str, Any]

NAMESPACE = "monitoring"
METRICS_SERVER_NAMESPACE = "kube-system"
PART_OF = "recserve-addons"
NONROOT = 65534  # `nobody`, the user of the upstream images of all five programs

# Built from its Go module, not Debian's 2.42 package, which lacks Kubernetes service discovery (see
# tools.PROMETHEUS_VERSION). Named in the Prometheus resource so the operator generates flags for it.
PROMETHEUS_VERSION = tools.PROMETHEUS_VERSION
PROMETHEUS_IMAGE = f"quay.io/prometheus/prometheus:{PROMETHEUS_VERSION}"
OPERATOR_IMAGE = f"quay.io/prometheus-operator/prometheus-operator:{tools.PROMETHEUS_OPERATOR_VERSION}"
RELOADER_IMAGE = f"quay.io/prometheus-operator/prometheus-config-reloader:{tools.PROMETHEUS_OPERATOR_VERSION}"
ADAPTER_IMAGE = f"registry.k8s.io/prometheus-adapter/prometheus-adapter:{tools.PROMETHEUS_ADAPTER_VERSION}"
METRICS_SERVER_IMAGE = f"registry.k8s.io/metrics-server/metrics-server:{tools.METRICS_SERVER_VERSION}"

PROMETHEUS_NAME = "k8s"
PROMETHEUS_SERVICE = "prometheus"
PROMETHEUS_PORT = 9090
# The operator's default RECSERVE_PROMETHEUS_URL (recserve_operator.settings) points here.
PROMETHEUS_URL = f"http://{PROMETHEUS_SERVICE}.{NAMESPACE}:{PROMETHEUS_PORT}"
# Short enough that a test sees a new target's series within seconds; ServiceMonitor endpoints that set
# their own interval (the operator's Triton ServiceMonitor: 15s) keep it.
SCRAPE_INTERVAL = "5s"
ADAPTER_RELIST_INTERVAL = "15s"
# The adapter's rules ship with the chart (users' adapters read the same file); this install mounts it as is.
ADAPTER_RULES_FILE = Path(__file__).resolve().parents[1] / "charts/recserve/files/prometheus-adapter-rules.yaml"
METRICS_SERVER_RESOLUTION = "15s"
# The config reloader re-reads the generated config every 3 minutes by default: the kubelet swaps a Secret
# volume's `..data` symlink, which its file watch does not see. Polling at this interval instead, a new
# ServiceMonitor is scraped about a kubelet volume sync (up to ~1 min) after it is applied.
RELOADER_WATCH_INTERVAL = "10s"
# kwok's simulated nodes (recserve_cluster.nodes.build_node labels them type=kwok) have no kubelet and no
# InternalIP: metrics-server watches only the other nodes, so it neither tries nor reports them.
METRICS_SERVER_NODE_SELECTOR = "type!=kwok"

OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"
READ = ("get", "list", "watch")
CUSTOM_METRICS_APISERVICE = "v1beta1.custom.metrics.k8s.io"
RESOURCE_METRICS_APISERVICE = "v1beta1.metrics.k8s.io"
CHECKSUM_ANNOTATION = "recserve.dev/config-checksum"
CERT_NAMES_ANNOTATION = "recserve.dev/cert-names"
# Every CRD of the operator; ServiceMonitor and PodMonitor are also applied by cluster.prepare (same manager).
CRD_KINDS = ("alertmanagerconfigs", "alertmanagers", "podmonitors", "probes", "prometheusagents", "prometheuses",
             "prometheusrules", "scrapeconfigs", "servicemonitors", "thanosrulers")
_CERT_DAYS = 3650
_CERT_RENEW_BEFORE_S = 30 * 86400


@dataclass(frozen=True)
class ServingCert:
    """A private CA and a serving certificate it signed (PEM), for one aggregated API server's Service."""

    ca_pem: str
    cert_pem: str
    key_pem: str


# ---------------------------------------------------------------------------------------- shared pieces


def _labels(name: str, component: str, version: str) -> dict[str, str]:
    return {**_selector(name, component), "app.kubernetes.io/version": version.lstrip("v"),
            "app.kubernetes.io/part-of": PART_OF}


def _selector(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}


def _meta(name: str, labels: Mapping[str, str], namespace: str | None = None) -> Obj:
    meta: Obj = {"name": name, "labels": dict(labels)}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def _pod_security(fs_group: bool = False) -> Obj:
    sec: Obj = {"runAsNonRoot": True, "runAsUser": NONROOT, "runAsGroup": NONROOT,
                "seccompProfile": {"type": "RuntimeDefault"}}
    if fs_group:
        sec["fsGroup"] = NONROOT
    return sec


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _service_account(name: str, namespace: str, labels: Mapping[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, labels, namespace)}


def _cluster_role(name: str, labels: Mapping[str, str], rules: list[Obj]) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(name, labels),
            "rules": rules}


def _binding(name: str, labels: Mapping[str, str], role: str, sa: str, sa_namespace: str, *,
             role_kind: str = "ClusterRole", namespace: str | None = None) -> Obj:
    """A ClusterRoleBinding, or a RoleBinding in `namespace`, of one ServiceAccount to one role."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
        "metadata": _meta(name, labels, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}],
    }


def _rule(groups: Sequence[str], resources: Sequence[str], verbs: Sequence[str]) -> Obj:
    return {"apiGroups": list(groups), "resources": list(resources), "verbs": list(verbs)}


def _deployment(name: str, namespace: str, labels: Mapping[str, str], selector: Mapping[str, str], pod: Obj, *,
                annotations: Mapping[str, str] | None = None) -> Obj:
    template_meta: Obj = {"labels": dict(labels)}
    if annotations:
        template_meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, labels, namespace),
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(selector)},
                 "template": {"metadata": template_meta, "spec": {**nc.real_pod_placement(), **pod}}},
    }


def _service(name: str, namespace: str, labels: Mapping[str, str], selector: Mapping[str, str],
             ports: list[Obj]) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, labels, namespace),
            "spec": {"selector": dict(selector), "ports": ports}}


def _https_probe(path: str, port: str, period: int = 5) -> Obj:
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTPS"}, "periodSeconds": period,
            "failureThreshold": 5}


def _tls_secret(name: str, namespace: str, labels: Mapping[str, str], cert: ServingCert, dns: Sequence[str]) -> Obj:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    meta = _meta(name, labels, namespace)
    meta["annotations"] = {CERT_NAMES_ANNOTATION: ",".join(dns)}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": meta,
            "data": {"ca.crt": b64(cert.ca_pem), "tls.crt": b64(cert.cert_pem),
                     "tls.key": b64(cert.key_pem)}}


def _api_service(name: str, labels: Mapping[str, str], service: str, namespace: str, cert: ServingCert) -> Obj:
    group, version = name.split(".", 1)[1], name.split(".", 1)[0]
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": _meta(name, labels),
        "spec": {"group": group, "version": version, "groupPriorityMinimum": 100, "versionPriority": 100,
                 "service": {"name": service, "namespace": namespace, "port": 443},
                 # The apiserver verifies the add-on's serving certificate against this CA (no insecureSkipTLSVerify).
                 "caBundle": base64.b64encode(cert.ca_pem.encode()).decode()},
    }


def _checksum(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def service_dns_names(service: str, namespace: str, cluster_domain: str = nc.NETWORK.cluster_domain) -> list[str]:
    """The names the apiserver may use to reach a Service (it dials `<service>.<namespace>.svc`)."""
    svc = f"{service}.{namespace}.svc"
    return [service, f"{service}.{namespace}", svc, f"{svc}.{cluster_domain}"]


# ---------------------------------------------------------------------------------------- Prometheus Operator


def namespace_object() -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _meta(NAMESPACE, {"app.kubernetes.io/part-of": PART_OF})}


def prometheus_operator_objects() -> list[Obj]:
    """The operator as upstream's example/rbac/prometheus-operator, on the real node, with no kubelet Service.

    `--kubelet-service` stays unset: the operator would otherwise keep an Endpoints object of every node's
    kubelet, kwok's simulated ones included, which nothing here scrapes.
    """
    name, version = "prometheus-operator", tools.PROMETHEUS_OPERATOR_VERSION
    labels, selector = _labels(name, "controller", version), _selector(name, "controller")
    crs = ["alertmanagers", "alertmanagers/finalizers", "alertmanagers/status", "alertmanagerconfigs",
           "prometheuses", "prometheuses/finalizers", "prometheuses/status", "prometheusagents",
           "prometheusagents/finalizers", "prometheusagents/status", "thanosrulers", "thanosrulers/finalizers",
           "thanosrulers/status", "scrapeconfigs", "servicemonitors", "servicemonitors/status", "podmonitors",
           "probes", "prometheusrules"]
    rules = [
        _rule(["monitoring.coreos.com"], crs, ["*"]),
        _rule(["apps"], ["statefulsets"], ["*"]),
        _rule([""], ["configmaps", "secrets"], ["*"]),
        _rule([""], ["pods"], ["list", "delete"]),
        _rule([""], ["services", "services/finalizers"], ["get", "create", "update", "delete"]),
        _rule([""], ["endpoints"], ["get", "create", "update", "delete"]),
        _rule([""], ["nodes"], ["list", "watch"]),
        _rule([""], ["namespaces"], READ),
        _rule([""], ["events"], ["patch", "create"]),
        _rule(["networking.k8s.io"], ["ingresses"], READ),
        _rule(["storage.k8s.io"], ["storageclasses"], ["get"]),
    ]
    container = {
        "name": name,
        "image": images.normalize(OPERATOR_IMAGE),
        "imagePullPolicy": "IfNotPresent",
        "args": [f"--prometheus-config-reloader={images.normalize(RELOADER_IMAGE)}", "--log-level=info"],
        "env": [{"name": "GOGC", "value": "30"}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "20m", "memory": "50Mi"}, "limits": {"memory": "200Mi"}},
        "securityContext": _container_security(),
    }
    pod = {"serviceAccountName": name, "securityContext": _pod_security(), "containers": [container]}
    return [
        _service_account(name, NAMESPACE, labels),
        _cluster_role(name, labels, rules),
        _binding(name, labels, name, name, NAMESPACE),
        _deployment(name, NAMESPACE, labels, selector, pod),
        _service(name, NAMESPACE, labels, selector, [{"name": "http", "port": 8080, "targetPort": "http"}]),
    ]


def reloader_args() -> list[str]:
    """The config-reloader flags Prometheus Operator v0.85 generates for Prometheus `k8s`, plus the watch interval.

    Copied from the pod the operator renders (pkg/operator/config_reloader.go); the integration test
    checks the running container still has each of them.
    """
    return [
        "--listen-address=:8080",
        f"--reload-url=http://localhost:{PROMETHEUS_PORT}/-/reload",
        "--config-file=/etc/prometheus/config/prometheus.yaml.gz",
        "--config-envsubst-file=/etc/prometheus/config_out/prometheus.env.yaml",
        f"--watched-dir=/etc/prometheus/rules/prometheus-{PROMETHEUS_NAME}-rulefiles-0",
        f"--watch-interval={RELOADER_WATCH_INTERVAL}",
    ]


def prometheus_objects() -> list[Obj]:
    """A `Prometheus` the operator runs (ServiceMonitors and PodMonitors of every namespace) and its Service."""
    sa, version = f"prometheus-{PROMETHEUS_NAME}", PROMETHEUS_VERSION
    labels = _labels("prometheus", "server", version)
    rules = [
        _rule([""], ["nodes", "nodes/metrics", "services", "endpoints", "pods"], READ),
        _rule([""], ["configmaps"], ["get"]),
        _rule(["discovery.k8s.io"], ["endpointslices"], READ),
        _rule(["networking.k8s.io"], ["ingresses"], READ),
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
    ]
    placement = nc.real_pod_placement()
    spec: Obj = {
        # Merged by container name into what the operator generates; `args` replaces the list as a whole.
        "containers": [{"name": "config-reloader", "args": reloader_args()}],
        "image": images.normalize(PROMETHEUS_IMAGE),
        "version": version,
        "replicas": 1,
        "serviceAccountName": sa,
        "serviceMonitorSelector": {},
        "serviceMonitorNamespaceSelector": {},
        "podMonitorSelector": {},
        "podMonitorNamespaceSelector": {},
        "scrapeInterval": SCRAPE_INTERVAL,
        "scrapeTimeout": SCRAPE_INTERVAL,
        "evaluationInterval": SCRAPE_INTERVAL,
        "retention": "6h",
        "storage": {"emptyDir": {"sizeLimit": "2Gi"}},
        "securityContext": _pod_security(fs_group=True),
        "resources": {"requests": {"cpu": "50m", "memory": "100Mi"}, "limits": {"memory": "1Gi"}},
        "podMetadata": {"labels": {"app.kubernetes.io/part-of": PART_OF}},
        "nodeSelector": placement["nodeSelector"],
        "tolerations": placement["tolerations"],
    }
    # The operator labels the pods it runs for this Prometheus with these two (its governing Service
    # `prometheus-operated` is headless; this one gives the stable ClusterIP the RecServe operator queries).
    pod_selector = {"app.kubernetes.io/name": "prometheus", "operator.prometheus.io/name": PROMETHEUS_NAME}
    return [
        _service_account(sa, NAMESPACE, labels),
        _cluster_role(sa, labels, rules),
        _binding(sa, labels, sa, sa, NAMESPACE),
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
         "metadata": _meta(PROMETHEUS_NAME, labels, NAMESPACE), "spec": spec},
        _service(PROMETHEUS_SERVICE, NAMESPACE, labels, pod_selector,
                 [{"name": "web", "port": PROMETHEUS_PORT, "targetPort": "web"}]),
    ]


# ---------------------------------------------------------------------------------------- prometheus-adapter


def adapter_config_text() -> str:
    """prometheus-adapter's config file, verbatim from the chart (its one copy): custom metrics only.

    Resource metrics (metrics.k8s.io) come from metrics-server, so there are no resourceRules.
    """
    return ADAPTER_RULES_FILE.read_text()


def adapter_config() -> Obj:
    """The chart's adapter config, parsed."""
    config: Obj = yaml.safe_load(adapter_config_text())
    return config


def queue_time_rule() -> Obj:
    """The custom-metrics rule behind the HPA's Pods metric `triton_queue_time_us` (builders/hpa.py).

    Average time a request waited in Triton's queue over the window, per pod; the chart file explains the query.
    """
    rule: Obj = next(r for r in adapter_config()["rules"] if r["name"]["as"] == QUEUE_TIME_METRIC)
    return rule


def adapter_objects(cert: ServingCert) -> list[Obj]:
    """prometheus-adapter serving custom.metrics.k8s.io from the Prometheus above, TLS from `cert`."""
    name, version = "prometheus-adapter", tools.PROMETHEUS_ADAPTER_VERSION
    labels, selector = _labels(name, "metrics-adapter", version), _selector(name, "metrics-adapter")
    config = adapter_config_text()
    tls = f"{name}-tls"
    dns = service_dns_names(name, NAMESPACE)
    container = {
        "name": name,
        "image": images.normalize(ADAPTER_IMAGE),
        "imagePullPolicy": "IfNotPresent",
        "args": ["--secure-port=6443", "--cert-dir=/tmp", "--tls-cert-file=/var/run/serving-cert/tls.crt",
                 "--tls-private-key-file=/var/run/serving-cert/tls.key", "--config=/etc/adapter/config.yaml",
                 f"--prometheus-url={PROMETHEUS_URL}/", f"--metrics-relist-interval={ADAPTER_RELIST_INTERVAL}",
                 "--v=1"],
        "ports": [{"name": "https", "containerPort": 6443}],
        "readinessProbe": _https_probe("/readyz", "https"),
        "livenessProbe": {**_https_probe("/livez", "https", 10), "initialDelaySeconds": 30},
        "resources": {"requests": {"cpu": "20m", "memory": "50Mi"}, "limits": {"memory": "300Mi"}},
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "serving-cert", "mountPath": "/var/run/serving-cert", "readOnly": True},
                         {"name": "config", "mountPath": "/etc/adapter", "readOnly": True}],
    }
    pod = {"serviceAccountName": name, "securityContext": _pod_security(), "containers": [container],
           "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "serving-cert", "secret": {"secretName": tls}},
                       {"name": "config", "configMap": {"name": name}}]}
    annotations = {CHECKSUM_ANNOTATION: _checksum(config, cert.cert_pem)}
    custom = "custom-metrics"
    return [
        _service_account(name, NAMESPACE, labels),
        _cluster_role(name, labels, [_rule([""], ["nodes", "namespaces", "pods", "services"], READ)]),
        _binding(name, labels, name, name, NAMESPACE),
        _binding(f"{name}:system:auth-delegator", labels, "system:auth-delegator", name, NAMESPACE),
        _binding(f"{name}-auth-reader", labels, "extension-apiserver-authentication-reader", name, NAMESPACE,
                 role_kind="Role", namespace="kube-system"),
        # The HPA controller reads the metrics through the aggregator with its own ServiceAccount.
        _cluster_role(f"{custom}:reader", labels, [_rule(["custom.metrics.k8s.io"], ["*"], READ)]),
        _binding(f"{custom}:hpa", labels, f"{custom}:reader", "horizontal-pod-autoscaler", "kube-system"),
        _tls_secret(tls, NAMESPACE, labels, cert, dns),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, labels, NAMESPACE),
         "data": {"config.yaml": config}},
        _deployment(name, NAMESPACE, labels, selector, pod, annotations=annotations),
        _service(name, NAMESPACE, labels, selector, [{"name": "https", "port": 443, "targetPort": "https"}]),
        _api_service(CUSTOM_METRICS_APISERVICE, labels, name, NAMESPACE, cert),
    ]


# ---------------------------------------------------------------------------------------- metrics-server


def metrics_server_objects(cert: ServingCert) -> list[Obj]:
    """metrics-server as upstream's manifests/base, reading only the real node's kubelet.

    The kubelet's serving certificate is self-signed (no CSR approver here): `--kubelet-insecure-tls`.
    """
    name, ns, version = "metrics-server", METRICS_SERVER_NAMESPACE, tools.METRICS_SERVER_VERSION
    labels, selector = _labels(name, "metrics-server", version), _selector(name, "metrics-server")
    tls = f"{name}-tls"
    args = ["--secure-port=10250", "--cert-dir=/tmp", "--tls-cert-file=/var/run/serving-cert/tls.crt",
            "--tls-private-key-file=/var/run/serving-cert/tls.key", "--kubelet-preferred-address-types=InternalIP",
            "--kubelet-use-node-status-port", "--kubelet-insecure-tls",
            f"--metric-resolution={METRICS_SERVER_RESOLUTION}",
            f"--node-selector={METRICS_SERVER_NODE_SELECTOR}"]
    container = {
        "name": name,
        "image": images.normalize(METRICS_SERVER_IMAGE),
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "https", "containerPort": 10250, "protocol": "TCP"}],
        "readinessProbe": {**_https_probe("/readyz", "https", 10), "failureThreshold": 3},
        "livenessProbe": {**_https_probe("/livez", "https", 10), "failureThreshold": 3},
        "resources": {"requests": {"cpu": "20m", "memory": "50Mi"}, "limits": {"memory": "200Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "serving-cert", "mountPath": "/var/run/serving-cert", "readOnly": True}],
    }
    pod = {"serviceAccountName": name, "priorityClassName": "system-cluster-critical",
           "securityContext": _pod_security(), "containers": [container],
           "volumes": [{"name": "tmp", "emptyDir": {}},
                       {"name": "serving-cert", "secret": {"secretName": tls}}]}
    reader = {**labels, "rbac.authorization.k8s.io/aggregate-to-view": "true",
              "rbac.authorization.k8s.io/aggregate-to-edit": "true",
              "rbac.authorization.k8s.io/aggregate-to-admin": "true"}
    return [
        _service_account(name, ns, labels),
        _cluster_role("system:aggregated-metrics-reader", reader,
                      [_rule(["metrics.k8s.io"], ["pods", "nodes"], READ)]),
        _cluster_role(f"system:{name}", labels, [_rule([""], ["nodes/metrics"], ["get"]),
                                                 _rule([""], ["pods", "nodes"], READ)]),
        _binding(f"system:{name}", labels, f"system:{name}", name, ns),
        _binding(f"{name}:system:auth-delegator", labels, "system:auth-delegator", name, ns),
        _binding(f"{name}-auth-reader", labels, "extension-apiserver-authentication-reader", name, ns,
                 role_kind="Role", namespace="kube-system"),
        _tls_secret(tls, ns, labels, cert, service_dns_names(name, ns)),
        _deployment(name, ns, labels, selector, pod, annotations={CHECKSUM_ANNOTATION: _checksum(args, cert.cert_pem)}),
        _service(name, ns, labels, selector, [{"name": "https", "port": 443, "targetPort": "https",
                                               "protocol": "TCP", "appProtocol": "https"}]),
        _api_service(RESOURCE_METRICS_APISERVICE, labels, name, ns, cert),
    ]


def all_objects(adapter_cert: ServingCert, metrics_server_cert: ServingCert) -> list[Obj]:
    """Every object `install` applies (CRDs aside), in apply order: the namespace first, APIServices last."""
    return [namespace_object(), *prometheus_operator_objects(), *prometheus_objects(), *adapter_objects(adapter_cert),
            *metrics_server_objects(metrics_server_cert)]


# ---------------------------------------------------------------------------------------- images


def addon_images(binaries: Mapping[str, Path]) -> list[images.Image]:
    """The five images the add-ons' pods name; each binary at the path and with the user its upstream image uses."""
    user = f"{NONROOT}:{NONROOT}"

    def scratch(ref: str, tool: str, path: str) -> images.Image:
        return images.scratch_image(ref, {binaries[tool]: path}, [path], user=user, name=tool)

    return [
        scratch(OPERATOR_IMAGE, "prometheus-operator", "/bin/operator"),
        # The operator starts the reloader as /bin/prometheus-config-reloader (it sets the command).
        scratch(RELOADER_IMAGE, "prometheus-config-reloader", "/bin/prometheus-config-reloader"),
        scratch(ADAPTER_IMAGE, "prometheus-adapter", "/adapter"),
        scratch(METRICS_SERVER_IMAGE, "metrics-server", "/metrics-server"),
        # The operator runs the image's entrypoint with its own flags; the data dir is an emptyDir it mounts.
        scratch(PROMETHEUS_IMAGE, "prometheus", "/bin/prometheus"),
    ]


def crd_files() -> list[Path]:
    """The operator's full CRD set, from its Go module (example/prometheus-operator-crd)."""
    module = tools.go_module_dir(OPERATOR_MODULE, tools.PROMETHEUS_OPERATOR_VERSION)
    files = [module / "example/prometheus-operator-crd" / f"monitoring.coreos.com_{k}.yaml" for k in CRD_KINDS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ClusterError(f"Prometheus Operator CRD files missing from its Go module: {missing}")
    return files


# ---------------------------------------------------------------------------------------- serving certificates


def _openssl(*args: str, cwd: Path) -> None:
    try:
        out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise ClusterError("openssl is not installed (apt-get install openssl); the add-ons need it for TLS") from exc
    if out.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {out.stderr.strip()}")


def new_serving_cert(dns_names: Sequence[str], days: int = _CERT_DAYS) -> ServingCert:
    """A fresh P-256 CA and a server certificate for `dns_names` signed by it (openssl, in a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="recserve-cert-") as tmp:
        d = Path(tmp)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
                 "-subj", "/CN=recserve-addons-ca", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
        _openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={dns_names[0]}", cwd=d)
        (d / "ext.cnf").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(f"DNS:{n}" for n in dns_names) + "\n"
        )
        _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", str(days), "-extfile", "ext.cnf", "-out", "tls.crt", cwd=d)
        return ServingCert((d / "ca.crt").read_text(), (d / "tls.crt").read_text(), (d / "tls.key").read_text())


def _valid_for(cert_pem: str, seconds: int) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".crt") as f:
        f.write(cert_pem)
        f.flush()
        out = subprocess.run(["openssl", "x509", "-in", f.name, "-noout", "-checkend", str(seconds)],
                             capture_output=True, timeout=30)
    return out.returncode == 0


def _serving_cert(cluster: Cluster, secret: str, namespace: str, dns_names: Sequence[str]) -> ServingCert:
    """The certificate in the add-on's Secret when it still fits (same names, not expiring), else a new one.

    Reusing it keeps a re-install from rolling the pods and from re-registering the APIService's CA.
    """
    out = cluster.kubectl("get", "secret", secret, "-n", namespace, "-o", "json", check=False, timeout=30)
    if out.returncode == 0:
        obj = json.loads(out.stdout)
        data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        names = obj["metadata"].get("annotations", {}).get(CERT_NAMES_ANNOTATION, "")
        if names == ",".join(dns_names) and {"ca.crt", "tls.crt", "tls.key"} <= data.keys() and _valid_for(
            data["tls.crt"], _CERT_RENEW_BEFORE_S
        ):
            return ServingCert(data["ca.crt"], data["tls.crt"], data["tls.key"])
    return new_serving_cert(dns_names)


# ---------------------------------------------------------------------------------------- install / uninstall


def _resolve_binaries() -> dict[str, Path]:
    # One at a time: each Go build takes both cores.
    return {t.name: tools.resolve(t) for t in tools.ADDON_TOOLS}


def _apply_crds(cluster: Cluster) -> None:
    files = crd_files()
    # Several CRDs (Prometheus, Alertmanager) exceed the client-side apply annotation limit: server-side.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=recserve-cluster",
                    *(arg for f in files for arg in ("-f", str(f))), timeout=180)
    # Named from the kinds, not parsed: PyYAML cannot read some of these files (a bare `=` list item).
    names = [f"crd/{kind}.monitoring.coreos.com" for kind in CRD_KINDS]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=120s", *names, timeout=150)


def _prometheus_reconciled(cluster: Cluster) -> bool:
    out = cluster.kubectl("get", f"prometheus/{PROMETHEUS_NAME}", "-n", NAMESPACE, "-o", "json", timeout=30)
    obj = json.loads(out.stdout)
    conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    reconciled = conds.get("Reconciled", {})
    current = reconciled.get("observedGeneration") == obj["metadata"]["generation"]
    return bool(current and reconciled.get("status") == "True")


def _wait_ready(cluster: Cluster, timeout: int = 300) -> None:
    """Each Deployment rolled out, the Prometheus Available, both APIServices Available."""
    t = f"--timeout={timeout}s"
    for ns, deploy in ((NAMESPACE, "prometheus-operator"), (NAMESPACE, "prometheus-adapter"),
                       (METRICS_SERVER_NAMESPACE, "metrics-server")):
        cluster.kubectl("rollout", "status", f"deployment/{deploy}", "-n", ns, t, timeout=timeout + 30)
    # The StatefulSet reflects the spec only once the operator has reconciled this generation of the Prometheus.
    try:
        wait_for(lambda: _prometheus_reconciled(cluster), timeout, 1, f"Prometheus {NAMESPACE}/{PROMETHEUS_NAME}")
    except TimeoutError as exc:
        raise ClusterError(str(exc)) from None
    cluster.kubectl("rollout", "status", f"statefulset/prometheus-{PROMETHEUS_NAME}", "-n", NAMESPACE, t,
                    timeout=timeout + 30)
    cluster.kubectl("wait", "--for=condition=Available", f"prometheus/{PROMETHEUS_NAME}", "-n", NAMESPACE, t,
                    timeout=timeout + 30)
    cluster.kubectl("wait", "--for=condition=Available", f"apiservice/{CUSTOM_METRICS_APISERVICE}",
                    f"apiservice/{RESOURCE_METRICS_APISERVICE}", t, timeout=timeout + 30)


def install(cluster: Cluster, node_socket: str) -> float:
    """Build (or reuse) the binaries and images, load them into the real node's containerd, apply, wait.

    Idempotent: a second call rebuilds nothing, keeps the serving certificates and changes no object.
    Returns the seconds it took.
    """
    start = time.monotonic()
    imgs = addon_images(_resolve_binaries())
    images.build(imgs)
    images.load(node_socket, [i.name for i in imgs])
    _apply_crds(cluster)
    adapter_cert = _serving_cert(cluster, "prometheus-adapter-tls", NAMESPACE,
                                 service_dns_names("prometheus-adapter", NAMESPACE))
    ms_cert = _serving_cert(cluster, "metrics-server-tls", METRICS_SERVER_NAMESPACE,
                            service_dns_names("metrics-server", METRICS_SERVER_NAMESPACE))
    cluster.apply_objects(all_objects(adapter_cert, ms_cert))
    _wait_ready(cluster)
    elapsed = time.monotonic() - start
    _log(f"Installed add-ons prometheus-operator={tools.PROMETHEUS_OPERATOR_VERSION} prometheus={PROMETHEUS_VERSION} "
         f"prometheus-adapter={tools.PROMETHEUS_ADAPTER_VERSION} metrics-server={tools.METRICS_SERVER_VERSION} "
         f"url={PROMETHEUS_URL} seconds={elapsed:.1f}")
    return elapsed


def _ref(obj: Obj) -> list[str]:
    kind = obj["kind"].lower()
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    resource = f"{kind}.{group}" if group else kind
    ns = obj["metadata"].get("namespace")
    return [f"{resource}/{obj['metadata']['name']}", *(["-n", ns] if ns else [])]


def uninstall(cluster: Cluster) -> None:
    """Delete what `install` applied: the Prometheus while its operator still runs (it owns the StatefulSet),
    then the rest in reverse, APIServices first (a dangling one breaks discovery), the namespace last."""
    cluster.kubectl("delete", f"prometheus.monitoring.coreos.com/{PROMETHEUS_NAME}", "-n", NAMESPACE,
                    "--ignore-not-found", "--timeout=120s", check=False, timeout=150)
    placeholder = ServingCert("", "", "")
    for obj in reversed(all_objects(placeholder, placeholder)):
        cluster.kubectl("delete", *_ref(obj), "--ignore-not-found", "--wait=false", check=False, timeout=60)
    cluster.kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=120s", check=False, timeout=150)
    _log(f"Deleted add-ons namespace={NAMESPACE}")
