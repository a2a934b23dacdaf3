"""The one error an invalid RecommenderModel spec raises, wherever in the spec the parser finds the fault."""

from __future__ import annotations


class InvalidSpec(ValueError):
    """The spec cannot be served as written; the message names the field (`spec.serving.replicas must be ...`).

    The reconcile reports it as a condition with reason InvalidSpec and changes nothing that runs."""
