"""Train a two-tower retrieval model (user and item towers, dot product, in-batch negatives); export both towers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared data generator
from ecommerce_data import DataConfig, EcommerceData, generate, roc_auc

HERE = Path(__file__).resolve().parent
USER_INPUT, ITEM_INPUT, EMBEDDING_OUTPUT = "user_features", "item_features", "embedding"


@dataclass(frozen=True)
class TwoTowerConfig:
    users: int = 2000
    items: int = 1000
    seed: int = 0
    embedding_dim: int = 32
    hidden: int = 64
    # Softmax temperature on cosine similarities: without it unit vectors cap the logits at +-1 and learning stalls.
    temperature: float = 0.1
    epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 3e-3
    version: int = 1


@dataclass
class TwoTowerResult:
    user_tower: Any
    item_tower: Any
    metrics: dict[str, Any]
    data: EcommerceData
    out_dir: Path | None


def build_tower(input_dim: int, input_name: str, hidden: int, embedding_dim: int, name: str) -> Any:
    """Dense -> Dense -> unit-normalised embedding: dot products of two towers are cosine similarities."""
    import keras

    inputs = keras.Input(shape=(input_dim,), name=input_name, dtype="float32")
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    x = keras.layers.Dense(embedding_dim)(x)
    outputs = keras.layers.UnitNormalization(axis=-1, name=EMBEDDING_OUTPUT)(x)
    return keras.Model(inputs, outputs, name=name)


def positive_pairs(data: EcommerceData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) pairs of clicks in the given labelled split (same time split as the CTR example)."""
    cfg, ev = data.config, data.events
    test_start = cfg.days - cfg.test_days
    in_split = (ev.day >= cfg.history_days) & (ev.day < test_start) if split == "train" else ev.day >= test_start
    mask = ev.click & in_split
    return ev.user[mask], ev.item[mask]


def evaluate(user_tower: Any, item_tower: Any, data: EcommerceData, k: int = 50, seed: int = 0) -> dict[str, float]:
    """Held-out clicks: AUC of (user, clicked item) vs (user, random item) scores, and recall@k over the catalogue."""
    feats = data.features
    users, items = positive_pairs(data, "test")
    u_emb = np.asarray(user_tower.predict(feats.user_features(np.arange(data.config.n_users)), verbose=0))
    i_emb = np.asarray(item_tower.predict(feats.item_features(np.arange(data.config.n_items)), verbose=0))
    rng = np.random.default_rng(seed)
    random_items = rng.integers(0, data.config.n_items, size=users.size)
    pos = np.einsum("nd,nd->n", u_emb[users], i_emb[items])
    neg = np.einsum("nd,nd->n", u_emb[users], i_emb[random_items])
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    # Rank of each clicked item among the whole catalogue for that user.
    all_scores = u_emb[users] @ i_emb.T
    rank = (all_scores > pos[:, None]).sum(axis=1)
    return {
        "pos_vs_random_auc": roc_auc(y, np.r_[pos, neg]),
        "mean_pos_score": float(pos.mean()),
        "mean_random_score": float(neg.mean()),
        f"recall_at_{k}": float((rank < k).mean()),
        f"random_recall_at_{k}": k / data.config.n_items,
        "test_pairs": int(users.size),
    }


def train(cfg: TwoTowerConfig, out: Path | None = None, verbose: int = 0) -> TwoTowerResult:
    import keras
    from keras import ops

    keras.utils.set_random_seed(cfg.seed)
    data = generate(DataConfig(n_users=cfg.users, n_items=cfg.items, seed=cfg.seed))
    feats = data.features
    user_tower = build_tower(feats.user_dim, USER_INPUT, cfg.hidden, cfg.embedding_dim, "user_tower")
    item_tower = build_tower(feats.item_dim, ITEM_INPUT, cfg.hidden, cfg.embedding_dim, "item_tower")

    u_in = keras.Input(shape=(feats.user_dim,), name=USER_INPUT)
    i_in = keras.Input(shape=(feats.item_dim,), name=ITEM_INPUT)
    # (B, B) similarity matrix: row b's positive is column b, the other items of the batch are its negatives.
    logits = keras.layers.Lambda(lambda t: ops.matmul(t[0], ops.transpose(t[1])) / cfg.temperature)(
        [user_tower(u_in), item_tower(i_in)])
    model = keras.Model([u_in, i_in], logits)

    def in_batch_softmax(_y_true: Any, y_pred: Any) -> Any:
        labels = ops.arange(ops.shape(y_pred)[0])
        return keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)

    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=in_batch_softmax)
    users, items = positive_pairs(data, "train")
    dummy = np.zeros(users.size, dtype=np.float32)  # the loss builds its own labels
    start = time.perf_counter()
    model.fit([feats.user_features(users), feats.item_features(items)], dummy, epochs=cfg.epochs,
              batch_size=cfg.batch_size, shuffle=True, verbose=verbose)
    train_seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "version": cfg.version,
        "embedding_dim": cfg.embedding_dim,
        "train_pairs": int(users.size),
        "train_seconds": round(train_seconds, 2),
        "test": evaluate(user_tower, item_tower, data, seed=cfg.seed),
        "config": asdict(cfg),
    }
    out_dir = None
    if out is not None:
        out_dir = out / str(cfg.version)
        out_dir.mkdir(parents=True, exist_ok=True)
        user_tower.save(out_dir / "user_tower.keras")
        item_tower.save(out_dir / "item_tower.keras")
        # Precomputed catalogue embeddings: what an ANN index (or a brute-force top-k) is built from.
        np.save(out_dir / "item_embeddings.npy",
                np.asarray(item_tower.predict(feats.item_features(np.arange(cfg.items)), verbose=0)))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        spec = {"user_input": USER_INPUT, "item_input": ITEM_INPUT, "output": EMBEDDING_OUTPUT,
                "user_dim": feats.user_dim, "item_dim": feats.item_dim, "embedding_dim": cfg.embedding_dim,
                "data_config": asdict(data.config)}
        (out_dir / "feature_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return TwoTowerResult(user_tower, item_tower, metrics, data, out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    d = TwoTowerConfig()
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--version", type=int, default=d.version, help="output goes to OUT/<version>/")
    p.add_argument("--out", type=Path, default=HERE / "artifacts")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    cfg = TwoTowerConfig(users=a.users, items=a.items, seed=a.seed, embedding_dim=a.embedding_dim, epochs=a.epochs,
                         batch_size=a.batch_size, temperature=a.temperature, version=a.version)
    result = train(cfg, out=a.out, verbose=min(a.verbose, 2))
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "config"}, indent=2))
    print(f"exported to {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
