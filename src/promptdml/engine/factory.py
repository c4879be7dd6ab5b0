"""Build a :class:`~promptdml.engine.Trainer`'s parts from a :class:`~promptdml.config.Config`.

:func:`build_parts` does what a run needs before its first step, in the order that fixes the random stream
(seed, data, model, data-dependent initialisation, loss, optimisers, loader): the process group, the run
directory (refused when used; locked), the resume state (checked against the data and backbone), and the
callbacks for everything around the hot path (``engine/callbacks.py``). A test can instead fill a
:class:`TrainParts` with tiny parts of its own and pass it as ``Trainer(cfg, parts=...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptdml.config import Config, save_config
from promptdml.data import Splits, build_splits, build_train_loader, build_transforms
from promptdml.device import make_grad_scaler, resolve_precision, seed_everything
from promptdml.engine.callbacks import (
    Callback,
    Checkpoints,
    CollapseMonitor,
    EpochEcho,
    Evaluation,
    ProgressBar,
    ReplicaSync,
    RunDirWriter,
    StopOnSignal,
    check_resume,
)
from promptdml.engine.distributed import (
    SINGLE,
    DistContext,
    all_gather_varlen,
    all_reduce_grads_,
    broadcast_object,
    init_distributed,
)
from promptdml.engine.evaluator import class_means, embed_records
from promptdml.engine.optim import build_optimizers, build_schedulers, dense_parameters
from promptdml.engine.rundir import (
    RunLock,
    backbone_fingerprint,
    check_run_dir,
    data_fingerprint,
    prepare_run_dir,
    run_dir_of,
)
from promptdml.engine.state import load_resume_state
from promptdml.losses import build_loss
from promptdml.models import PromptDMLModel, create_model
from promptdml.models.backbone import resolve_weights

log = logging.getLogger("promptdml")


@dataclass
class TrainParts:
    """Everything a :class:`~promptdml.engine.Trainer` runs (see :func:`build_parts`)."""

    cfg: Config
    model: PromptDMLModel
    loss_fn: Callable[..., torch.Tensor]
    """``loss_fn(embeddings, labels, proxy_output)`` (``promptdml.losses``)."""
    optimizers: list[torch.optim.Optimizer]
    schedulers: list = field(default_factory=list)
    scaler: Any = None
    """A ``torch.amp.GradScaler`` (None: a disabled one)."""
    loader: Any = None
    splits: Splits | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    dist: DistContext = field(default_factory=lambda: SINGLE)
    run_dir: Path | None = None
    echo: Callable[[str], None] = print
    callbacks: list[Callback] = field(default_factory=list)
    grad_sync: Callable[[bool], bool] | None = None
    """Distributed: ``grad_sync(stop_requested_here) -> stop_requested_anywhere`` after backward."""
    resume_state: dict[str, Any] | None = None
    lock: RunLock | None = None


class GradientSync:
    """Distributed, after backward: sum the dense gradients of the parameters used before the gather (each rank
    holds its images' share), make the row optimisers' pending rows the union over the ranks, and agree on a
    stop request. The proxy bias is used only after the gather: its gradient is already complete on every rank
    and is not communicated."""

    def __init__(self, dense: list[torch.Tensor], optimizers: list[torch.optim.Optimizer], ctx: DistContext) -> None:
        self.dense, self.ctx = dense, ctx
        self.row_optimizers = [o for o in optimizers if hasattr(o, "exchange_grads")]

    def __call__(self, stop: bool) -> bool:
        ctx = self.ctx
        flags = all_reduce_grads_(self.dense, ctx, flags=[float(stop)])

        def gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
            return all_gather_varlen(t, ctx, "class_prompts/grads" if t.is_floating_point() else "class_prompts/ids")

        for opt in self.row_optimizers:
            opt.exchange_grads(gather_varlen)
        return flags[0] > 0


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


def _quiet(_: str) -> None:
    pass


def build_parts(cfg: Config, splits: Splits | None = None, run_dir: Path | None = None,
                echo: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False,
                resume_anyway: bool = False, dry: bool = False) -> TrainParts:
    """The parts of one training run of ``cfg`` (see the module docstring); ``dry`` creates no run directory."""
    cfg = absolute_paths(cfg)
    dist, device = init_distributed(cfg.train.device)
    planned = Path(run_dir).absolute() if run_dir is not None else None
    if dist.is_main:  # refuse a used run directory before building anything
        planned = planned or run_dir_of(cfg)
        check_run_dir(planned, overwrite, resume)
    if not dist.is_main:  # other ranks stay quiet: no echo, no progress bars, only errors logged
        echo = _quiet
        log.setLevel(logging.ERROR)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    dtype = resolve_precision(cfg.train.precision, device)
    if cfg.model.backbone.pretrained:  # fail in seconds when no weights can be had, before reading the data
        resolve_weights(cfg.model.backbone)
    splits = splits if splits is not None else build_splits(cfg.data, progress=cfg.train.progress and dist.is_main)
    train = splits.train
    _warn_small_classes(train, cfg.data.samples_per_class)
    model = create_model(cfg.model, train.num_classes)
    fingerprint = {"data": data_fingerprint(splits), "backbone": backbone_fingerprint(cfg)}
    model = model.to(device)
    if cfg.train.compile:  # training calls of the backbone blocks; falls back to eager with one warning
        model.backbone.enable_compile()
    if not resume:
        init_from_data(model, splits, cfg, device, dtype, dist, echo)
    loss_fn = build_loss(cfg.loss)
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    scaler = make_grad_scaler(device, dtype)
    d = cfg.data
    transform = build_transforms(model.data_config, cfg.model.backbone.img_size, train=True)
    # global batches of data.batch_size, split by whole classes across ranks; per-sample seeded augmentation
    loader = build_train_loader(train, transform, d.batch_size, d.samples_per_class, d.batches_per_epoch or None,
                                cfg.train.seed, d.num_workers, device.type, rank=dist.rank, world_size=dist.world_size)
    lock = None
    if dist.is_main and not dry:  # rank 0 names the run (a timestamp), creates and locks it
        lock = prepare_run_dir(planned, overwrite, resume)
    run_dir = Path(broadcast_object(str(planned) if dist.is_main else None, dist))
    if dist.is_main and not dry:
        save_config(cfg, run_dir / "config.yaml")
    state = None
    if resume:  # every rank reads checkpoints/last.pt (a shared file system across nodes)
        state = load_resume_state(run_dir)
        check_resume(state, fingerprint, run_dir, train.num_classes, resume_anyway)
        missing = [n for n, _ in class_feature_buffers(model) if n not in state["model"]]
        if missing and init_class_features(model, splits, cfg, device, dtype, dist):  # saved by an older run
            state["model"].update((n, b.detach().cpu().clone()) for n, b in class_feature_buffers(model))
    callbacks: list[Callback] = [ReplicaSync(model.proxies.bias, optimizers[1])] if dist.enabled else []
    if dist.is_main and not dry:
        callbacks += [RunDirWriter(run_dir, cfg, resumed=resume), Checkpoints(fingerprint)]
    callbacks += [ProgressBar(), Evaluation(), EpochEcho(), CollapseMonitor(), StopOnSignal()]
    sync = GradientSync(dense_parameters(model, optimizers[0]), optimizers, dist) if dist.enabled else None
    return TrainParts(cfg=cfg, model=model, loss_fn=loss_fn, optimizers=optimizers, schedulers=schedulers,
                      scaler=scaler, loader=loader, splits=splits, device=device, dtype=dtype, dist=dist,
                      run_dir=run_dir, echo=echo, callbacks=callbacks, grad_sync=sync, resume_state=state, lock=lock)


def class_feature_buffers(model: PromptDMLModel) -> list[tuple[str, torch.Tensor]]:
    """The class-prompt source's buffers set from the class-mean frozen features (``generated``: its
    descriptors), by their names in ``trainable_state``; empty for the other sources."""
    source = getattr(model, "class_prompts", None)
    if not (model.semantic and getattr(source, "wants_class_features", False)):
        return []
    return list(source.named_buffers(prefix="class_prompts"))


def init_class_features(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device,
                        dtype: torch.dtype | None, dist: DistContext = SINGLE) -> bool:
    """Give a class-prompt source that wants them (``wants_class_features``) each training class's mean
    frozen-backbone feature (the plain backbone, no prompts, no head; one pass over the training images, the
    evaluator's ``frozen_features``). Returns whether it did."""
    if not class_feature_buffers(model):
        return False
    train = splits.train
    with torch.random.fork_rng(devices=[]):  # the data loader draws a seed: keep the run's random stream
        feats = embed_records(model, train, cfg, device, dtype, desc="init class descriptors", dist=dist,
                              frozen_features=True, normalize=False)
    model.class_prompts.set_class_features(class_means(feats, torch.as_tensor(train.labels), train.num_classes))
    return True


def init_from_data(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device,
                   dtype: torch.dtype | None, dist: DistContext = SINGLE, echo: Callable[[str], None] = print) -> None:
    """Data-dependent initialisation before the first step, from one pass of the initial model over the
    training images per branch: the ``generated`` class-prompt source's descriptors first
    (:func:`init_class_features`), then ``model.head_init=centered`` shifts a head's LayerNorm bias so that
    the normalised features (hence the embeddings before L2 normalisation) average zero;
    ``proxy.bias_init=class_mean`` (``proxy.container_init=class_mean``) starts each class's proxy bias
    (container row) at the class's mean embedding (proxy-branch feature)."""
    described = init_class_features(model, splits, cfg, device, dtype, dist)
    m, p = cfg.model, cfg.model.proxy
    center = m.head_init == "centered"
    todo = {"embedding": (model.embed_head, p.bias_init == "class_mean"),
            "proxy": (getattr(model, "proxy_head", None), p.semantic and p.container_init == "class_mean")}
    means: dict[str, torch.Tensor] = {}
    train = splits.train
    labels = torch.as_tensor(train.labels)
    for branch, (head, wants_means) in todo.items():
        if head is None or not (center or wants_means):
            continue
        with torch.random.fork_rng(devices=[]):  # the data loader draws a seed: keep the run's random stream
            feats = embed_records(model, train, cfg, device, dtype, desc=f"init {branch}", dist=dist,
                                  normalize=False, forward=lambda x, y, b=branch: model.head_inputs(x, y, b))
        if center:
            mean = feats.mean(dim=0)
            head.center_(mean)
            feats = feats - mean
        if wants_means:
            bias = head.fc.bias.detach().float().cpu() if head.fc.bias is not None else None
            z = torch.nn.functional.linear(feats, head.fc.weight.detach().float().cpu(), bias)
            means[branch] = class_means(torch.nn.functional.normalize(z, dim=-1), labels, train.num_classes)
    if means:
        model.proxies.init_from_class_means(means.get("embedding"), means.get("proxy"))
    done = (["class descriptors"] if described else []) + (["heads centred"] if center else [])
    done += [f"{b} class means" for b in means]
    if done:
        echo("initialised from the training images: " + ", ".join(done))
