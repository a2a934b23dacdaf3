"""The CTR example trains to a useful AUC on a tiny data set, exports, reloads and predicts identically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.builder
ROOT = Path(__file__).resolve().parents[2]


def test_reaches_auc_well_above_random(ctr_result: Any) -> None:
    test = ctr_result.metrics["test"]
    assert test["auc"] > 0.7, test
    assert test["accuracy"] > 1 - test["positive_rate"] - 0.01  # at least as good as "never clicks"
    assert set(test) >= {"accuracy", "auc", "precision", "recall", "f1"}


def test_architecture_is_the_classic_ctr_dnn(ctr_result: Any) -> None:
    layers = [(type(layer).__name__, getattr(layer, "units", None) or getattr(layer, "rate", None))
              for layer in ctr_result.model.layers[1:]]
    assert layers == [("Dense", 128), ("Dropout", 0.5), ("Dense", 64), ("Dropout", 0.5), ("Dense", 1)]
    assert ctr_result.model.layers[-1].activation.__name__ == "sigmoid"


def test_export_reloads_and_predicts_identically(ctr_result: Any, ctr_train: ModuleType) -> None:
    import keras

    out = ctr_result.out_dir
    assert (out / "model.keras").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["auc"] == pytest.approx(ctr_result.metrics["test"]["auc"])
    spec = json.loads((out / "feature_spec.json").read_text())
    assert spec["feature_dim"] == ctr_result.data.features.dim == len(spec["feature_names"])
    assert spec["input_name"] == ctr_train.INPUT_NAME
    x = ctr_result.data.features.split("test").x[:500]
    reloaded = keras.models.load_model(out / "model.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), ctr_result.model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-7)


def test_variant_is_a_different_model(ctr_train: ModuleType) -> None:
    wide = ctr_train.build_model(51, "wide")
    base = ctr_train.build_model(51, "baseline")
    assert wide.count_params() != base.count_params()
    with pytest.raises(ValueError):
        ctr_train.build_model(51, "unknown")


def test_recommend_puts_likely_clicks_on_top(ctr_result: Any, recommend_module: ModuleType) -> None:
    recommend = recommend_module
    model = ctr_result.model

    def scorer(x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(x, verbose=0)).ravel()

    lifts = []
    for user in range(10):
        recs, mean_p = recommend.recommend(ctr_result.data, scorer, user, n_candidates=200, top=10)
        assert len(recs) == 10 and len({r.item for r in recs}) == 10
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
        lifts.append(np.mean([r.true_click_prob for r in recs]) / mean_p)
    assert np.mean(lifts) > 1.5, lifts


@pytest.mark.triton
def test_recommend_through_triton_matches_keras(ctr_result: Any, recommend_module: ModuleType,
                                                tmp_path: Path) -> None:
    """The exported model, built by RecServe's builder and served by the real local Triton, scores like Keras."""
    from model_repo_builder.triton_local import TritonServer

    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "model_repo_builder", "build", "--source", str(ctr_result.out_dir / "model.keras"),
         "--format", "keras", "--name", "ctr-dnn", "--version", "1", "--repo", str(repo), "--backend", "python",
         "--precision", "fp32", "--max-batch-size", "256", "--json"],
        capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with TritonServer(repo) as server:
        server.wait_model_ready("ctr-dnn")
        scorer = recommend_module.triton_scorer(server.http_url, "ctr-dnn")
        recs, _ = recommend_module.recommend(ctr_result.data, scorer, 5, n_candidates=200, top=10)
    items = np.array([r.item for r in recs])
    x = ctr_result.data.features.candidates(5, items)
    expected = ctr_result.model.predict(x, verbose=0).ravel()
    np.testing.assert_allclose([r.score for r in recs], expected, atol=1e-5)


def test_the_ranking_example_names_the_columns_train_py_writes(ctr_result: Any) -> None:
    import yaml

    example = yaml.safe_load((ROOT / "examples" / "ctr-dnn" / "ranking.yaml").read_text())
    spec = json.loads((ctr_result.out_dir / "feature_spec.json").read_text())
    assert example["spec"]["serving"]["ranking"]["requestColumns"] == spec["request_columns"] == "0-17,42-47"
    names = [spec["feature_names"][i] for i in range(spec["feature_dim"])]
    assert all(n.startswith(("user_", "hour_", "device_", "weekend")) for n in names[:18] + names[42:48])


@pytest.mark.triton
def test_recommend_through_a_ranking_head_on_triton_matches_keras(ctr_result: Any, recommend_module: ModuleType,
                                                                  tmp_path: Path) -> None:
    """Built with the ranking head (the columns from feature_spec.json), Triton picks the same top 10 as Keras
    scoring every candidate row, and the request carries the user's and the context's columns once."""
    from model_repo_builder.triton_local import TritonServer

    spec = json.loads((ctr_result.out_dir / "feature_spec.json").read_text())
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "model_repo_builder", "build", "--source", str(ctr_result.out_dir / "model.keras"),
         "--format", "keras", "--name", "ranker", "--version", "1", "--repo", str(repo), "--backend", "python",
         "--ranking-request-columns", spec["request_columns"], "--ranking-max-k", "50", "--json"],
        capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with TritonServer(repo) as server:
        server.wait_model_ready("ranker")
        ranker = recommend_module.triton_ranker(server.http_url, "ranker")
        recs, _ = recommend_module.recommend(ctr_result.data, None, 5, n_candidates=200, top=10, ranker=ranker)
    x = ctr_result.data.features.candidates(5, recommend_module.candidate_items(ctr_result.data, 5, 200))
    expected = ctr_result.model.predict(x, verbose=0).ravel()
    order = np.argsort(-expected, kind="stable")[:10]
    items = recommend_module.candidate_items(ctr_result.data, 5, 200)
    assert [r.item for r in recs] == items[order].tolist()
    np.testing.assert_allclose([r.score for r in recs], expected[order], atol=1e-5)
