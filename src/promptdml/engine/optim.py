"""Optimisers, schedules, warm-up and the tensors that clipping sees, built from the model and the config.

Three optimisers of one type (``optim.optimizer``): everything dense at ``optim.lr`` (the backbone-side
parameters at ``lr * backbone_lr_scale``), the proxy bias at ``optim.lr_proxy``, and the row tables (the
class-prompt table) by a :class:`~promptdml.models.memory_bank.LazyRowOptimizer` at ``optim.lr``. All three
are ``torch.optim.Optimizer``: the trainer steps, schedules, warms up, unscales and clips them alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from promptdml.config import Config
from promptdml.models import PromptDMLModel
from promptdml.models.memory_bank import LazyRowOptimizer

log = logging.getLogger("promptdml")


def build_optimizers(model: PromptDMLModel, cfg: Config) -> list[torch.optim.Optimizer]:
    """``[main, proxy bias]`` plus the lazy row optimiser when the model has row tables."""
    o = cfg.optim
    placements = model.row_placements()
    rows = {id(p.table) for p in placements}
    bias = model.proxies.bias
    main = [p for ps in model.trainable_groups().values() for _, p in ps if id(p) not in rows and p is not bias]

    def make(params: list, lr: float) -> torch.optim.Optimizer:
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)

    if o.backbone_lr_scale != 1.0:  # group 0 keeps lr (heads, GRU), group 1 scaled
        backbone = {id(p) for p in model.backbone_parameters()}
        main = [{"params": [p for p in main if id(p) not in backbone]},
                {"params": [p for p in main if id(p) in backbone], "lr": o.lr * o.backbone_lr_scale}]
        main = [g for g in main if g["params"]]
    optimizers = [make(main, o.lr), make([bias], o.lr_proxy)]
    if placements:
        optimizers.append(LazyRowOptimizer(placements, o.optimizer, lr=o.lr, momentum=o.momentum,
                                           weight_decay=o.weight_decay))
    return optimizers


def build_schedulers(optimizers: list[torch.optim.Optimizer], cfg: Config) -> list:
    if cfg.optim.scheduler == "constant":
        return [torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0) for opt in optimizers]
    t_max = cfg.optim.t_max or cfg.train.epochs
    if t_max < cfg.train.epochs:
        log.warning("optim.t_max=%d is shorter than train.epochs=%d: the cosine learning rate will rise again "
                    "after epoch %d", t_max, cfg.train.epochs, t_max)
    return [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=cfg.optim.lr_min)
            for opt in optimizers]


def clip_tensors(model: PromptDMLModel, optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every optimised tensor, for global-norm clipping: the model's trainable parameters in group order, then
    the optimisers' other parameters (gradient holders that are not module parameters)."""
    stepped = {id(p): p for opt in optimizers for g in opt.param_groups for p in g["params"]}
    ordered = [p for ps in model.trainable_groups().values() for _, p in ps if id(p) in stepped]
    listed = {id(p) for p in ordered}
    return ordered + [p for i, p in stepped.items() if i not in listed]


def dense_parameters(model: PromptDMLModel, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of ``optimizer`` in the model's group order (what distributed training all-reduces)."""
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [p for ps in model.trainable_groups().values() for _, p in ps if id(p) in mine]


@contextlib.contextmanager
def scaled_lr(optimizers: list[torch.optim.Optimizer], factor: float | None) -> Iterator[None]:
    """Scale every group's learning rate by ``factor`` for the duration (None: untouched), then restore it."""
    if factor is None:
        yield
        return
    scheduled = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] *= factor
    try:
        yield
    finally:
        for opt, lrs in zip(optimizers, scheduled, strict=True):
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = lr


class StepSchedule:
    """What changes step by step inside the per-epoch schedule: the linear warm-up (``optim.warmup_epochs``)
    and the head warm-up that holds the backbone parts (``optim.head_warmup_epochs``); ``loader`` gives the
    steps per epoch (read only when a warm-up is on)."""

    def __init__(self, cfg: Config, loader: Any) -> None:
        self.cfg, self.loader = cfg, loader

    def _steps(self, epochs: float) -> int:
        return round(epochs * len(self.loader)) if epochs > 0 else 0

    def warmup_factor(self, step: int) -> float | None:
        """The factor on every scheduled rate for step ``step`` (0-based): (step + 1) / warm-up steps."""
        steps = self._steps(self.cfg.optim.warmup_epochs)
        return (step + 1) / steps if step < steps else None

    def taken_factor(self, steps_done: int) -> float:
        """The warm-up factor the last of ``steps_done`` steps used (1 after the warm-up)."""
        steps = self._steps(self.cfg.optim.warmup_epochs)
        return min(1.0, steps_done / steps) if steps else 1.0

    def holds_backbone(self, step: int) -> bool:
        return step < self._steps(self.cfg.optim.head_warmup_epochs)

    def step_lrs(self, optimizers: list[torch.optim.Optimizer], steps_done: int) -> tuple[float, float]:
        """The learning rates the last step used (main group, proxy bias), warm-up factor included."""
        factor = self.taken_factor(steps_done)
        return optimizers[0].param_groups[0]["lr"] * factor, optimizers[1].param_groups[0]["lr"] * factor
