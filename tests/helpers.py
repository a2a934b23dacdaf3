"""Test helpers shared by every suite: deadline-based waiting that fails as a test assertion."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from recserve_cluster import waiting

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | bool | None], timeout: float, interval: float = 0.5, message: str = "") -> T:
    """Poll predicate until truthy (returned) or the deadline (AssertionError with the last value seen)."""
    try:
        return waiting.wait_for(predicate, timeout, interval, message)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None
