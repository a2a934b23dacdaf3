"""tqdm progress bars on stderr that switch themselves off for non-TTY or --json runs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _NullBar:
    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def progress_enabled(json_output: bool) -> bool:
    """Bars only for humans: an interactive stderr and no machine-readable output requested."""
    return not json_output and sys.stderr.isatty()


@contextmanager
def progress_bar(total: float | None, desc: str, enabled: bool, unit: str = "B") -> Iterator[Any]:
    """A tqdm bar (bytes scale for unit "B") or a no-op stand-in when disabled."""
    if not enabled:
        yield _NullBar()
        return
    from tqdm import tqdm

    scale = unit == "B"
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
              file=sys.stderr, leave=False) as bar:
        yield bar
