"""The comparator's pure math: top-k overlap, Kendall tau-b over the union, score differences, answer parsing."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from recserve_operator.shadow.compare import Ranking, UnsupportedAnswer, compare, kendall_tau_b, parse_answer


def ranking(items: list[int], scores: list[float] | None = None) -> Ranking:
    scores = scores if scores is not None else [1.0 - i / 100 for i in range(len(items))]
    return Ranking(tuple(items), tuple(scores))


def test_equal_answers_agree_fully() -> None:
    r = ranking(list(range(10)))
    c = compare(r, r, 10)
    assert (c.k, c.overlap, c.rank_correlation, c.max_abs_score_diff, c.mean_abs_score_diff, c.common) == (
        10, 1.0, 1.0, 0.0, 0.0, 10)  # fmt: skip


def test_a_reversed_ranking_of_the_same_items_correlates_minus_one() -> None:
    items = list(range(10))
    c = compare(ranking(items), ranking(items[::-1]), 10)
    assert c.overlap == 1.0
    assert c.rank_correlation == pytest.approx(-1.0)


def test_disjoint_top_k_lists_share_nothing_and_correlate_negatively() -> None:
    c = compare(ranking(list(range(10))), ranking(list(range(100, 110))), 10)
    assert c.overlap == 0.0 and c.common == 0
    assert c.rank_correlation is not None and c.rank_correlation < -0.5
    assert c.max_abs_score_diff is None and c.mean_abs_score_diff is None


def test_overlap_counts_shared_items_at_depth_k() -> None:
    s = ranking([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    c_ = ranking([1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 9, 10])  # 9 and 10 pushed below the top 10
    assert compare(s, c_, 10).overlap == pytest.approx(0.8)
    assert compare(s, c_, 12).overlap == pytest.approx(10 / 12)


def test_score_differences_are_over_the_common_items() -> None:
    s = ranking([1, 2, 3], [0.9, 0.8, 0.7])
    c_ = ranking([2, 1, 4], [0.85, 0.5, 0.4])
    cmp = compare(s, c_, 3)
    assert cmp.common == 2
    assert cmp.max_abs_score_diff == pytest.approx(0.4)  # item 1: 0.9 vs 0.5
    assert cmp.mean_abs_score_diff == pytest.approx((0.4 + 0.05) / 2)


def test_depth_is_capped_by_the_shorter_answer() -> None:
    c = compare(ranking([1, 2, 3]), ranking([1, 2, 3, 4, 5]), 10)
    assert c.k == 3 and c.overlap == 1.0


def test_empty_answers_are_equal_and_have_no_correlation() -> None:
    c = compare(ranking([]), ranking([]), 10)
    assert c.overlap == 1.0 and c.rank_correlation is None


def test_top_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="top_k"):
        compare(ranking([1]), ranking([1]), 0)


def _tau_reference(a: list[float], b: list[float]) -> float | None:
    """tau-b from its definition with explicit pair counting (independent of the implementation's loop)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    n0 = len(pairs)
    n1 = sum(1 for i, j in pairs if a[i] == a[j])
    n2 = sum(1 for i, j in pairs if b[i] == b[j])

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    s = sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs)
    denom = ((n0 - n1) * (n0 - n2)) ** 0.5
    return None if denom == 0 else s / denom


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=12))
def test_kendall_tau_b_matches_its_definition(pairs: list[tuple[int, int]]) -> None:
    a = [float(p[0]) for p in pairs]
    b = [float(p[1]) for p in pairs]
    got, want = kendall_tau_b(a, b), _tau_reference(a, b)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want)


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(30))), st.permutations(list(range(30))), st.integers(1, 30))
def test_comparison_bounds_and_symmetry(p: list[int], q: list[int], k: int) -> None:
    a, b = ranking(p), ranking(q)
    ab, ba = compare(a, b, k), compare(b, a, k)
    assert 0.0 <= ab.overlap <= 1.0
    assert ab.overlap == ba.overlap
    assert ab.common == round(ab.overlap * ab.k)
    if ab.rank_correlation is not None:
        assert -1.0 - 1e-9 <= ab.rank_correlation <= 1.0 + 1e-9
        assert ab.rank_correlation == pytest.approx(ba.rank_correlation)  # type: ignore[arg-type]
    if p[:k] == q[:k]:
        assert ab.overlap == 1.0 and ab.rank_correlation == pytest.approx(1.0 if k > 1 else ab.rank_correlation)


def test_a_shuffled_ranking_scores_far_below_an_equal_one() -> None:
    rng = random.Random(3)
    items = list(range(300))
    overlaps = []
    for _ in range(50):
        shuffled = items[:]
        rng.shuffle(shuffled)
        overlaps.append(compare(ranking(items), ranking(shuffled), 10).overlap)
    assert sum(overlaps) / len(overlaps) < 0.2


def test_parse_a_ranking_heads_answer() -> None:
    body = {"outputs": [{"name": "scores", "datatype": "FP32", "shape": [3], "data": [0.9, 0.5, 0.1]},
                        {"name": "indices", "datatype": "INT64", "shape": [3], "data": [7, 2, 40]}]}  # fmt: skip
    assert parse_answer(body) == Ranking((7, 2, 40), (0.9, 0.5, 0.1))


def test_parse_a_plain_scorers_answer_ranks_rows_by_score_ties_by_lower_row() -> None:
    body = {"outputs": [{"name": "ctr", "datatype": "FP32", "shape": [4, 1], "data": [[0.2], [0.7], [0.2], [0.9]]}]}
    assert parse_answer(body) == Ranking((3, 1, 0, 2), (0.9, 0.7, 0.2, 0.2))


@pytest.mark.parametrize(
    "body",
    [{}, {"outputs": []}, {"outputs": [{"name": "x"}]}, {"outputs": [{"name": "x", "data": ["a"]}]},
     {"outputs": [{"name": "scores", "data": [1.0]}, {"name": "indices", "data": [1, 2]}]}],
)  # fmt: skip
def test_unreadable_answers_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(UnsupportedAnswer):
        parse_answer(body)
