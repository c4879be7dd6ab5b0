"""Lazy row-wise optimisation of the class-prompt table, and where the table lives (device or memory bank).

The class-prompt table ``[C, T, D]`` is optimised by :class:`LazyRowOptimizer`, a ``torch.optim.Optimizer``
like the other two, with one semantics whether the memory bank is on or off:

**Lazy / row-wise semantics** (like ``torch.optim.SparseAdam``). A step touches only the rows of the classes
present in the batch. For those rows it applies exactly the update ``torch.optim.SGD`` (momentum, no
dampening, no Nesterov, L2 weight decay added to the gradient) or ``torch.optim.AdamW`` (default betas and
eps, decoupled weight decay) would apply to that row alone. Rows of absent classes are not changed at all:
their momentum does **not** keep moving them, their weight decay is not applied, and their Adam moments and
step count stay frozen. Each row has its own step count, so AdamW's bias correction of a row depends on how
many times its class has been in a batch. (Dense torch optimisers over the whole table would instead keep
moving absent rows with their momentum and decay them every step; that cannot be reproduced without touching
every row, which is what the memory bank exists to avoid.)

**Placement.** Where the table lives is a strategy of the table (:class:`DevicePlacement`,
:class:`MemoryBankPlacement`): each exposes the *gradient holder*, the tensor whose ``.grad`` holds this
step's class-prompt gradient, and that tensor is what the optimiser lists in its parameter group. So
``GradScaler`` (unscale, inf check, skip), ``clip_grad_norm_``, learning-rate schedulers, warm-up and
``state_dict`` see the class prompts like any parameter. With the bank on, the table and the optimiser state
live on the CPU; per step only the batch's rows are copied to the compute device (into the holder), stepped
there, and written back. With it off, the table is an ``nn.Parameter`` on the model's device and is its own
holder. The arithmetic is the same code on the same values, so the two give the same parameters (checked in
``tests/test_memory_bank.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class RowwiseOptimizer:
    """The arithmetic: SGD-momentum or AdamW applied row by row to a table ``[C, ...]``.

    ``state`` (``momentum_buffer`` for SGD; ``exp_avg``, ``exp_avg_sq`` and a per-row ``step`` count for
    AdamW) is a dict updated in place (:class:`LazyRowOptimizer` passes its own per-parameter state); it is
    allocated lazily on the table's device at the first step, so with the memory bank it stays on the CPU next
    to the table.
    """

    def __init__(self, kind: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, state: dict | None = None) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"row-wise optimiser kind must be 'sgd' or 'adamw', got {kind!r}")
        self.kind, self.momentum, self.weight_decay = kind, momentum, weight_decay
        self.betas, self.eps = betas, eps
        self.state: dict[str, torch.Tensor] = {} if state is None else state

    def _ensure_state(self, table: torch.Tensor) -> None:
        for k, v in self.state.items():
            if v.device != table.device:
                self.state[k] = v.to(table.device)
        if self.state:
            return
        if self.kind == "sgd":
            if self.momentum != 0:
                self.state["momentum_buffer"] = torch.zeros_like(table)
        else:
            self.state["exp_avg"] = torch.zeros_like(table)
            self.state["exp_avg_sq"] = torch.zeros_like(table)
            self.state["step"] = torch.zeros(table.shape[0], dtype=torch.float64, device=table.device)

    @torch.no_grad()
    def step(self, table: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update rows ``table[index]`` in place with ``grad`` ``[len(index), ...]``.

        ``index`` lives on the table's device, ``grad`` on the compute device; rows and their state are
        copied there, stepped, and written back (``index`` must not repeat a row).
        """
        self._ensure_state(table)
        device = grad.device
        values = table.index_select(0, index).to(device)
        grad = grad.to(values.dtype)
        rows = {k: v.index_select(0, index).to(device) for k, v in self.state.items()}
        wd = self.weight_decay
        if self.kind == "sgd":
            if wd != 0:
                grad = grad.add(values, alpha=wd)
            if self.momentum != 0:
                buf = rows["momentum_buffer"]
                buf.mul_(self.momentum).add_(grad)  # a fresh (zero) buffer gives buf = grad, as torch does
                grad = buf
            values.add_(grad, alpha=-lr)
        else:
            beta1, beta2 = self.betas
            shape = (-1,) + (1,) * (values.dim() - 1)
            step = rows["step"].add_(1)
            values.mul_(1 - lr * wd)
            exp_avg, exp_avg_sq = rows["exp_avg"], rows["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = (lr / (1 - beta1 ** step)).to(values.dtype).view(shape)
            bc2_sqrt = (1 - beta2 ** step).sqrt().to(values.dtype).view(shape)
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
            values.sub_(step_size * (exp_avg / denom))
        table.index_copy_(0, index, values.to(table.device))
        for k, v in rows.items():
            self.state[k].index_copy_(0, index, v.to(table.device))


# ------------------------------------------------------------------------------------------------- placement
class DevicePlacement:
    """The table is an ``nn.Parameter`` on the model's device and is its own gradient holder (a dense
    gradient, read at the rows of the batch's classes)."""

    memory_bank = False

    def __init__(self, table: torch.Tensor) -> None:
        self.table = nn.Parameter(table)
        self.index: torch.Tensor | None = None  # the rows of the pending step

    @property
    def holder(self) -> torch.Tensor:
        return self.table

    def lookup(self, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's rows ``[B, T, D]`` (with the graph); records the step's rows when grad is enabled."""
        if torch.is_grad_enabled():
            self.index = torch.unique(labels).to(self.table.device)
        return self.table.index_select(0, labels)

    def pending(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(row ids, their gradient)`` of the pending step, or None."""
        if self.index is None:
            return None
        grad = self.table.grad.index_select(0, self.index) if self.table.grad is not None else None
        return self.index, grad

    def release(self) -> None:
        self.index = None
        self.table.grad = None

    def set_pending(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        self.table.grad.index_copy_(0, index, grad.to(self.table.grad.dtype))
        self.index = index


class MemoryBankPlacement:
    """The table is a plain CPU tensor, not registered with the module (so ``model.to(device)`` leaves it,
    and its optimiser state, on the CPU). Each training forward copies the batch's distinct classes' rows to
    the device into :attr:`holder`, a leaf tensor that receives their gradient."""

    memory_bank = True

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.holder = torch.empty(0)  # the same tensor every step; its data are the step's rows
        self.index: torch.Tensor | None = None

    def lookup(self, labels: torch.Tensor) -> torch.Tensor:
        classes, inverse = torch.unique(labels, return_inverse=True)
        index = classes.to(self.table.device)
        rows = self.table.index_select(0, index).to(labels.device)
        if torch.is_grad_enabled():
            self._hold(index, rows)
            rows = self.holder
        return rows.index_select(0, inverse)

    def _hold(self, index: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        self.holder.grad = None
        self.holder.data = rows
        self.holder.requires_grad_(True)
        self.holder.grad = grad
        self.index = index

    def pending(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return None if self.index is None else (self.index, self.holder.grad)

    def release(self) -> None:
        self.index = None
        self.holder.grad = None
        self.holder.data = self.holder.data.new_empty(0)

    def set_pending(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        self._hold(index, self.table.index_select(0, index).to(grad.device), grad)


Placement = DevicePlacement | MemoryBankPlacement


@torch.no_grad()
def exchange_pending_grad(place: Placement, gather_varlen: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
    """Distributed training: merge the pending row gradients of all ranks.

    ``gather_varlen(t)`` returns the list of every rank's ``t``. Each rank contributes ``(row ids, row
    gradients)`` of its own batch classes; the union (duplicates summed) becomes the pending step on every rank.
    Only the batch's rows travel, never the table."""
    pending = place.pending()
    if pending is None or place.table.numel() == 0:
        return
    index, grad = pending
    if grad is None:
        return  # the loss did not reach the class prompts (on every rank alike)
    all_index = torch.cat(gather_varlen(index.to(grad.device)))
    all_grad = torch.cat(gather_varlen(grad))
    union, inverse = torch.unique(all_index, return_inverse=True)
    merged = all_grad.new_zeros((union.numel(), *all_grad.shape[1:])).index_add_(0, inverse, all_grad)
    place.set_pending(union.to(place.table.device), merged)


# ------------------------------------------------------------------------------------------------- optimiser
class LazyRowOptimizer(torch.optim.Optimizer):
    """SGD-momentum or AdamW with lazy row semantics over row tables (see the module docstring).

    ``placements`` are the tables' placements; their gradient holders are this optimiser's parameters. A step
    applies :class:`RowwiseOptimizer` to each table's pending rows, then releases them. A table whose pending
    gradient is not finite is not stepped, and :attr:`skipped` says so (the caller must then not commit
    anything that depends on the step)."""

    def __init__(self, placements: list[Placement], kind: str = "sgd", lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"row-wise optimiser kind must be 'sgd' or 'adamw', got {kind!r}")
        self.placements = {id(p.holder): p for p in placements}
        self.skipped = False
        defaults = dict(lr=lr, kind=kind, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps)
        super().__init__([p.holder for p in placements], defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.skipped = False
        for group in self.param_groups:
            for holder in group["params"]:
                place = self.placements[id(holder)]
                pending = place.pending()
                if pending is None:
                    continue
                index, grad = pending
                place.release()
                if grad is None:
                    continue
                if not bool(torch.isfinite(grad).all()):
                    self.skipped = True
                    continue
                RowwiseOptimizer(group["kind"], group["momentum"], group["weight_decay"], tuple(group["betas"]),
                                 group["eps"], state=self.state[holder]).step(place.table.detach(), index, grad,
                                                                             group["lr"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the pending rows and their gradients (the next forward records new ones)."""
        for place in self.placements.values():
            place.release()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like torch, then keep each table's state where the table lives (CPU with the memory bank)."""
        super().load_state_dict(state_dict)
        for holder, place in ((h, self.placements[id(h)]) for g in self.param_groups for h in g["params"]):
            st = self.state[holder]
            for k, v in list(st.items()):
                st[k] = v.to(place.table.device)

    def exchange_grads(self, gather_varlen: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        """Distributed: make every rank's pending rows the union over all ranks (:func:`exchange_pending_grad`)."""
        for place in self.placements.values():
            exchange_pending_grad(place, gather_varlen)
