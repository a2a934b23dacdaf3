"""The e-commerce data generator is deterministic by seed, has learnable signal and a well-formed feature pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ecommerce_data import DataConfig, binary_metrics, click_logit, generate, roc_auc

SMALL = DataConfig(n_users=400, n_items=200, seed=7)


def test_same_seed_same_data_and_different_seed_different_data() -> None:
    a, b, c = generate(SMALL), generate(SMALL), generate(DataConfig(n_users=400, n_items=200, seed=8))
    for name in ("user", "item", "session", "day", "hour", "device", "click", "cart", "purchase"):
        np.testing.assert_array_equal(getattr(a.events, name), getattr(b.events, name))
    np.testing.assert_array_equal(a.items.price, b.items.price)
    np.testing.assert_array_equal(a.features.split("train").x, b.features.split("train").x)
    assert len(a.events) != len(c.events) or not np.array_equal(a.events.item, c.events.item)


def test_sizes_are_configurable() -> None:
    data = generate(DataConfig(n_users=50, n_items=40, n_categories=5, n_brands=9, seed=1))
    assert data.users.category_affinity.shape == (50, 5)
    assert data.items.category.shape == (40,)
    assert data.events.user.max() < 50 and data.events.item.max() < 40
    assert set(np.unique(data.items.category)) <= set(range(5))


def test_funnel_is_nested_and_rates_plausible() -> None:
    ev = generate(SMALL).events
    assert np.all(ev.cart <= ev.click) and np.all(ev.purchase <= ev.cart)
    assert 0.05 < ev.click.mean() < 0.4
    assert 0.0 < ev.purchase.mean() < ev.click.mean()


def test_click_rate_rises_with_true_affinity() -> None:
    data = generate(SMALL)
    ev = data.events
    logit = click_logit(data.users, data.items, ev.user, ev.item, hour=ev.hour, device=ev.device)
    edges = np.quantile(logit, [0.2, 0.4, 0.6, 0.8])
    rates = [ev.click[np.digitize(logit, edges) == q].mean() for q in range(5)]
    assert all(lo < hi for lo, hi in itertools.pairwise(rates)), rates
    assert rates[-1] > 3 * rates[0]


def test_users_click_more_in_their_favourite_category() -> None:
    data = generate(SMALL)
    ev = data.events
    favourite = np.argmax(data.users.category_affinity, axis=1)
    in_fav = data.items.category[ev.item] == favourite[ev.user]
    assert ev.click[in_fav].mean() > 1.5 * ev.click[~in_fav].mean()


def test_feature_pipeline_shapes_and_time_split() -> None:
    data = generate(SMALL)
    feats = data.features
    train, test = feats.split("train"), feats.split("test")
    assert train.x.dtype == np.float32 and train.x.shape[1] == feats.dim == len(feats.feature_names())
    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()
    assert feats.user_dim + feats.item_dim + feats.context_dim + 3 == feats.dim
    assert train.x.shape[0] > test.x.shape[0] > 0
    cand = feats.candidates(3, np.arange(20), hour=9, device=1)
    assert cand.shape == (20, feats.dim)
    # The same user in every row: the user block is identical across candidates.
    assert np.all(cand[:, : feats.user_dim] == cand[0, : feats.user_dim])
    with pytest.raises(ValueError):
        feats.split("validation")


def test_profile_features_carry_the_latent_preference() -> None:
    """Users' observed category shares (from history) point at their latent favourite category."""
    data = generate(SMALL)
    favourite = np.argmax(data.users.category_affinity, axis=1)
    observed = np.argmax(data.features.user_cat_share, axis=1)
    assert (observed == favourite).mean() > 0.4  # chance is about 1/12


def test_metrics_helpers() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.zeros(4)) == 0.5
    m = binary_metrics(y, np.array([0.1, 0.6, 0.8, 0.4]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
