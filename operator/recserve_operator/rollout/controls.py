"""Which manual rollout actions make sense in which rollout state: one rule for the operator and the CLI.

The operator consumes an action from the names.ROLLOUT_ACTION_ANNOTATION annotation (or `spec.rollout.control`);
`kubectl recserve promote|abort|pause|resume` refuses one that the state machine would ignore, and says why,
instead of writing an annotation that silently does nothing.
"""

from __future__ import annotations

from recserve_operator.rollout.policy import ManualAction
from recserve_operator.rollout.state import Phase, RolloutState

__all__ = ["refusal"]


def refusal(state: RolloutState, action: ManualAction) -> str | None:
    """Why `action` makes no sense for this rollout state, or None when the operator would act on it."""
    if action is ManualAction.NONE:
        return "no action given"
    if state.phase is not Phase.PROGRESSING:
        last = f" (last rollout of revision {state.revision}: {state.phase.value})" if state.revision else ""
        stable = state.stable_revision or "none yet"
        return f"no rollout in progress{last}; stable revision is {stable}: nothing to {action.value}"
    if action is ManualAction.PAUSE and state.paused:
        return f"the rollout of revision {state.revision} is already paused at {state.weight}%"
    if action is ManualAction.RESUME and not state.paused:
        return f"the rollout of revision {state.revision} is not paused (at {state.weight}%)"
    return None
