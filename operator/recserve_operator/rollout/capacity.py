"""Capacity of a canary: replicas per revision that follow the traffic split, within the stable's scale plus a surge.

A canary at w% of a model whose stable runs N replicas needs ceil(N·w/100) replicas, and the stable then needs
only ceil(N·(100-w)/100): a 10% canary of 4 replicas holds 1 + 4 = 5 pods (GPUs), not 4 + 4. The split moves as a
ratchet, so the total never exceeds N + surge and no revision carries more traffic than its Ready replicas serve
(the canary: up to less than one point of rounding): the canary grows within the surge (and into places the
stable's pods have left, not beside them), the router gives it only the share its Ready replicas cover, and the
stable shrinks only to what the share the router serves now (and the one it moves to) leaves it.

A falling weight (a rollback, a candidate that stopped being Available) is the one move that does not wait: the
router takes the traffic back at once and the stable is asked for its share of the new split at once, while the
canary keeps its Ready pods until the router serves the lower weight. Only for that moment, the router's roll, may
the total exceed N + surge.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Capacity", "plan_capacity", "share_replicas"]


@dataclass(frozen=True)
class Capacity:
    stable_replicas: int
    canary_replicas: int
    canary_weight: int  # the canary weight the router may serve now: the decided one, or less until capacity is up

    @property
    def total(self) -> int:
        return self.stable_replicas + self.canary_replicas


def share_replicas(total: int, weight: int) -> int:
    """Replicas that serve `weight`% of what `total` replicas serve: rounded up, 0 only at 0%."""
    if weight <= 0 or total <= 0:
        return 0
    return -(-total * min(weight, 100) // 100)


def plan_capacity(
    *, total: int, surge: int, target_weight: int, served_weight: int, canary_ready: int, stable_ready: int = 0
) -> Capacity:
    """Replicas of stable and canary, and the canary weight the router may serve, for one reconcile.

    total: the stable's scale before the rollout (its replicas, or what its autoscaler runs); surge: pods allowed
    beyond it (at least 1: a canary needs a pod beside the stable's before it gets any traffic); target_weight:
    the canary weight the rollout decided (100 while promoting); served_weight: the canary weight the router
    pods serve now; canary_ready: the canary's Ready replicas; stable_ready: the stable's Ready replicas, whose
    places the canary takes only once they are gone (a scale-down holds its GPUs until its pods terminate, so
    the canary grows in the reconcile after the stable's pods went, never beside them).
    """
    total, surge = max(total, 1), max(surge, 1)
    target, served, ready = _clamp(target_weight), _clamp(served_weight), max(canary_ready, 0)
    if target < served:
        # Falling: traffic goes back at once; the canary keeps what carries the share it may still be sent (the
        # served weight, or a higher one the router was given and has not confirmed: its Ready pods cover that).
        canary = max(1, share_replicas(total, served), ready)
        return Capacity(stable_replicas=max(1, share_replicas(total, 100 - target)), canary_replicas=canary,
                        canary_weight=target)  # fmt: skip
    # What the canary's Ready replicas can carry: each replica serves 1/total of the stable's load. Weights are
    # whole percents, so this rounds up (by less than one point): rounded down, a share like 1/11 = 9.09% would
    # leave the stable a 91% it needs all 11 replicas for, and with a surge of 1 the split could never move on.
    coverable = min(100, -(-100 * ready // total))
    weight = min(target, max(coverable, served))
    # The stable keeps the share of the split served now (the larger of the two it may be asked to carry), and a
    # pod even at 100%: it is what a rollback returns to.
    stable = max(1, share_replicas(total, 100 - served))
    canary = max(1, min(share_replicas(total, target), total + surge - max(stable, stable_ready)))
    return Capacity(stable_replicas=stable, canary_replicas=canary, canary_weight=weight)


def _clamp(weight: int) -> int:
    return max(0, min(100, weight))
