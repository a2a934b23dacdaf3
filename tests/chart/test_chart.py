"""Chart checks without a cluster: helm lint, Kubernetes 1.35 schemas, values documentation, RBAC shape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.render import CHART, KUBE_VERSION, RELEASE_NAMESPACE, ROOT, VALUE_SETS, by_kind, helm, one, render

pytestmark = pytest.mark.chart

# Kinds served by CRDs (ours, Kopf's, the Prometheus Operator's): no bundled schema exists for them; the
# integration test validates them with a server-side dry run against the real apiserver instead.
CRD_KINDS = {"ServiceMonitor", "KopfPeering", "ClusterKopfPeering", "RecommenderModel"}
VALUE_SET_IDS = list(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SET_IDS)
def test_helm_lint_strict_passes_for_every_value_set(name: str, tmp_path: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, values=VALUE_SETS[name],
               tmp_path=tmp_path, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_kubernetes_validate_bundles_the_pinned_minor_schemas() -> None:
    """kubernetes-validate 1.37 bundles schemas up to 1.37; the pinned control plane (1.35) must be among them."""
    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    minor = ".".join(KUBE_VERSION.split(".")[:2])
    assert (schema_dir / f"v{minor}.0-local-strict").is_dir(), sorted(p.name for p in schema_dir.iterdir())


@pytest.mark.parametrize("name", VALUE_SET_IDS)
def test_rendered_manifests_match_the_pinned_kubernetes_schemas_strictly(name: str, tmp_path: Path) -> None:
    minor_version = ".".join(KUBE_VERSION.split(".")[:2]) + ".0"
    docs = render(VALUE_SETS[name], tmp_path, include_crds=True)
    errors = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, minor_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)
    assert {d["kind"] for d in docs} - CRD_KINDS >= {"Deployment", "ServiceAccount", "ConfigMap"}


def test_values_schema_rejects_typos_and_bad_values(tmp_path: Path) -> None:
    for values, message in [
        ({"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),
        ({"defaults": {"imagePullPolicy": "Sometimes"}}, "value must be one of 'Always', 'IfNotPresent', 'Never'"),
        ({"watchNamespaces": ["Team_A"]}, "does not match pattern"),
        ({"replicaCount": 0}, "minimum"),
    ]:
        out = helm("template", "rs", str(CHART), values=values, tmp_path=tmp_path, check=False)
        assert out.returncode != 0 and message in out.stderr, (values, out.stderr)


def _values_keys(text: str) -> list[tuple[int, str, bool]]:
    """(line number, dotted key, documented) for every key in values.yaml.

    A key is documented by a comment right above it; a `# --` comment documents the key's whole subtree
    (free-form maps such as resources or securityContext), so their inner keys need no comment of their own.
    """
    keys = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documents subtree)
    previous = ""
    block_start = ""  # first line of the comment block right above the current line
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"^(\s*)(?:- )?([A-Za-z_][\w.-]*):", line)
        if match and not line.lstrip().startswith("#"):
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            commented = previous.lstrip().startswith("#")
            inherited = any(subtree for _, _, subtree in stack)
            dotted = ".".join([k for _, k, _ in stack] + [match.group(2)])
            keys.append((number, dotted, commented or inherited))
            stack.append((indent, match.group(2), commented and block_start.lstrip().startswith("# --")))
        if line.strip():
            if line.lstrip().startswith("#") and not previous.lstrip().startswith("#"):
                block_start = line
            previous = line
    return keys


def test_every_value_in_values_yaml_is_commented() -> None:
    keys = _values_keys((CHART / "values.yaml").read_text())
    undocumented = [f"line {n}: {k}" for n, k, documented in keys if not documented]
    assert len(keys) > 50
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        dotted = f"{prefix}{key}"
        paths.add(dotted)
        paths |= _schema_paths(sub, dotted + ".")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of values, descending only where the schema declares properties (not free-form maps)."""
    paths = set()
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        paths.add(dotted)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            paths |= _value_paths(value, sub, dotted + ".")
    return paths


def test_values_schema_types_every_value_and_every_schema_property_has_a_default() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_values = _value_paths(values, schema)
    in_schema = _schema_paths(schema)
    assert in_values - in_schema == set(), "values missing from values.schema.json"
    assert in_schema - in_values <= {"global"}, "schema properties with no default in values.yaml"


def _rules(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(d["kind"], d["metadata"]["name"], r) for d in docs if d["kind"] in ("Role", "ClusterRole")
            for r in d["rules"]]  # fmt: skip


@pytest.mark.parametrize("name", VALUE_SET_IDS)
def test_rbac_has_no_wildcards_no_update_and_no_secrets_but_the_store_keys_copy(name: str, tmp_path: Path) -> None:
    """The one Secret rule: in cluster mode with the embedded store, the operator reads the store's keys in the
    release namespace and writes their copy, by that one name, into model namespaces. Never a list or a watch."""
    values = VALUE_SETS[name]
    rules = _rules(render(values, tmp_path))
    assert rules
    copies = not values.get("watchNamespaces") and (values.get("modelStore") or {}).get("embedded") != {
        "enabled": False}  # fmt: skip
    secret_rules = []
    for kind, role, rule in rules:
        fields = rule.get("apiGroups", []) + rule.get("resources", []) + rule.get("verbs", [])
        assert "*" not in fields and not any("*" in f for f in fields), (kind, role, rule)
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), (kind, role, rule)
        if "update" in rule["verbs"]:  # only the leader-election Lease, by name
            assert rule["resources"] == ["leases"] and len(rule.get("resourceNames") or []) == 1, (role, rule)
        if "secrets" in rule.get("resources", []):
            assert rule["resources"] == ["secrets"] and len(rule.get("resourceNames") or []) == 1, (role, rule)
            secret_rules.append((kind, rule["resourceNames"][0], sorted(rule["verbs"])))
    expected = [("ClusterRole", "recserve-model-store", ["create", "get", "patch"]),
                ("Role", "rs-recserve-model-store", ["get"])] if copies else []  # fmt: skip
    assert sorted(secret_rules) == expected, secret_rules


def test_namespaced_mode_writes_only_inside_the_watched_namespaces(tmp_path: Path) -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2}, tmp_path)
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-operator")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # Two replicas: the leader-election Lease, in the release namespace, is the only thing written there.
    election = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert [r["metadata"]["namespace"] for r in election] == [RELEASE_NAMESPACE]
    for kind, role, rule in _rules(docs):
        if kind == "ClusterRole":
            assert set(rule["verbs"]) <= {"list", "watch"}, (role, rule)
    assert not [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"].endswith("-operator")]
    deployment = one(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_cluster_mode_uses_a_cluster_role_and_all_namespaces(tmp_path: Path) -> None:
    docs = render({}, tmp_path)
    # The only Role: reading the embedded store's keys in the release namespace (to copy them; see below).
    assert [r["metadata"]["name"] for r in by_kind(docs, "Role")] == ["rs-recserve-model-store-keys"]
    operator_role = next(d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"].endswith("-operator"))
    granted = {(g, r) for rule in operator_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("recserve.dev", "recommendermodels/status") in granted and ("apps", "deployments") in granted
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and "--standalone" in args


def test_two_replicas_elect_a_leader_on_one_lease_with_a_pdb_and_a_rolling_update(tmp_path: Path) -> None:
    docs = render({"replicaCount": 2}, tmp_path)
    deployment = one(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # Kopf only watches in every replica (caches warm); the Lease decides who reconciles.
    assert "--standalone" in container["args"] and not any(a.startswith("--peering") for a in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["RECSERVE_LEADER_ELECTION"]["value"] == "true"
    assert env["RECSERVE_LEASE_NAME"]["value"] == "rs-recserve-operator"
    assert env["RECSERVE_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RECSERVE_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    role = next(r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "rs-recserve-leader-election")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["rs-recserve-operator"],
         "verbs": ["get", "update"]},
    ]  # fmt: skip
    assert not by_kind(docs, "ClusterKopfPeering") and not by_kind(docs, "KopfPeering")


def test_one_replica_runs_standalone_and_is_recreated_so_two_operators_never_overlap(tmp_path: Path) -> None:
    docs = render({}, tmp_path)
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    assert not by_kind(docs, "PodDisruptionBudget") and not by_kind(docs, "ClusterKopfPeering")
    env = {e["name"] for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RECSERVE_LEADER_ELECTION" not in env and "RECSERVE_WORKERS" in env
    assert not [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize("name", VALUE_SET_IDS)
def test_operator_pod_meets_the_restricted_pod_security_standard(name: str, tmp_path: Path) -> None:
    """The operator's pod, and every other pod the chart runs (the embedded model store)."""
    for dep in by_kind(render(VALUE_SETS[name], tmp_path), "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        sc = container["securityContext"]
        seccomp = sc.get("seccompProfile") or spec["securityContext"].get("seccompProfile")
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and seccomp == {"type": "RuntimeDefault"}
        assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
        assert container["livenessProbe"] and container["readinessProbe"]
        if not dep["metadata"]["name"].endswith("-model-store"):
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_changing_a_default_changes_the_pod_template_checksum(tmp_path: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = one(render(values, tmp_path), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/defaults"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"defaults": {"tritonImage": "nvcr.io/nvidia/tritonserver:25.11-py3"}})


def _operator_env_names() -> set[str]:
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "recserve_operator").rglob("*.py"))
    return set(re.findall(r"\"(RECSERVE_[A-Z_]+)\"", source))


def test_every_default_in_the_configmap_is_read_by_the_operator(tmp_path: Path) -> None:
    data = next(c for c in by_kind(render({}, tmp_path), "ConfigMap") if c["metadata"]["name"].endswith("-defaults"))
    unread = set(data["data"]) - _operator_env_names()
    assert not unread, f"ConfigMap keys the operator never reads: {sorted(unread)}"


def test_the_model_store_values_reach_the_operator_and_the_fetch_step_defaults_to_the_operator_image(
    tmp_path: Path,
) -> None:
    from recserve_operator.settings import OperatorDefaults

    values = {"modelStore": {"url": "s3://models/artifacts", "endpoint": "http://minio:9000", "secretName": "keys",
                             "keepUnused": 5}, "image": {"tag": "9.9.9"}}  # fmt: skip
    objs = render(values, tmp_path)
    data = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-defaults"))["data"]
    settings = OperatorDefaults.from_env(data)
    assert settings.builds_once and settings.model_store == "s3://models/artifacts"
    assert (settings.model_store_endpoint, settings.model_store_secret, settings.model_store_keep) == (
        "http://minio:9000", "keys", 5)
    assert settings.fetcher_image == "ghcr.io/recserve/operator:9.9.9"
    def settings_of(values: dict[str, Any]) -> OperatorDefaults:
        return OperatorDefaults.from_env(next(c for c in by_kind(render(values, tmp_path), "ConfigMap")
                                              if c["metadata"]["name"].endswith("-defaults"))["data"])  # fmt: skip

    assert settings_of({}).builds_once  # the embedded store, by default
    assert not settings_of({"modelStore": {"embedded": {"enabled": False}}}).builds_once
    # A store of one's own: the embedded one, if still enabled, is not what the operator publishes to.
    assert settings.model_store_secret_source == ""
    rules = [r for role in by_kind(objs, "ClusterRole") + by_kind(objs, "Role") for r in role.get("rules", [])]
    jobs = next(r for r in rules if "jobs" in r["resources"])
    assert jobs["apiGroups"] == ["batch"] and "create" in jobs["verbs"] and "delete" in jobs["verbs"]
    with pytest.raises(AssertionError):
        render({"modelStore": {"url": "file:///models"}}, tmp_path)  # only S3 stores (pods mount no volume)


def test_the_embedded_store_gives_each_watched_namespace_its_keys_and_becomes_the_operators_store(
    tmp_path: Path,
) -> None:
    from recserve_operator.settings import OperatorDefaults

    objs = render({"watchNamespaces": ["team-a", "team-b"]}, tmp_path)  # the embedded store is the default
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s["stringData"] for s in by_kind(objs, "Secret")}
    store = secrets[("recserve-system", "rs-recserve-model-store")]
    for ns in ("team-a", "team-b"):
        keys = secrets[(ns, "recserve-model-store")]
        assert keys == {k: store[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    identity = json.loads(store["s3.json"])["identities"][0]["credentials"][0]
    assert identity == {"accessKey": store["AWS_ACCESS_KEY_ID"], "secretKey": store["AWS_SECRET_ACCESS_KEY"]}
    data = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-defaults"))["data"]
    settings = OperatorDefaults.from_env(data)
    assert settings.model_store == "s3://recserve-models/artifacts"
    assert settings.model_store_endpoint == "http://rs-recserve-model-store.recserve-system.svc.cluster.local:8333"
    assert settings.model_store_secret == "recserve-model-store"
    dep = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "rs-recserve-model-store")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    assert not any("env" in c or "envFrom" in c for c in pod["containers"]), "keys reach the store as a file only"
    claim = one(objs, "PersistentVolumeClaim", store=True)
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert settings.model_store_secret_source == ""  # the chart put the keys in each namespace
    policy = next(p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "rs-recserve-model-store")
    (source,) = policy["spec"]["ingress"][0]["from"]
    assert source["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]


def test_in_cluster_mode_the_operator_copies_the_embedded_stores_keys_into_model_namespaces(tmp_path: Path) -> None:
    from recserve_operator.settings import OperatorDefaults

    objs = render({}, tmp_path)
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in by_kind(objs, "Secret")}
    assert secrets == {("recserve-system", "rs-recserve-model-store")}  # no namespace list to put copies in
    data = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-defaults"))["data"]
    settings = OperatorDefaults.from_env(data)
    assert settings.store_secret_source == ("recserve-system", "rs-recserve-model-store")
    assert settings.model_store_secret == "recserve-model-store"
    (role,) = [r for r in by_kind(objs, "Role") if r["metadata"]["namespace"] == "recserve-system"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["rs-recserve-model-store"],
                              "verbs": ["get"]}]  # fmt: skip
    (binding,) = [b for b in by_kind(objs, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"][0]["name"] == "rs-recserve"
    policy = next(p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "rs-recserve-model-store")
    (source,) = policy["spec"]["ingress"][0]["from"]
    pods = {"matchLabels": {"app.kubernetes.io/name": "recserve-triton"}}  # build and serving pods, any namespace
    assert source == {"namespaceSelector": {}, "podSelector": pods}
    # With a store of one's own, nothing is copied: the user puts secretName in each namespace.
    own = render({"modelStore": {"url": "s3://b/p", "secretName": "keys"}}, tmp_path)
    assert not [r for r in _rules(own) if "secrets" in r[2]["resources"]]


def test_the_embedded_store_image_is_the_seaweedfs_the_tests_build() -> None:
    from recserve_cluster import images

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["modelStore"]["embedded"]["image"] == images.seaweedfs().ref


def test_the_grafana_dashboard_queries_triton_gpu_and_operator_metrics(tmp_path: Path) -> None:
    docs = render(VALUE_SETS["all-optional-features"], tmp_path)
    cm = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["namespace"] == "monitoring" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["recserve-overview.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    text = "\n".join(exprs)
    for series in ("nv_inference_request_success", "nv_inference_request_failure", "nv_gpu_utilization",
                   "recserve_reconcile_duration_seconds_bucket", "recserve_reconciles_total"):  # fmt: skip
        assert series in text, series
    assert all(e.count("(") == e.count(")") for e in exprs)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Traffic share per revision", "Click-through rate per variant", "GPU utilisation"} <= titles


def test_every_operator_series_the_dashboard_queries_is_exported_by_the_operator() -> None:
    dashboard = json.loads((CHART / "dashboards" / "recserve-overview.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\b(recserve_[a-z_]+)\b", exprs)}
    queried -= {"recserve_clicks_total", "recserve_impressions_total"}  # the application's counters (variables)
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "recserve_operator").rglob("*.py"))
    exported = set(re.findall(r"\"(recserve_[a-z_]+)\"", source))
    assert queried - exported == set(), "dashboard series the operator does not export"


def test_helm_test_hook_checks_the_api_and_the_operator_health(tmp_path: Path) -> None:
    pod = next(p for p in by_kind(render({}, tmp_path), "Pod"))
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "/apis/recserve.dev/v1alpha1" in script and "/healthz" in script
    compile(script, "helm-test", "exec")  # the embedded check is valid Python


def test_values_and_chart_metadata_pass_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable, "
        "comments: {min-spaces-from-content: 1}}}"
    )
    problems = [
        f"{name}:{p.line}: {p.message}"
        for name in ("values.yaml", "Chart.yaml")
        for p in linter.run((CHART / name).read_text(), config)
    ]
    assert not problems, "\n".join(problems)
