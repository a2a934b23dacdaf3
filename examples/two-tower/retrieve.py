"""Retrieve a user's top-N catalogue items: user tower (Triton over HTTP, or the local .keras) x item embeddings."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared data generator
from ecommerce_data import DEVICES, DataConfig, EcommerceData, click_logit, generate

HERE = Path(__file__).resolve().parent
UserEncoder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Retrieved:
    item: int
    score: float
    category: int
    brand: int
    price: float
    true_click_prob: float  # the generator's ground truth, to show the retrieval learned something


def triton_encoder(url: str, model: str = "two-tower-user") -> UserEncoder:
    """The user tower served by Triton (HTTP); input/output names from the model metadata."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model)
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]

    def encode(x: np.ndarray) -> np.ndarray:
        inp = httpclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x.astype(np.float32), binary_data=True)
        return np.asarray(client.infer(model, [inp]).as_numpy(out_name), dtype=np.float32)

    return encode


def keras_encoder(path: Path) -> UserEncoder:
    import keras

    tower = keras.models.load_model(path)
    return lambda x: np.asarray(tower.predict(x, verbose=0), dtype=np.float32)


def retrieve(data: EcommerceData, encode: UserEncoder, item_embeddings: np.ndarray, user: int, *, top: int = 10,
             hour: int = 20, device: int = 0) -> tuple[list[Retrieved], float]:
    """Top-`top` items by dot product, and the catalogue's mean true click probability for this user (the baseline)."""
    u = encode(data.features.user_features(np.array([user])))[0]
    scores = item_embeddings @ u
    all_items = np.arange(data.config.n_items)
    logit = click_logit(data.users, data.items, np.full(all_items.size, user), all_items,
                        hour=np.full(all_items.size, hour), device=np.full(all_items.size, device))
    true_p = 1.0 / (1.0 + np.exp(-logit))
    it = data.items
    order = np.argsort(-scores)[:top]
    recs = [Retrieved(int(i), float(scores[i]), int(it.category[i]), int(it.brand[i]), float(it.price[i]),
                      float(true_p[i])) for i in order]
    return recs, float(true_p.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifacts", type=Path, default=HERE / "artifacts" / "1",
                   help="train.py output: feature_spec.json, item_embeddings.npy, user_tower.keras")
    p.add_argument("--url", help="Triton HTTP endpoint serving the user tower (default: run the .keras locally)")
    p.add_argument("--model", default="two-tower-user", help="Triton model name of the user tower")
    p.add_argument("--user", type=int, default=0)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    spec = json.loads((a.artifacts / "feature_spec.json").read_text())
    data = generate(DataConfig(**spec["data_config"]))
    encode = triton_encoder(a.url, a.model) if a.url else keras_encoder(a.artifacts / "user_tower.keras")
    recs, mean_p = retrieve(data, encode, np.load(a.artifacts / "item_embeddings.npy"), a.user, top=a.top)
    top_p = float(np.mean([r.true_click_prob for r in recs]))
    if a.json:
        print(json.dumps({"user": a.user, "items": [asdict(r) for r in recs], "mean_true_click_prob_top": top_p,
                          "mean_true_click_prob_catalogue": mean_p}))
        return 0
    print(f"user {a.user}: top {a.top} of {data.config.n_items} items ({DEVICES[0]}, 20:00)")
    print(f"{'rank':>4} {'item':>6} {'category':>8} {'brand':>6} {'price':>9} {'cosine':>7} {'true p(click)':>13}")
    for rank, r in enumerate(recs, 1):
        print(f"{rank:>4} {r.item:>6} {r.category:>8} {r.brand:>6} {r.price:>9.2f} {r.score:>7.4f} "
              f"{r.true_click_prob:>13.4f}")
    print(f"mean true p(click): top {a.top} = {top_p:.4f}, whole catalogue = {mean_p:.4f} ({top_p / mean_p:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
