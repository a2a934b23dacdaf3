"""The chart's CRDs are generated copies of crds/ (the single source of truth): any drift fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import yaml

from tests.chart.render import CHART, ROOT

SOURCE_DIR = ROOT / "crds"
CHART_CRDS = CHART / "crds"


def _sync_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync_crds", ROOT / "hack" / "sync_crds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sync_crds"] = module
    spec.loader.exec_module(module)
    return module


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_chart_has_exactly_the_crd_files_of_crds_dir() -> None:
    source = sorted(p.name for p in SOURCE_DIR.glob("*.yaml"))
    assert "recommendermodels.yaml" in source
    assert sorted(p.name for p in CHART_CRDS.glob("*.yaml")) == source, "run python hack/sync_crds.py"


def test_chart_crds_equal_their_source_except_for_the_keep_annotation() -> None:
    sync = _sync_script()
    for source in sorted(SOURCE_DIR.glob("*.yaml")):
        copied = _docs(CHART_CRDS / source.name)
        assert [sync.without_keep(d) for d in copied] == _docs(source), (
            f"charts/recserve/crds/{source.name} drifted from crds/{source.name}: run python hack/sync_crds.py"
        )


def test_every_chart_crd_is_kept_on_uninstall() -> None:
    for path in sorted(CHART_CRDS.glob("*.yaml")):
        for doc in _docs(path):
            assert doc["kind"] == "CustomResourceDefinition", path.name
            assert doc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", doc["metadata"]["name"]


def test_sync_script_reports_no_drift_byte_for_byte() -> None:
    assert _sync_script().drift() == []


def test_sync_script_notices_an_edited_copy(tmp_path: Path, monkeypatch) -> None:
    sync = _sync_script()
    copy_dir = tmp_path / "crds"
    copy_dir.mkdir()
    for path in CHART_CRDS.glob("*.yaml"):
        (copy_dir / path.name).write_text(path.read_text())
    edited = copy_dir / "recommendermodels.yaml"
    edited.write_text(edited.read_text().replace("served: true", "served: false", 1))
    monkeypatch.setattr(sync, "CHART_CRD_DIR", copy_dir)
    assert sync.drift() == ["recommendermodels.yaml"]
