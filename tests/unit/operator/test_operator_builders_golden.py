"""Golden files for every builder; regenerate with RECSERVE_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_samples import ROOT, example_objects
from recserve_operator.builders.common import Ids
from recserve_operator.builders.configmap import build_configmap
from recserve_operator.builders.deployment import build_deployment
from recserve_operator.builders.hpa import build_hpa
from recserve_operator.builders.pdb import build_pdb
from recserve_operator.builders.service import build_revision_service, build_stable_service
from recserve_operator.builders.servicemonitor import build_servicemonitor
from recserve_operator.settings import OperatorDefaults
from recserve_operator.spec import parse_spec, revision_of

GOLDEN = ROOT / "tests" / "golden" / "operator"
DEFAULTS = OperatorDefaults(triton_image="nvcr.io/nvidia/tritonserver:25.10-py3", builder_image="recserve/builder:test")
CASES = {
    "ctr-dnn-onnxruntime-gpu": "ctr-dnn/onnxruntime-gpu.yaml",
    "ctr-dnn-tensorrt-fp16": "ctr-dnn/tensorrt-fp16.yaml",
    "ctr-dnn-cpu-only": "ctr-dnn/cpu-only.yaml",
    "two-tower-int8": "two-tower/recommendermodel.yaml",
}


def _objects(example: str) -> dict[str, Any]:
    doc = example_objects()[example]
    spec = parse_spec(doc["spec"])
    ids = Ids(name=doc["metadata"]["name"], namespace="shop", uid="uid-1234", revision=revision_of(spec))
    return {
        "configmap": build_configmap(spec, ids),
        "deployment": build_deployment(spec, ids, DEFAULTS),
        "service": build_revision_service(spec, ids),
        "stable-service": build_stable_service(spec, ids),
        "pdb": build_pdb(spec, ids),
        "hpa": build_hpa(spec, ids),
        "servicemonitor": build_servicemonitor(ids.namespace),
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (config.pbtxt, build spec) as literal blocks, so golden diffs stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _check(path: Path, obj: Any) -> None:
    text = yaml.dump(obj, Dumper=_Dumper, sort_keys=True, width=120)
    if os.environ.get("RECSERVE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with RECSERVE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{path.name} differs from the builder output; review, then RECSERVE_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "kind", ["configmap", "deployment", "service", "stable-service", "pdb", "hpa", "servicemonitor"]
)
def test_builder_output_matches_golden_file(case: str, kind: str) -> None:
    _check(GOLDEN / case / f"{kind}.yaml", _objects(CASES[case])[kind])


def test_builders_are_deterministic() -> None:
    assert _objects(CASES["ctr-dnn-tensorrt-fp16"]) == _objects(CASES["ctr-dnn-tensorrt-fp16"])
