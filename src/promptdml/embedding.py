"""The one embedding loop: batches of images through a model into rows of an ``[N, E]`` float32 CPU tensor.

Shared by evaluation (:func:`promptdml.engine.evaluator.embed_records`) and inference
(:class:`promptdml.retrieval.Embedder`, what :func:`promptdml.load` returns), so that an embedding computed for
search is the one the metrics were computed on. Neutral: it imports neither the engine nor retrieval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from promptdml.device import autocast

__all__ = ["embed_batches"]


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  size: int, device: torch.device, dtype: torch.dtype | None, *,
                  forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
                  normalize: bool = True, dim: int | None = None) -> torch.Tensor | None:
    """Embed ``batches`` of ``(images, row index, labels or None)`` into ``out[index]`` of a ``[size, E]`` tensor.

    The model runs in eval mode (its mode is restored after), under autocast for ``dtype`` on ``device``;
    ``forward(images, labels)`` replaces ``model(images)``. Rows are float32 on the CPU, L2-normalised unless
    ``normalize=False``. ``dim``: the width E, allocated up front; None = read from the first batch (then None
    is returned when there was no batch). Rows no batch wrote are left uninitialised.
    """
    was_training = model.training
    model.eval()
    out = torch.empty(size, dim) if dim is not None else None
    try:
        for images, index, labels in batches:
            images = images.to(device, non_blocking=True)
            with autocast(device, dtype):
                emb = forward(images, labels) if forward is not None else model(images)
            emb = emb.float()
            if out is None:
                out = torch.empty(size, emb.shape[1])
            out[index] = (torch.nn.functional.normalize(emb, dim=-1) if normalize else emb).cpu()
    finally:
        model.train(was_training)
    return out
