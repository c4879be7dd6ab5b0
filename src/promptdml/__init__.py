"""promptdml: parameter-efficient deep metric learning with semantic proxies from visual prompts.

``promptdml.load(run_dir_or_checkpoint, device="auto")`` returns an :class:`~promptdml.retrieval.Embedder`
(imported on first use, so ``import promptdml`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Embedder"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Embedder"):
        from promptdml.retrieval import embedder

        value = getattr(embedder, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'promptdml' has no attribute '{name}'")
