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
        """Shift the LayerNorm's bias so that normalised features whose mean was ``mean`` [D] average zero.

        Centring the Linear's *input* (not only its output) matters for training: with a large common
        component mu in the normalised features, every SGD update of the weight moves all embeddings by the
        same ``dW mu`` and they drift into one narrow cone within a few steps."""
        self.norm.bias.sub_(mean.to(self.norm.bias))
