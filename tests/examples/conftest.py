"""Fixtures for the examples' tests: import paths for examples/ and tiny, session-shared trained models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The shared data generator is a plain module in examples/ (the example folders have dashes: not packages).
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def load_example(relpath: str, module_name: str) -> ModuleType:
    """Import an example script (e.g. ctr-dnn/train.py) by path under a unique module name."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / relpath)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ctr_train() -> ModuleType:
    return load_example("ctr-dnn/train.py", "recserve_example_ctr_train")


@pytest.fixture(scope="session")
def two_tower_train() -> ModuleType:
    return load_example("two-tower/train.py", "recserve_example_two_tower_train")


@pytest.fixture(scope="session")
def recommend_module() -> ModuleType:
    return load_example("ctr-dnn/recommend.py", "recserve_example_recommend")


@pytest.fixture(scope="session")
def retrieve_module() -> ModuleType:
    return load_example("two-tower/retrieve.py", "recserve_example_retrieve")


@pytest.fixture(scope="session")
def ctr_result(ctr_train: ModuleType, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The CTR model trained once on a tiny data set, exported to a temporary directory."""
    cfg = ctr_train.TrainConfig(users=600, items=300, epochs=4, seed=1)
    return ctr_train.train(cfg, out=tmp_path_factory.mktemp("ctr"))


@pytest.fixture(scope="session")
def two_tower_result(two_tower_train: ModuleType, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = two_tower_train.TwoTowerConfig(users=600, items=300, epochs=6, embedding_dim=16, seed=1)
    return two_tower_train.train(cfg, out=tmp_path_factory.mktemp("two_tower"))
