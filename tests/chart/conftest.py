"""Registers the `chart` marker: checks that need the pinned helm binary (and checkov in .venv-tools)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chart: renders the Helm chart with the pinned helm (make provision)")
