"""The builder runs users' model files: unsafe deserialization only on the spec's word, and a builder pod with no
API token (unless a workload identity needs one), no writable root filesystem and no privileges."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest
from operator_samples import minimal_spec
from recserve_operator.builders.common import Ids
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.job import build_job
from recserve_operator.names import BUILDER_CONTAINER
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import InvalidSpec, RecommenderModelSpec, parse_spec, revision_of

from model_repo_builder.cli import build_parser

DEFAULTS = OperatorDefaults(triton_image="nvcr.io/nvidia/tritonserver:25.10-py3", builder_image="recserve/builder:t")
STORE = OperatorDefaults(model_store="s3://models/artifacts", model_store_secret="store-keys",
                         fetcher_image="recserve/operator:t")  # fmt: skip
TUNED = {"resources": {"gpu": 1}, "gpuProduct": "NVIDIA-A10G",
         "tuning": {"sloP99Milliseconds": 25, "concurrencyLevels": [1, 8]}}  # fmt: skip


def _model(**extra: Any) -> dict[str, Any]:
    return {"uri": "s3://models/ctr/3/model.keras", "format": "keras", "version": 3, **extra}


def _ids(spec: RecommenderModelSpec) -> Ids:
    return Ids(name="ctr-dnn", namespace="shop", uid="uid-1", revision=revision_of(spec))


def _builder_pods(spec_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod the builder runs in: a revision pod's init container, the build Job's, the tuning Job's."""
    spec = parse_spec(spec_dict)
    tuned = parse_spec({**spec_dict, "serving": {**spec_dict["serving"], **TUNED}})
    return {
        "revision pod": build_deployment(spec, _ids(spec), DEFAULTS)["spec"]["template"]["spec"],
        "build Job": build_job(spec, _ids(spec), STORE)["spec"]["template"]["spec"],
        "tuning Job": build_job(tuned, _ids(tuned), STORE)["spec"]["template"]["spec"],
    }


def _builder(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod.get("initContainers", []) + pod["containers"]
    return next(c for c in containers if c["name"] == BUILDER_CONTAINER)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_model(), False),
        (_model(allowUnsafeDeserialization=False), False),
        (_model(allowUnsafeDeserialization=True), True),
    ],
    ids=["off unless asked", "off when said so", "on when the spec asks"],
)
def test_unsafe_deserialization_reaches_the_builder_only_when_the_spec_asks(model: dict[str, Any],
                                                                            expected: bool) -> None:
    spec_dict = minimal_spec(model=model)
    assert parse_spec(spec_dict).model.allow_unsafe_deserialization is expected
    for where, pod in _builder_pods(spec_dict).items():
        args = _builder(pod)["args"]
        assert ("--allow-unsafe-deserialization" in args) is expected, where
        assert build_parser().parse_args(args).allow_unsafe_deserialization is expected, where


def test_unsafe_deserialization_must_be_a_boolean() -> None:
    with pytest.raises(InvalidSpec, match=r"spec.model.allowUnsafeDeserialization must be a boolean, got 'yes'"):
        parse_spec(minimal_spec(model=_model(allowUnsafeDeserialization="yes")))


@pytest.mark.parametrize(
    ("flag", "same_revision"),
    [(False, True), (True, False)],
    ids=["left off, as before the field existed, keeps the revision", "turning it on makes a new revision"],
)
def test_unsafe_deserialization_is_part_of_the_revision_when_on(flag: bool, same_revision: bool) -> None:
    # A new revision: a build Job is never re-applied, so a refused build is retried only by a new one.
    base = revision_of(parse_spec(minimal_spec(model=_model())))
    flagged = revision_of(parse_spec(minimal_spec(model=_model(allowUnsafeDeserialization=flag))))
    assert (flagged == base) is same_revision


@pytest.mark.parametrize(
    ("credentials", "account"),
    [(None, None), ({"secretRef": {"name": "keys"}}, None), ({"serviceAccountName": "ctr-reader"}, "ctr-reader")],
    ids=["no credentials: no token", "a key Secret: still no token",
         "workload identity: that account's token is mounted (documented in the CRD)"],
)
def test_the_builder_pod_gets_an_api_token_only_for_workload_identity(credentials: dict[str, Any] | None,
                                                                      account: str | None) -> None:
    model = _model(**({"credentials": credentials} if credentials else {}))
    for where, pod in _builder_pods(minimal_spec(model=model)).items():
        assert pod["automountServiceAccountToken"] is (account is not None), where
        assert pod.get("serviceAccountName") == account, where


def test_the_builder_runs_unprivileged_on_a_read_only_root_filesystem() -> None:
    for where, pod in _builder_pods(minimal_spec(model=_model())).items():
        security = _builder(pod)["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, where
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"] == {"drop": ["ALL"]}, where
        assert "privileged" not in security and pod["securityContext"]["runAsNonRoot"] is True, where


def _under(path: str, mounts: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"])), None)


@pytest.mark.parametrize(
    "serving",
    [{"resources": {"gpu": 1}}, {"resources": {"gpu": 1}, "buildCache": {"claimName": "build-cache"}}],
    ids=["without a build cache", "with a build cache claim"],
)
def test_every_path_the_builder_writes_is_a_writable_volume_and_nothing_else_is(serving: dict[str, Any]) -> None:
    for where, pod in _builder_pods(minimal_spec(model=_model(), serving=serving)).items():
        builder = _builder(pod)
        env = {e["name"]: e["value"] for e in builder["env"] if "value" in e}
        args = builder["args"]
        # HOME and XDG_CACHE_HOME take the libraries' caches (Keras, TensorRT, ONNX); TMPDIR is unset, so Python's
        # tempfile uses /tmp; --repo holds the staging directory; the build cache its own claim.
        writes = [env["HOME"], env["XDG_CACHE_HOME"], env.get("TMPDIR", "/tmp"), args[args.index("--repo") + 1]]
        writes += [env["MODEL_REPO_BUILDER_CACHE_DIR"]] if "buildCache" in serving else []
        for path in writes:
            mount = _under(path, builder["volumeMounts"])
            assert mount is not None and not mount.get("readOnly"), (where, path)
        read_only = {m["name"] for m in builder["volumeMounts"] if m.get("readOnly")}
        assert read_only >= {"config"}, where  # the config template is the operator's, not the builder's
