"""The scale-out benchmark's models: the real-pod tests' tiny CTR MLP, or a production-sized CTR model made here.

`production` is a CTR ranking model of the size real ones have, generated deterministically (seeded initial weights,
no training, no download: the build's cost does not depend on the weights' values, and the parity gate compares
the same weights on both sides). Four categorical id inputs (int64, shape (1,)) through Embedding tables plus 16
dense features (float32), concatenated into a 512-256-128 ReLU MLP with a sigmoid output:

    user_id       450,000 x 32   14.40 M weights
    item_id       250,000 x 32    8.00 M
    brand_id      200,000 x 16    3.20 M
    category_id    20,000 x 16    0.32 M
    MLP 112 -> 512 -> 256 -> 128 -> 1   0.22 M
    total 26.14 M float32 weights: 104.6 MB, the .keras file and the ONNX model alike

The builder's parity gate synthesizes integer inputs in [0, 10), valid ids of every table. Measured on the
development machine (2 shared cores): `model-repo-builder build --backend onnxruntime` takes ~30 s (conversion
29 s), parity max abs error 1.2e-7, and peaks at 7.1 GB resident (tf2onnx's graph passes copy the tables many
times), which is why the benchmark gives this model's pods 8Gi (the build Job and a rebuilding pod's init container take
the serving resources). On the local cluster's real node the build took 31-44 s in a pod.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHOICES = ("tiny", "production")
# (input name, rows, dims): users, items, brands, categories
TABLES: tuple[tuple[str, int, int], ...] = (
    ("user_id", 450_000, 32),
    ("item_id", 250_000, 32),
    ("brand_id", 200_000, 16),
    ("category_id", 20_000, 16),
)
DENSE_FEATURES = 16
HIDDEN = (512, 256, 128)


@dataclass(frozen=True)
class BenchModel:
    kind: str
    path: Path  # gone once the benchmark's temporary folder is
    parameters: int
    inputs: tuple[str, ...]
    keras_bytes: int

    def describe(self) -> str:
        return (f"{self.kind} CTR Keras model: {self.parameters:,} parameters ({size(self.parameters * 4)} "
                f"float32), .keras {size(self.keras_bytes)}, inputs {', '.join(self.inputs)}")  # fmt: skip


def size(n: float) -> str:
    """Bytes in MB (decimal) from 1 MB up, else in KB."""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _keras(seed: int) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    return keras


def production_ctr(path: Path, seed: int = 7) -> Path:
    """Save the production-sized CTR model (the module's docstring) at `path` (.keras): same seed, same weights."""
    keras = _keras(seed)
    inputs, parts = [], []
    for i, (name, rows, dims) in enumerate(TABLES):
        inp = keras.Input(shape=(1,), dtype="int64", name=name)
        init = keras.initializers.RandomNormal(stddev=0.05, seed=seed + i)
        emb = keras.layers.Embedding(rows, dims, embeddings_initializer=init, name=f"{name}_embedding")(inp)
        inputs.append(inp)
        parts.append(keras.layers.Flatten(name=f"{name}_vector")(emb))
    dense = keras.Input(shape=(DENSE_FEATURES,), dtype="float32", name="dense")
    inputs.append(dense)
    h = keras.layers.Concatenate(name="features")([*parts, dense])
    for j, units in enumerate(HIDDEN):
        init = keras.initializers.GlorotUniform(seed=seed + 100 + j)
        h = keras.layers.Dense(units, activation="relu", kernel_initializer=init, name=f"mlp_{units}")(h)
    init = keras.initializers.GlorotUniform(seed=seed + 200)
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init, name="ctr")(h)
    keras.Model(inputs, out, name="ctr_production").save(path)  # never compiled: no optimizer state in the file
    return path


def bench_model(kind: str, tmp: Path) -> BenchModel:
    """The benchmark's model of `kind`, written under `tmp`, with its parameter count and input names."""
    if kind == "tiny":
        from tests.integration.realpods import keras_model

        path, _, _ = keras_model(tmp)
    elif kind == "production":
        path = production_ctr(tmp / "model.keras")
    else:
        raise ValueError(f"unknown model {kind!r} (one of {', '.join(CHOICES)})")
    model = _keras(0).models.load_model(path, compile=False)
    names = tuple(str(getattr(t, "name", "")).split(":")[0] for t in model.inputs)
    return BenchModel(kind, path, int(model.count_params()), names, path.stat().st_size)
