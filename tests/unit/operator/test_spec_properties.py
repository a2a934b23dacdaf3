"""Hostile specs, property-tested: parse_spec accepts or raises InvalidSpec naming a spec field, and every object
built from an accepted spec carries names, labels and references the API server accepts, names at 52 included."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from recserve_operator import names
from recserve_operator.builders.common import Ids, owner_reference
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.job import build_job
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.routers.base import get_router
from recserve_operator.routers.builtin import render_nginx_conf
from recserve_operator.routers.plan import CANARY, STABLE, Backend, TrafficPlan, revision_service_name
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec, parse_spec, revision_of

K8S_VERSION = "1.35.0"
PROMETHEUS = "http://prometheus.monitoring:9090"
# The CRD's metadata.name rule: a DNS-1035 label of at most 52 characters.
MAX_NAME = 52
PLAIN = OperatorDefaults()
STORE = OperatorDefaults(model_store="s3://recserve-models/artifacts", model_store_endpoint="http://store:8333",
                         model_store_secret="recserve-store")  # fmt: skip
FIELD_RE = re.compile(r"\bspec\.(model|optimize|serving|rollout)\b")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS_1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
IANA_SVC_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?\Z")
CONFIG_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+\Z")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}\Z")
CORE_KINDS = ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job")
SERVICE_KINDS = ("Service",)
# Kinds whose name becomes a label value (the Job controller labels its pods job-name=<name>).
LABEL_NAMED_KINDS = ("Job",)

MISSING: Any = object()  # a key left out of its object
HUGE = 100_000
UNICODE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "0", "1.5", "x" * HUGE, "模" * (HUGE // 4), "\x00", "a\nb", "${jndi}", "../.."]),
    UNICODE,
    st.lists(st.integers(-3, 3), max_size=3),
    st.just(list(range(HUGE // 10))),
    st.dictionaries(st.sampled_from(["name", "x", "", "模"]), st.integers(0, 2), max_size=2),
)
HOSTILE_OR_MISSING = st.one_of(HOSTILE, st.just(MISSING))
MUTATIONS: list[Callable[[str], str]] = [
    lambda v: v + "\n", lambda v: f" {v}", lambda v: f"{v} ", lambda v: v.upper(), lambda v: f"{v}-",
    lambda v: f"{v}é", lambda v: v * 2, lambda v: f"-{v}", lambda v: v.replace("-", "_"),
]
EXTRA_KEYS = st.sampled_from(["extra", "Model", "spec", "模型", "x" * 300, "", "apiVersion"])

model_names = st.one_of(
    st.from_regex(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", fullmatch=True),
    st.integers(1, MAX_NAME).map(lambda n: ("m" + "-9" * MAX_NAME)[:n].rstrip("-") or "m"),
    st.just("a" * MAX_NAME),
    st.just("z" + "-" * (MAX_NAME - 2) + "0"),
)


class Spec:
    """Draws one spec dict: every field valid (coherent with the CEL rules) unless a fault lands on it.

    A fault replaces a field (or a whole object) with a hostile value, drops it, mutates its valid string (a
    trailing newline, surrounding space, upper case, unicode, doubled: what a regex without \\Z lets by), or gives
    an object an unknown key. `fault` is ("one", n): only the n-th field drawn is faulty, so the rest of the spec
    stays valid and the builders see it; or ("rate", percent): each field independently. No fault: a spec the CRD
    accepts."""

    def __init__(self, draw: st.DrawFn, fault: tuple[str, int]) -> None:
        self.draw, (self.mode, self.n) = draw, fault
        self.fields = 0

    def hostile(self) -> bool:
        self.fields += 1
        if self.mode == "one":
            return self.fields == self.n
        return self.n > 0 and self.draw(st.integers(0, 99)) < self.n

    def v(self, valid: Any) -> Any:
        """`valid` (a value or strategy), or, at a fault, a hostile value, MISSING, or the valid string mutated."""
        faulty = self.hostile()
        value = self.draw(valid) if isinstance(valid, st.SearchStrategy) else valid
        if not faulty:
            return value
        if isinstance(value, str) and self.flag():
            return self.draw(st.sampled_from(MUTATIONS))(value)
        return self.draw(HOSTILE_OR_MISSING)

    def opt(self, present: bool, valid: Any) -> Any:
        """An optional field: absent unless `present`, then like v()."""
        if not present:
            return self.draw(HOSTILE_OR_MISSING) if self.hostile() else MISSING
        return self.v(valid)

    def obj(self, **fields: Any) -> Any:
        if self.hostile():
            return self.draw(HOSTILE_OR_MISSING)
        out = {k: v for k, v in fields.items() if v is not MISSING}
        if self.hostile():
            out[self.draw(EXTRA_KEYS)] = self.draw(HOSTILE)
        return out

    def flag(self) -> bool:
        return self.draw(st.booleans())


def _uri(draw: st.DrawFn) -> str:
    return draw(st.one_of(
        st.sampled_from(["s3://models/ctr/3", "gs://b/m.onnx", "https://h.example/m.zip", "file:///m/1",
                         "pvc://models/ctr/3", "pvc://a.b-c/x/y"]),
        UNICODE.map(lambda s: f"s3://bücket/模型/{s}"),
        st.just("s3://b/" + "k" * (2048 - len("s3://b/"))),  # the CRD's maxLength
        st.just("pvc://" + "c" * 253 + "/p"),
    ))  # fmt: skip


def _model(s: Spec) -> Any:
    secret, account = s.flag(), s.flag()
    credentials = secret or account
    return s.obj(
        uri=s.v(_uri(s.draw)),
        format=s.v(st.sampled_from(["keras", "savedmodel", "onnx"])),
        version=s.v(st.sampled_from([1, 2**63 - 1]) | st.integers(1, 10**6)),
        sha256=s.opt(s.flag(), st.text("0123456789abcdef", min_size=64, max_size=64)),
        endpoint=s.opt(s.flag(), st.sampled_from(["http://minio.storage:9000", "https://s3.ü.example/p"])),
        credentials=s.opt(credentials, s.obj(
            secretRef=s.opt(secret, s.obj(name=s.v(st.sampled_from(["keys", "a" * 253, "a.b-c"])))),
            serviceAccountName=s.opt(account, st.sampled_from(["reader", "irsa.sa"])))),
        allowUnsafeDeserialization=s.opt(s.flag(), st.booleans()),
    )  # fmt: skip


def _optimize(s: Spec, gpu: bool, precision: str, backend: str) -> Any:
    calibration = s.opt(precision == "int8" or s.flag(), s.obj(
        uri=s.v(_uri(s.draw)), samples=s.opt(s.flag(), st.integers(1, 10**6))))  # fmt: skip
    return s.obj(
        backend=s.v(backend),
        precision=s.v(precision),
        parity=s.opt(s.flag(), s.obj(maxAbsError=s.opt(s.flag(), st.sampled_from([0, 0.0, 1e-9, 1e300, 5])),
                                     samples=s.opt(s.flag(), st.sampled_from([1, 512, 100000])))),
        calibration=calibration,
    )


def _tuning(s: Spec, max_batch: int) -> Any:
    return s.obj(
        sloP99Milliseconds=s.v(st.sampled_from([1, 60000, 20])),
        concurrencyLevels=s.opt(s.flag(), st.lists(st.integers(1, 1024), min_size=1, max_size=8, unique=True)),
        # The CRD defaults it to 64 before its rule compares it with maxBatchSize.
        candidatesPerRequest=s.opt(max_batch < 64 or s.flag(), st.integers(1, max_batch)),
        instanceCounts=s.opt(s.flag(), st.lists(st.integers(1, 16), min_size=1, max_size=4, unique=True)),
        maxQueueDelaysMicroseconds=s.opt(s.flag(), st.lists(st.integers(0, 10**6), min_size=1, max_size=6,
                                                            unique=True)),
        durationSeconds=s.opt(s.flag(), st.sampled_from([1, 60])),
        rounds=s.opt(s.flag(), st.sampled_from([1, 5])),
    )


def _ranking(s: Spec) -> Any:
    columns = s.flag()
    inputs = st.lists(st.one_of(st.sampled_from(["user", "ctx", "i" * 253]), UNICODE), min_size=1, max_size=64,
                      unique=True)  # fmt: skip
    return s.obj(
        requestColumns=s.opt(columns, st.sampled_from(["0-15,28-31", "0", "9" * 1024])),
        requestInputs=s.opt(not columns, inputs),
        maxK=s.opt(s.flag(), st.sampled_from([1, 100, 10000])),
    )


def _serving(s: Spec, gpu: bool, ranking: bool) -> Any:
    d = s.draw
    max_batch = d(st.sampled_from([1, 8, 256, 65536]))
    autoscaling = s.flag()
    low = d(st.integers(1, 5))
    high = d(st.integers(low, 1000))
    replicas = d(st.integers(low, min(high, 1000))) if autoscaling else d(st.sampled_from([0, 1, 3, 1000]))
    tuning = not ranking and s.flag()
    target = d(st.sampled_from(["targetCPUUtilization", "targetQueueTimeMicroseconds", "both"]))
    return s.obj(
        maxBatchSize=s.v(max_batch),
        dynamicBatching=s.opt(s.flag(), s.obj(
            preferredBatchSizes=s.opt(s.flag(), st.lists(st.integers(1, max_batch), max_size=16, unique=True)),
            maxQueueDelayMicroseconds=s.opt(s.flag(), st.sampled_from([0, 100, 10**7])),
            preserveOrdering=s.opt(s.flag(), st.booleans()))),
        instances=s.obj(kind=s.v("GPU" if gpu else "CPU"), count=s.opt(s.flag(), st.sampled_from([1, 16]))),
        replicas=s.opt(s.flag(), replicas),
        autoscaling=s.opt(autoscaling, s.obj(
            minReplicas=s.v(low), maxReplicas=s.v(high),
            targetCPUUtilization=s.opt(target != "targetQueueTimeMicroseconds", st.sampled_from([1, 100])),
            targetQueueTimeMicroseconds=s.opt(target != "targetCPUUtilization", st.sampled_from([1, 2**40])))),
        resources=s.obj(
            gpu=s.v(d(st.integers(1, 16)) if gpu else 0),
            cpu=s.opt(s.flag(), st.sampled_from(["1", "500m", "2.5", "0", "64"])),
            memory=s.opt(s.flag(), st.sampled_from(["1Gi", "512Mi", "1.5G", "1024", "8Ti"]))),
        gpuProduct=s.opt(gpu and s.flag(), st.sampled_from(["NVIDIA-A10G", "NVIDIA-H100-80GB-HBM3", "A" * 63,
                                                            "a_b.c"])),
        tritonImage=s.opt(s.flag(), st.sampled_from(["nvcr.io/nvidia/tritonserver:25.10-py3",
                                                     "r.example:5000/t@sha256:" + "a" * 64, "t" * 512])),
        builderImage=s.opt(s.flag(), st.just("recserve/model-repo-builder:test")),
        warmup=s.opt(s.flag(), st.booleans()),
        ranking=s.opt(ranking, _ranking(s) if ranking else MISSING),
        tuning=s.opt(tuning, _tuning(s, max_batch) if tuning else MISSING),
        buildCache=s.opt(s.flag(), s.obj(claimName=s.v(st.sampled_from(["trt-cache", "c" * 253, "a.b"])))),
    )  # fmt: skip


DURATIONS = st.sampled_from(["1s", "30s", "5m", "1h30m", "250ms", "0s", "9" * 40 + "h"])


def _analysis(s: Spec, ab: bool) -> Any:
    d = s.draw
    checks = st.lists(
        st.builds(dict, name=st.one_of(st.sampled_from(["p99", "n" * 300]), UNICODE),
                  query=st.one_of(st.just('sum(rate(x{revision="{{revision}}"}[1m]))'), UNICODE, st.just("q" * 4000)),
                  max=st.sampled_from([1.0, 1e300, 0])),
        max_size=20, unique_by=lambda c: c["name"],
    )  # fmt: skip
    interval = d(st.sampled_from(["10s", "1m"]))
    return s.obj(
        interval=s.opt(s.flag(), interval),
        prometheus=s.opt(s.flag(), st.sampled_from([PROMETHEUS, "http://prom:9090/", "https://p.ü.example"])),
        maxErrorRate=s.opt(s.flag(), st.sampled_from([0, 0.01, 1])),
        maxP99LatencyMs=s.opt(s.flag(), st.sampled_from([0, 25.5, 1e9])),
        minRequests=s.opt(s.flag(), st.sampled_from([0, 100, 2**62])),
        failureLimit=s.opt(s.flag(), st.sampled_from([0, 1, 3])),
        checks=s.opt(s.flag(), checks),
        abTest=s.opt(ab, s.obj(
            metric=s.opt(s.flag(), "ctr"),
            clicks=s.v(st.sampled_from(['sum(increase(clicks{variant="{{variant}}"}[{{elapsed}}]))', "clicks_total"])),
            impressions=s.v(st.sampled_from(["imps_total", 'sum(increase(i{v="[1h]"}[{{elapsed}}]))'])),
            confidence=s.opt(s.flag(), st.sampled_from([0.5, 0.95, 0.9999])),
            minImpressions=s.opt(s.flag(), st.sampled_from([0, 10000])),
            power=s.opt(s.flag(), st.sampled_from([0.5, 0.9999])),
            minDetectableEffect=s.opt(s.flag(), st.sampled_from([0.001, 0.1, 10])),
            maxDuration=s.opt(s.flag(), st.sampled_from(["24h", "1h30m"])),
            split=s.opt(s.flag(), st.sampled_from([1, 50, 99])))),
    )  # fmt: skip


def _rollout(s: Spec) -> Any:
    d = s.draw
    strategy = d(st.sampled_from(["immediate", "canary", "abTest"]))
    provider = d(st.sampled_from(["builtin", "gatewayAPI"]))
    weights = d(st.lists(st.integers(1, 100), min_size=1, max_size=20, unique=True).map(sorted))
    steps = [s.obj(weight=s.v(w), pause=s.opt(s.flag(), DURATIONS)) for w in weights]
    analysis = strategy == "abTest" or s.flag()
    return s.obj(
        strategy=s.opt(strategy != "immediate" or s.flag(), strategy),
        steps=s.opt(strategy == "canary" or s.flag(), steps),
        routing=s.opt(provider == "gatewayAPI" or s.flag(), s.obj(
            provider=s.opt(provider == "gatewayAPI" or s.flag(), provider),
            parentRef=s.opt(provider == "gatewayAPI", s.obj(
                name=s.v(st.sampled_from(["shop-gw", "g" * 253])),
                namespace=s.opt(s.flag(), st.sampled_from(["infra", "n" * 63])),
                sectionName=s.opt(s.flag(), st.sampled_from(["https", "a.b"])))),
            stickyHeader=s.opt(s.flag(), st.sampled_from(["x-user-id", "X-Session", "h" * 63])),
            variantHeader=s.opt(s.flag(), "x-recserve-variant"))),
        analysis=s.opt(analysis, _analysis(s, strategy == "abTest")),
        progressDeadline=s.opt(s.flag(), st.sampled_from(["30m", "2h"])),
        onProgressDeadline=s.opt(s.flag(), st.sampled_from(["rollback", "hold"])),
        surge=s.opt(s.flag(), st.sampled_from([1, 1000])),
        control=s.opt(s.flag(), s.obj(action=s.v(st.sampled_from(["", "pause", "resume", "promote", "abort"])))),
    )  # fmt: skip


# Mostly one fault in an otherwise valid spec (those reach the builders), sometimes many.
FAULTS = st.one_of(st.tuples(st.just("one"), st.integers(0, 160)),
                   st.tuples(st.just("rate"), st.sampled_from([2, 5, 10, 30])))  # fmt: skip
VALID: st.SearchStrategy[tuple[str, int]] = st.just(("one", 0))


@st.composite
def spec_dicts(draw: st.DrawFn, faults: st.SearchStrategy[tuple[str, int]] = FAULTS) -> dict[str, Any]:
    """A spec dict for every section; without a fault one the CRD's schema and CEL rules accept."""
    s = Spec(draw, draw(faults))
    gpu = s.flag()
    precision = draw(st.sampled_from(["fp32", "fp16", "int8"] if gpu else ["fp32", "int8"]))
    ranking = draw(st.booleans())
    backends = ["onnxruntime"] + ([] if ranking else ["tensorrt", "auto"] if gpu else ["auto"])
    backend = draw(st.sampled_from(backends))
    spec = s.obj(
        model=s.v(_model(s)),
        optimize=s.opt(s.flag() or precision != "fp32" or backend != "onnxruntime",
                       _optimize(s, gpu, precision, backend)),
        serving=s.v(_serving(s, gpu, ranking)),
        rollout=s.opt(s.flag(), _rollout(s)),
    )  # fmt: skip
    return spec if isinstance(spec, dict) else {"model": spec}


# -- what the API server requires of the objects -----------------------------------------------------------------


def _labels_in(obj: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every label map in an object: metadata and template labels, selectors, node selectors."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            here = f"{path}.{key}"
            if key in ("labels", "matchLabels", "nodeSelector", "selector") and isinstance(value, Mapping) and all(
                    isinstance(v, str) for v in value.values()):  # fmt: skip
                yield here, value
            yield from _labels_in(value, here)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _labels_in(item, f"{path}[{i}]")


def _qualified_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (not prefix or (len(prefix) <= 253 and bool(DNS_SUBDOMAIN_RE.match(prefix)))) and (
        len(name) <= 63 and bool(QUALIFIED_NAME_RE.match(name)))  # fmt: skip


def _pod_spec(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    template = (obj.get("spec") or {}).get("template")
    return template["spec"] if isinstance(template, Mapping) else None


def _check_pod(pod: Mapping[str, Any], where: str) -> None:
    volumes = pod.get("volumes") or []
    assert len({v["name"] for v in volumes}) == len(volumes), f"{where}: duplicate volume names"
    for volume in volumes:
        assert DNS_LABEL_RE.match(volume["name"]) and len(volume["name"]) <= 63, f"{where}: volume {volume['name']}"
        for ref in (volume.get("persistentVolumeClaim", {}).get("claimName"),
                    volume.get("configMap", {}).get("name"), volume.get("secret", {}).get("secretName")):  # fmt: skip
            assert ref is None or (len(ref) <= 253 and DNS_SUBDOMAIN_RE.match(ref)), f"{where}: volume ref {ref!r}"
    account = pod.get("serviceAccountName")
    assert account is None or (len(account) <= 253 and DNS_SUBDOMAIN_RE.match(account)), account
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    assert len({c["name"] for c in containers}) == len(containers), f"{where}: duplicate container names"
    for c in containers:
        assert DNS_LABEL_RE.match(c["name"]) and len(c["name"]) <= 63, f"{where}: container {c['name']}"
        image = c["image"]
        assert image and image == image.strip() and len(image) <= 4096, f"{where}: image {image!r}"
        assert all(isinstance(a, str) for a in c.get("args", []) + c.get("command", [])), f"{where}: non-string arg"
        for port in c.get("ports", []):
            assert IANA_SVC_NAME_RE.match(port["name"]), port
        for source in c.get("envFrom", []):
            name = (source.get("secretRef") or source.get("configMapRef") or {}).get("name", "")
            assert DNS_SUBDOMAIN_RE.match(name) and len(name) <= 253, f"{where}: envFrom {name!r}"


def _check_httproute(route: Mapping[str, Any], where: str) -> None:
    """The Gateway API CRD's own patterns (ObjectName, Namespace, SectionName, HTTPHeaderName)."""
    for ref in route["spec"]["parentRefs"]:
        assert isinstance(ref["name"], str) and 1 <= len(ref["name"]) <= 253, f"{where}: parentRef {ref}"
        namespace, section = ref.get("namespace"), ref.get("sectionName")
        assert namespace is None or (isinstance(namespace, str) and len(namespace) <= 63
                                     and DNS_LABEL_RE.match(namespace)), f"{where}: parentRef {ref}"  # fmt: skip
        assert section is None or (isinstance(section, str) and len(section) <= 253
                                   and DNS_SUBDOMAIN_RE.match(section)), f"{where}: parentRef {ref}"  # fmt: skip
    for rule in route["spec"]["rules"]:
        for match in rule.get("matches", []):
            for header in match.get("headers", []):
                assert HEADER_NAME_RE.match(header["name"]), f"{where}: header {header['name']!r}"
        for backend in rule["backendRefs"]:
            assert DNS_1035_RE.match(backend["name"]) and len(backend["name"]) <= 63, f"{where}: {backend}"


def assert_valid_objects(objects: list[dict[str, Any]]) -> None:
    """What the API server (and the controllers that derive names from these) would refuse, asserted here."""
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        name, where = meta["name"], f"{obj['kind']}/{meta['name']}"
        assert (kind, name) not in seen, f"two {kind}s named {name}"
        seen.add((kind, name))
        assert len(name) <= 63 and DNS_SUBDOMAIN_RE.match(name), where
        if kind in SERVICE_KINDS:
            assert DNS_1035_RE.match(name), f"{where}: a Service name is a DNS-1035 label"
        if kind in LABEL_NAMED_KINDS:
            assert LABEL_VALUE_RE.match(name), f"{where}: the name becomes a label value"
        for path, labels in _labels_in(obj):
            for key, value in labels.items():
                assert _qualified_key(key), f"{where}{path}: label key {key!r}"
                assert len(value) <= 63 and LABEL_VALUE_RE.match(value), f"{where}{path}: label {key}={value!r}"
        annotations = meta.get("annotations") or {}
        assert all(_qualified_key(k) and isinstance(v, str) for k, v in annotations.items()), where
        assert sum(len(k) + len(v) for k, v in annotations.items()) < 256 * 1024, f"{where}: annotations too large"
        for ref in meta.get("ownerReferences", []):
            assert ref["name"] and ref["uid"], where
        if kind == "ConfigMap":
            data = obj.get("data") or {}
            assert all(CONFIG_KEY_RE.match(k) for k in data), where
            assert sum(len(k) + len(v.encode()) for k, v in data.items()) < 1024 * 1024, f"{where}: over 1 MiB"
        if kind == "Service":
            assert all(IANA_SVC_NAME_RE.match(p["name"]) for p in obj["spec"]["ports"]), where
        if kind == "HTTPRoute":
            _check_httproute(obj, where)
        pod = _pod_spec(obj)
        if pod is not None:
            _check_pod(pod, where)
        if kind in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def derived_objects(spec: RecommenderModelSpec, name: str) -> list[list[dict[str, Any]]]:
    """Every object the reconciler builds for a spec, in groups that exist together: a pod-built revision with a
    rollout's router objects, and a revision built once (its build Job, then the Deployment that fetches, and the
    autoscaler pinned to a rollout's share)."""
    ids = Ids(name=name, namespace="shop", uid="0b0c0d0e-1111-2222-3333-444455556666", revision=revision_of(spec))
    stable = ids.at("0123456789")
    routing = spec.rollout.routing
    plan = TrafficPlan((Backend(STABLE, stable.revision, revision_service_name(name, stable.revision), 90),
                        Backend(CANARY, ids.revision, revision_service_name(name, ids.revision), 10)),
                       routing.sticky_header, routing.variant_header)  # fmt: skip
    router = get_router(routing.provider.value, routing, image=PLAIN.router_image, placement={})
    pod_built = [
        build_configmap(spec, ids),
        build_deployment(spec, ids, PLAIN),
        build_revision_service(spec, ids),
        build_stable_service(spec, stable),
        build_pdb(spec, ids),
        build_servicemonitor(ids.namespace),
        build_hpa(spec, ids),
        *router.render(plan, name, ids.namespace, owner_reference(ids)),
    ]
    built_once = [
        build_job(spec, ids, STORE, keep=[f"shop/{name}/0123456789-abcdef01"]),
        build_deployment(spec, ids, STORE, replicas=2, artifact=(f"shop/{name}/{ids.revision}-0", "f" * 64)),
        build_hpa(spec, ids, bounds=(1, 1)),
    ]
    return [[o for o in group if o is not None] for group in (pod_built, built_once)]


def _parse(spec: Mapping[str, Any]) -> RecommenderModelSpec | None:
    try:
        return parse_spec(spec, default_prometheus=PROMETHEUS)
    except InvalidSpec as exc:
        assert FIELD_RE.search(str(exc)), f"InvalidSpec names no spec field: {exc}"
        return None


def _build(parsed: RecommenderModelSpec, name: str) -> None:
    try:
        groups = derived_objects(parsed, name)
    except InvalidSpec as exc:  # the reconcile reports a builder's refusal like the parser's
        assert FIELD_RE.search(str(exc)), f"InvalidSpec names no spec field: {exc}"
        return
    for group in groups:
        assert_valid_objects(group)


# Derandomized, no example database; no shrinking: shrinking 100 kB strings takes minutes, and a failure's spec
# (one fault in a valid spec, mostly) reads well as drawn.
SETTINGS = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])  # fmt: skip


@SETTINGS
@given(spec=spec_dicts(), name=model_names)
def test_any_spec_is_accepted_or_refused_naming_its_field(spec: dict[str, Any], name: str) -> None:
    """Never any exception but InvalidSpec; an accepted spec builds objects the API server accepts."""
    parsed = _parse(spec)
    event("accepted" if parsed is not None else "refused")
    if parsed is not None:
        _build(parsed, name)


@settings(SETTINGS, max_examples=25)
@given(spec=spec_dicts(VALID), name=model_names)
def test_a_spec_the_crd_accepts_is_parsed_and_built(spec: dict[str, Any], name: str) -> None:
    """The valid half of the generator (boundary values, unicode where strings are free) is never refused."""
    parsed = parse_spec(spec, default_prometheus=PROMETHEUS)
    _build(parsed, name)


@pytest.mark.parametrize("name", ["a" * MAX_NAME, "m" * 46, "m" * 47], ids=["max-length", "46", "47"])
def test_every_derived_name_is_valid_at_the_crd_name_limit(name: str) -> None:
    spec = parse_spec({"model": {"uri": "s3://models/m/1", "format": "onnx", "version": 1},
                       "serving": {"resources": {"gpu": 1}, "tuning": {"sloP99Milliseconds": 20},
                                   "autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                                                   "targetCPUUtilization": 50}},
                       "rollout": {"strategy": "canary", "steps": [{"weight": 10}]}})  # fmt: skip
    for group in derived_objects(spec, name):
        assert_valid_objects(group)


def _with(path: str, value: Any) -> dict[str, Any]:
    """A valid GPU spec with one field (a dotted path under spec) set."""
    spec: dict[str, Any] = {"model": {"uri": "s3://models/m/1", "format": "onnx", "version": 1},
                            "serving": {"resources": {"gpu": 1}}}  # fmt: skip
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return spec


# Found by the properties above: each was accepted by parse_spec, then refused by the API server when the
# operator applied a Deployment, Job or HTTPRoute (an exception at every reconcile, no status), or rendered into
# nginx.conf. Python's `$` matches before a trailing newline; several fields have no pattern in the CRD.
@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        pytest.param("serving.gpuProduct", "NVIDIA-A10G\n", "spec.serving.gpuProduct", id="gpu-product-newline"),
        pytest.param("serving.tritonImage", "nvcr.io/nvidia/tritonserver:25.10-py3\n", "spec.serving.tritonImage",
                     id="triton-image-newline"),
        pytest.param("serving.builderImage", "recserve/model-repo-builder:test\n", "spec.serving.builderImage",
                     id="builder-image-newline"),
        pytest.param("serving.buildCache", {"claimName": "Trt-Cache"}, "spec.serving.buildCache.claimName",
                     id="cache-claim-upper-case"),
        pytest.param("serving.buildCache", {"claimName": "trt-cache\n"}, "spec.serving.buildCache.claimName",
                     id="cache-claim-newline"),
        pytest.param("serving.buildCache", {"claimName": "緩存"}, "spec.serving.buildCache.claimName",
                     id="cache-claim-unicode"),
        pytest.param("serving.resources", {"gpu": 1, "cpu": "2\n"}, "spec.serving.resources.cpu", id="cpu-newline"),
        pytest.param("serving.resources", {"gpu": 1, "memory": "4Gi\n"}, "spec.serving.resources.memory",
                     id="memory-newline"),
        pytest.param("serving.ranking", {"requestColumns": "0-3\n"}, "spec.serving.ranking.requestColumns",
                     id="request-columns-newline"),
        pytest.param("model.credentials", {"secretRef": {"name": "keys\n"}}, "spec.model.credentials.secretRef.name",
                     id="secret-name-newline"),
        pytest.param("model.endpoint", "http://minio:9000\n", "spec.model.endpoint", id="endpoint-newline"),
        pytest.param("model.sha256", "a" * 64 + "\n", "spec.model.sha256", id="sha256-newline"),
        pytest.param("model.uri", "pvc://models\n/m/1", "spec.model.uri", id="pvc-claim-newline"),
        pytest.param("optimize.parity", {"maxAbsError": float("nan")}, "spec.optimize.parity.maxAbsError",
                     id="parity-error-nan"),
        pytest.param("optimize.parity", {"maxAbsError": float("inf")}, "spec.optimize.parity.maxAbsError",
                     id="parity-error-infinite"),
        pytest.param("rollout.routing", {"stickyHeader": "x-user-id\n"}, "spec.rollout.routing.stickyHeader",
                     id="sticky-header-newline"),
        pytest.param("rollout.routing", {"provider": "gatewayAPI", "parentRef": {"name": "gw", "namespace": "Ïnfra"}},
                     "spec.rollout.routing.parentRef.namespace", id="gateway-namespace-unicode"),
        pytest.param("rollout.routing", {"provider": "gatewayAPI", "parentRef": {"name": "gw", "namespace": 5}},
                     "spec.rollout.routing.parentRef.namespace", id="gateway-namespace-integer"),
        pytest.param("rollout.routing", {"provider": "gatewayAPI", "parentRef": {"name": "gw", "sectionName": ["a"]}},
                     "spec.rollout.routing.parentRef.sectionName", id="gateway-section-list"),
        pytest.param("rollout.routing", {"provider": "gatewayAPI", "parentRef": {"name": "g" * 254}},
                     "spec.rollout.routing.parentRef.name", id="gateway-name-too-long"),
    ],
)  # fmt: skip
def test_a_value_the_api_server_would_refuse_later_is_refused_now(path: str, value: Any, field: str) -> None:
    with pytest.raises(InvalidSpec, match=re.escape(field)):
        parse_spec(_with(path, value), default_prometheus=PROMETHEUS)


def test_build_job_names_stay_distinct_for_long_model_names() -> None:
    """Two long model names with a common prefix and the same revision still get two build Jobs."""
    first, second = "a" * 50 + "-x", "a" * 50 + "-y"
    assert names.build_job_name(first, "0123456789") != names.build_job_name(second, "0123456789")
    assert names.build_job_name("ctr-dnn", "0123456789") == "ctr-dnn-0123456789-build"



def test_the_nginx_config_refuses_a_value_ending_in_a_newline() -> None:
    """The router's last guard against config injection: `$` let a trailing newline through it too."""
    plan = TrafficPlan((Backend(STABLE, "0123456789", "m-0123456789", 100),), "x-user-id\n", "x-recserve-variant")
    with pytest.raises(ValueError, match="unsafe nginx config value"):
        render_nginx_conf(plan)
