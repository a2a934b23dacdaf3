"""The CRD as an API: descriptions everywhere, examples valid, one must-reject manifest per CEL rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from operator_samples import ROOT, example_objects

CRD = yaml.safe_load((ROOT / "crds" / "recommendermodels.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
REJECTS = sorted((ROOT / "tests" / "integration" / "manifests").glob("reject-*.yaml"))


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema (drop Kubernetes extensions and `format: int64`)."""
    if isinstance(schema, dict):
        return {k: _to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes") and k != "format"}
    if isinstance(schema, list):
        return [_to_jsonschema(v) for v in schema]
    return schema


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Apply schema defaults the way the apiserver does, so CEL-free checks see stored objects."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = _defaulted(sub, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [_defaulted(schema["items"], v) for v in value]
    return value


def test_every_field_has_a_description_so_kubectl_explain_teaches_the_api() -> None:
    missing = [p for p, s in _walk(SCHEMA) if p != ".metadata" and not p.endswith("[]") and not s.get("description")]
    assert missing == []


def test_the_crd_has_status_printer_columns_short_names_and_category() -> None:
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {
        "Phase",
        "Backend",
        "Stable",
        "Canary",
        "Ready",
        "Age",
    }
    assert set(CRD["spec"]["names"]["shortNames"]) == {"rm", "recmodel"}
    assert CRD["spec"]["names"]["categories"] == ["recserve"]


@pytest.mark.parametrize("path", sorted(example_objects()))
def test_examples_are_valid_against_the_openapi_schema(path: str) -> None:
    obj = example_objects()[path]
    jsonschema.validate(_defaulted(SCHEMA, obj), _to_jsonschema(SCHEMA))


def test_every_cel_rule_has_a_must_reject_manifest() -> None:
    messages = [rule["message"] for _, s in _walk(SCHEMA) for rule in s.get("x-kubernetes-validations", [])]
    expected = [_expectation(p) for p in REJECTS]
    uncovered = [m for m in messages if not any(e in m for e in expected)]
    assert uncovered == []


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", REJECTS, ids=lambda p: p.stem)
def test_must_reject_manifests_declare_their_expected_message(path: Path) -> None:
    assert _expectation(path)
    assert yaml.safe_load(path.read_text())["kind"] == "RecommenderModel"
