"""Parity gate: compare source and optimized model outputs (errors, AUC, top-k ranking agreement)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata

from model_repo_builder.config import ModelSignature
from model_repo_builder.errors import BadInputError

Predict = Callable[[dict[str, NDArray[Any]]], dict[str, NDArray[Any]]]


@dataclass(frozen=True)
class Tolerance:
    """Acceptance limits. Defaults per precision come from `default_tolerance`."""

    max_abs_error: float
    max_auc_drop: float = 0.0  # only with labels
    min_topk_overlap: float = 1.0  # mean |top-k(src) ∩ top-k(opt)| / k over candidate lists
    topk: int = 10
    list_size: int = 100


def default_tolerance(precision: str, max_abs_error: float | None = None) -> Tolerance:
    """fp32 must match to 1e-5; int8 is judged on ranking: AUC within 0.01 and >= 80% top-10 overlap.

    int8 scores legitimately move by ~1e-2, so the abs-error bound for int8 (0.05) only catches broken
    quantization; ranking agreement is the figure that matters to a recommender. fp16 is executed by TensorRT on
    a GPU, so on the build host the shipped fp32 ONNX is compared with the fp32 bound.
    """
    if precision == "int8":
        return Tolerance(max_abs_error if max_abs_error is not None else 0.05, max_auc_drop=0.01, min_topk_overlap=0.8)
    # Not 1.0: near-tied scores at the top-k boundary may swap under last-bit float differences.
    return Tolerance(max_abs_error if max_abs_error is not None else 1e-5, max_auc_drop=0.001, min_topk_overlap=0.98)


@dataclass
class ParityReport:
    samples: int
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    topk: int
    topk_overlap: float | None
    auc_source: float | None = None
    auc_optimized: float | None = None
    auc_drop: float | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exact_auc(scores: NDArray[Any], labels: NDArray[Any]) -> float:
    """ROC AUC via the Mann-Whitney U statistic, with average ranks for tied scores."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def topk_overlap(a: NDArray[Any], b: NDArray[Any], k: int, list_size: int) -> float:
    """Mean fraction of shared top-k items between two scorings, over consecutive candidate lists."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    n_lists = len(a) // list_size
    if n_lists == 0:
        list_size, n_lists = len(a), 1
    k = min(k, list_size)
    overlaps = []
    for i in range(n_lists):
        sa, sb = a[i * list_size : (i + 1) * list_size], b[i * list_size : (i + 1) * list_size]
        # Stable sort so ties resolve identically in both scorings.
        ta = set(np.argsort(-sa, kind="stable")[:k].tolist())
        tb = set(np.argsort(-sb, kind="stable")[:k].tolist())
        overlaps.append(len(ta & tb) / k)
    return float(np.mean(overlaps))


def synthesize_inputs(signature: ModelSignature, n: int, seed: int = 0) -> dict[str, NDArray[Any]]:
    """Seeded inputs from the signature: N(0,1) floats, small non-negative ints (valid embedding ids), bools."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, NDArray[Any]] = {}
    for spec in signature.inputs:
        shape = (n, *[d if d >= 0 else 8 for d in spec.shape])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            raise BadInputError(
                f"cannot synthesize parity inputs for {spec.name} ({spec.dtype})", "pass --parity-data FILE.npz"
            )
    return feeds


def load_parity_data(path: Path, signature: ModelSignature) -> tuple[dict[str, NDArray[Any]], NDArray[Any] | None]:
    """Inputs (by input name) and optional `labels` from an npz file, checked against the signature."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read parity data {path}: {exc}", "pass an .npz written by numpy.savez") from exc
    with data:
        feeds = {}
        for spec in signature.inputs:
            if spec.name not in data.files:
                raise BadInputError(
                    f"parity data {path.name} lacks input {spec.name!r} (has {sorted(data.files)})",
                    "store each model input under its name, and optional labels under 'labels'",
                )
            arr = _npz_array(data, spec.name, path).astype(spec.dtype)
            if arr.ndim != len(spec.shape) + 1 or any(
                d >= 0 and d != s for d, s in zip(spec.shape, arr.shape[1:], strict=True)
            ):
                raise BadInputError(
                    f"parity data {spec.name!r} has shape {arr.shape}, model expects (batch, {spec.shape})",
                    "regenerate the parity data for this model",
                )
            feeds[spec.name] = arr
        labels = _npz_array(data, "labels", path).ravel() if "labels" in data.files else None
    n = {len(v) for v in feeds.values()}
    if len(n) != 1 or (labels is not None and len(labels) not in n):
        raise BadInputError(f"parity data {path.name} arrays have different lengths", "regenerate the parity data")
    return feeds, labels


def _npz_array(data: Any, key: str, path: Path) -> NDArray[Any]:
    """One array of an npz opened with allow_pickle=False: Python objects (stored pickled) are refused, unread."""
    try:
        return np.asarray(data[key])
    except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise BadInputError(
            f"{path.name}: {key!r} holds Python objects, which load by unpickling ({exc})",
            "store numeric arrays only (numpy.savez of numbers)",
        ) from exc


def _batched(predict: Predict, feeds: dict[str, NDArray[Any]], batch: int) -> dict[str, NDArray[Any]]:
    n = len(next(iter(feeds.values())))
    parts: dict[str, list[NDArray[Any]]] = {}
    for start in range(0, n, batch):
        out = predict({k: v[start : start + batch] for k, v in feeds.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare(
    source: Predict,
    optimized: Predict,
    feeds: dict[str, NDArray[Any]],
    tol: Tolerance,
    *,
    labels: NDArray[Any] | None = None,
    batch: int = 256,
    on_batch: Callable[[], None] | None = None,
) -> ParityReport:
    """Run both models on `feeds` and judge the optimized one against `tol`."""
    ref = _batched(source, feeds, batch)
    got = _batched(optimized, feeds, batch)
    if on_batch:
        on_batch()
    missing = sorted(set(ref) - set(got))
    if missing:
        raise BadInputError(f"optimized model lacks outputs {missing}", "this is a conversion bug; report it")
    abs_err, rel_err, mean_err = 0.0, 0.0, []
    for name, r in ref.items():
        g = got[name].astype(np.float64).reshape(r.shape)
        diff = np.abs(g - r.astype(np.float64))
        abs_err = max(abs_err, float(diff.max(initial=0.0)))
        rel_err = max(rel_err, float((diff / np.maximum(np.abs(r), 1e-6)).max(initial=0.0)))
        mean_err.append(float(diff.mean()) if diff.size else 0.0)
    # Ranking metrics use the first output: the score a recommender sorts candidates by.
    first = sorted(ref)[0]
    s_ref, s_got = ref[first].reshape(len(ref[first]), -1)[:, 0], got[first].reshape(len(got[first]), -1)[:, 0]
    report = ParityReport(
        samples=len(s_ref),
        max_abs_error=abs_err,
        max_rel_error=rel_err,
        mean_abs_error=float(np.mean(mean_err)),
        topk=tol.topk,
        topk_overlap=topk_overlap(s_ref, s_got, tol.topk, tol.list_size),
        tolerance={k: float(v) for k, v in asdict(tol).items()},
    )
    if labels is not None and 0 < labels.sum() < len(labels):
        report.auc_source = exact_auc(s_ref, labels)
        report.auc_optimized = exact_auc(s_got, labels)
        report.auc_drop = report.auc_source - report.auc_optimized
    if abs_err > tol.max_abs_error:
        report.failures.append(f"max abs error {abs_err:.3g} > {tol.max_abs_error:.3g}")
    if report.topk_overlap is not None and report.topk_overlap < tol.min_topk_overlap:
        report.failures.append(f"top-{tol.topk} overlap {report.topk_overlap:.3f} < {tol.min_topk_overlap:.3f}")
    if report.auc_drop is not None and report.auc_drop > tol.max_auc_drop:
        report.failures.append(f"AUC drop {report.auc_drop:.4f} > {tol.max_auc_drop:.4f}")
    report.passed = not report.failures
    return report
