"""Embedding heads: LayerNorm -> Linear -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingHead(nn.Module):
    """``LayerNorm(D) -> Linear(D, E) -> L2 normalise``."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, embed_dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalized(x).float(), dim=-1)

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """``Linear(LayerNorm(x))``: the embedding before L2 normalisation."""
        return self.fc(self.norm(x))

    @torch.no_grad()
    def center_(self, mean: torch.Tensor) -> None:
        """Shift the bias so that outputs whose mean was ``mean`` [E] (before normalisation) average zero."""
        self.fc.bias.sub_(mean.to(self.fc.bias))
