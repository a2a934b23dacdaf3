"""Pure comparison of two ranking answers: top-k overlap, rank correlation, score differences.

An answer is a ranked list of (item, score). A ranking model's KServe v2 response carries it as `indices` and
`scores` (the ranking head's TopK, docs/ranking.md); a plain scoring model's first numeric output is one score per
candidate row, ranked here by score (descending, ties by the lower row first, as the ranking head does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Comparison", "Ranking", "UnsupportedAnswer", "compare", "kendall_tau_b", "parse_answer"]


class UnsupportedAnswer(ValueError):
    """A response the comparator cannot read as a ranking (not KServe v2 JSON, no numeric output)."""


@dataclass(frozen=True)
class Ranking:
    items: tuple[int, ...]  # best first
    scores: tuple[float, ...]  # the items' scores, same order

    def __post_init__(self) -> None:
        if len(self.items) != len(self.scores):
            raise ValueError(f"{len(self.items)} items but {len(self.scores)} scores")


@dataclass(frozen=True)
class Comparison:
    k: int  # the depth compared: min(top_k, both answers' lengths)
    overlap: float  # |top-k(stable) ∩ top-k(candidate)| / k, 1.0 when both are empty
    rank_correlation: float | None  # Kendall tau-b over the union of both top-k lists; None below two items
    max_abs_score_diff: float | None  # over the items both top-k lists hold; None when they share none
    mean_abs_score_diff: float | None
    common: int  # items both top-k lists hold


def _output(outputs: Sequence[Mapping[str, Any]], name: str) -> list[Any] | None:
    for o in outputs:
        if o.get("name") == name and isinstance(o.get("data"), list):
            return list(o["data"])
    return None


def _flat(data: list[Any]) -> list[float]:
    out: list[float] = []
    for v in data:
        if isinstance(v, list):
            out.extend(_flat(v))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise UnsupportedAnswer(f"non-numeric value {v!r} in an output")
    return out


def parse_answer(body: Mapping[str, Any]) -> Ranking:
    """The ranking in a KServe v2 JSON response body."""
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise UnsupportedAnswer("no outputs in the response")
    indices, scores = _output(outputs, "indices"), _output(outputs, "scores")
    if indices is not None and scores is not None:
        items = [int(i) for i in _flat(indices)]
        values = _flat(scores)
        if len(items) != len(values):
            raise UnsupportedAnswer(f"{len(items)} indices but {len(values)} scores")
        return Ranking(tuple(items), tuple(values))
    first = next((o for o in outputs if isinstance(o.get("data"), list)), None)
    if first is None:
        raise UnsupportedAnswer("no output with data")
    values = _flat(first["data"])
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return Ranking(tuple(order), tuple(values[i] for i in order))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired rank vectors (ties allowed); None when either side is all ties."""
    n = len(a)
    if n != len(b):
        raise ValueError("paired vectors differ in length")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    if denom == 0:
        return None
    return (concordant - discordant) / denom


def compare(stable: Ranking, candidate: Ranking, top_k: int) -> Comparison:
    """Compare the candidate's top-k with the stable's.

    Rank correlation is Kendall's tau-b over the union of both top-k lists, an item missing from one list ranked
    (tied) after that list's last: equal lists give 1, reversed or disjoint ones a negative value, and it is defined
    however little the lists share. Score differences are taken over the items both lists hold.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, len(stable.items), len(candidate.items))
    s_items, c_items = stable.items[:k], candidate.items[:k]
    s_rank = {item: r for r, item in enumerate(s_items)}
    c_rank = {item: r for r, item in enumerate(c_items)}
    common = [item for item in s_items if item in c_rank]
    overlap = 1.0 if k == 0 else len(common) / k
    union = list(dict.fromkeys((*s_items, *c_items)))
    tau = None
    if len(union) >= 2:
        tau = kendall_tau_b([s_rank.get(i, k) for i in union], [c_rank.get(i, k) for i in union])
    if common:
        diffs = [abs(stable.scores[s_rank[i]] - candidate.scores[c_rank[i]]) for i in common]
        max_diff: float | None = max(diffs)
        mean_diff: float | None = sum(diffs) / len(diffs)
    else:
        max_diff = mean_diff = None
    return Comparison(k, overlap, tau, max_diff, mean_diff, len(common))
