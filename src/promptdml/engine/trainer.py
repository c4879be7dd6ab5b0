"""The training loop: class-balanced batches, autocast, the optimisers' step, the epoch loop.

:class:`Trainer` holds the hot path only (:meth:`Trainer.train_step` and the epoch loop); its parts (model,
loss, optimisers, loader, distributed context) come from ``engine/factory.py`` and everything around the loop
(run directory, checkpoints and resume, evaluation and selection, collapse warnings, signals) from the
callbacks in ``engine/callbacks.py``. See ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from promptdml.config import Config, ConfigError
from promptdml.data import Splits
from promptdml.device import autocast, make_grad_scaler
from promptdml.engine.callbacks import (  # noqa: F401 - re-exported
    COLLAPSE_COS,
    CONTAINER_COLLAPSE_COS,
    CONTAINER_SHARE,
    EMBEDDING_COLLAPSE_COS,
    EMBEDDING_COLLAPSE_EPOCH,
    format_metrics,
    interruption,
    load_training_state,
    training_state,
)
from promptdml.engine.distributed import all_gather_cat
from promptdml.engine.evaluator import embed_records, evaluate
from promptdml.engine.factory import TrainParts, absolute_paths, build_parts  # noqa: F401 - re-exported
from promptdml.engine.optim import (  # noqa: F401 - build_* re-exported
    StepSchedule,
    build_optimizers,
    build_schedulers,
    clip_tensors,
    scaled_lr,
)
from promptdml.engine.rundir import prepare_run_dir, run_dir_of
from promptdml.errors import BackboneError, DataError, TrainingError, TrainingInterrupted  # noqa: F401 - re-exported
from promptdml.metrics import mean_pairwise_cosine
from promptdml.models import PromptDMLModel, count_parameters, format_parameter_report

log = logging.getLogger("promptdml")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] | None = None


def make_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """Create the run directory of ``cfg`` (refused when it holds a previous run, unless ``overwrite``)."""
    run_dir = run_dir_of(cfg)
    prepare_run_dir(run_dir, overwrite).release()
    return run_dir


class Trainer:
    """One training run: the hot path over parts built from ``cfg`` (``engine/factory.py``) or given (``parts``).

    Under torchrun (``WORLD_SIZE > 1``) it trains data-parallel with exact single-process equivalence
    (``docs/distributed.md``); rank 0 alone writes the run directory and prints."""

    def __init__(self, cfg: Config, splits: Splits | None = None, run_dir: Path | None = None,
                 echo: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False,
                 resume_anyway: bool = False, dry: bool = False, parts: TrainParts | None = None) -> None:
        if parts is None:
            parts = build_parts(cfg, splits, run_dir, echo, resume, overwrite, resume_anyway, dry)
        self.cfg, self.model, self.loss_fn, self.splits = parts.cfg, parts.model, parts.loss_fn, parts.splits
        self.optimizers, self.schedulers, self.loader = parts.optimizers, parts.schedulers, parts.loader
        self.scaler = parts.scaler if parts.scaler is not None else make_grad_scaler(parts.device, None)
        self.device, self.dtype, self.dist, self.echo = parts.device, parts.dtype, parts.dist, parts.echo
        self.run_dir, self.callbacks, self.grad_sync, self._lock = parts.run_dir, parts.callbacks, parts.grad_sync, parts.lock
        self.clip = clip_tensors(self.model, self.optimizers)
        self.held = self.model.backbone_parameters()  # what optim.head_warmup_epochs holds
        self.schedule = StepSchedule(self.cfg, self.loader)
        self.history: list[dict[str, float]] = []
        self.epoch = self.step_in_epoch = self.global_step = self.skipped_steps = 0  # epochs / steps completed
        self.best, self.before, self.train_seconds, self.eval_report = {}, None, 0.0, {}
        self._stop_signal: int | None = None  # set by the signal callback
        self._stop_agreed = False
        self._embedding_cos: list[float] = []  # per step of the current epoch
        if parts.resume_state is not None:
            load_training_state(self, parts.resume_state)
        self._emit("on_ready")

    def _emit(self, event: str, *args: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for cb in self.callbacks:
            metrics = getattr(cb, event)(self, *args) or metrics
        return metrics

    # ---------------------------------------------------------------------------------------------
    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The loss of one batch (global under distributed training), the model output and the embeddings."""
        ctx = self.dist
        # all ranks' classes and container rows (with their graph) for the global proxies
        gather = partial(gather_proxy_inputs, ctx=ctx) if ctx.enabled else None
        with autocast(self.device, self.dtype):
            out = self.model.forward_train(images, labels, self.cfg.data.samples_per_class, gather=gather)
        embeddings = out.embeddings
        if ctx.enabled:  # the loss sees the global batch, computed identically on every rank
            embeddings = all_gather_cat(embeddings, ctx, "embeddings")
            labels = all_gather_cat(labels, ctx, "labels")
        return self.loss_fn(embeddings, labels, out.proxy), out, embeddings

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimisation step; returns the loss (NaN if the step was skipped)."""
        cfg, scaler = self.cfg, self.scaler
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss, out, embeddings = self._forward_loss(images, labels)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            log.warning("non-finite loss (%s): step skipped (%d so far)", loss.item(), self.skipped_steps)
            return float("nan")
        scaler.scale(loss).backward()
        if self.grad_sync is not None:
            self._stop_agreed = self.grad_sync(self._stop_signal is not None) or self._stop_agreed
        if self.schedule.holds_backbone(self.global_step):  # backbone parts wait (no step, no decay)
            for param in self.held:
                param.grad = None
        if cfg.optim.grad_clip > 0:
            for opt in self.optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.clip, cfg.optim.grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        with scaled_lr(self.optimizers, self.schedule.warmup_factor(self.global_step)):
            for opt in self.optimizers:
                scaler.step(opt)
            scaler.update()
        if (scale is not None and scaler.get_scale() < scale) or any(getattr(o, "skipped", False)
                                                                     for o in self.optimizers):
            self.skipped_steps += 1
            log.warning("non-finite gradients: step skipped, container rows kept (%d so far)", self.skipped_steps)
        else:
            self.model.commit(out)  # container rows are written only after a step that was taken
        value = loss.item()  # the step's one device sync; the geometry probe below comes after it
        self._embedding_cos.append(mean_pairwise_cosine(embeddings))
        return value

    def _stop_requested(self) -> bool:
        """A stop signal arrived (distributed: on any rank, agreed with the gradient sync of a step)."""
        return self._stop_agreed if self.dist.enabled else self._stop_signal is not None

    def _train_epoch(self) -> dict[str, float] | None:
        """One epoch from ``step_in_epoch``; None if a stop signal arrived (state is consistent)."""
        cfg, epoch = self.cfg, self.epoch + 1
        self.loader.batch_sampler.set_epoch(epoch - 1)
        self.model.train()
        t0, losses, n_images, consecutive_bad = time.time(), [], 0, 0
        self._embedding_cos = []
        skip = self.step_in_epoch
        self._emit("on_epoch_start", epoch)
        for images, labels, _ in (iter(self.loader) if skip == 0 else _skip_batches(self.loader, skip)):
            value = self.train_step(images, labels)
            self.step_in_epoch += 1
            self.global_step += 1
            consecutive_bad = consecutive_bad + 1 if math.isnan(value) else 0
            if consecutive_bad >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"the loss was non-finite for {consecutive_bad} consecutive steps (epoch {epoch}); "
                    "training aborted. Lower optim.lr, set optim.grad_clip (e.g. 1.0), or use "
                    "train.precision=fp32.")
            if not consecutive_bad:
                losses.append(value)
            n_images += labels.numel() * self.dist.world_size  # global images
            lr = self.schedule.step_lrs(self.optimizers, self.global_step)
            self._emit("on_step_end", epoch, value, lr, n_images / max(time.time() - t0, 1e-9))
            if self._stop_requested() and self.step_in_epoch < len(self.loader):
                self._emit("on_epoch_stop")
                return None
        self._emit("on_epoch_stop")
        elapsed = time.time() - t0
        self.train_seconds += elapsed
        return {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1),
                "lr": self.optimizers[0].param_groups[0]["lr"], "lr_proxy": self.optimizers[1].param_groups[0]["lr"],
                "epoch_seconds": elapsed, "images_per_second": n_images / max(elapsed, 1e-9),
                "skipped_steps": self.skipped_steps, "peak_memory_mb": peak_memory_mb(self.device),
                **self.model.proxies.geometry(),
                "embedding_cos": sum(self._embedding_cos) / max(len(self._embedding_cos), 1)}

    def _end_epoch(self, row: dict[str, float]) -> dict[str, float]:
        """Schedulers, then the callbacks: evaluation and selection, logs, collapse warnings, resume state."""
        for sched in self.schedulers:
            sched.step()
        self.epoch, self.step_in_epoch = int(row["epoch"]), 0
        metrics = self._emit("on_epoch_end", row)
        self.history.append(row)
        self._emit("on_epoch_logged", row, metrics)
        self.save_state()
        return metrics

    def fit(self, evaluate_before: bool | None = None,
            on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
        """Train the remaining epochs (all, or those left after a resume) and finish the run.

        ``on_epoch(row)`` is called after every epoch, once its log row is written and the resume state saved;
        an exception it raises stops training there and propagates (``promptdml tune`` prunes trials so). Splits
        built without the test split train and select on the validation split only."""
        reset_peak_memory(self.device)  # this run's peak, even when several runs share one process
        self.echo(format_parameter_report(self.model))
        metrics: dict[str, float] = {}
        try:
            try:
                self._emit("on_fit_start", evaluate_before)
                while self.epoch < self.cfg.train.epochs:
                    metrics = self._end_epoch(self._interruptible_epoch()) or metrics
                    if on_epoch is not None:
                        on_epoch(self.history[-1])
            finally:
                self._emit("on_fit_exit")
            if not metrics and self.history:  # resumed a run whose epochs were all done
                metrics = {k[5:]: v for k, v in self.history[-1].items() if k.startswith("test_")}
            self._emit("on_fit_end", metrics)  # rank 0's callbacks write the run directory
            self.dist.barrier()
            return TrainResult(self.run_dir, metrics, self.history, self.before)
        finally:
            self.release()

    def _interruptible_epoch(self) -> dict[str, float]:
        try:
            row = self._train_epoch()
        except RuntimeError as e:  # a signal to the whole process group also stops the loader workers
            if self._stop_signal is None:
                raise
            raise interruption(self, e) from None
        if row is None:  # interrupted: 'last' holds the position inside the epoch
            self.save_state()
            raise interruption(self)
        return row

    def evaluate(self, split: str = "test", frozen_features: bool = False) -> dict[str, float]:
        report: dict[str, Any] = {}
        metrics = evaluate(self.model, self.splits, self.cfg, self.device, self.dtype, split,
                           progress=self.cfg.train.progress and self.dist.is_main, frozen_features=frozen_features,
                           dist=self.dist, report=report)
        self.eval_report[split] = report.get("unreadable", [])
        return metrics

    def save_state(self) -> None:
        """Write the resume state (the checkpoint callback; rank 0 only: the ranks' states are identical)."""
        self._emit("on_save_state")

    def release(self) -> None:
        """Release the run directory's lock (the run is finished or stopped)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the run directory and leave the process group if this trainer created it."""
        self.release()
        self.dist.close()


def gather_proxy_inputs(t: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Distributed: one tensor of the proxy inputs (classes or container rows) over all ranks, with its graph."""
    return all_gather_cat(t, ctx, "proxy/rows" if t.is_floating_point() else "proxy/classes")


def dry_run_report(trainer: Trainer) -> str:
    """Dry run (``promptdml train --check``): one training batch forward and backward (no update) and one
    evaluation batch; returns a short report. Nothing is written."""
    cfg, splits = trainer.cfg, trainer.splits
    images, labels, _ = next(iter(trainer.loader))
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)
    loss, _, _ = trainer._forward_loss(images.to(trainer.device), labels.to(trainer.device))
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss of the first training batch is {loss.item()}; lower optim.lr or use "
                            f"train.precision=fp32")
    trainer.scaler.scale(loss).backward()
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)
    records = splits.test if splits.test is not None else splits.gallery
    assert records is not None
    first = records.subset(range(min(len(records), cfg.eval.batch_size)))
    emb = embed_records(trainer.model, first, cfg, trainer.device, trainer.dtype)
    lines = [f"{name}: {rec.summary()}" for name, rec in splits.named_splits()]
    lines += [f"problems: {len(splits.problems)} (see `promptdml data check`)" if splits.problems
              else "problems: none",
              f"model: {cfg.model.backbone.name} @ {cfg.model.backbone.img_size}px on {trainer.device}, "
              f"{count_parameters(trainer.model)['trainable']:,} trainable parameters",
              f"one training batch of {labels.numel()} images: loss {loss.item():.4f}; one evaluation batch of "
              f"{emb.shape[0]} images: {emb.shape[1]}-d embeddings",
              f"run directory (not created by --check): {trainer.run_dir}",
              "check passed: the config builds and runs; drop --check to train"]
    return "\n".join(lines)


def _skip_batches(loader, n: int):
    """Iterate ``loader`` from batch ``n`` without loading the skipped batches' images."""
    sampler = loader.batch_sampler
    batches = list(iter(sampler))[n:]
    dataset, collate = loader.dataset, loader.collate_fn
    for idx in batches:
        yield collate([dataset[i] for i in idx])


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


def peak_memory_mb(device: torch.device) -> float:
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


def weights_description(model: PromptDMLModel) -> str:
    source = getattr(model.backbone.vit, "weights_source", None)
    return source.describe() if source is not None else "none (randomly initialised backbone)"


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
        return dry_run_report(trainer)
    finally:
        trainer.close()
