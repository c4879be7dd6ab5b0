"""The training loop: class-balanced batches, autocast, two optimisers, cosine schedules, run directory."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from promptdml.config import Config, save_config
from promptdml.data import Splits, build_splits, build_train_loader, build_transforms
from promptdml.engine.checkpoint import CHECKPOINT_NAME, save_checkpoint
from promptdml.engine.device import (
    autocast,
    make_grad_scaler,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from promptdml.engine.evaluator import evaluate
from promptdml.engine.plots import plot_history
from promptdml.losses import ProxyAnchorLoss
from promptdml.models import PromptDMLModel, count_parameters, create_model, format_parameter_report

log = logging.getLogger("promptdml")


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] | None = None


def build_optimizers(model: PromptDMLModel, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Two optimisers of the same type: everything trainable at ``lr``; the proxy bias at ``lr_proxy``."""
    o = cfg.optim
    main = [p for g, ps in model.trainable_groups().items() if g != "proxy_bias" for _, p in ps]
    proxy = [model.proxies.bias]

    def make(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)

    return make(main, o.lr), make(proxy, o.lr_proxy)


def build_schedulers(optimizers: tuple[torch.optim.Optimizer, ...], cfg: Config) -> list:
    if cfg.optim.scheduler == "constant":
        return [torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0) for opt in optimizers]
    t_max = cfg.optim.t_max or cfg.train.epochs
    if t_max < cfg.train.epochs:
        log.warning("optim.t_max=%d is shorter than train.epochs=%d: the cosine learning rate will rise again "
                    "after epoch %d", t_max, cfg.train.epochs, t_max)
    return [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=cfg.optim.lr_min)
            for opt in optimizers]


def make_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Trainer:
    """Owns the model, data, optimisers and run directory of one training run."""

    def __init__(self, cfg: Config, splits: Splits | None = None, run_dir: Path | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.echo = echo
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        self.splits = splits if splits is not None else build_splits(cfg.data)
        for problem in self.splits.problems:
            log.warning(problem)
        train = self.splits.train
        self.model = create_model(cfg.model, train.num_classes).to(self.device)
        self.loss_fn = ProxyAnchorLoss(cfg.loss.alpha, cfg.loss.delta, cfg.loss.normalization)
        self.optimizers = build_optimizers(self.model, cfg)
        self.schedulers = build_schedulers(self.optimizers, cfg)
        self.scaler = make_grad_scaler(self.device, self.dtype)
        d = cfg.data
        transform = build_transforms(self.model.data_config, cfg.model.backbone.img_size, train=True)
        self.loader = build_train_loader(train, transform, d.batch_size, d.samples_per_class,
                                         d.batches_per_epoch or None, cfg.train.seed, d.num_workers,
                                         self.device.type)
        self.run_dir = run_dir or make_run_dir(cfg)
        save_config(cfg, self.run_dir / "config.yaml")
        self.history: list[dict[str, float]] = []
        self.skipped_steps = 0

    # ---------------------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimisation step; returns the loss (NaN if the step was skipped)."""
        cfg, model = self.cfg, self.model
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.dtype):
            out = model.forward_train(images, labels, cfg.data.samples_per_class)
        p = out.proxy
        if cfg.loss.proxy_range == "both_all":
            loss = self.loss_fn(out.embeddings, labels, p.proxies)
        else:
            loss = self.loss_fn(out.embeddings, labels, p.batch_proxies, p.batch_classes)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            log.warning("non-finite loss (%s): step skipped (%d so far)", loss.item(), self.skipped_steps)
            return float("nan")
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            params = [p for g in self.model.trainable_groups().values() for _, p in g]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        model.commit(out)
        return loss.item()

    def evaluate(self, split: str = "test", frozen_features: bool = False) -> dict[str, float]:
        return evaluate(self.model, self.splits, self.cfg, self.device, self.dtype, split,
                        progress=self.cfg.train.progress, frozen_features=frozen_features)

    def fit(self, evaluate_before: bool | None = None) -> TrainResult:
        cfg = self.cfg
        before = None
        counts = count_parameters(self.model)
        self.echo(format_parameter_report(self.model))
        if evaluate_before if evaluate_before is not None else cfg.eval.before_training:
            before = self.evaluate("test", frozen_features=True)
            self.echo("before training (frozen backbone features): " + format_metrics(before))
        start = time.time()
        metrics: dict[str, float] = {}
        for epoch in range(1, cfg.train.epochs + 1):
            self.loader.batch_sampler.set_epoch(epoch - 1)
            self.model.train()
            t0, losses, n_images = time.time(), [], 0
            bar = tqdm(self.loader, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not cfg.train.progress,
                       leave=False)
            for images, labels, _ in bar:
                value = self.train_step(images, labels)
                if not math.isnan(value):
                    losses.append(value)
                n_images += labels.numel()
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.optimizers[0].param_groups[0]['lr']:.2e}",
                                img_s=f"{n_images / max(time.time() - t0, 1e-9):.1f}")
            elapsed = time.time() - t0
            row: dict[str, float] = {
                "epoch": epoch, "loss": sum(losses) / max(len(losses), 1),
                "lr": self.optimizers[0].param_groups[0]["lr"], "lr_proxy": self.optimizers[1].param_groups[0]["lr"],
                "epoch_seconds": elapsed, "images_per_second": n_images / max(elapsed, 1e-9),
                "skipped_steps": self.skipped_steps,
            }
            for sched in self.schedulers:
                sched.step()
            last = epoch == cfg.train.epochs
            if last or (cfg.eval.every and epoch % cfg.eval.every == 0):
                if self.splits.val is not None:
                    row.update({f"val_{k}": v for k, v in self.evaluate("val").items()})
                metrics = self.evaluate("test")
                row.update({f"test_{k}": v for k, v in metrics.items()})
            self.history.append(row)
            self._write_log()
            self.echo(f"epoch {epoch}/{cfg.train.epochs}  loss {row['loss']:.4f}  {elapsed:.1f}s  "
                      f"{row['images_per_second']:.1f} img/s"
                      + (f"  | {format_metrics(metrics)}" if "test_recall@1" in row else ""))
        save_checkpoint(self.model, cfg, self.run_dir / CHECKPOINT_NAME, self.splits.train.class_names)
        summary = {
            "test": metrics, "before_training_frozen_features": before,
            "train_seconds": time.time() - start, "epochs": cfg.train.epochs,
            "skipped_steps": self.skipped_steps, "parameters": counts,
            "loss_normalization": cfg.loss.normalization, "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "fp32",
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        return TrainResult(self.run_dir, metrics, self.history, before)

    def _write_log(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        with open(self.run_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        plot_history(self.history, self.run_dir / "training.png")


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(cfg: Config, echo: Callable[[str], None] = print, evaluate_before: bool | None = None) -> TrainResult:
    """Train ``cfg`` end to end and write its run directory."""
    return Trainer(cfg, echo=echo).fit(evaluate_before)
