"""Canary capacity: replicas follow the split, the total stays within the stable's scale plus the surge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from recserve_operator.rollout.capacity import Capacity, plan_capacity, share_replicas


@pytest.mark.parametrize(
    ("total", "weight", "expected"),
    [(4, 0, 0), (4, 10, 1), (4, 25, 1), (4, 26, 2), (4, 50, 2), (4, 90, 4), (4, 100, 4), (1, 1, 1), (10, 33, 4)],
)
def test_a_share_of_the_traffic_needs_its_share_of_the_replicas_rounded_up(
    total: int, weight: int, expected: int
) -> None:
    assert share_replicas(total, weight) == expected


def _converge(total: int, surge: int, target: int, served: int, ready: int) -> list[Capacity]:
    """Reconciles where every pod asked for becomes Ready and the router serves each allowed weight at once."""
    seen = []
    for _ in range(4 * total + 4):
        cap = plan_capacity(total=total, surge=surge, target_weight=target, served_weight=served, canary_ready=ready)
        seen.append(cap)
        if cap.canary_weight == served and cap.canary_replicas == ready:
            break
        served, ready = cap.canary_weight, cap.canary_replicas
    return seen


def test_a_10_percent_canary_of_4_replicas_holds_5_pods_not_8() -> None:
    steps = _converge(4, 1, target=10, served=0, ready=0)
    assert steps[0] == Capacity(stable_replicas=4, canary_replicas=1, canary_weight=0)  # no traffic before Ready
    assert steps[-1] == Capacity(stable_replicas=4, canary_replicas=1, canary_weight=10)
    assert max(s.total for s in steps) == 5


def test_moving_from_10_to_50_percent_ratchets_through_25_and_never_exceeds_the_surge() -> None:
    steps = _converge(4, 1, target=50, served=10, ready=1)
    assert [s.canary_weight for s in steps] == [25, 25, 50, 50]
    assert steps[-1] == Capacity(stable_replicas=2, canary_replicas=2, canary_weight=50)
    assert max(s.total for s in steps) == 5


def test_promotion_grows_the_candidate_to_the_stables_scale_before_the_stable_gives_up_its_last_share() -> None:
    steps = _converge(4, 1, target=100, served=50, ready=2)
    assert steps[-1] == Capacity(stable_replicas=1, canary_replicas=4, canary_weight=100)
    # The stable holds a replica even once the candidate's four are Ready and the router serves them everything:
    # it is what a rollback would return to (a promotion drops it then, strategies._finishing_promotion).
    assert all(s.stable_replicas >= 1 for s in steps)
    assert max(s.total for s in steps) == 5


def test_a_rollback_takes_the_traffic_back_at_once_and_asks_for_the_stables_full_scale() -> None:
    cap = plan_capacity(total=4, surge=1, target_weight=0, served_weight=50, canary_ready=2)
    assert cap.canary_weight == 0 and cap.stable_replicas == 4


def test_a_rollback_keeps_the_canarys_ready_pods_until_the_router_serves_the_stable_only_plan() -> None:
    # The router still sends 50% to the canary until its pods roll: its two Ready pods stay for that moment.
    assert plan_capacity(total=4, surge=1, target_weight=0, served_weight=50, canary_ready=2).canary_replicas == 2
    # A weight given to the router but not yet confirmed (25% served, 50% applied) is covered by the Ready pods.
    assert plan_capacity(total=10, surge=1, target_weight=0, served_weight=25, canary_ready=5).canary_replicas == 5
    # Once the router serves the stable-only plan, the canary is down to the one pod a candidate keeps.
    assert plan_capacity(total=4, surge=1, target_weight=0, served_weight=0, canary_ready=2) == Capacity(
        stable_replicas=4, canary_replicas=1, canary_weight=0
    )


def test_the_canary_takes_the_place_of_a_stable_pod_only_once_that_pod_is_gone() -> None:
    # The router serves 25%: the stable is asked down to 3, but its 4th pod still runs (and holds its GPU).
    asked = plan_capacity(total=4, surge=1, target_weight=50, served_weight=25, canary_ready=1, stable_ready=4)
    assert (asked.stable_replicas, asked.canary_replicas) == (3, 1)
    gone = plan_capacity(total=4, surge=1, target_weight=50, served_weight=25, canary_ready=1, stable_ready=3)
    assert (gone.stable_replicas, gone.canary_replicas) == (3, 2)


def test_a_larger_surge_lets_the_canary_grow_before_the_stable_shrinks() -> None:
    cap = plan_capacity(total=4, surge=2, target_weight=50, served_weight=10, canary_ready=1)
    assert cap == Capacity(stable_replicas=4, canary_replicas=2, canary_weight=25)


weights = st.integers(min_value=0, max_value=100)


@given(total=st.integers(1, 40), surge=st.integers(1, 5), target=weights, served=weights,
       ready=st.integers(0, 45), stable_ready=st.integers(0, 45))  # fmt: skip
def test_invariants_of_every_plan(
    total: int, surge: int, target: int, served: int, ready: int, *, stable_ready: int
) -> None:
    cap = plan_capacity(total=total, surge=surge, target_weight=target, served_weight=served, canary_ready=ready,
                        stable_ready=stable_ready)  # fmt: skip
    assert cap.canary_replicas >= 1  # the candidate keeps a pod while it is measured
    assert cap.stable_replicas >= 1  # and the stable one: it is what a rollback returns to
    # The stable carries what the router gives it now and what it may give it next.
    assert cap.stable_replicas >= share_replicas(total, 100 - served)
    assert cap.stable_replicas >= share_replicas(total, 100 - cap.canary_weight)
    if target >= served:
        # A rising (or held) weight never outruns the canary's Ready capacity, nor the total the surge allows.
        assert cap.total <= total + surge
        # Nor beside stable pods still running: the canary grows into GPUs they have given up.
        assert cap.canary_replicas == 1 or cap.canary_replicas + max(cap.stable_replicas, stable_ready) <= total + surge
        assert served <= cap.canary_weight <= target
        assert cap.canary_weight == served or cap.canary_weight < 100 * ready / total + 1  # whole percents
    else:
        # A falling one applies at once, and the canary keeps what the router may still send it.
        assert cap.canary_weight == target
        assert cap.canary_replicas >= max(share_replicas(total, served), ready)


@given(total=st.integers(1, 40), surge=st.integers(1, 5), target=weights, start=weights)
def test_the_ratchet_reaches_the_decided_weight_with_the_replicas_it_needs(
    total: int, surge: int, target: int, start: int
) -> None:
    steps = _converge(total, surge, target, served=start, ready=share_replicas(total, start))
    end = steps[-1]
    assert end.canary_weight == target
    assert end.stable_replicas == max(1, share_replicas(total, 100 - target))
    assert end.canary_replicas == max(1, share_replicas(total, target))
    # Only a falling weight's first plan may exceed the surge: the canary keeps its pods while the router rolls.
    assert all(s.total <= total + surge for s in (steps if target >= start else steps[1:]))
