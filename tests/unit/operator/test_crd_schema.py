"""The operator's check of the installed RecommenderModel CRD: Helm never upgrades CRDs, and an older schema
silently prunes the fields it does not know from every manifest."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from recserve_operator import telemetry
from recserve_operator.crd_schema import (
    CRD_NAME,
    CURRENT,
    MISSING,
    OUTDATED,
    SCHEMA_DIGEST,
    SCHEMA_DIGEST_ANNOTATION,
    UNVERSIONED,
    UPGRADE_COMMAND,
    check_installed,
    schema_digest,
)
from recserve_operator.handlers import watch_crd_schema
from recserve_operator.settings import Runtime

ROOT = Path(__file__).resolve().parents[3]


def _crd(path: Path) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CustomResourceDefinition")


def _installed(digest: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": CRD_NAME}
    if digest is not None:
        meta["annotations"] = {SCHEMA_DIGEST_ANNOTATION: digest, "helm.sh/resource-policy": "keep"}
    return {"metadata": meta, "spec": {}}


def test_the_digest_ignores_key_order_and_layout_but_not_a_field() -> None:
    spec = {"group": "recserve.dev", "versions": [{"name": "v1alpha1", "schema": {"a": 1, "b": [1, 2]}}]}
    reordered = {"versions": [{"schema": {"b": [1, 2], "a": 1}, "name": "v1alpha1"}], "group": "recserve.dev"}
    assert schema_digest(spec) == schema_digest(reordered)
    assert len(schema_digest(spec)) == 16
    grown = {**spec, "versions": [{"name": "v1alpha1", "schema": {"a": 1, "b": [1, 2], "shadow": {}}}]}
    assert schema_digest(grown) != schema_digest(spec)


def test_the_source_crd_its_chart_copy_and_the_operator_carry_the_digest_of_the_spec() -> None:
    source = _crd(ROOT / "crds" / "recommendermodels.yaml")
    chart = _crd(ROOT / "charts" / "recserve" / "crds" / "recommendermodels.yaml")
    digest = schema_digest(source["spec"])
    assert source["metadata"]["annotations"][SCHEMA_DIGEST_ANNOTATION] == digest, "run python hack/sync_crds.py"
    assert chart["metadata"]["annotations"][SCHEMA_DIGEST_ANNOTATION] == digest, "run python hack/sync_crds.py"
    assert digest == SCHEMA_DIGEST, "run python hack/sync_crds.py"
    assert check_installed(source).current and check_installed(chart).current


@pytest.mark.parametrize(
    ("installed", "reason", "says"),
    [
        (_installed(SCHEMA_DIGEST), CURRENT, "is the one this operator expects"),
        (_installed("0123456789abcdef"), OUTDATED, "has schema 0123456789abcdef, this operator expects"),
        (_installed(None), UNVERSIONED, f"has no {SCHEMA_DIGEST_ANNOTATION} annotation (installed by an earlier"),
        (None, MISSING, "is not installed"),
    ],
)  # fmt: skip
def test_each_installed_state_has_a_reason_and_a_message_that_says_what_to_do(
    installed: dict[str, Any] | None, reason: str, says: str
) -> None:
    result = check_installed(installed)
    assert result.reason == reason and says in result.message and CRD_NAME in result.message
    assert result.current is (reason == CURRENT)
    if reason != CURRENT:
        assert UPGRADE_COMMAND in result.message
    if reason in (OUTDATED, UNVERSIONED):
        assert SCHEMA_DIGEST in result.message and "dropped from every RecommenderModel" in result.message


class _Kube:
    """Answers the CRD list with the given sequence (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.queries: list[tuple[str, str, str]] = []

    def list_objects(self, resource: Any, namespace: str, label_selector: str = "", *,
                     field_selector: str = "") -> list[dict[str, Any]]:  # fmt: skip
        self.queries.append((resource.path(namespace), label_selector, field_selector))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [answer] if answer is not None else []


def test_the_watch_logs_each_state_once_exports_it_and_stops_once_the_crd_is_current(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = _installed("0123456789abcdef")
    kube = _Kube(stale, stale, ApiException(status=503), _installed(SCHEMA_DIGEST), AssertionError("looked again"))
    gauge: list[float] = []
    stop = threading.Event()
    monkeypatch.setattr(telemetry.CRD_SCHEMA_CURRENT, "set", gauge.append)
    with caplog.at_level(logging.INFO, logger="recserve.handlers"):
        watch_crd_schema(kube, stop, 0)  # type: ignore[arg-type]
    assert kube.queries == [("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "",
                             f"metadata.name={CRD_NAME}")] * 4  # fmt: skip
    assert gauge == [0, 0, 1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("CRD schema Outdated:") and UPGRADE_COMMAND in errors[0]
    assert any(r.levelno == logging.WARNING and "Could not check" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("CRD schema Current:") for r in caplog.records)


def test_a_stopped_operator_stops_looking() -> None:
    kube = _Kube(_installed(None), AssertionError("looked again after stop"))
    stop = threading.Event()
    stop.set()
    watch_crd_schema(kube, stop, 3600)  # type: ignore[arg-type]
    assert len(kube.queries) == 1


def test_the_recheck_period_comes_from_the_environment() -> None:
    assert Runtime.from_env({}).crd_recheck_seconds == 300.0
    assert Runtime.from_env({"RECSERVE_CRD_RECHECK_SECONDS": "5"}).crd_recheck_seconds == 5.0
