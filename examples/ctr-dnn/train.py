"""Train the classic Keras CTR/purchase DNN on generated e-commerce data, evaluate it on held-out days, export it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner hides the metrics table


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared data generator
from ecommerce_data import DataConfig, EcommerceData, binary_metrics, generate

HERE = Path(__file__).resolve().parent
INPUT_NAME = "features"
OUTPUT_NAME = "probability"
# (units of the first and second hidden layer, dropout). "baseline" is the classic model; "wide" is the slightly
# different second version that the canary and A/B examples roll out next to it.
VARIANTS: dict[str, tuple[int, int, float]] = {"baseline": (128, 64, 0.5), "wide": (256, 128, 0.3)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model: data size, seed, architecture variant and schedule."""

    users: int = 2000
    items: int = 1000
    seed: int = 0
    epochs: int = 4
    batch_size: int = 512
    learning_rate: float = 1e-3
    label: str = "click"
    variant: str = "baseline"
    version: int = 1
    threshold: float = 0.5


@dataclass
class TrainResult:
    model: Any  # keras.Model; typed loosely so importing this module does not need TensorFlow
    metrics: dict[str, Any]
    data: EcommerceData
    out_dir: Path | None


def build_model(input_dim: int, variant: str = "baseline") -> Any:
    """Dense 128 relu -> Dropout 0.5 -> Dense 64 relu -> Dropout 0.5 -> Dense 1 sigmoid (Adam, binary cross-entropy)."""
    import keras

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {sorted(VARIANTS)}")
    units1, units2, dropout = VARIANTS[variant]
    inputs = keras.Input(shape=(input_dim,), name=INPUT_NAME, dtype="float32")
    x = keras.layers.Dense(units1, activation="relu")(inputs)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(units2, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"ctr_dnn_{variant}")


def train(cfg: TrainConfig, out: Path | None = None, *, saved_model: bool = False, onnx: bool = False,
          verbose: int = 0) -> TrainResult:
    """Generate data, fit, evaluate on the time-held-out split; export into out/<version>/ when `out` is given."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    data = generate(DataConfig(n_users=cfg.users, n_items=cfg.items, seed=cfg.seed))
    feats = data.features
    train_split, test_split = feats.split("train"), feats.split("test")
    y_train, y_test = train_split.label(cfg.label), test_split.label(cfg.label)

    model = build_model(feats.dim, cfg.variant)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    start = time.perf_counter()
    model.fit(train_split.x, y_train, epochs=cfg.epochs, batch_size=cfg.batch_size, verbose=verbose, shuffle=True)
    train_seconds = time.perf_counter() - start
    prob = model.predict(test_split.x, batch_size=4096, verbose=0).ravel()

    metrics: dict[str, Any] = {
        "model": model.name,
        "version": cfg.version,
        "variant": cfg.variant,
        "label": cfg.label,
        "test": binary_metrics(y_test, prob, cfg.threshold),
        "train_rows": int(train_split.x.shape[0]),
        "train_seconds": round(train_seconds, 2),
        "config": asdict(cfg),
    }
    out_dir = None
    if out is not None:
        out_dir = export(model, data, metrics, out / str(cfg.version), saved_model=saved_model, onnx=onnx)
    return TrainResult(model, metrics, data, out_dir)


def export_onnx(model: Any, path: Path, opset: int = 17) -> Path:
    """model.onnx via tf2onnx (what RecServe's builder does too); for recommend.py --onnx and the GPU check."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, model.input_shape[1]), tf.float32, name=INPUT_NAME)]
    model.output_names = [OUTPUT_NAME]  # tf2onnx names graph outputs after these
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=str(path), opset=opset)
    return path


def column_ranges(columns: list[int]) -> str:
    """[0, 1, 2, 7, 9, 10] -> "0-2,7,9-10"."""
    parts: list[str] = []
    for c in sorted(columns):
        if parts and c == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{c}"
        else:
            parts.append(str(c))
    return ",".join(parts)


def export(model: Any, data: EcommerceData, metrics: dict[str, Any], out_dir: Path, *, saved_model: bool = False,
           onnx: bool = False) -> Path:
    """Write model.keras, metrics.json and feature_spec.json (what a client needs to build the input rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "model.keras")
    if saved_model:
        # A TF SavedModel for TF Serving / tf2onnx users; RecServe's builder takes the .keras file.
        model.export(str(out_dir / "saved_model"), verbose=False)
    if onnx:
        export_onnx(model, out_dir / "model.onnx")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    spec = {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "feature_dim": data.features.dim,
        "feature_names": data.features.feature_names(),
        # For a ranking model (spec.serving.ranking.requestColumns): sent once per request, not per candidate.
        "request_columns": column_ranges(data.features.request_columns()),
        "data_config": asdict(data.config),
    }
    (out_dir / "feature_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out_dir


def format_table(metrics: dict[str, Any]) -> str:
    t = metrics["test"]
    rows = [("model", f"{metrics['model']} v{metrics['version']}"), ("label", metrics["label"]),
            ("test rows", str(t["n"])), ("positive rate", f"{t['positive_rate']:.3f}"),
            ("accuracy", f"{t['accuracy']:.4f}"), ("AUC", f"{t['auc']:.4f}"),
            (f"precision@{t['threshold']}", f"{t['precision']:.4f}"),
            (f"recall@{t['threshold']}", f"{t['recall']:.4f}"),
            (f"F1@{t['threshold']}", f"{t['f1']:.4f}"), ("train seconds", f"{metrics['train_seconds']:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    d = TrainConfig()
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--label", choices=("click", "purchase"), default=d.label)
    p.add_argument("--variant", choices=sorted(VARIANTS), default=d.variant)
    p.add_argument("--version", type=int, default=d.version, help="output goes to OUT/<version>/")
    p.add_argument("--threshold", type=float, default=d.threshold, help="for accuracy/precision/recall/F1")
    p.add_argument("--out", type=Path, default=HERE / "artifacts")
    p.add_argument("--saved-model", action="store_true", help="also export a TF SavedModel")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx (tf2onnx)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    cfg = TrainConfig(users=a.users, items=a.items, seed=a.seed, epochs=a.epochs, batch_size=a.batch_size,
                      learning_rate=a.learning_rate, label=a.label, variant=a.variant, version=a.version,
                      threshold=a.threshold)
    result = train(cfg, out=a.out, saved_model=a.saved_model, onnx=a.onnx, verbose=min(a.verbose, 2))
    print(format_table(result.metrics))
    print(f"exported to {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
