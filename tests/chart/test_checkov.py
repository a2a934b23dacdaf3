"""Security scan of the rendered chart (every values combination) and the Dockerfile with checkov.

checkov conflicts with the main venv's pins, so it lives in its own venv: RECSERVE_CHECKOV, else
.venv-tools/bin/checkov (created by the Makefile's tools target), else checkov on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.chart.render import ROOT, VALUE_SETS, render_to_dir

pytestmark = pytest.mark.chart


def _checkov() -> str:
    candidates = [os.environ.get("RECSERVE_CHECKOV"), str(ROOT / ".venv-tools" / "bin" / "checkov"),
                  shutil.which("checkov")]  # fmt: skip
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        pytest.fail("checkov not found: run `make tools` (creates .venv-tools) or set RECSERVE_CHECKOV", pytrace=False)
    return found


def _scan(args: list[str]) -> list[dict[str, Any]]:
    # --skip-download: no Prisma Cloud calls (offline CI); the built-in policies are complete without them.
    cmd = [_checkov(), *args, "--output", "json", "--skip-download", "--compact"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "LOG_LEVEL": "ERROR"})
    assert out.returncode in (0, 1), f"checkov crashed (exit {out.returncode}):\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout) if out.stdout.strip() else []
    return report if isinstance(report, list) else [report]


def _findings(reports: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    failed, skipped = [], []
    for report in reports:
        summary = report.get("summary", {})
        # Guard against a scan that silently saw nothing (a rendering change that breaks its parser).
        assert summary.get("parsing_errors") == 0 and summary.get("passed", 0) > 0, summary
        results = report.get("results", {})
        failed += [f"{c['check_id']} {c['check_name']} on {c['resource']} ({c['file_path']})"
                   for c in results.get("failed_checks", [])]  # fmt: skip
        skipped += results.get("skipped_checks", [])
    return failed, skipped


def test_checkov_finds_nothing_unexplained_in_the_rendered_chart(tmp_path: Path) -> None:
    """Every values combination renders to its own folder; a finding is either fixed or skipped with a reason.

    Offline, checkov reports no severities (they come from Prisma Cloud), so every finding counts as high.
    Its Kubernetes scanner ignores `checkov:skip=` comments: skips are `checkov.io/skipN: ID=reason`
    annotations on the object, next to what they excuse.
    """
    for name, values in VALUE_SETS.items():
        (tmp_path / name).mkdir()
        render_to_dir(values, tmp_path / name, tmp_path / "rendered" / name)
    failed, skipped = _findings(_scan(["--directory", str(tmp_path / "rendered"), "--framework", "kubernetes"]))
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    reasons = {s["check_id"]: s["check_result"].get("suppress_comment", "") for s in skipped}
    unexplained = {k: v for k, v in reasons.items() if len(v) < 20 or v == "No comment provided"}
    assert not unexplained, f"skips without a reason: {unexplained}"


def test_checkov_finds_nothing_in_the_dockerfile() -> None:
    failed, _ = _findings(_scan(["--file", str(ROOT / "Dockerfile"), "--framework", "dockerfile"]))
    assert not failed, "checkov findings:\n" + "\n".join(failed)
