"""Deadline-based polling shared by the cluster tooling and the tests (no unbounded or bare sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | bool | None], timeout: float, interval: float = 0.5, message: str = "") -> T:
    """Poll until predicate returns a truthy value and return it; fail with the last value at the deadline.

    An exception from the predicate counts as "not yet" (a transient API error while something starts).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message or predicate!r}; last: {last!r}")
        time.sleep(interval)
