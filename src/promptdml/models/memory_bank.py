"""Row-wise ("lazy") optimiser for the class-prompt table, and the memory bank that keeps it on the CPU.

The class-prompt table ``[C, T, D]`` is optimised separately from every other trainable tensor, by
:class:`RowwiseOptimizer`, with one semantics whether the memory bank is on or off:

**Lazy / row-wise semantics.** A step touches only the rows of the classes present in the batch. For those
rows it applies exactly the update ``torch.optim.SGD`` (momentum, no dampening, no Nesterov, L2 weight
decay added to the gradient) or ``torch.optim.AdamW`` (default betas and eps, decoupled weight decay)
would apply to that row alone. Rows of absent classes are not changed at all: their momentum does **not**
keep moving them, their weight decay is not applied, and their Adam moments and step count stay frozen.
Each row has its own step count, so AdamW's bias correction of a row depends on how many times its class
has been in a batch. (Dense torch optimisers over the whole table would instead keep moving absent rows
with their momentum and decay them every step; that cannot be reproduced without touching every row, which
is what the memory bank exists to avoid.)

**Memory bank.** With the bank on, the table and the optimiser state live on the CPU; per step only the
batch's rows and their state are copied to the compute device, updated there, and written back. With it
off, table and state live on the model's device. The arithmetic is the same code on the same values, so
the two give the same parameters (checked in ``tests/test_memory_bank.py``).
"""

from __future__ import annotations

import torch


class RowwiseOptimizer:
    """SGD-momentum or AdamW applied row by row to a table ``[C, ...]`` (see the module docstring).

    The state (``momentum_buffer`` for SGD; ``exp_avg``, ``exp_avg_sq`` and a per-row ``step`` count for
    AdamW) is allocated lazily on the table's device at the first step, so with the memory bank it stays on
    the CPU next to the table.
    """

    def __init__(self, kind: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"row-wise optimiser kind must be 'sgd' or 'adamw', got {kind!r}")
        self.kind, self.momentum, self.weight_decay = kind, momentum, weight_decay
        self.betas, self.eps = betas, eps
        self.state: dict[str, torch.Tensor] = {}

    def _ensure_state(self, table: torch.Tensor) -> None:
        if self.state and next(iter(self.state.values())).device != table.device:
            self.state = {k: v.to(table.device) for k, v in self.state.items()}
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

    def state_dict(self) -> dict:
        """Hyper-parameters and state tensors (for resuming training)."""
        return {"kind": self.kind, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "betas": self.betas, "eps": self.eps, "state": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"row-wise optimiser state is for {state['kind']!r}, this optimiser is {self.kind!r}")
        self.momentum, self.weight_decay = state["momentum"], state["weight_decay"]
        self.betas, self.eps = tuple(state["betas"]), state["eps"]
        self.state = {k: v.clone() for k, v in state["state"].items()}
