"""Learnable prompt tokens: shared deep prompts (VPT-deep) and per-class prompt tables."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from promptdml.models.memory_bank import RowwiseOptimizer


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
    """One prompt set per class: a table ``[C, sum_i m_i, D]`` sliced per block.

    Each class's prompts of block i are initialised Xavier-normal over ``[m_i, D]``, so the scale does not
    shrink with the number of classes (a defect of the original code).

    The table is trained by its own :class:`RowwiseOptimizer` (lazy/row-wise semantics, see
    ``models/memory_bank.py``), never by the torch optimisers of the other parameters:

    - ``memory_bank=False``: ``table`` is an ``nn.Parameter`` on the model's device; its gradient is read
      at the rows of the batch's classes.
    - ``memory_bank=True``: ``table`` is a plain CPU tensor that is *not* registered with the module (so
      ``model.to(device)`` leaves it, and its optimiser state, on the CPU). Each training forward copies
      the batch's distinct classes' rows to the device as a leaf tensor ``rows`` ``[b, T, D]`` that
      receives the gradient; :meth:`step` updates those rows and writes them back.
    """

    def __init__(self, num_classes: int, counts: list[int], dim: int, memory_bank: bool = False) -> None:
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
        if memory_bank:
            self.table = table  # plain attribute: stays on the CPU, not part of parameters()/buffers()
        else:
            self.table = nn.Parameter(table)
        self.optimizer = RowwiseOptimizer()
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def num_classes(self) -> int:
        return self.table.shape[0]

    @property
    def rows(self) -> torch.Tensor | None:
        """The device buffer of the current batch's rows (memory bank only; None between steps)."""
        return self._pending[1] if self._pending is not None else None

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-block prompts ``[B, m_i, D]`` of each sample's class."""
        record = torch.is_grad_enabled()
        if self.memory_bank:
            classes, inverse = torch.unique(labels, return_inverse=True)
            index = classes.to(self.table.device)
            rows = self.table.index_select(0, index).to(labels.device)
            if record:
                rows.requires_grad_(True)
                self._pending = (index, rows)
            per_sample = rows.index_select(0, inverse)
        else:
            if record:
                self.table.grad = None  # the row-wise optimiser owns this gradient
                self._pending = (torch.unique(labels).to(self.table.device), None)
            per_sample = self.table.index_select(0, labels)
        return [per_sample[:, o:o + m] if m > 0 else None for o, m in zip(self.offsets, self.counts, strict=True)]

    # ---------------------------------------------------------------------------------------------
    def grad_tensors(self) -> list[torch.Tensor]:
        """Tensors holding the class-prompt gradient of the pending step (for global-norm clipping)."""
        if self._pending is None:
            return []
        rows = self._pending[1]
        grad_holder = rows if self.memory_bank else self.table
        return [grad_holder] if grad_holder is not None and grad_holder.grad is not None else []

    @torch.no_grad()
    def exchange_pending_grad(self, gather_varlen) -> None:
        """Distributed training: merge the pending gradients of all ranks.

        ``gather_varlen(t)`` returns the list of every rank's ``t``. Each rank contributes ``(class ids, row
        gradients)`` of its own batch classes; the union (duplicates summed) becomes the pending step on every
        rank: with the memory bank a device buffer of the union's rows holding the merged gradient, without it
        the merged rows written into ``table.grad``. A rank without a pending gradient is an error (all ranks
        run the same graph)."""
        if self._pending is None or self.table.numel() == 0:
            return
        index, rows = self._pending
        if self.memory_bank:
            grad = rows.grad
            device = rows.device
        else:
            grad = self.table.grad.index_select(0, index) if self.table.grad is not None else None
            device = self.table.device
        if grad is None:
            return  # the loss did not reach the class prompts (on every rank alike)
        all_index = torch.cat(gather_varlen(index.to(device)))
        all_grad = torch.cat(gather_varlen(grad))
        union, inverse = torch.unique(all_index, return_inverse=True)
        merged = all_grad.new_zeros((union.numel(), *all_grad.shape[1:])).index_add_(0, inverse, all_grad)
        union = union.to(self.table.device)
        if self.memory_bank:
            holder = self.table.index_select(0, union).to(device)
            holder.grad = merged
            self._pending = (union, holder)
        else:
            self.table.grad.index_copy_(0, union, merged.to(self.table.grad.dtype))
            self._pending = (union, None)

    @torch.no_grad()
    def unscale_grad_(self, inv_scale: float) -> None:
        """Undo loss scaling (fp16 GradScaler) on the pending gradient."""
        for t in self.grad_tensors():
            t.grad.mul_(inv_scale)

    @torch.no_grad()
    def step(self, lr: float) -> bool:
        """Apply the row-wise optimiser to the pending batch rows; False if there was nothing to do or the
        gradient was not finite (the step is then skipped, like GradScaler skips the other optimisers)."""
        if self._pending is None:
            return False
        index, rows = self._pending
        self._pending = None
        if self.memory_bank:
            grad = rows.grad
        else:
            grad = self.table.grad.index_select(0, index) if self.table.grad is not None else None
            self.table.grad = None
        if grad is None or not bool(torch.isfinite(grad).all()):
            return False
        self.optimizer.step(self.table.detach(), index, grad, lr)
        return True
