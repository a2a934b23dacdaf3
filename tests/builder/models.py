"""Tiny recommendation models trained a few steps on synthetic data, for the builder tests and benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

N_USER, N_ITEM, N_CONTEXT = 16, 12, 4


def synthetic_ctr(n: int, seed: int = 0) -> tuple[dict[str, NDArray[Any]], NDArray[Any]]:
    """User/item/context features and click labels from a planted logistic model (so AUC is meaningful)."""
    rng = np.random.default_rng(seed)
    user = rng.normal(size=(n, N_USER)).astype(np.float32)
    item = rng.normal(size=(n, N_ITEM)).astype(np.float32)
    ctx = rng.normal(size=(n, N_CONTEXT)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=N_USER + N_ITEM + N_CONTEXT)
    logits = np.concatenate([user, item, ctx], axis=1) @ w * 0.5 + 0.3 * user[:, 0] * item[:, 0]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return {"user": user, "item": item, "context": ctx}, labels


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    return keras


def ctr_dnn(path: Path, steps: int = 30, hidden: tuple[int, int] = (128, 64)) -> Path:
    """The seed CTR DNN: concat features -> dense 128 relu -> dropout 0.5 -> dense 64 relu -> dropout -> sigmoid."""
    keras = _keras()
    feats, labels = synthetic_ctr(2048)
    x = np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1)
    inp = keras.Input(shape=(x.shape[1],), name="features")
    h = keras.layers.Dense(hidden[0], activation="relu")(inp)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.Dense(hidden[1], activation="relu")(h)
    h = keras.layers.Dropout(0.5)(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="ctr")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, labels, batch_size=256, epochs=max(1, steps // 8), verbose=0)
    model.save(path)
    return path


def two_tower(path: Path, steps: int = 16) -> Path:
    """A two-input model: user tower and item features, merged into a scoring head."""
    keras = _keras()
    feats, labels = synthetic_ctr(2048, seed=1)
    user_in = keras.Input(shape=(N_USER,), name="user")
    item_in = keras.Input(shape=(N_ITEM,), name="item")
    u = keras.layers.Dense(32, activation="relu")(user_in)
    i = keras.layers.Dense(32, activation="relu")(item_in)
    h = keras.layers.Concatenate()([u, i, keras.layers.Multiply()([u, i])])
    h = keras.layers.Dense(32, activation="relu")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="score")(h)
    model = keras.Model([user_in, item_in], out)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit([feats["user"], feats["item"]], labels, batch_size=256, epochs=max(1, steps // 8), verbose=0)
    model.save(path)
    return path


def fixed_batch(path: Path) -> Path:
    """A model whose input has a fixed batch size of 1: the builder must refuse it."""
    keras = _keras()
    inp = keras.Input(batch_shape=(1, 8), name="x")
    out = keras.layers.Dense(1, activation="sigmoid", name="y")(inp)
    keras.Model(inp, out).save(path)
    return path


def ctr_parity_data(path: Path, n: int = 512, seed: int = 7) -> Path:
    """Labelled samples for the CTR DNN in the --parity-data npz layout (inputs by name + `labels`)."""
    feats, labels = synthetic_ctr(n, seed)
    x = np.concatenate([feats["user"], feats["item"], feats["context"]], axis=1)
    np.savez(path, features=x, labels=labels)
    return path
