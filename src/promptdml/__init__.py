"""promptdml: parameter-efficient deep metric learning with semantic proxies from visual prompts.

The public Python API (docs/python.md), importable from the package itself::

    import promptdml

    cfg = promptdml.load_config("demo", {"data.dataset": "folder", "data.root": "my_photos"})
    result = promptdml.train(cfg)                        # writes the run directory
    metrics = promptdml.evaluate_run(result.run_dir)     # Recall@K, MAP@R, R-Precision
    promptdml.retrieval_metrics(embeddings, labels)      # the same metrics on your own embeddings
    embedder = promptdml.load(result.run_dir)            # embed images; build_index / load_index to search

Names are imported on first use, so ``import promptdml`` stays light (no torch until you need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # configuration
    "Config": "promptdml.config",
    "load_config": "promptdml.config",
    "save_config": "promptdml.config",
    "shipped_configs": "promptdml.config",
    # training and evaluation
    "train": "promptdml.engine.trainer",
    "resume": "promptdml.engine.trainer",
    "Trainer": "promptdml.engine.trainer",
    "TrainResult": "promptdml.engine.trainer",
    "evaluate_run": "promptdml.engine.evaluator",
    "load_model": "promptdml.checkpoint",
    "retrieval_metrics": "promptdml.metrics.retrieval",
    # data
    "build_splits": "promptdml.data.sources",
    "check_dataset": "promptdml.data.check",
    # using a trained model
    "load": "promptdml.retrieval.embedder",
    "Embedder": "promptdml.retrieval.embedder",
    "build_index": "promptdml.retrieval.index",
    "load_index": "promptdml.retrieval.index",
    "Index": "promptdml.retrieval.index",
    "save_embeddings": "promptdml.retrieval.store",
    "load_embeddings": "promptdml.retrieval.store",
    "export_onnx": "promptdml.retrieval.export",
    # errors (each message says what to change)
    "ConfigError": "promptdml.config",
    "DataError": "promptdml.data.records",
    "BackboneError": "promptdml.models.backbone",
    "TrainingError": "promptdml.engine.trainer",
    "RetrievalError": "promptdml.retrieval",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'promptdml' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
