"""What capacity adds to the rollout's spec and status: rollout.surge, and servedWeight / baseReplicas /
retiringRevision, which survive an operator restart."""

from __future__ import annotations

import pytest
import yaml
from recserve_operator.errors import InvalidSpec
from recserve_operator.rollout.policy import RolloutPolicy
from recserve_operator.rollout.state import Phase, RolloutState

from .helpers import CANARY_SPEC, T0, spec


def test_the_surge_defaults_to_one_pod_like_the_crd() -> None:
    assert RolloutPolicy.from_spec(CANARY_SPEC).surge == 1
    assert RolloutPolicy.from_spec(spec(CANARY_SPEC, surge=3)).surge == 3


@pytest.mark.parametrize("surge", [0, -1, 1.5, "two", True])
def test_a_surge_below_one_pod_or_not_a_whole_number_is_rejected(surge: object) -> None:
    with pytest.raises(InvalidSpec, match=r"rollout\.surge"):
        RolloutPolicy.from_spec(spec(CANARY_SPEC, surge=surge))


def test_the_capacity_state_round_trips_through_the_status_subresource() -> None:
    state = RolloutState(phase=Phase.PROMOTED, stable_revision="r2", revision="r2", started_at=T0, served_weight=50,
                         base_replicas=4, retiring_revision="r1")  # fmt: skip
    stored = yaml.safe_load(yaml.safe_dump(state.to_status()))
    assert {k: stored["canary"][k] for k in ("servedWeight", "baseReplicas", "retiringRevision")} == {
        "servedWeight": 50, "baseReplicas": 4, "retiringRevision": "r1",
    }  # fmt: skip
    assert RolloutState.from_status(stored) == state


def test_a_status_written_before_capacity_existed_reads_as_nothing_served_and_nothing_retiring() -> None:
    state = RolloutState.from_status({"canary": {"phase": "Progressing", "revision": "r2", "weight": 10}})
    assert (state.served_weight, state.base_replicas, state.retiring_revision) == (0, 0, None)
    assert state.extra == {}
