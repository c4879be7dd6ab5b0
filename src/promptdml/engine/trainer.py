"""The training loop: class-balanced batches, autocast, two optimisers, cosine schedules, run directory."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptdml.config import Config, ConfigError, save_config
from promptdml.data import Splits, build_splits, build_transforms
from promptdml.engine.checkpoint import CHECKPOINT_NAME, save_checkpoint
from promptdml.engine.device import autocast, make_grad_scaler, resolve_precision, seed_everything
from promptdml.engine.distributed import (
    SINGLE,
    DistContext,
    all_gather_cat,
    all_gather_varlen,
    all_reduce_grads_,
    broadcast_object,
    broadcast_tensors_,
    build_sharded_train_loader,
    check_replicas_equal,
    init_distributed,
)
from promptdml.engine.evaluator import class_means, embed_records, evaluate
from promptdml.engine.model_card import write_model_card
from promptdml.engine.plots import plot_history
from promptdml.engine.rundir import (
    RunLock,
    backbone_fingerprint,
    check_run_dir,
    compare_fingerprints,
    data_fingerprint,
    prepare_run_dir,
    run_dir_of,
)
from promptdml.engine.state import (
    LAST,
    RESUME_DIR,
    atomic_torch_save,
    load_resume_state,
    rng_state,
    set_rng_state,
)
from promptdml.errors import BackboneError, DataError, TrainingError
from promptdml.extras import optional_import
from promptdml.files import atomic_write_text
from promptdml.losses import build_loss
from promptdml.metrics import mean_pairwise_cosine
from promptdml.models import PromptDMLModel, count_parameters, create_model, format_parameter_report
from promptdml.models.backbone import resolve_weights
from promptdml.progress import progress_bar

log = logging.getLogger("promptdml")

COLLAPSE_COS = 0.5
"""Mean pairwise cosine between the class proxies above which the trainer warns of a proxy collapse (plain
proxies stay below 0.2). On the real-image benchmark (benchmarks/real_data.py) VPTSP-G at the cub200_small settings
starts at 0.78 and ends at 0.45 after a good run: the warning says the classes separate slowly, not that the run
failed."""
CONTAINER_COLLAPSE_COS = 0.9
"""Mean pairwise cosine between container rows above which the trainer warns when the container makes up at
least ``CONTAINER_SHARE`` of each proxy (``1 - proxy_bias_ratio``)."""
CONTAINER_SHARE = 0.25
EMBEDDING_COLLAPSE_COS = 0.9
"""Mean pairwise cosine between a training batch's embeddings (averaged over the epoch) above which the trainer
warns of an embedding collapse, from epoch ``EMBEDDING_COLLAPSE_EPOCH`` on: every image still maps close to one
point, so retrieval has little left to rank by. On the real-image benchmark the embeddings of every run huddle
together in the first epoch (0.94-0.99) unless ``optim.head_warmup_epochs`` holds the backbone; good runs spread
out later (by epoch 3, or only at epochs 7-9), failed runs stayed at 0.96-0.99 for all 15 epochs and ended below the
frozen features."""
EMBEDDING_COLLAPSE_EPOCH = 3


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] | None = None


def build_optimizers(model: PromptDMLModel, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Two optimisers of the same type: everything trainable at ``lr``; the proxy bias at ``lr_proxy``."""
    o = cfg.optim
    # >>> memory-bank hook: the class-prompt table is stepped by the model's row-wise optimiser of the same
    # type (lazy semantics, models/memory_bank.py), not by these torch optimisers.
    groups = model.trainable_groups()
    main = [p for g, ps in groups.items() if g not in ("proxy_bias", "class_prompts") for _, p in ps]
    model.configure_row_optimizer(o.optimizer, momentum=o.momentum, weight_decay=o.weight_decay)
    # <<< memory-bank hook
    proxy = [model.proxies.bias]

    def make(params: list, lr: float) -> torch.optim.Optimizer:
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)

    if o.backbone_lr_scale != 1.0:  # group 0 keeps lr (heads, GRU; the class-prompt rows read it), group 1 scaled
        backbone = {id(p) for p in model.backbone_parameters()}
        main = [{"params": [p for p in main if id(p) not in backbone]},
                {"params": [p for p in main if id(p) in backbone], "lr": o.lr * o.backbone_lr_scale}]
        main = [g for g in main if g["params"]]
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


def make_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """Create the run directory of ``cfg`` (refused when it holds a previous run, unless ``overwrite``)."""
    run_dir = run_dir_of(cfg)
    prepare_run_dir(run_dir, overwrite).release()
    return run_dir


def absolute_paths(cfg: Config) -> Config:
    """Store ``data.root`` and ``model.backbone.weights`` as absolute paths, so that the run's config works from
    any folder (``promptdml evaluate --run``, ``search``, the model card's commands)."""
    for key in ("root",):
        value = getattr(cfg.data, key)
        if str(value).strip():
            setattr(cfg.data, key, str(Path(value).expanduser().absolute()))
    if str(cfg.model.backbone.weights).strip():
        cfg.model.backbone.weights = str(Path(cfg.model.backbone.weights).expanduser().absolute())
    return cfg


def _warn_small_classes(train: Any, k: int) -> None:
    counts = train.class_counts()
    small = [train.class_names[c] for c in np.flatnonzero(counts < k)]
    if small:
        log.warning("%d of %d training classes have fewer than data.samples_per_class=%d images (e.g. %s): the "
                    "sampler repeats their images within a batch. Lower data.samples_per_class or add images.",
                    len(small), train.num_classes, k, ", ".join(small[:5]))


class Trainer:
    """Owns the model, data, optimisers and run directory of one training run.

    Under torchrun (``WORLD_SIZE > 1``) it joins the process group and trains data-parallel with exact
    single-process equivalence (``engine/distributed.py``, ``docs/distributed.md``): ``data.batch_size`` is the
    global batch, each rank processes ``batch_size / world_size`` images of it, and rank 0 alone writes the run
    directory (config, logs, plots, checkpoints, metrics, model card, tensorboard) and prints.
    """

    dist: DistContext = SINGLE  # class default: a Trainer built without __init__ is single-process
    global_step = 0  # (and starts at step 0)
    _stop_agreed = False

    def __init__(self, cfg: Config, splits: Splits | None = None, run_dir: Path | None = None,
                 echo: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False,
                 resume_anyway: bool = False, dry: bool = False) -> None:
        self.cfg = absolute_paths(cfg)
        self._lock: RunLock | None = None
        self.dist, self.device = init_distributed(cfg.train.device)
        planned = Path(run_dir).absolute() if run_dir is not None else None
        if self.dist.is_main:  # refuse a used run directory before building anything
            planned = planned or run_dir_of(cfg)
            check_run_dir(planned, overwrite, resume)
        if not self.dist.is_main:  # other ranks stay quiet: no echo, no progress bars, only errors logged
            echo = _quiet
            log.setLevel(logging.ERROR)
        self.echo = echo
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        if cfg.model.backbone.pretrained:  # fail in seconds when no weights can be had, before reading the data
            resolve_weights(cfg.model.backbone)
        self.splits = splits if splits is not None else build_splits(
            cfg.data, progress=cfg.train.progress and self.dist.is_main)
        train = self.splits.train
        _warn_small_classes(train, cfg.data.samples_per_class)
        model = create_model(cfg.model, train.num_classes)
        self.fingerprint = {"data": data_fingerprint(self.splits), "backbone": backbone_fingerprint(cfg)}
        self.model = model.to(self.device)
        if cfg.train.compile:  # training calls of the backbone blocks; falls back to eager with one warning
            self.model.backbone.enable_compile()
        if not resume:
            self._init_from_data()
        self.loss_fn = build_loss(cfg.loss)
        self.optimizers = build_optimizers(self.model, cfg)
        self.schedulers = build_schedulers(self.optimizers, cfg)
        self.scaler = make_grad_scaler(self.device, self.dtype)
        d = cfg.data
        transform = build_transforms(self.model.data_config, cfg.model.backbone.img_size, train=True)
        # global batches of data.batch_size, split by whole classes across ranks; per-sample seeded augmentation
        self.loader = build_sharded_train_loader(train, transform, d.batch_size, d.samples_per_class,
                                                 d.batches_per_epoch or None, cfg.train.seed, d.num_workers,
                                                 self.device.type, self.dist)
        if self.dist.is_main and not dry:  # rank 0 names the run (a timestamp), creates and locks it
            self._lock = prepare_run_dir(planned, overwrite, resume)
        self.run_dir = Path(broadcast_object(str(planned) if self.dist.is_main else None, self.dist))
        if self.dist.is_main and not dry:
            save_config(cfg, self.run_dir / "config.yaml")
        self.history: list[dict[str, float]] = []
        self.skipped_steps = 0
        self._collapse_warned: set[str] = set()  # kinds already warned about
        self._embedding_cos: list[float] = []  # per step of the current epoch
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps completed in the current (unfinished) epoch
        self.global_step = 0
        self.best: dict[str, Any] = {}
        self.before: dict[str, float] | None = None
        self.train_seconds = 0.0
        self._stop_signal: int | None = None
        self._tb: Any = None  # the TensorBoard writer, created on first use (False: unavailable)
        self._step_rows: list[dict[str, float]] = []  # steps.csv rows not yet written (written with the state)
        self.eval_report: dict[str, Any] = {}
        if resume:  # every rank reads checkpoints/last.pt (a shared file system across nodes)
            state = load_resume_state(self.run_dir)
            self._check_resume(state, resume_anyway)
            self.load_state(state)
            if self.dist.is_main:
                self._truncate_step_log()
        if self.dist.enabled:
            check_replicas_equal(self.model.trainable_state(), self.dist, "initial trainable state")

    def _init_from_data(self) -> None:
        """Data-dependent initialisation before the first step, from one pass of the initial model over the
        training images per branch: ``model.head_init=centered`` shifts a head's LayerNorm bias so that the
        normalised features (hence the embeddings before L2 normalisation) average zero;
        ``proxy.bias_init=class_mean`` (``proxy.container_init=class_mean``) starts each class's proxy bias
        (container row) at the class's mean embedding (proxy-branch feature)."""
        m, p = self.cfg.model, self.cfg.model.proxy
        center = m.head_init == "centered"
        todo = {"embedding": (self.model.embed_head, p.bias_init == "class_mean"),
                "proxy": (getattr(self.model, "proxy_head", None), p.semantic and p.container_init == "class_mean")}
        means: dict[str, torch.Tensor] = {}
        train = self.splits.train
        labels = torch.as_tensor(train.labels)
        for branch, (head, wants_means) in todo.items():
            if head is None or not (center or wants_means):
                continue
            with torch.random.fork_rng(devices=[]):  # the data loader draws a seed: keep the run's random stream
                feats = embed_records(self.model, train, self.cfg, self.device, self.dtype, desc=f"init {branch}",
                                      dist=self.dist, normalize=False,
                                      forward=lambda x, y, b=branch: self.model.head_inputs(x, y, b))
            if center:
                mean = feats.mean(dim=0)
                head.center_(mean)
                feats = feats - mean
            if wants_means:
                bias = head.fc.bias.detach().float().cpu() if head.fc.bias is not None else None
                z = torch.nn.functional.linear(feats, head.fc.weight.detach().float().cpu(), bias)
                means[branch] = class_means(torch.nn.functional.normalize(z, dim=-1), labels, train.num_classes)
        if means:
            self.model.proxies.init_from_class_means(means.get("embedding"), means.get("proxy"))
        done = (["heads centred"] if center else []) + [f"{b} class means" for b in means]
        if done:
            self.echo("initialised from the training images: " + ", ".join(done))

    # ---------------------------------------------------------------------------------------------
    def check(self) -> str:
        """Dry run (``promptdml train --check``): one training batch forward and backward (no update) and one
        evaluation batch; returns a short report. Nothing is written."""
        images, labels, _ = next(iter(self.loader))
        loss, _, _ = self._forward_loss(images.to(self.device), labels.to(self.device))
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss of the first training batch is {loss.item()}; lower optim.lr or use "
                                f"train.precision=fp32")
        self.scaler.scale(loss).backward()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        records = self.splits.test if self.splits.test is not None else self.splits.gallery
        assert records is not None
        first = records.subset(range(min(len(records), self.cfg.eval.batch_size)))
        emb = embed_records(self.model, first, self.cfg, self.device, self.dtype)
        lines = [f"{name}: {rec.summary()}" for name, rec in self.splits.named_splits()]
        lines += [f"problems: {len(self.splits.problems)} (see `promptdml data check`)" if self.splits.problems
                  else "problems: none",
                  f"model: {self.cfg.model.backbone.name} @ {self.cfg.model.backbone.img_size}px on {self.device}, "
                  f"{count_parameters(self.model)['trainable']:,} trainable parameters",
                  f"one training batch of {labels.numel()} images: loss {loss.item():.4f}; one evaluation batch of "
                  f"{emb.shape[0]} images: {emb.shape[1]}-d embeddings",
                  f"run directory (not created by --check): {self.run_dir}",
                  "check passed: the config builds and runs; drop --check to train"]
        return "\n".join(lines)

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The loss of one batch (global under distributed training), the model output and the embeddings."""
        cfg, model, ctx = self.cfg, self.model, self.dist
        gather = None
        if ctx.enabled:  # all ranks' classes and container rows (with their graph) for the global proxies

            def gather(t: torch.Tensor) -> torch.Tensor:
                return all_gather_cat(t, ctx, "proxy/rows" if t.is_floating_point() else "proxy/classes")

        with autocast(self.device, self.dtype):
            out = model.forward_train(images, labels, cfg.data.samples_per_class, gather=gather)
        embeddings = out.embeddings
        if ctx.enabled:  # the loss sees the global batch, computed identically on every rank
            embeddings = all_gather_cat(embeddings, ctx, "embeddings")
            labels = all_gather_cat(labels, ctx, "labels")
        p = out.proxy
        if cfg.loss.proxy_range == "both_all":
            loss = self.loss_fn(embeddings, labels, p.proxies)
        else:
            loss = self.loss_fn(embeddings, labels, p.batch_proxies, p.batch_classes)
        return loss, out, embeddings

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimisation step; returns the loss (NaN if the step was skipped)."""
        cfg, model, ctx = self.cfg, self.model, self.dist
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss, out, embeddings = self._forward_loss(images, labels)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            log.warning("non-finite loss (%s): step skipped (%d so far)", loss.item(), self.skipped_steps)
            return float("nan")
        self.scaler.scale(loss).backward()
        if ctx.enabled:
            self._sync_gradients()
        if self.global_step < self._steps(cfg.optim.head_warmup_epochs):  # backbone parts wait (no step, no decay)
            for param in model.backbone_parameters():
                param.grad = None
        # >>> memory-bank hook: class-prompt gradients are not in a torch optimiser; unscale them here
        if self.scaler.is_enabled():
            model.unscale_row_grads_(1.0 / self.scaler.get_scale())
        # <<< memory-bank hook
        if cfg.optim.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.gradient_tensors(), cfg.optim.grad_clip)  # memory-bank hook
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        with self._warmup():
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            model.step_rows(self.optimizers[0].param_groups[0]["lr"])  # memory-bank hook: class-prompt rows
        if scale is not None and self.scaler.get_scale() < scale:  # the scaler found inf/NaN gradients
            self.skipped_steps += 1
            log.warning("fp16 gradients overflowed: step skipped, container rows kept (%d so far)",
                        self.skipped_steps)
        else:
            model.commit(out)  # container rows are written only after a step that was taken
        value = loss.item()  # the step's one device sync; the geometry probe below comes after it
        self._embedding_cos.append(mean_pairwise_cosine(embeddings))
        return value

    def _step_lrs(self) -> tuple[float, float]:
        """The learning rates the last step used (main group, proxy bias), warm-up factor included."""
        steps = self._steps(self.cfg.optim.warmup_epochs)
        factor = min(1.0, self.global_step / steps) if steps else 1.0  # global_step counts the step just taken
        return (self.optimizers[0].param_groups[0]["lr"] * factor, self.optimizers[1].param_groups[0]["lr"] * factor)

    def _log_step(self, epoch: int, loss: float, lr: tuple[float, float]) -> None:
        """Per-step loss and learning rates: TensorBoard (``step/*``) and, with train.log_steps, steps.csv."""
        tb = self._tensorboard()
        if tb is not None:
            if math.isfinite(loss):
                tb.add_scalar("step/loss", loss, self.global_step)
            tb.add_scalar("step/lr", lr[0], self.global_step)
            tb.add_scalar("step/lr_proxy", lr[1], self.global_step)
        if self.cfg.train.log_steps:
            self._step_rows.append({"step": self.global_step, "epoch": epoch, "loss": loss, "lr": lr[0],
                                    "lr_proxy": lr[1]})

    def _steps(self, epochs: float) -> int:
        return round(epochs * len(self.loader)) if epochs > 0 else 0

    @contextlib.contextmanager
    def _warmup(self):
        """During ``optim.warmup_epochs``, scale every group's scheduled learning rate by (step + 1) / warmup
        steps for this step only (the per-epoch schedule itself is untouched)."""
        steps = self._steps(self.cfg.optim.warmup_epochs)
        if self.global_step >= steps:
            yield
            return
        factor = (self.global_step + 1) / steps
        scheduled = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] *= factor
        try:
            yield
        finally:
            for opt, lrs in zip(self.optimizers, scheduled, strict=True):
                for g, lr in zip(opt.param_groups, lrs, strict=True):
                    g["lr"] = lr

    def _sync_gradients(self) -> None:
        """Distributed: sum the dense gradients of the parameters used before the gather (each rank holds its
        images' share), exchange the class-prompt row gradients (union of the ranks' classes), and agree on a
        stop request. The proxy bias is used only after the gather: its gradient is already complete on
        every rank and is not communicated."""
        ctx = self.dist
        flags = all_reduce_grads_(self._dense_params(), ctx, flags=[float(self._stop_signal is not None)])
        self._stop_agreed = self._stop_agreed or flags[0] > 0

        def gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
            return all_gather_varlen(t, ctx, "class_prompts/grads" if t.is_floating_point() else "class_prompts/ids")

        self.model.exchange_row_grads(gather_varlen)

    def _dense_params(self) -> list[torch.nn.Parameter]:
        return [p for g, ps in self.model.trainable_groups().items() if g not in ("proxy_bias", "class_prompts")
                for _, p in ps]

    def _resync_replicated(self) -> None:
        """Distributed, once per epoch: copy rank 0's proxy bias (and its optimiser state) to all ranks. They
        are computed redundantly on every rank from identical inputs, so this is a no-op unless a
        non-deterministic kernel made the replicas drift apart in the last bits."""
        if not self.dist.enabled:
            return
        bias = self.model.proxies.bias
        state = self.optimizers[1].state.get(bias, {})
        tensors = [bias.data] + [v for _, v in sorted(state.items()) if torch.is_tensor(v) and v.dim() > 0]
        broadcast_tensors_(tensors, self.dist, tag="resync/proxy_bias")

    def _stop_requested(self) -> bool:
        """A stop signal arrived (distributed: on any rank, agreed with the gradient sync of a step)."""
        return self._stop_agreed if self.dist.enabled else self._stop_signal is not None

    def evaluate(self, split: str = "test", frozen_features: bool = False) -> dict[str, float]:
        report: dict[str, Any] = {}
        metrics = evaluate(self.model, self.splits, self.cfg, self.device, self.dtype, split,
                           progress=self.cfg.train.progress and self.dist.is_main, frozen_features=frozen_features,
                           dist=self.dist, report=report)
        self.eval_report[split] = report.get("unreadable", [])
        return metrics

    def _check_resume(self, state: dict[str, Any], anyway: bool) -> None:
        """Refuse to continue a run on other data or another backbone (``anyway``: warn and try)."""
        saved = state.get("fingerprint")
        if saved is None:
            log.warning("the resume state of %s has no data fingerprint (an older promptdml); cannot check that the "
                        "data and backbone are unchanged", self.run_dir)
            return
        diffs = compare_fingerprints(saved, self.fingerprint)
        if diffs:
            text = "; ".join(diffs)
            if not anyway:
                raise TrainingError(
                    f"cannot resume '{self.run_dir}': the data or backbone differ from the run's: {text}. Point "
                    f"at the original files (--data-root DIR, --weights FILE), or pass --resume-anyway to continue "
                    f"on the changed data.")
            log.warning("resuming %s on changed data/backbone (--resume-anyway): %s", self.run_dir, text)
        saved_classes = len(saved.get("data", {}).get("train_class_names", []))
        if saved_classes and saved_classes != self.splits.train.num_classes:
            raise TrainingError(
                f"cannot resume '{self.run_dir}': it was trained on {saved_classes} training classes, the data now "
                f"has {self.splits.train.num_classes}; the proxies and class prompts cannot be carried over. Start a "
                f"new run (another --name, or --overwrite).")

    def release(self) -> None:
        """Release the run directory's lock (the run is finished or stopped)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the run directory and leave the process group if this trainer created it."""
        self.release()
        self.dist.close()

    def fit(self, evaluate_before: bool | None = None,
            on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
        """Train the remaining epochs (all of them, or those left after a resume) and finish the run.

        ``on_epoch(row)`` is called after every epoch, once its log row (``log.csv``: loss, ``val_*`` and
        ``test_*`` metrics when evaluated) is written and the resume state saved. An exception it raises stops
        training there and propagates (``promptdml tune`` prunes trials this way); the run directory then
        holds that epoch's state.

        Splits built without the test split (``build_splits(..., with_test=False)``) train and select on the
        validation split only: the test metrics are empty and nothing is evaluated on test.
        """
        try:
            return self._fit(evaluate_before, on_epoch)
        finally:
            self.release()

    def _fit(self, evaluate_before: bool | None = None,
             on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
        cfg = self.cfg
        reset_peak_memory(self.device)  # this run's peak, even when several runs share one process
        counts = count_parameters(self.model)
        self.echo(format_parameter_report(self.model))
        if self.epoch == 0 and self.step_in_epoch == 0 and self.splits.has_test and (
                evaluate_before if evaluate_before is not None else cfg.eval.before_training):
            self.before = self.evaluate("test", frozen_features=True)
            self.echo("before training (frozen backbone features): " + format_metrics(self.before))
        metrics: dict[str, float] = {}
        with _StopOnSignal(self):
            while self.epoch < cfg.train.epochs:
                try:
                    row = self._train_epoch()
                except RuntimeError as e:  # a signal to the whole process group also stops the loader workers
                    if self._stop_signal is None:
                        raise
                    raise TrainingInterrupted(
                        f"stopped by signal {self._stop_signal} during epoch {self.epoch + 1}, which also stopped "
                        f"the data-loading workers ({str(e).strip()}); the last saved state is the end of epoch "
                        f"{self.epoch}. Continue with: promptdml train --resume {self.run_dir}") from None
                if row is None:  # interrupted: 'last' holds the position inside the epoch
                    self.save_state()
                    raise TrainingInterrupted(
                        f"stopped by signal {self._stop_signal} at epoch {self.epoch + 1}, step "
                        f"{self.step_in_epoch}; the state is saved. Continue with: promptdml train --resume "
                        f"{self.run_dir}")
                metrics = self._end_epoch(row) or metrics
                if on_epoch is not None:
                    on_epoch(row)
        if not metrics and self.history:  # resumed a run whose epochs were all done
            metrics = {k[5:]: v for k, v in self.history[-1].items() if k.startswith("test_")}
        if not self.dist.is_main:  # rank 0 writes the run directory
            self.dist.barrier()
            return TrainResult(self.run_dir, metrics, self.history, self.before)
        save_checkpoint(self.model, cfg, self.run_dir / CHECKPOINT_NAME, self.splits.train.class_names)
        unreadable = [d for split in ("test", "val") for d in self.eval_report.get(split, [])]
        summary: dict[str, Any] = {
            "test": metrics, "before_training_frozen_features": self.before,
            "train_seconds": self.train_seconds, "epochs": cfg.train.epochs,
            "skipped_steps": self.skipped_steps, "parameters": counts,
            "loss_normalization": cfg.loss.normalization, "device": str(self.device),
            "world_size": self.dist.world_size,
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "fp32",
            "peak_memory_mb": _peak_memory_mb(self.device),
            "unreadable_eval_images": unreadable,
            "backbone_weights": _weights_description(self.model),
        }
        val = {k[4:]: v for k, v in self.history[-1].items() if k.startswith("val_")} if self.history else {}
        if val:
            summary["val"] = val  # the last epoch's
        if self.best:
            summary["best"] = {"epoch": self.best["epoch"], "selected_by": f"val_{cfg.eval.select_metric}",
                               "value": self.best["value"]}
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(summary, indent=2))
        test = self.splits.test
        write_model_card(self.run_dir, cfg, summary, self.splits.train.num_classes,
                         test.num_classes if test is not None else None)
        if self._tb:
            self._tb.close()
        self.dist.barrier()
        return TrainResult(self.run_dir, metrics, self.history, self.before)

    def _train_epoch(self) -> dict[str, float] | None:
        """One epoch from ``step_in_epoch``; None if a stop signal arrived (state is consistent)."""
        cfg = self.cfg
        epoch = self.epoch + 1
        self.loader.batch_sampler.set_epoch(epoch - 1)
        self.model.train()
        t0, losses, n_images, consecutive_bad = time.time(), [], 0, 0
        self._embedding_cos = []
        skip = self.step_in_epoch
        bar = progress_bar(total=len(self.loader), initial=skip, desc=f"epoch {epoch}/{cfg.train.epochs}",
                           enabled=cfg.train.progress and self.dist.is_main, unit="step")
        batches = iter(self.loader) if skip == 0 else _skip_batches(self.loader, skip)
        for images, labels, _ in batches:
            value = self.train_step(images, labels)
            self.step_in_epoch += 1
            self.global_step += 1
            if math.isnan(value):
                consecutive_bad += 1
                if consecutive_bad >= cfg.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"the loss was non-finite for {consecutive_bad} consecutive steps (epoch {epoch}); "
                        "training aborted. Lower optim.lr, set optim.grad_clip (e.g. 1.0), or use "
                        "train.precision=fp32.")
            else:
                consecutive_bad = 0
                losses.append(value)
            n_images += labels.numel() * self.dist.world_size  # global images
            lr = self._step_lrs()
            if self.dist.is_main:
                self._log_step(epoch, value, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr[0]:.2e}",
                            img_s=f"{n_images / max(time.time() - t0, 1e-9):.1f}")
            if self._stop_requested() and self.step_in_epoch < len(self.loader):
                bar.close()
                return None
        bar.close()
        elapsed = time.time() - t0
        self.train_seconds += elapsed
        return {
            "epoch": epoch, "loss": sum(losses) / max(len(losses), 1),
            "lr": self.optimizers[0].param_groups[0]["lr"], "lr_proxy": self.optimizers[1].param_groups[0]["lr"],
            "epoch_seconds": elapsed, "images_per_second": n_images / max(elapsed, 1e-9),
            "skipped_steps": self.skipped_steps, "peak_memory_mb": _peak_memory_mb(self.device),
            **self.model.proxies.geometry(),
            "embedding_cos": sum(self._embedding_cos) / max(len(self._embedding_cos), 1),
        }

    def _end_epoch(self, row: dict[str, float]) -> dict[str, float]:
        """Schedulers, evaluation, model selection on the validation split, logs and checkpoints."""
        cfg = self.cfg
        epoch = int(row["epoch"])
        for sched in self.schedulers:
            sched.step()
        self._resync_replicated()
        self.epoch, self.step_in_epoch = epoch, 0
        last = epoch == cfg.train.epochs
        scheduled = bool(cfg.eval.every) and epoch % cfg.eval.every == 0
        metrics: dict[str, float] = {}
        if last and self.dist.is_main:  # the trained model is safe before the final evaluation
            save_checkpoint(self.model, cfg, self.run_dir / CHECKPOINT_NAME, self.splits.train.class_names)
        try:
            metrics = self._evaluate_epoch(row, epoch, scheduled, last)
        except (TrainingError, KeyboardInterrupt):
            raise
        except Exception as e:
            if not last:
                raise
            raise TrainingError(
                f"training finished, but the final evaluation failed: {e}. The trained model is saved in "
                f"{self.run_dir / CHECKPOINT_NAME}; fix the cause and evaluate it with `promptdml evaluate --run "
                f"{self.run_dir}`.") from e
        self.history.append(row)
        if self.dist.is_main:
            self._write_log(row)
        self.echo(f"epoch {epoch}/{cfg.train.epochs}  loss {row['loss']:.4f}  {row['epoch_seconds']:.1f}s  "
                  f"{row['images_per_second']:.1f} img/s  proxy cos {row['proxy_cos']:.2f}  emb cos {row['embedding_cos']:.2f}"
                  + (f"  | {format_metrics(metrics)}" if metrics else ""))
        self._warn_collapse(row)
        self.save_state()
        return metrics

    def _evaluate_epoch(self, row: dict[str, float], epoch: int, scheduled: bool, last: bool) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if self.splits.val is not None and (scheduled or last or not cfg.eval.every):
            val = self.evaluate("val")
            row.update({f"val_{k}": v for k, v in val.items()})
            value = val[cfg.eval.select_metric]
            if not self.best or value > self.best["value"]:
                self.best = {"epoch": epoch, "value": value}
                if self.dist.is_main:
                        save_checkpoint(self.model, cfg, self.run_dir / RESUME_DIR / "best.safetensors",
                                    self.splits.train.class_names)
        if (scheduled or last) and self.splits.has_test:
            metrics = self.evaluate("test")  # reported only; never used for selection
            row.update({f"test_{k}": v for k, v in metrics.items()})
        return metrics

    def _warn_collapse(self, row: dict[str, float]) -> None:
        """Warn (once per kind) when the proxies, a container that is a large part of them, or the embeddings
        collapse onto one direction."""
        share = 1.0 - self.model.proxies.ratio
        kinds = {
            "proxy": row["proxy_cos"] >= COLLAPSE_COS or (
                row.get("container_cos", 0.0) >= CONTAINER_COLLAPSE_COS and share >= CONTAINER_SHARE),
            "embedding": row["epoch"] >= EMBEDDING_COLLAPSE_EPOCH
            and row.get("embedding_cos", 0.0) >= EMBEDDING_COLLAPSE_COS,
        }
        for kind, collapsed in kinds.items():
            if not collapsed or kind in self._collapse_warned:
                continue
            self._collapse_warned.add(kind)
            log.warning(
                "%s collapse (epoch %d): mean cosine between class proxies %.2f, between container rows %s, "
                "between a batch's embeddings %.2f (plain proxies: below 0.2; spread-out embeddings: below 0.9). "
                "Classes are not separating yet. Runs like this either recover later (watch the loss and "
                "embedding_cos fall) or stay stuck; if it stays, train with optim.head_warmup_epochs=1 (the "
                "backbone waits while the proxies settle) or try another seed (docs/method.md, 'Proxy collapse').",
                kind, int(row["epoch"]), row["proxy_cos"],
                f"{row['container_cos']:.2f}" if "container_cos" in row else "n/a",
                row.get("embedding_cos", float("nan")))

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.trainable_state().items()},
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "row_optimizer": self.model.row_optimizer_state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "history": self.history, "skipped_steps": self.skipped_steps, "best": self.best,
            "before": self.before, "train_seconds": self.train_seconds, "fingerprint": self.fingerprint,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_trainable_state(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.model.load_row_optimizer_state_dict(state["row_optimizer"])
        for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(s)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        for key in ("epoch", "step_in_epoch", "global_step", "history", "skipped_steps", "best", "before",
                    "train_seconds"):
            setattr(self, key, state[key])

    def save_state(self) -> None:
        """Write ``checkpoints/last.pt`` atomically, plus a per-epoch copy under the keep-N policy (rank 0 only:
        the ranks' states are identical)."""
        if not self.dist.is_main:
            return
        folder = self.run_dir / RESUME_DIR
        state = self.state_dict()
        self._flush_step_log()  # steps.csv always ends where the saved state does
        atomic_torch_save(state, folder / LAST)
        keep = self.cfg.train.keep_checkpoints
        if keep > 0 and self.step_in_epoch == 0:
            atomic_torch_save(state, folder / f"epoch_{self.epoch:04d}.pt")
            for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
                old.unlink()

    STEP_LOG = "steps.csv"
    STEP_FIELDS = ("step", "epoch", "loss", "lr", "lr_proxy")

    def _flush_step_log(self) -> None:
        if not self._step_rows:
            return
        path = self.run_dir / self.STEP_LOG
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.STEP_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(self._step_rows)
        self._step_rows = []

    def _truncate_step_log(self) -> None:
        """Resume: drop steps.csv rows after the saved state (a crash may have left none, a signal none)."""
        path = self.run_dir / self.STEP_LOG
        if not path.is_file():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.global_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.STEP_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _tensorboard(self) -> Any:
        """The run's TensorBoard writer (rank 0), or None when off or tensorboard is not installed."""
        if self._tb is None:
            self._tb = False
            if self.cfg.train.tensorboard and self.dist.is_main and optional_import(
                    "torch.utils.tensorboard", "TensorBoard logging", "viz", "train.tensorboard",
                    package="tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None

    def _write_log(self, row: dict[str, float]) -> None:
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        with open(self.run_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        if self.cfg.train.plot and optional_import("matplotlib", "training.png (the training plot)", "viz",
                                                   "train.plot") is not None:
            plot_history(self.history, self.run_dir / "training.png", before=self.before)
        tb = self._tensorboard()
        if tb is not None:
            for key, value in row.items():
                if key != "epoch":
                    tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("test_", "val_")) else
                                  f"train/{key}", value, int(row["epoch"]))
            tb.flush()


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGINT/SIGTERM after finishing a step; the resume state was saved."""


def _quiet(_: str) -> None:
    pass


def _skip_batches(loader, n: int):
    """Iterate ``loader`` from batch ``n`` without loading the skipped batches' images."""
    sampler = loader.batch_sampler
    batches = list(iter(sampler))[n:]
    dataset, collate = loader.dataset, loader.collate_fn
    for idx in batches:
        yield collate([dataset[i] for i in idx])


class _StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.trainer._stop_signal = signum
        log.warning("signal %d received: finishing the current step, then saving the state", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs) so that several runs in one process each report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory`: CUDA allocator peak, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _weights_description(model: PromptDMLModel) -> str:
    source = getattr(model.backbone.vit, "weights_source", None)
    return source.describe() if source is not None else "none (randomly initialised backbone)"


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(cfg: Config, echo: Callable[[str], None] = print, evaluate_before: bool | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train ``cfg`` end to end and write its run directory (data-parallel under torchrun).

    A run directory that already holds a run is refused unless ``overwrite`` (which empties it first)."""
    trainer = Trainer(cfg, echo=echo, overwrite=overwrite)
    try:
        return trainer.fit(evaluate_before)
    finally:
        trainer.close()


RESUME_KEYS = ("model.backbone.weights", "data.root", "train.device", "data.num_workers", "train.progress")
"""Config keys that may change when a run is resumed (files that moved, another machine); nothing else does."""


def resume(run_dir: str | Path, echo: Callable[[str], None] = print, overrides: dict[str, Any] | None = None,
           resume_anyway: bool = False) -> TrainResult:
    """Continue the run in ``run_dir`` from its last intact saved state (same config, same data).

    ``overrides`` may set the :data:`RESUME_KEYS` (e.g. a moved weights file or data root). The data and the
    backbone are checked against the fingerprint saved with the run; ``resume_anyway`` continues on a
    mismatch (with a warning)."""
    from promptdml.config import load_config, set_key

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TrainingError(f"nothing to resume in '{run_dir}': no config.yaml there. Pass a run directory "
                            f"written by `promptdml train`.")
    cfg = load_config(run_dir / "config.yaml", validate=False)
    for key, value in (overrides or {}).items():
        if key not in RESUME_KEYS:
            raise ConfigError(f"{key} cannot change when a run is resumed (only {', '.join(RESUME_KEYS)})")
        set_key(cfg, key, value)
    cfg.validate()
    try:
        trainer = Trainer(cfg, run_dir=run_dir, echo=echo, resume=True, resume_anyway=resume_anyway)
    except (DataError, BackboneError) as e:
        raise type(e)(f"{e}\nResuming '{run_dir}': if its data or weights moved, pass --data-root DIR / --weights "
                      f"FILE with --resume.") from None
    try:
        return trainer.fit()
    finally:
        trainer.close()


def check(cfg: Config, echo: Callable[[str], None] = print, overwrite: bool = False) -> str:
    """``promptdml train --check``: build the data, the model and one batch of each kind without training or
    writing anything; returns the report (raises the error a real run would hit first)."""
    trainer = Trainer(cfg, echo=echo, overwrite=overwrite, dry=True)
    try:
        return trainer.check()
    finally:
        trainer.close()
