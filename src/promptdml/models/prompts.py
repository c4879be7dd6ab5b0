"""Learnable prompt tokens: shared deep prompts (VPT-deep) and per-class prompt tables."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from promptdml.models.memory_bank import DevicePlacement, MemoryBankPlacement


def prompt_counts(num: int, depth: int, step: int, num_blocks: int) -> list[int]:
    """Prompts per block: n_i = max(num - i * step, 0) for i < depth, else 0 (length ``num_blocks``)."""
    return [max(num - i * step, 0) if i < depth else 0 for i in range(num_blocks)]


def _prompt_std(n: int, dim: int) -> float:
    """Xavier-normal std of one prompt set viewed as ``[1, n, D]`` (fan_in = n * D, fan_out = D), the
    original code's initialisation of the shared prompts. The class prompts use the same per-class scale
    (the original initialised the whole ``[C, n, D]`` table, so its scale shrank with C)."""
    return math.sqrt(2.0 / ((n + 1) * dim))



class DeepPrompts(nn.Module):
    """Shared prompts, one ``[n_i, D]`` tensor per block that gets any (Xavier-normal init)."""

    def __init__(self, counts: list[int], dim: int) -> None:
        super().__init__()
        self.counts = list(counts)
        self.params = nn.ParameterDict({
            str(i): nn.Parameter(torch.randn(n, dim) * _prompt_std(n, dim)) for i, n in enumerate(counts) if n > 0
        })

    def forward(self) -> list[torch.Tensor | None]:
        return [self.params[str(i)] if n > 0 else None for i, n in enumerate(self.counts)]


class ClassPrompts(nn.Module):
    """One prompt set per class: a table ``[C, sum_i m_i, D]`` sliced per block (the ``table`` class-prompt
    source).

    Each class's prompts of block i are initialised Xavier-normal over ``[m_i, D]``, so the scale does not
    shrink with the number of classes (a defect of the original code).

    Where the table lives is its placement (``models/memory_bank.py``); it is trained by a
    :class:`~promptdml.models.memory_bank.LazyRowOptimizer` over :attr:`placement` (lazy/row-wise semantics),
    never by the dense torch optimisers of the other parameters:

    - ``memory_bank=False`` (:class:`DevicePlacement`): ``table`` is an ``nn.Parameter`` on the model's device.
    - ``memory_bank=True`` (:class:`MemoryBankPlacement`): ``table`` is a plain CPU tensor that is *not*
      registered with the module. Each training forward copies the batch's distinct classes' rows to the
      device as the leaf tensor :attr:`rows` ``[b, T, D]`` that receives the gradient.
    """

    def __init__(self, num_classes: int, counts: list[int], dim: int, memory_bank: bool = False,
                 cfg: Any = None, feature_dim: int | None = None) -> None:
        # cfg (the ClassPromptConfig) and feature_dim: the source interface's other arguments, unused here
        super().__init__()
        self.counts = list(counts)
        self.offsets = [sum(counts[:i]) for i in range(len(counts))]
        total = sum(counts)
        table = torch.empty(num_classes, total, dim)
        for i, m in enumerate(counts):
            if m:
                o = self.offsets[i]
                table[:, o:o + m].normal_(0.0, _prompt_std(m, dim))
        self.memory_bank = memory_bank
        self.placement = MemoryBankPlacement(table) if memory_bank else DevicePlacement(table)
        # off: registered as class_prompts.table; on: a plain attribute, stays on the CPU
        self.table = self.placement.table

    @property
    def num_classes(self) -> int:
        return self.placement.table.shape[0]

    @property
    def rows(self) -> torch.Tensor | None:
        """The device buffer of the current batch's rows (memory bank only; None between steps)."""
        p = self.placement
        return p.holder if p.memory_bank and p.index is not None else None

    def parameter_groups(self, prefix: str = "") -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """The groups of ``promptdml info``: the table (registered only without the memory bank)."""
        return [("class_prompts", list(self.named_parameters(prefix=prefix.rstrip("."))))]

    def describe(self) -> str:
        where = "on the CPU (memory bank)" if self.memory_bank else "on the model's device"
        return f"table C x T x D ({self.num_classes} x {sum(self.counts)} x {self.table.shape[-1]}), {where}"

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-block prompts ``[B, m_i, D]`` of each sample's class."""
        per_sample = self.placement.lookup(labels)
        return [per_sample[:, o:o + m] if m > 0 else None for o, m in zip(self.offsets, self.counts, strict=True)]
