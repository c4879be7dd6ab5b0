"""Learnable prompt tokens: shared deep prompts (VPT-deep) and per-class prompt tables."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def prompt_counts(num: int, depth: int, step: int, num_blocks: int) -> list[int]:
    """Prompts per block: n_i = max(num - i * step, 0) for i < depth, else 0 (length ``num_blocks``)."""
    return [max(num - i * step, 0) if i < depth else 0 for i in range(num_blocks)]


def _xavier_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


class DeepPrompts(nn.Module):
    """Shared prompts, one ``[n_i, D]`` tensor per block that gets any (Xavier-normal init)."""

    def __init__(self, counts: list[int], dim: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.params = nn.ParameterDict({
            str(i): nn.Parameter(torch.randn(n, dim) * _xavier_std(n, dim)) for i, n in enumerate(counts) if n > 0
        })

    def forward(self) -> list[torch.Tensor | None]:
        return [self.params[str(i)] if n > 0 else None for i, n in enumerate(self.counts)]


class ClassPrompts(nn.Module):
    """One prompt set per class: a table ``[C, sum_i m_i, D]`` sliced per block.

    Each class's prompts of block i are initialised Xavier-normal over ``[m_i, D]``, so the scale does not
    shrink with the number of classes (a defect of the original code).
    """

    def __init__(self, num_classes: int, counts: list[int], dim: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.offsets = [sum(counts[:i]) for i in range(len(counts))]
        total = sum(counts)
        table = torch.empty(num_classes, total, dim)
        for i, m in enumerate(counts):
            if m:
                o = self.offsets[i]
                table[:, o:o + m].normal_(0.0, _xavier_std(m, dim))
        self.table = nn.Parameter(table)

    @property
    def num_classes(self) -> int:
        return self.table.shape[0]

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-block prompts ``[B, m_i, D]`` of each sample's class."""
        rows = self.table.index_select(0, labels)
        return [rows[:, o:o + m] if m > 0 else None for o, m in zip(self.offsets, self.counts, strict=True)]
