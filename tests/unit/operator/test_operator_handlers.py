"""Kopf registrations: what the operator watches, and that deleting a model never waits for the operator."""

from __future__ import annotations

import kopf
from recserve_operator import handlers


def _registry() -> kopf.OperatorRegistry:
    return kopf.get_default_registry()


def test_no_handler_needs_a_finalizer_so_deletion_works_while_the_operator_is_down() -> None:
    registry = _registry()
    changing = list(registry._changing.get_all_handlers())
    assert changing, "reconcile handlers are registered"
    assert not any(getattr(h, "requires_finalizer", None) for h in changing)
    assert list(registry._spawning.get_all_handlers()) == []  # no Kopf timers/daemons (they add finalizers)


def test_the_watch_caches_cover_every_kind_the_reconciler_reads() -> None:
    ids = {h.id for h in _registry()._indexing.get_all_handlers()}
    assert set(handlers.IndexedLive.INDEX_BY_KIND.values()) | {"recserve_models"} <= ids


def test_owned_kinds_are_watched_by_label_only() -> None:
    for handler in _registry()._indexing.get_all_handlers():
        if handler.id != "recserve_models":
            assert handler.labels == handlers.OWNED
