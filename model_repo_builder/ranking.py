"""A ranking head, added to an exported scoring model at build time: one request, N candidates, top-k in the engine.

A ranking request is one user (and one context) with N candidates. Sent as rows of the model's own input, the
user's and the context's features are copied into every row; with the head they arrive once:

- a model with one 2-D input (the CTR DNN's `features [B, F]`): the request's columns (`request_columns`, e.g.
  the user's and the context's) arrive as `request [1, U]`, the other columns as `candidates [N, F-U]`, both in
  ascending column order. The head broadcasts the request row to the N candidates, restores the model's own
  column order (one Gather), scores, and returns the top k;
- a model with named inputs (a two-tower's `user`, `item`): the per-request inputs (`request_inputs`) keep their
  names with a leading dimension of 1, the others arrive with N rows.

Every request also sends `k [1]` (int64); the head returns `scores [k']` (float32, descending) and `indices [k']`
(int64, positions in `candidates`), k' = min(k, N, max_k). Ties keep the lower index first (ONNX TopK), as a
stable sort of the source model's scores does. All of it is ONNX operators (Shape, Slice, Expand, Concat,
Gather, Reshape, Min, Max, TopK), so ONNX Runtime and TensorRT run it inside the engine, never in Python. The
model then has no batch dimension for Triton (max_batch_size 0): N is the request's own batch, of any size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from model_repo_builder.config import ModelSignature, TensorSpec
from model_repo_builder.errors import BadInputError, UsageError

REQUEST_INPUT = "request"
CANDIDATES_INPUT = "candidates"
K_INPUT = "k"
SCORES_OUTPUT = "scores"
INDICES_OUTPUT = "indices"
DEFAULT_MAX_K = 100
MAX_K_LIMIT = 10_000
MIN_OPSET = 12  # Min and Max on int64
_PREFIX = "recserve_ranking/"

Predict = Callable[[dict[str, NDArray[Any]]], Mapping[str, NDArray[Any]]]


@dataclass(frozen=True)
class RankingSpec:
    """Which part of the model's input is per request (the rest is per candidate), and the largest k served."""

    request_columns: tuple[int, ...] = ()  # a one-input model: its per-request columns
    request_inputs: tuple[str, ...] = ()  # a model with named inputs: its per-request inputs
    max_k: int = DEFAULT_MAX_K


@dataclass(frozen=True)
class RankingLayout:
    """What a client sends and gets, checked against the model's signature (recorded in build.json)."""

    model_input_names: tuple[str, ...]
    model_output: str
    max_k: int
    request_columns: tuple[int, ...] = ()
    candidate_columns: tuple[int, ...] = ()
    request_inputs: tuple[str, ...] = ()
    candidate_inputs: tuple[str, ...] = ()
    signature: ModelSignature = dataclasses.field(default_factory=lambda: ModelSignature((), ()))
    # ^ the ranking model's own, full shapes (it has no batch dimension)

    @property
    def by_columns(self) -> bool:
        return bool(self.request_columns)

    @property
    def candidate_feed(self) -> str:
        """The input whose first dimension is N."""
        return CANDIDATES_INPUT if self.by_columns else self.candidate_inputs[0]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_k": self.max_k, "k_input": K_INPUT,
                               "outputs": {"scores": SCORES_OUTPUT, "indices": INDICES_OUTPUT}}  # fmt: skip
        if self.by_columns:
            out.update(request_input=REQUEST_INPUT, candidates_input=CANDIDATES_INPUT,
                       request_columns=list(self.request_columns), candidate_columns=list(self.candidate_columns))
        else:
            out.update(request_inputs=list(self.request_inputs), candidate_inputs=list(self.candidate_inputs))
        return out


def parse_columns(text: str) -> tuple[int, ...]:
    """'0-5,9,12-14' -> (0, 1, 2, 3, 4, 5, 9, 12, 13, 14)."""
    cols: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(f"ranking columns {text!r}: {part!r} is not a column or a range a-b",
                             "list columns as 0-5,9,12-14 (zero-based)") from None  # fmt: skip
        if first < 0 or last < first:
            raise UsageError(f"ranking columns {text!r}: {part!r} is not a range of columns >= 0",
                             "write ranges low-high, zero-based")  # fmt: skip
        cols.update(range(first, last + 1))
    if not cols:
        raise UsageError("no ranking columns given", "list the per-request columns, e.g. 0-5,40-44")
    return tuple(sorted(cols))


def plan_ranking(signature: ModelSignature, spec: RankingSpec) -> RankingLayout:
    """The head's layout for a model, or a BadInputError/UsageError naming what does not fit."""
    if bool(spec.request_columns) == bool(spec.request_inputs):
        raise UsageError("a ranking head needs the per-request columns or the per-request inputs, not both",
                         "one-input models: --ranking-request-columns; named inputs: --ranking-request-inputs")
    if not 1 <= spec.max_k <= MAX_K_LIMIT:
        raise UsageError(f"ranking max k {spec.max_k} is outside 1..{MAX_K_LIMIT}", "pass a smaller --ranking-max-k")
    if len(signature.outputs) != 1 or signature.outputs[0].shape not in ((), (1,)):
        shapes = ", ".join(f"{o.name} {list(o.shape)}" for o in signature.outputs)
        raise BadInputError(f"a ranking head needs one score per row; the model outputs {shapes}",
                            "export a model with one output of shape [batch, 1] or [batch]")  # fmt: skip
    output = signature.outputs[0].name
    taken = {s.name for s in (*signature.inputs, *signature.outputs)}
    clash = taken & {K_INPUT, SCORES_OUTPUT, INDICES_OUTPUT} - {output}
    if clash:
        raise BadInputError(f"the model already names a tensor {', '.join(sorted(clash))}",
                            "the ranking head's k, scores and indices would clash: rename it in the export")
    head_out = (TensorSpec(SCORES_OUTPUT, "float32", (-1,)), TensorSpec(INDICES_OUTPUT, "int64", (-1,)))
    k = TensorSpec(K_INPUT, "int64", (1,))
    names = tuple(s.name for s in signature.inputs)
    if spec.request_columns:
        return _plan_columns(signature, spec, output, head_out, k)
    unknown = sorted(set(spec.request_inputs) - set(names))
    if unknown:
        raise UsageError(f"ranking request inputs {', '.join(unknown)} are not inputs of the model",
                         f"the model's inputs: {', '.join(names)}")  # fmt: skip
    candidates = tuple(n for n in names if n not in spec.request_inputs)
    if not candidates:
        raise UsageError("every input is per request: nothing is left to rank",
                         "leave the candidates' inputs out of --ranking-request-inputs")  # fmt: skip
    inputs = tuple(TensorSpec(s.name, s.dtype, ((1 if s.name in spec.request_inputs else -1), *s.shape))
                   for s in signature.inputs)  # fmt: skip
    request = tuple(n for n in names if n in spec.request_inputs)
    return RankingLayout(names, output, spec.max_k, request_inputs=request, candidate_inputs=candidates,
                         signature=ModelSignature((*inputs, k), head_out))  # fmt: skip


def _plan_columns(
    signature: ModelSignature, spec: RankingSpec, output: str, head_out: tuple[TensorSpec, ...], k: TensorSpec
) -> RankingLayout:
    if len(signature.inputs) != 1 or len(signature.inputs[0].shape) != 1 or signature.inputs[0].shape[0] < 1:
        shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in signature.inputs)
        raise BadInputError(f"ranking by columns needs one input of shape [batch, F] with F known; the model has "
                            f"{shapes}", "name the per-request inputs instead (--ranking-request-inputs)")
    (x,) = signature.inputs
    width = x.shape[0]
    outside = [c for c in spec.request_columns if c >= width]
    if outside:
        raise UsageError(f"ranking request columns {outside} are outside the model's {width} columns",
                         f"columns are zero-based, 0..{width - 1}")  # fmt: skip
    candidate = tuple(c for c in range(width) if c not in spec.request_columns)
    if not candidate:
        raise UsageError("every column is per request: nothing is left to rank",
                         "leave the candidates' columns out of --ranking-request-columns")  # fmt: skip
    inputs = (TensorSpec(REQUEST_INPUT, x.dtype, (1, len(spec.request_columns))),
              TensorSpec(CANDIDATES_INPUT, x.dtype, (-1, len(candidate))), k)  # fmt: skip
    return RankingLayout((x.name,), output, spec.max_k, request_columns=spec.request_columns,
                         candidate_columns=candidate, signature=ModelSignature(inputs, head_out))  # fmt: skip


def add_ranking_head(model: onnx.ModelProto, layout: RankingLayout) -> onnx.ModelProto:
    """A copy of `model` that takes the layout's request/candidates/k and returns the top-k scores and indices."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise BadInputError(f"the ranking head needs ONNX opset {MIN_OPSET} or later; the model has {opset}",
                            f"convert with --opset {MIN_OPSET} or later")  # fmt: skip
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if layout.model_output == SCORES_OUTPUT:  # the head's output takes the name: the model's row scores move
        _rename_internal(g, SCORES_OUTPUT, f"{_PREFIX}row_scores")
        row_scores = f"{_PREFIX}row_scores"
    else:
        row_scores = layout.model_output
    originals = {i.name: i for i in g.input}
    elem = {n: originals[n].type.tensor_type.elem_type for n in layout.model_input_names}
    nodes: list[onnx.NodeProto] = []
    consts = [numpy_helper.from_array(np.array([0], np.int64), f"{_PREFIX}zero"),
              numpy_helper.from_array(np.array([1], np.int64), f"{_PREFIX}one"),
              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{_PREFIX}end"),
              numpy_helper.from_array(np.array([layout.max_k], np.int64), f"{_PREFIX}max_k"),
              numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}flat")]  # fmt: skip
    n = f"{_PREFIX}n"
    if opset >= 15:  # Shape's start/end: N in one node
        nodes.append(helper.make_node("Shape", [layout.candidate_feed], [n], start=0, end=1))
    else:
        nodes += [helper.make_node("Shape", [layout.candidate_feed], [f"{_PREFIX}cand_shape"]),
                  helper.make_node("Slice", [f"{_PREFIX}cand_shape", f"{_PREFIX}zero", f"{_PREFIX}one"], [n])]
    new_inputs: list[onnx.ValueInfoProto] = []
    split = _split_first_matmul(g, layout) if layout.by_columns else None
    if layout.by_columns:
        (x,) = layout.model_input_names
        new_inputs += [helper.make_tensor_value_info(REQUEST_INPUT, elem[x], [1, len(layout.request_columns)]),
                       helper.make_tensor_value_info(CANDIDATES_INPUT, elem[x], ["candidates",
                                                                                 len(layout.candidate_columns)])]
        kept = [i for i in g.input if i.name != x]
    if split is not None:
        nodes += split
    elif layout.by_columns:
        (x,) = layout.model_input_names
        order = [*layout.request_columns, *layout.candidate_columns]  # the columns of Concat(request, candidates)
        perm = np.argsort(np.array(order, np.int64)).astype(np.int64)  # model column j sits at Concat column perm[j]
        consts.append(numpy_helper.from_array(perm, f"{_PREFIX}column_order"))
        nodes += _broadcast(REQUEST_INPUT, n, f"{_PREFIX}request_rows")
        nodes += [helper.make_node("Concat", [f"{_PREFIX}request_rows", CANDIDATES_INPUT], [f"{_PREFIX}rows"], axis=1),
                  helper.make_node("Gather", [f"{_PREFIX}rows", f"{_PREFIX}column_order"], [x], axis=1)]  # fmt: skip
    else:
        kept = []
        for inp in g.input:
            if inp.name in layout.request_inputs:
                rows = f"{_PREFIX}{inp.name}_rows"
                _rename_uses(g, inp.name, rows)
                nodes += _broadcast(inp.name, n, rows)
                dims = [1, *_dims(inp)[1:]]
                new_inputs.append(helper.make_tensor_value_info(inp.name, elem[inp.name], dims))
            elif inp.name in layout.candidate_inputs:
                dims = ["candidates", *_dims(inp)[1:]]
                new_inputs.append(helper.make_tensor_value_info(inp.name, elem[inp.name], dims))
            else:
                kept.append(inp)  # initializers listed as inputs
    k_eff = f"{_PREFIX}k"
    post = [
        helper.make_node("Min", [K_INPUT, n, f"{_PREFIX}max_k"], [f"{_PREFIX}k_capped"]),
        helper.make_node("Max", [f"{_PREFIX}k_capped", f"{_PREFIX}zero"], [k_eff]),
        helper.make_node("Reshape", [row_scores, f"{_PREFIX}flat"], [f"{_PREFIX}scores_flat"]),
        helper.make_node("TopK", [f"{_PREFIX}scores_flat", k_eff], [SCORES_OUTPUT, INDICES_OUTPUT],
                         axis=0, largest=1, sorted=1),
    ]  # fmt: skip
    body = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *body, *post])
    used = {i for node in g.node for i in node.input}
    g.initializer.extend(c for c in consts if c.name in used)
    del g.input[:]
    g.input.extend([*new_inputs, helper.make_tensor_value_info(K_INPUT, TensorProto.INT64, [1]), *kept])
    score_type = next((o.type.tensor_type.elem_type for o in model.graph.output if o.name == layout.model_output),
                      TensorProto.FLOAT)  # fmt: skip
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(SCORES_OUTPUT, score_type, ["k"]),
                     helper.make_tensor_value_info(INDICES_OUTPUT, TensorProto.INT64, ["k"])])  # fmt: skip
    # Shapes inferred for the old batch dimension would now contradict the head's: let the runtime infer them.
    del g.value_info[:]
    onnx.checker.check_model(out)
    return out


def _split_first_matmul(graph: onnx.GraphProto, layout: RankingLayout) -> list[onnx.NodeProto] | None:
    """When the model's input feeds only a MatMul with constant weights W (a Keras Dense layer), its request
    columns are multiplied once per request instead of once per candidate:

        features @ W  ==  candidates @ W[candidate_columns]  +  request @ W[request_columns]   (broadcast over N)

    The MatMul is replaced in `graph` (its weights split into two initializers) and the replacement nodes are
    returned; None when the pattern does not hold (the head then broadcasts the request row and gathers)."""
    (x,) = layout.model_input_names
    users = [n for n in graph.node if x in n.input]
    inits = {i.name: i for i in graph.initializer}
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != x:
        return None
    matmul = users[0]
    weights = inits.get(matmul.input[1])
    if weights is None or len(weights.dims) != 2 or any(matmul.input[1] in n.input for n in graph.node
                                                        if n is not matmul):  # fmt: skip
        return None
    w = numpy_helper.to_array(weights)
    if w.shape[0] != len(layout.request_columns) + len(layout.candidate_columns):
        return None
    req_w, cand_w = f"{_PREFIX}request_weights", f"{_PREFIX}candidate_weights"
    graph.initializer.remove(weights)
    graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w[list(layout.request_columns)]), req_w),
                              numpy_helper.from_array(np.ascontiguousarray(w[list(layout.candidate_columns)]),
                                                      cand_w)])  # fmt: skip
    out = matmul.output[0]
    graph.node.remove(matmul)
    return [helper.make_node("MatMul", [REQUEST_INPUT, req_w], [f"{_PREFIX}request_part"]),
            helper.make_node("MatMul", [CANDIDATES_INPUT, cand_w], [f"{_PREFIX}candidate_part"]),
            helper.make_node("Add", [f"{_PREFIX}candidate_part", f"{_PREFIX}request_part"], [out])]  # fmt: skip


def _broadcast(name: str, n: str, rows: str) -> list[onnx.NodeProto]:
    """`rows` = `name` ([1, ...]) repeated to [N, ...]."""
    shape, tail, target = f"{rows}/shape", f"{rows}/tail", f"{rows}/target"
    return [helper.make_node("Shape", [name], [shape]),
            helper.make_node("Slice", [shape, f"{_PREFIX}one", f"{_PREFIX}end"], [tail]),
            helper.make_node("Concat", [n, tail], [target], axis=0),
            helper.make_node("Expand", [name, target], [rows])]  # fmt: skip


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    dims: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, old, new)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_uses(sub, old, new)


def _rename_internal(graph: onnx.GraphProto, old: str, new: str) -> None:
    _rename_uses(graph, old, new)
    for node in graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for out in graph.output:
        if out.name == old:
            out.name = new


# ---------------------------------------------------------------- the parity gate's part for the head


@dataclass(frozen=True)
class RankingParity:
    requests: int
    candidates: int
    k: int
    max_abs_error: float
    topk_identical: float  # share of requests whose top-k indices equal the source's exactly (ties aside)
    passed: bool
    failures: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"failures": list(self.failures)}


def requests_from_rows(
    layout: RankingLayout, feeds: Mapping[str, NDArray[Any]], request: int, rows: NDArray[np.int64]
) -> tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]:
    """One ranking request made of parity rows: row `request`'s per-request part with the candidates' parts of
    `rows`. Returns (the head's feeds without k, the equivalent rows in the model's own signature)."""
    if layout.by_columns:
        (x,) = layout.model_input_names
        table = np.asarray(feeds[x])
        req = table[request : request + 1, list(layout.request_columns)]
        cand = table[rows][:, list(layout.candidate_columns)]
        full = table[rows].copy()
        full[:, list(layout.request_columns)] = req
        return {REQUEST_INPUT: req, CANDIDATES_INPUT: cand}, {x: full}
    head: dict[str, NDArray[Any]] = {}
    full_feeds: dict[str, NDArray[Any]] = {}
    for name in layout.model_input_names:
        table = np.asarray(feeds[name])
        if name in layout.request_inputs:
            head[name] = table[request : request + 1]
            full_feeds[name] = np.repeat(head[name], len(rows), axis=0)
        else:
            head[name] = full_feeds[name] = table[rows]
    return head, full_feeds


def check_head(
    source: Predict, head: Predict, layout: RankingLayout, feeds: Mapping[str, NDArray[Any]], max_abs_error: float,
    *, requests: int = 16, candidates: int = 200, k: int = 10,
) -> RankingParity:  # fmt: skip
    """The head against the source model on requests made of the parity rows: the same top-k (up to scores tied
    within the tolerance), the same scores within it, descending."""
    total = len(next(iter(feeds.values())))
    n = min(candidates, total)
    k = min(k, layout.max_k)
    worst, identical, failures = 0.0, 0, []
    for r in range(min(requests, total)):
        rows = (r * 7 + np.arange(n, dtype=np.int64)) % total
        head_feeds, full = requests_from_rows(layout, feeds, r, rows)
        expected = np.asarray(next(iter(source(full).values())), np.float64).reshape(-1)
        got = head({**head_feeds, K_INPUT: np.array([k], np.int64)})
        scores, idx = np.asarray(got[SCORES_OUTPUT], np.float64), np.asarray(got[INDICES_OUTPUT], np.int64)
        want = min(k, n)
        if scores.shape != (want,) or idx.shape != (want,) or len(set(idx.tolist())) != want:
            failures.append(f"request {r}: {idx.shape[0]} results (expected {want} distinct)")
            continue
        order = np.argsort(-expected, kind="stable")[:want]
        kth = expected[order[-1]]
        err = float(np.max(np.abs(scores - expected[idx])))
        worst = max(worst, err)
        if err > max_abs_error:
            failures.append(f"request {r}: scores differ from the source by {err:.3g} > {max_abs_error:g}")
        elif np.any(expected[idx] < kth - max_abs_error) or np.any(np.diff(scores) > 0):
            failures.append(f"request {r}: top-{want} differs from the source model's")
        identical += int(np.array_equal(idx, order))
    done = min(requests, total)
    return RankingParity(done, n, k, worst, identical / done if done else 0.0, not failures, tuple(failures[:5]))
