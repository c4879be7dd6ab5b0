"""Embedding heads: LayerNorm -> Linear -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingHead(nn.Module):
    """``LayerNorm(D) -> Linear(D, E) -> L2 normalise``."""

    def __init__(self, in_dim: int, embed_dim: int, center: bool = False, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, embed_dim, bias=not center)  # centred: the embeddings average zero
        nn.init.xavier_uniform_(self.fc.weight)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)
        self.center = center
        self.momentum = momentum
        if center:
            self.register_buffer("running_mean", torch.zeros(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalized(x).float(), dim=-1)

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """``Linear(LayerNorm(x))`` (with ``center``: minus the features' mean in between): the embedding
        before L2 normalisation."""
        return self.fc(self.centered(self.norm(x)))

    def centered(self, h: torch.Tensor) -> torch.Tensor:
        """``center``: in training subtract the batch mean (and track it), in eval the running mean, like
        BatchNorm's mean without its variance. With the Linear's bias dropped, a batch's embeddings before L2
        normalisation then average zero: neither a shift shared by every image (a BitFit bias, a prompt)
        nor the loss can put them all in one narrow cone."""
        if not self.center:
            return h
        if self.training and h.shape[0] > 1:
            mean = h.mean(dim=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().float(), self.momentum)
            return h - mean
        return h - self.running_mean.to(h.dtype)

    @torch.no_grad()
    def center_(self, mean: torch.Tensor) -> None:
        """Shift the LayerNorm's bias so that normalised features whose mean was ``mean`` [D] average zero.

        Centring the Linear's *input* (not only its output) matters for training: with a large common
        component mu in the normalised features, every SGD update of the weight moves all embeddings by the
        same ``dW mu`` and they drift into one narrow cone within a few steps."""
        self.norm.bias.sub_(mean.to(self.norm.bias))
