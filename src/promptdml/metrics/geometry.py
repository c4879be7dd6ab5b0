"""Geometry of a set of vectors: how spread out embeddings or proxies are (collapse diagnostics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs of distinct rows of ``rows`` [N, E] (0.0 for N < 2).

    Near 0 for vectors spread over the sphere; near 1 when every row points the same way. Computed in fp32
    from the sum of the rows, O(N E): ``sum_{i != j} u_i . u_j = |sum_i u_i|^2 - N`` for unit vectors u."""
    n = rows.shape[0]
    if n < 2:
        return 0.0
    u = F.normalize(rows.detach().float(), dim=-1)
    total = u.sum(dim=0)
    return float((total.dot(total) - (u * u).sum()) / (n * (n - 1)))
