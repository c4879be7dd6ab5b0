"""Progress bars: one tqdm bar on stderr for every step that can take more than a few seconds.

A bar is shown only when progress is enabled (``train.progress``, ``--no-progress`` turns it off) *and* stderr
is a terminal: logs, pipes and CI stay free of bar noise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "bars_visible"]


def bars_visible(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: enabled and stderr is a terminal."""
    if not enabled:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, desc: str = "",
                 total: int | float | None = None, unit: str = "it", **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar (``leave=False``) that stays silent unless :func:`bars_visible`."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not bars_visible(enabled), **kwargs)
