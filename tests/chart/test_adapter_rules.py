"""The prometheus-adapter rule the chart ships for the queue-time HPA: one file, its ConfigMap, its docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from recserve_operator.builders.hpa import QUEUE_TIME_METRIC

from recserve_cluster import addons
from tests.chart.render import CHART, RELEASE_NAMESPACE, by_kind, helm, render

RULES_FILE = CHART / "files" / "prometheus-adapter-rules.yaml"
DEFAULT_NAME = "rs-recserve-prometheus-adapter-rules"


def _adapter_configmaps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in by_kind(docs, "ConfigMap") if "config.yaml" in c.get("data", {})]


def test_the_rule_file_is_an_adapter_config_serving_the_hpa_metric() -> None:
    config = yaml.safe_load(RULES_FILE.read_text())
    assert list(config) == ["rules"]
    assert [r["name"]["as"] for r in config["rules"]] == [QUEUE_TIME_METRIC]
    # The local cluster's adapter reads this same file: there is no second copy to drift.
    assert addons.ADAPTER_RULES_FILE.resolve() == RULES_FILE.resolve()


@pytest.mark.chart
@pytest.mark.parametrize(("values", "namespace", "name"), [
    ({"create": True}, RELEASE_NAMESPACE, DEFAULT_NAME),
    ({"create": True, "namespace": "monitoring", "name": "adapter-rules"}, "monitoring", "adapter-rules"),
])  # fmt: skip
def test_enabled_the_configmap_holds_the_rule_file_byte_for_byte(values: dict[str, Any], namespace: str, name: str,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    (cm,) = _adapter_configmaps(render({"metricsAdapter": {"rules": values}}, tmp_path))
    assert (cm["metadata"]["namespace"], cm["metadata"]["name"]) == (namespace, name)
    # prometheus-adapter reads /etc/adapter/config.yaml (the prometheus-community chart mounts `rules.existing` there).
    assert cm["data"] == {"config.yaml": RULES_FILE.read_text()}


@pytest.mark.chart
def test_by_default_the_chart_renders_no_adapter_configmap(tmp_path: Path) -> None:
    assert not _adapter_configmaps(render({}, tmp_path))
    assert not _adapter_configmaps(render({"metricsAdapter": {"rules": {"create": False, "namespace": "x"}}}, tmp_path))


@pytest.mark.chart
def test_the_schema_refuses_bad_adapter_values(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"metricsAdapter": {"rules": {"create": True, "namepsace": "monitoring"}}}, "'namepsace' not allowed"),
        ({"metricsAdapter": {"rules": {"create": "yes"}}}, "want boolean"),
        ({"metricsAdapter": {"rules": {"create": True, "namespace": "Monitoring"}}}, "does not match pattern"),
        ({"metricsAdapter": {"rules": {"create": True, "name": "rules_cm"}}}, "does not match pattern"),
    ]
    for values, message in cases:
        out = helm("template", "rs", str(CHART), values=values, tmp_path=tmp_path, check=False)
        assert out.returncode != 0 and message in out.stderr, (values, out.stderr)


def _yaml_blocks(markdown: str) -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", markdown, flags=re.S)]


def test_the_readme_snippet_for_the_prometheus_adapter_chart_is_the_rule_file() -> None:
    """The values users paste under the prometheus-community chart's `rules.custom` are exactly the shipped rules."""
    readme = (CHART / "README.md").read_text()
    blocks = [b for b in _yaml_blocks(readme) if isinstance(b, dict) and "custom" in b.get("rules", {})]
    assert len(blocks) == 1, "one values snippet with rules.custom in the chart README"
    assert blocks[0]["rules"]["custom"] == yaml.safe_load(RULES_FILE.read_text())["rules"]
    assert "rules.existing" in readme and "metricsAdapter.rules.create" in readme
