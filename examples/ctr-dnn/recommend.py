"""Score candidate items for a user with the CTR model (via Triton HTTP or an ONNX file) and print the top N."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared data generator
from ecommerce_data import DEVICES, DataConfig, EcommerceData, click_logit, generate

HERE = Path(__file__).resolve().parent
Scorer = Callable[[np.ndarray], np.ndarray]
# Top `k` of the candidate rows: (indices into the rows, their scores), best first.
Ranker = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Recommendation:
    item: int
    score: float
    category: int
    brand: int
    price: float
    true_click_prob: float  # from the generator's ground truth: shows whether the model learned something


def triton_scorer(url: str, model: str, version: str = "") -> Scorer:
    """Score rows through Triton's HTTP/REST endpoint; input and output names come from the model metadata."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model, model_version=version)
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    in_dtype = meta["inputs"][0]["datatype"]

    def score(x: np.ndarray) -> np.ndarray:
        arr = x.astype(np.float16 if in_dtype == "FP16" else np.float32)
        inp = httpclient.InferInput(in_name, list(arr.shape), in_dtype)
        inp.set_data_from_numpy(arr, binary_data=True)
        res = client.infer(model, [inp], model_version=version,
                           outputs=[httpclient.InferRequestedOutput(out_name, binary_data=True)])
        return np.asarray(res.as_numpy(out_name), dtype=np.float32).ravel()

    return score


def triton_ranker(url: str, model: str, version: str = "") -> Ranker:
    """Rank through a model served with a ranking head (spec.serving.ranking): the request's columns travel once,
    the candidates' own columns once each, and Triton answers the top k. The split comes from the model's config
    (its `recserve_ranking` parameter), so the client cannot disagree with the build."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    cfg = client.get_model_config(model, model_version=version)
    layout = json.loads(cfg["parameters"]["recserve_ranking"]["string_value"])
    req_cols, cand_cols = layout["request_columns"], layout["candidate_columns"]

    def rank(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = x.astype(np.float32)
        feeds = {"request": rows[:1, req_cols], "candidates": np.ascontiguousarray(rows[:, cand_cols]),
                 "k": np.array([k], np.int64)}
        inputs = []
        for name, arr in feeds.items():
            inp = httpclient.InferInput(name, list(arr.shape), "INT64" if name == "k" else "FP32")
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("indices", "scores")]
        res = client.infer(model, inputs, model_version=version, outputs=wanted)
        return np.asarray(res.as_numpy("indices")), np.asarray(res.as_numpy("scores"), dtype=np.float32)

    return rank


def onnx_scorer(path: Path) -> Scorer:
    """Score rows with ONNX Runtime in-process (no server)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name

    def score(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {in_name: x.astype(np.float32)})[0], dtype=np.float32).ravel()

    return score


def load_data(spec_path: Path) -> EcommerceData:
    """Regenerate the exact data set the model was trained on (same config and seed) from feature_spec.json."""
    spec = json.loads(spec_path.read_text())
    return generate(DataConfig(**spec["data_config"]))


def candidate_items(data: EcommerceData, user: int, n: int = 200, seed: int = 0) -> np.ndarray:
    """A stand-in for candidate generation: n distinct catalogue items drawn per user."""
    rng = np.random.default_rng([seed, user])
    return rng.choice(data.config.n_items, size=min(n, data.config.n_items), replace=False)


def recommend(data: EcommerceData, scorer: Scorer | None, user: int, *, n_candidates: int = 200, top: int = 10,
              hour: int = 20, device: int = 0, ranker: Ranker | None = None) -> tuple[list[Recommendation], float]:
    """Top-`top` of `n_candidates` items for `user` in the given context, and the mean true click probability of all
    candidates (the baseline the top-N should beat). With `ranker` the server picks the top (a ranking model);
    else `scorer` scores every candidate and the client sorts."""
    items = candidate_items(data, user, n_candidates)
    x = data.features.candidates(user, items, hour=hour, device=device)
    logit = click_logit(data.users, data.items, np.full(items.size, user), items, hour=np.full(items.size, hour),
                        device=np.full(items.size, device))
    true_p = 1.0 / (1.0 + np.exp(-logit))
    if ranker is not None:
        order, top_scores = ranker(x, top)
        scores = np.zeros(items.size, np.float32)
        scores[order] = top_scores
    else:
        assert scorer is not None, "a scorer or a ranker"
        scores = scorer(x)
        order = np.argsort(-scores)[:top]
    it = data.items
    recs = [Recommendation(int(items[i]), float(scores[i]), int(it.category[items[i]]), int(it.brand[items[i]]),
                           float(it.price[items[i]]), float(true_p[i])) for i in order]
    return recs, float(true_p.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="Triton HTTP endpoint, e.g. localhost:8000")
    src.add_argument("--onnx", type=Path, help="score with a local ONNX file instead of a server")
    p.add_argument("--model", default="ctr-dnn", help="Triton model name (with --url)")
    p.add_argument("--ranking", action="store_true",
                   help="the model has a ranking head (spec.serving.ranking): send the user's and the context's "
                        "columns once and let Triton pick the top (with --url)")
    p.add_argument("--model-version", default="", help="Triton model version; empty = the server's policy")
    p.add_argument("--spec", type=Path, default=HERE / "artifacts" / "1" / "feature_spec.json",
                   help="feature_spec.json written by train.py (to rebuild the same features)")
    p.add_argument("--user", type=int, default=0)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--hour", type=int, default=20)
    p.add_argument("--device", choices=DEVICES, default="mobile")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)

    data = load_data(a.spec)
    if a.ranking and not a.url:
        p.error("--ranking needs --url (a Triton serving the ranking model)")
    ranker = triton_ranker(a.url, a.model, a.model_version) if a.ranking else None
    scorer = None if ranker else triton_scorer(a.url, a.model, a.model_version) if a.url else onnx_scorer(a.onnx)
    recs, mean_p = recommend(data, scorer, a.user, n_candidates=a.candidates, top=a.top, hour=a.hour,
                             device=DEVICES.index(a.device), ranker=ranker)
    top_p = float(np.mean([r.true_click_prob for r in recs]))
    if a.json:
        print(json.dumps({"user": a.user, "recommendations": [r.__dict__ for r in recs],
                          "mean_true_click_prob_candidates": mean_p, "mean_true_click_prob_top": top_p}))
        return 0
    print(f"user {a.user}: top {a.top} of {a.candidates} candidates ({a.device}, {a.hour}:00)")
    print(f"{'rank':>4} {'item':>6} {'category':>8} {'brand':>6} {'price':>9} {'score':>7} {'true p(click)':>13}")
    for rank, r in enumerate(recs, 1):
        print(f"{rank:>4} {r.item:>6} {r.category:>8} {r.brand:>6} {r.price:>9.2f} {r.score:>7.4f} "
              f"{r.true_click_prob:>13.4f}")
    print(f"mean true p(click): top {a.top} = {top_p:.4f}, all candidates = {mean_p:.4f} ({top_p / mean_p:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
