"""Embed a split and compute retrieval metrics on it (sharded over the ranks in distributed training)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from promptdml.config import Config
from promptdml.data import ImageRecords, Splits, build_eval_loader, build_transforms
from promptdml.data.loading import ImageDataset, _loader_kwargs
from promptdml.embedding import embed_batches
from promptdml.engine.distributed import (
    SINGLE,
    DistContext,
    all_gather_varlen,
    broadcast_object,
    shard_batches,
)
from promptdml.errors import DataError
from promptdml.metrics import retrieval_metrics
from promptdml.models import PromptDMLModel
from promptdml.progress import progress_bar

log = logging.getLogger("promptdml")


@torch.no_grad()
def embed_records(model: PromptDMLModel, records: ImageRecords, cfg: Config, device: torch.device,
                  dtype: torch.dtype | None, progress: bool = False, desc: str = "embed",
                  frozen_features: bool = False, dist: DistContext = SINGLE, *,
                  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  normalize: bool = True, failed: dict[int, str] | None = None) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[N, E]`` (on the CPU) in the order of ``records``.

    ``frozen_features=True`` embeds with the plain backbone feature instead (no prompts, no head): the
    baseline a user gets from the pretrained ViT alone. ``forward(images, labels)`` replaces the model's
    embedding path (e.g. ``model.head_inputs``), its output width read from the first batch.
    ``normalize=False`` keeps the rows as computed.

    No image is ever replaced by another one: an image that cannot be decoded gets the embedding of a blank
    image, and its position and reason are put into ``failed`` (or logged when ``failed`` is None) so that the
    caller can drop it.

    Distributed (``dist``): rank r embeds the evaluation batches r, r+N, ... (the same batches as a single
    process, so the same numbers) and every rank returns the complete gathered ``[N, E]``.
    """
    transform = build_transforms(model.data_config, cfg.model.backbone.img_size, train=False)
    if dist.enabled:
        loader = torch.utils.data.DataLoader(
            ImageDataset(records, transform, substitute=False),
            batch_sampler=shard_batches(len(records), cfg.eval.batch_size, dist),
            **_loader_kwargs(cfg.data.num_workers, device.type))
    else:
        loader = build_eval_loader(records, transform, cfg.eval.batch_size, cfg.data.num_workers, device.type,
                                   substitute=False)
    mine: list[torch.Tensor] = []
    bad: dict[int, str] = {}

    def batches():
        for images, labels, index, errors in progress_bar(loader, desc=desc, enabled=progress, unit="batch"):
            yield images, index, labels
            mine.append(index)
            bad.update({int(i): e for i, e in zip(index.tolist(), errors, strict=True) if e})

    if forward is not None:
        run, dim = (lambda images, labels: forward(images, labels.to(device))), None
    elif frozen_features:
        run, dim = (lambda images, labels: model.backbone(images)), model.backbone.feature_dim
    else:
        run, dim = None, cfg.model.embed_dim
    out = embed_batches(model, batches(), len(records), device, dtype, forward=run, normalize=normalize, dim=dim)
    if out is None:  # this rank had no batch (distributed): the width of a head input
        out = torch.empty(len(records), model.backbone.feature_dim)
    if dist.enabled:
        index = torch.cat(mine) if mine else torch.empty(0, dtype=torch.int64)
        parts = zip(all_gather_varlen(index, dist, "eval/index"), all_gather_varlen(out[index], dist, "eval/emb"),
                    strict=True)
        for idx, emb in parts:
            out[idx] = emb
        local = torch.tensor(sorted(bad), dtype=torch.int64)
        for idx in all_gather_varlen(local, dist, "eval/failed"):
            for i in idx.tolist():
                bad.setdefault(int(i), "could not be decoded (on another rank)")
    if failed is not None:
        failed.update(bad)
    elif bad:
        log.warning("%d image(s) of %s could not be decoded (embedded as blank images), e.g. %s",
                    len(bad), desc, records.paths[min(bad)])
    return out


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, E]`` mean of each class's rows of ``embeddings`` (zero rows for classes without any)."""
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, labels, embeddings.float())
    return sums / torch.bincount(labels, minlength=num_classes).clamp_min(1)[:, None]


def evaluate(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device, dtype: torch.dtype | None,
             split: str = "test", progress: bool = False, frozen_features: bool = False,
             dist: DistContext = SINGLE, report: dict[str, Any] | None = None) -> dict[str, float]:
    """Recall@K (``cfg.eval.recall_ks``), MAP@R and R-Precision on ``split`` (``test`` or ``val``).

    ``test`` uses query-vs-gallery when the dataset defines them (In-Shop), else the test set against itself.
    An image that cannot be decoded is dropped from the query and the gallery sets (never replaced); the
    dropped files are logged and listed in ``report["unreadable"]`` (``{"split", "path", "reason"}``).
    Distributed: the ranks embed shards, rank 0 computes the metrics once and every rank returns them.
    """
    if not dist.enabled:
        return _evaluate(model, splits, cfg, device, dtype, split, progress, frozen_features, SINGLE, True, report)
    metrics = _evaluate(model, splits, cfg, device, dtype, split, progress, frozen_features, dist, dist.is_main,
                        report)
    return broadcast_object(metrics, dist)


def _readable(records: ImageRecords, emb: torch.Tensor, failed: dict[int, str], name: str,
              report: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and labels of the images that could be decoded; the others are reported."""
    labels = torch.as_tensor(records.labels)
    if not failed:
        return emb, labels
    dropped = [{"split": name, "path": records.paths[i], "reason": failed[i]} for i in sorted(failed)]
    if report is not None:
        report.setdefault("unreadable", []).extend(dropped)
    shown = ", ".join(d["path"] for d in dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    log.warning("%d of %d %s image(s) could not be decoded and are left out of the evaluation (never replaced): "
                "%s. Replace or delete them (`promptdml data check` lists unreadable files).",
                len(dropped), len(records), name, shown)
    keep = torch.tensor([i for i in range(len(records)) if i not in failed], dtype=torch.int64)
    if len(keep) < 2:
        raise DataError(f"only {len(keep)} of the {len(records)} {name} images could be decoded (e.g. "
                        f"'{dropped[0]['path']}': {dropped[0]['reason']}); nothing to evaluate. Fix the images.")
    return emb[keep], labels[keep]


def _warn_large_k(ks: tuple[int, ...], candidates: int, name: str) -> None:
    big = [k for k in ks if k >= candidates]
    if big:
        log.warning("recall@%s: K is at least the %d candidates each %s query is ranked against, so Recall@K is "
                    "1.0 by construction. Use smaller eval.recall_ks for this split.",
                    ",".join(map(str, big)), candidates, name)


def _evaluate(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device, dtype: torch.dtype | None,
              split: str, progress: bool, frozen_features: bool, dist: DistContext,
              compute: bool, report: dict[str, Any] | None = None) -> dict[str, float] | None:
    ks = tuple(cfg.eval.recall_ks)
    if split == "test" and splits.query is not None and splits.gallery is not None:
        qf: dict[int, str] = {}
        gf: dict[int, str] = {}
        q = embed_records(model, splits.query, cfg, device, dtype, progress, "embed query", frozen_features, dist,
                          failed=qf)
        g = embed_records(model, splits.gallery, cfg, device, dtype, progress, "embed gallery", frozen_features,
                          dist, failed=gf)
        if not compute:
            return None
        q, qy = _readable(splits.query, q, qf, "query", report)
        g, gy = _readable(splits.gallery, g, gf, "gallery", report)
        _warn_large_k(ks, len(g), "query")
        return retrieval_metrics(g, gy, ks, query_embeddings=q, query_labels=qy, progress=progress)
    records = getattr(splits, split)
    if records is None:
        hint = " (set data.val_ratio > 0 to hold out validation classes)" if split == "val" else ""
        raise DataError(f"the data has no '{split}' split{hint}")
    failed: dict[int, str] = {}
    emb = embed_records(model, records, cfg, device, dtype, progress, f"embed {split}", frozen_features, dist,
                        failed=failed)
    if not compute:
        return None
    emb, labels = _readable(records, emb, failed, split, report)
    _warn_large_k(ks, len(labels) - 1, split)
    return retrieval_metrics(emb, labels, ks, progress=progress)


def evaluate_run(run: str | Path, split: str = "test", overrides: dict[str, Any] | list[str] | None = None,
                 progress: bool | None = None, report: dict[str, Any] | None = None) -> dict[str, float]:
    """Rebuild the model of a run directory (or its ``model.safetensors``) on its frozen backbone and evaluate it.

    ``overrides`` change the run's stored config first, like ``promptdml evaluate --set KEY=VALUE``: e.g.
    ``{"data.root": "elsewhere", "eval.recall_ks": [1, 10]}``. ``progress=None`` follows ``train.progress``.
    Returns Recall@K, MAP@R and R-Precision, as ``promptdml evaluate`` prints them; ``report`` receives the
    images that could not be decoded (``report["unreadable"]``).
    """
    from promptdml.checkpoint import load_model, read_checkpoint
    from promptdml.config import ConfigError, parse_override, set_key
    from promptdml.data import build_splits
    from promptdml.device import resolve_device, resolve_precision

    if split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got {split!r}")
    _, cfg, _ = read_checkpoint(run)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        set_key(cfg, key, value)
    cfg.validate()
    device = resolve_device(cfg.train.device)
    model, cfg = load_model(run, cfg, device)
    splits = build_splits(cfg.data)
    if split == "val" and splits.val is None:
        raise ConfigError(f"--split val: the data of this run has no validation split (data.val_ratio="
                          f"{cfg.data.val_ratio}); evaluate --split test, or train with --set data.val_ratio=0.2")
    show = cfg.train.progress if progress is None else progress
    return evaluate(model, splits, cfg, device, resolve_precision(cfg.train.precision, device), split,
                    progress=show, report=report)
