"""What a training run does around its hot path, as callbacks of the :class:`~promptdml.engine.Trainer`.

The trainer calls every callback's hooks in list order (``engine/factory.py`` builds the list from the
config): ``on_ready`` (built, resumed), ``on_fit_start``, ``on_step_end`` after each optimisation step,
``on_epoch_start``, ``on_epoch_stop`` (the epoch's steps are done or a signal stopped them),
``on_epoch_end`` after the schedulers stepped (returns the epoch's test metrics, if any), ``on_epoch_logged``
once the epoch's row is in the history, ``on_save_state`` when the resume state is written, ``on_fit_end``
after the last epoch (rank 0) and ``on_fit_exit`` always, also on errors.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from promptdml.checkpoint import CHECKPOINT_NAME, save_checkpoint
from promptdml.engine.distributed import broadcast_tensors_, check_replicas_equal
from promptdml.engine.model_card import write_model_card
from promptdml.engine.plots import plot_history
from promptdml.engine.rundir import compare_fingerprints
from promptdml.engine.state import LAST, RESUME_DIR, atomic_torch_save, rng_state, set_rng_state
from promptdml.errors import TrainingError, TrainingInterrupted
from promptdml.extras import optional_import
from promptdml.files import atomic_write_text
from promptdml.models import count_parameters

if TYPE_CHECKING:
    from promptdml.engine.trainer import Trainer

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


class Callback:
    """Hooks around the training loop; each does nothing unless overridden."""

    def on_ready(self, trainer: Trainer) -> None: ...
    def on_fit_start(self, trainer: Trainer, evaluate_before: bool | None) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_step_end(self, trainer: Trainer, epoch: int, loss: float, lr: tuple[float, float],
                    images_per_second: float) -> None: ...
    def on_epoch_stop(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> dict[str, float] | None: ...
    def on_epoch_logged(self, trainer: Trainer, row: dict[str, float], metrics: dict[str, float]) -> None: ...
    def on_save_state(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_fit_exit(self, trainer: Trainer) -> None: ...


def _last(trainer: Trainer, row: dict[str, float]) -> bool:
    return int(row["epoch"]) == trainer.cfg.train.epochs


# ------------------------------------------------------------------------------------------------- replicas
class ReplicaSync(Callback):
    """Distributed: the ranks start as replicas, and once per epoch rank 0's proxy bias (and its optimiser
    state) is copied to all ranks. The bias is computed redundantly on every rank from identical inputs, so this
    is a no-op unless a non-deterministic kernel made the replicas drift apart in the last bits."""

    def __init__(self, bias: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
        self.bias, self.optimizer = bias, optimizer

    def on_ready(self, trainer: Trainer) -> None:
        check_replicas_equal(trainer.model.trainable_state(), trainer.dist, "initial trainable state")

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        state = self.optimizer.state.get(self.bias, {})
        tensors = [self.bias.data] + [v for _, v in sorted(state.items()) if torch.is_tensor(v) and v.dim() > 0]
        broadcast_tensors_(tensors, trainer.dist, tag="resync/proxy_bias")


# ---------------------------------------------------------------------------------------------- checkpoints
class Checkpoints(Callback):
    """The run's checkpoints (rank 0): ``model.safetensors`` before the final evaluation, and the resume state
    ``checkpoints/last.pt`` (plus per-epoch copies under the keep-N policy) after every epoch."""

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = fingerprint

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if _last(trainer, row):  # the trained model is safe before the final evaluation
            save_checkpoint(trainer.model, trainer.cfg, trainer.run_dir / CHECKPOINT_NAME,
                            trainer.splits.train.class_names)

    def on_save_state(self, trainer: Trainer) -> None:
        folder = trainer.run_dir / RESUME_DIR
        state = {**training_state(trainer), "fingerprint": self.fingerprint}
        atomic_torch_save(state, folder / LAST)
        keep = trainer.cfg.train.keep_checkpoints
        if keep > 0 and trainer.step_in_epoch == 0:
            atomic_torch_save(state, folder / f"epoch_{trainer.epoch:04d}.pt")
            for old in sorted(folder.glob("epoch_*.pt"))[:-keep]:
                old.unlink()


STATE = ("epoch", "step_in_epoch", "global_step", "history", "skipped_steps", "best", "before", "train_seconds")
"""The trainer's loop state, saved with the resume state."""


def training_state(trainer: Trainer) -> dict[str, Any]:
    """Everything needed to continue ``trainer`` exactly where it is (``checkpoints/last.pt``)."""
    return {"model": {k: v.detach().cpu().clone() for k, v in trainer.model.trainable_state().items()},
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "schedulers": [s.state_dict() for s in trainer.schedulers], "scaler": trainer.scaler.state_dict(),
            "rng": rng_state(), **{k: getattr(trainer, k) for k in STATE}}


def load_training_state(trainer: Trainer, state: dict[str, Any]) -> None:
    trainer.model.load_trainable_state(state["model"])
    if len(state["optimizers"]) != len(trainer.optimizers) or "row_optimizer" in state:
        raise TrainingError(f"the resume state of '{trainer.run_dir}' was written by an older promptdml (before the "
                            "class-prompt table had its own torch optimiser) and cannot be continued; its "
                            "model.safetensors / checkpoints still load for evaluation. Start a new run.")
    for opt, s in zip(trainer.optimizers, state["optimizers"], strict=True):
        opt.load_state_dict(s)
    for sched, s in zip(trainer.schedulers, state["schedulers"], strict=True):
        sched.load_state_dict(s)
    trainer.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    for key in STATE:
        setattr(trainer, key, state[key])


def check_resume(state: dict[str, Any], fingerprint: dict[str, Any], run_dir: Path, num_classes: int,
                 anyway: bool) -> None:
    """Refuse to continue a run on other data or another backbone (``anyway``: warn and try)."""
    saved = state.get("fingerprint")
    if saved is None:
        log.warning("the resume state of %s has no data fingerprint (an older promptdml); cannot check that the "
                    "data and backbone are unchanged", run_dir)
        return
    diffs = compare_fingerprints(saved, fingerprint)
    if diffs:
        text = "; ".join(diffs)
        if not anyway:
            raise TrainingError(
                f"cannot resume '{run_dir}': the data or backbone differ from the run's: {text}. Point "
                f"at the original files (--data-root DIR, --weights FILE), or pass --resume-anyway to continue "
                f"on the changed data.")
        log.warning("resuming %s on changed data/backbone (--resume-anyway): %s", run_dir, text)
    saved_classes = len(saved.get("data", {}).get("train_class_names", []))
    if saved_classes and saved_classes != num_classes:
        raise TrainingError(
            f"cannot resume '{run_dir}': it was trained on {saved_classes} training classes, the data now "
            f"has {num_classes}; the proxies and class prompts cannot be carried over. Start a "
            f"new run (another --name, or --overwrite).")


# ----------------------------------------------------------------------------------------------- evaluation
class Evaluation(Callback):
    """Evaluation schedule and model selection: the frozen features before training (if asked), the validation
    split (selects ``checkpoints/best.safetensors`` by ``eval.select_metric``) and the test split (reported,
    never used for selection) every ``eval.every`` epochs and after the last."""

    def on_fit_start(self, trainer: Trainer, evaluate_before: bool | None) -> None:
        if trainer.epoch == 0 and trainer.step_in_epoch == 0 and trainer.splits.has_test and (
                evaluate_before if evaluate_before is not None else trainer.cfg.eval.before_training):
            trainer.before = trainer.evaluate("test", frozen_features=True)
            trainer.echo("before training (frozen backbone features): " + format_metrics(trainer.before))

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> dict[str, float]:
        last = _last(trainer, row)
        try:
            return self._evaluate(trainer, row, last)
        except (TrainingError, KeyboardInterrupt):
            raise
        except Exception as e:
            if not last:
                raise
            raise TrainingError(
                f"training finished, but the final evaluation failed: {e}. The trained model is saved in "
                f"{trainer.run_dir / CHECKPOINT_NAME}; fix the cause and evaluate it with `promptdml evaluate --run "
                f"{trainer.run_dir}`.") from e

    def _evaluate(self, trainer: Trainer, row: dict[str, float], last: bool) -> dict[str, float]:
        cfg, splits, epoch = trainer.cfg, trainer.splits, int(row["epoch"])
        scheduled = bool(cfg.eval.every) and epoch % cfg.eval.every == 0
        metrics: dict[str, float] = {}
        if splits.val is not None and (scheduled or last or not cfg.eval.every):
            val = trainer.evaluate("val")
            row.update({f"val_{k}": v for k, v in val.items()})
            value = val[cfg.eval.select_metric]
            if not trainer.best or value > trainer.best["value"]:
                trainer.best = {"epoch": epoch, "value": value}
                if trainer.dist.is_main:
                    save_checkpoint(trainer.model, cfg, trainer.run_dir / RESUME_DIR / "best.safetensors",
                                    splits.train.class_names)
        if (scheduled or last) and splits.has_test:
            metrics = trainer.evaluate("test")  # reported only; never used for selection
            row.update({f"test_{k}": v for k, v in metrics.items()})
        return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------- collapse
class CollapseMonitor(Callback):
    """Warn (once per kind) when the proxies, a container that is a large part of them, or the embeddings
    collapse onto one direction."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def on_epoch_logged(self, trainer: Trainer, row: dict[str, float], metrics: dict[str, float]) -> None:
        share = 1.0 - trainer.model.proxies.ratio
        kinds = {
            "proxy": row["proxy_cos"] >= COLLAPSE_COS or (
                row.get("container_cos", 0.0) >= CONTAINER_COLLAPSE_COS and share >= CONTAINER_SHARE),
            "embedding": row["epoch"] >= EMBEDDING_COLLAPSE_EPOCH
            and row.get("embedding_cos", 0.0) >= EMBEDDING_COLLAPSE_COS,
        }
        for kind, collapsed in kinds.items():
            if not collapsed or kind in self.warned:
                continue
            self.warned.add(kind)
            log.warning(
                "%s collapse (epoch %d): mean cosine between class proxies %.2f, between container rows %s, "
                "between a batch's embeddings %.2f (plain proxies: below 0.2; spread-out embeddings: below 0.9). "
                "Classes are not separating yet. Runs like this either recover later (watch the loss and "
                "embedding_cos fall) or stay stuck; if it stays, train with optim.head_warmup_epochs=1 (the "
                "backbone waits while the proxies settle) or try another seed (docs/method.md, 'Proxy collapse').",
                kind, int(row["epoch"]), row["proxy_cos"],
                f"{row['container_cos']:.2f}" if "container_cos" in row else "n/a",
                row.get("embedding_cos", float("nan")))


# --------------------------------------------------------------------------------------------------- signals
def interruption(trainer: Trainer, error: Exception | None = None) -> TrainingInterrupted:
    """The error that ends a run stopped by a signal: after a step (the state is saved there), or with the
    data-loading workers the signal also stopped (``error``; the last saved state is the last epoch's end)."""
    if error is not None:
        return TrainingInterrupted(
            f"stopped by signal {trainer._stop_signal} during epoch {trainer.epoch + 1}, which also stopped "
            f"the data-loading workers ({str(error).strip()}); the last saved state is the end of epoch "
            f"{trainer.epoch}. Continue with: promptdml train --resume {trainer.run_dir}")
    return TrainingInterrupted(
        f"stopped by signal {trainer._stop_signal} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}; "
        f"the state is saved. Continue with: promptdml train --resume {trainer.run_dir}")


class StopOnSignal(Callback):
    """Turn SIGINT/SIGTERM into ``trainer.stop_signal``, which the loop checks after each step (main thread
    only); a second one stops at once."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.trainer: Trainer | None = None

    def on_fit_start(self, trainer: Trainer, evaluate_before: bool | None) -> None:
        self.trainer = trainer
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.trainer._stop_signal = signum
        log.warning("signal %d received: finishing the current step, then saving the state", signum)

    def on_fit_exit(self, trainer: Trainer) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ------------------------------------------------------------------------------------------- run directory
class RunDirWriter(Callback):
    """Rank 0's run-directory files besides the checkpoints: ``log.csv``, ``training.png``, TensorBoard events,
    ``steps.csv`` (``train.log_steps``), and at the end ``model.safetensors``, ``metrics.json`` and the model
    card ``README.md``."""

    STEP_LOG = "steps.csv"
    STEP_FIELDS = ("step", "epoch", "loss", "lr", "lr_proxy")

    def __init__(self, run_dir: Path, cfg: Any, resumed: bool = False) -> None:
        self.run_dir, self.cfg, self.resumed = run_dir, cfg, resumed
        self._tb: Any = None  # created on first use (False: unavailable)
        self._step_rows: list[dict[str, float]] = []  # written with the resume state
        self.counts: dict[str, int] = {}

    def on_ready(self, trainer: Trainer) -> None:
        if self.resumed:  # drop steps.csv rows after the saved state (a crash may have left some)
            path = self.run_dir / self.STEP_LOG
            if path.is_file():
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
                self._write_steps(rows, "w")

    def _write_steps(self, rows: list[dict], mode: str) -> None:
        path = self.run_dir / self.STEP_LOG
        new = mode == "w" or not path.is_file()
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.STEP_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def tensorboard(self) -> Any:
        """The run's TensorBoard writer, or None when off or tensorboard is not installed."""
        if self._tb is None:
            self._tb = False
            if self.cfg.train.tensorboard and optional_import(
                    "torch.utils.tensorboard", "TensorBoard logging", "viz", "train.tensorboard",
                    package="tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None

    def on_fit_start(self, trainer: Trainer, evaluate_before: bool | None) -> None:
        self.counts = count_parameters(trainer.model)

    def on_step_end(self, trainer: Trainer, epoch: int, loss: float, lr: tuple[float, float],
                    images_per_second: float) -> None:
        tb = self.tensorboard()
        step = trainer.global_step
        if tb is not None:
            if math.isfinite(loss):
                tb.add_scalar("step/loss", loss, step)
            tb.add_scalar("step/lr", lr[0], step)
            tb.add_scalar("step/lr_proxy", lr[1], step)
        if self.cfg.train.log_steps:
            self._step_rows.append({"step": step, "epoch": epoch, "loss": loss, "lr": lr[0], "lr_proxy": lr[1]})

    def on_save_state(self, trainer: Trainer) -> None:  # steps.csv always ends where the saved state does
        if self._step_rows:
            self._write_steps(self._step_rows, "a")
            self._step_rows = []

    def on_epoch_logged(self, trainer: Trainer, row: dict[str, float], metrics: dict[str, float]) -> None:
        history = trainer.history
        keys: list[str] = []
        for r in history:
            keys += [k for k in r if k not in keys]
        with open(self.run_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        if self.cfg.train.plot and optional_import("matplotlib", "training.png (the training plot)", "viz",
                                                   "train.plot") is not None:
            plot_history(history, self.run_dir / "training.png", before=trainer.before)
        tb = self.tensorboard()
        if tb is not None:
            for key, value in row.items():
                if key != "epoch":
                    tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("test_", "val_")) else
                                  f"train/{key}", value, int(row["epoch"]))
            tb.flush()

    def on_fit_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        from promptdml.engine.trainer import peak_memory_mb, weights_description

        cfg = trainer.cfg
        save_checkpoint(trainer.model, cfg, self.run_dir / CHECKPOINT_NAME, trainer.splits.train.class_names)
        unreadable = [d for split in ("test", "val") for d in trainer.eval_report.get(split, [])]
        summary: dict[str, Any] = {
            "test": metrics, "before_training_frozen_features": trainer.before,
            "train_seconds": trainer.train_seconds, "epochs": cfg.train.epochs,
            "skipped_steps": trainer.skipped_steps, "parameters": self.counts,
            "loss_normalization": cfg.loss.normalization, "device": str(trainer.device),
            "world_size": trainer.dist.world_size,
            "precision": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "fp32",
            "peak_memory_mb": peak_memory_mb(trainer.device),
            "unreadable_eval_images": unreadable,
            "backbone_weights": weights_description(trainer.model),
        }
        history = trainer.history
        val = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
        if val:
            summary["val"] = val  # the last epoch's
        if trainer.best:
            summary["best"] = {"epoch": trainer.best["epoch"], "selected_by": f"val_{cfg.eval.select_metric}",
                               "value": trainer.best["value"]}
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(summary, indent=2))
        test = trainer.splits.test
        write_model_card(self.run_dir, cfg, summary, trainer.splits.train.num_classes,
                         test.num_classes if test is not None else None)
        if self._tb:
            self._tb.close()


class EpochEcho(Callback):
    """One console line per epoch: loss, speed, proxy and embedding geometry, and the metrics if evaluated."""

    def on_epoch_logged(self, trainer: Trainer, row: dict[str, float], metrics: dict[str, float]) -> None:
        trainer.echo(f"epoch {int(row['epoch'])}/{trainer.cfg.train.epochs}  loss {row['loss']:.4f}  "
                     f"{row['epoch_seconds']:.1f}s  {row['images_per_second']:.1f} img/s  proxy cos "
                     f"{row['proxy_cos']:.2f}  emb cos {row['embedding_cos']:.2f}"
                     + (f"  | {format_metrics(metrics)}" if metrics else ""))


class ProgressBar(Callback):
    """The per-epoch progress bar (``train.progress``, rank 0): steps, loss, learning rate, images per second."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        from promptdml.progress import progress_bar

        self.bar = progress_bar(total=len(trainer.loader), initial=trainer.step_in_epoch,
                                desc=f"epoch {epoch}/{trainer.cfg.train.epochs}",
                                enabled=trainer.cfg.train.progress and trainer.dist.is_main, unit="step")

    def on_step_end(self, trainer: Trainer, epoch: int, loss: float, lr: tuple[float, float],
                    images_per_second: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr[0]:.2e}", img_s=f"{images_per_second:.1f}")

    def on_epoch_stop(self, trainer: Trainer) -> None:
        self.bar.close()
