"""The two-tower example emits unit embeddings of the declared size that rank clicked items above random ones."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.builder


def test_towers_emit_embeddings_of_declared_size(two_tower_result: Any) -> None:
    feats = two_tower_result.data.features
    u = np.asarray(two_tower_result.user_tower.predict(feats.user_features(np.arange(7)), verbose=0))
    i = np.asarray(two_tower_result.item_tower.predict(feats.item_features(np.arange(9)), verbose=0))
    assert u.shape == (7, 16) and i.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)


def test_positives_rank_above_random_items(two_tower_result: Any) -> None:
    test = two_tower_result.metrics["test"]
    assert test["mean_pos_score"] > test["mean_random_score"]
    assert test["pos_vs_random_auc"] > 0.65, test
    assert test["recall_at_50"] > 2 * test["random_recall_at_50"]


def test_exported_towers_reload_identically(two_tower_result: Any) -> None:
    import keras

    out = two_tower_result.out_dir
    spec = json.loads((out / "feature_spec.json").read_text())
    assert spec["embedding_dim"] == 16
    feats = two_tower_result.data.features
    x_u, x_i = feats.user_features(np.arange(50)), feats.item_features(np.arange(50))
    for name, tower, x in (("user_tower", two_tower_result.user_tower, x_u),
                           ("item_tower", two_tower_result.item_tower, x_i)):
        reloaded = keras.models.load_model(out / f"{name}.keras")
        assert reloaded.input_shape == (None, x.shape[1])
        np.testing.assert_allclose(reloaded.predict(x, verbose=0), tower.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    emb = np.load(out / "item_embeddings.npy")
    assert emb.shape == (two_tower_result.data.config.n_items, 16)


def test_retrieve_finds_items_the_user_likes(two_tower_result: Any, retrieve_module: ModuleType) -> None:
    tower = two_tower_result.user_tower

    def encode(x: np.ndarray) -> np.ndarray:
        return np.asarray(tower.predict(x, verbose=0))

    emb = np.load(two_tower_result.out_dir / "item_embeddings.npy")
    lifts = []
    for user in range(10):
        recs, catalogue_p = retrieve_module.retrieve(two_tower_result.data, encode, emb, user, top=10)
        assert len({r.item for r in recs}) == 10
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
        lifts.append(np.mean([r.true_click_prob for r in recs]) / catalogue_p)
    assert np.mean(lifts) > 1.3, lifts
