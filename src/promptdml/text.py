"""Small text helpers shared by the command line, logs and model cards."""

from __future__ import annotations

__all__ = ["plural"]


def plural(n: int | float, word: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0.5 epochs``."""
    return f"{n:g} {word}{'' if n == 1 else 's'}"
