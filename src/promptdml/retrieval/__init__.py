"""Use a trained model: embed images, build a nearest-neighbour index, search it, export to ONNX.

Python API::

    import promptdml
    embedder = promptdml.load("runs/demo")            # run directory or model.safetensors
    emb = embedder.embed(["a.jpg", "b.jpg"])          # [N, E] float32, L2-normalised (numpy)

    from promptdml.retrieval import build_index, load_index
    index = build_index(emb, paths, kind="exact")     # or "ivf" / "hnsw" (faiss)
    index.save("gallery.index")
    scores, ids = load_index("gallery.index").search(embedder.embed(["query.jpg"]), k=10)

The heavy modules (torch, faiss) are imported on first use, so importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

from promptdml.errors import RetrievalError

_LAZY = {
    "Embedder": "promptdml.retrieval.embedder",
    "EmbedResult": "promptdml.retrieval.embedder",
    "load": "promptdml.retrieval.embedder",
    "list_images": "promptdml.retrieval.embedder",
    "save_embeddings": "promptdml.retrieval.store",
    "load_embeddings": "promptdml.retrieval.store",
    "EmbeddingFile": "promptdml.retrieval.store",
    "Index": "promptdml.retrieval.index",
    "build_index": "promptdml.retrieval.index",
    "load_index": "promptdml.retrieval.index",
    "exact_search": "promptdml.retrieval.index",
    "neighbor_recall_at_k": "promptdml.retrieval.index",
    "export_onnx": "promptdml.retrieval.export",
}

__all__ = ["RetrievalError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'promptdml.retrieval' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
