"""Embed a split and compute retrieval metrics on it (sharded over the ranks in distributed training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from promptdml.config import Config
from promptdml.data import ImageRecords, Splits, build_eval_loader, build_transforms
from promptdml.data.loading import ImageDataset, _loader_kwargs
from promptdml.engine.device import autocast
from promptdml.engine.distributed import (
    SINGLE,
    DistContext,
    all_gather_varlen,
    broadcast_object,
    shard_batches,
)
from promptdml.metrics import retrieval_metrics
from promptdml.models import PromptDMLModel
from promptdml.progress import progress_bar


@torch.no_grad()
def embed_records(model: PromptDMLModel, records: ImageRecords, cfg: Config, device: torch.device,
                  dtype: torch.dtype | None, progress: bool = False, desc: str = "embed",
                  frozen_features: bool = False, dist: DistContext = SINGLE) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[N, E]`` (on the CPU) in the order of ``records``.

    ``frozen_features=True`` embeds with the plain backbone feature instead (no prompts, no head): the
    baseline a user gets from the pretrained ViT alone.

    Distributed (``dist``): rank r embeds the evaluation batches r, r+N, ... (the same batches as a single
    process, so the same numbers) and every rank returns the complete gathered ``[N, E]``.
    """
    transform = build_transforms(model.data_config, cfg.model.backbone.img_size, train=False)
    if dist.enabled:
        loader = torch.utils.data.DataLoader(
            ImageDataset(records, transform), batch_sampler=shard_batches(len(records), cfg.eval.batch_size, dist),
            **_loader_kwargs(cfg.data.num_workers, device.type))
    else:
        loader = build_eval_loader(records, transform, cfg.eval.batch_size, cfg.data.num_workers, device.type)
    was_training = model.training
    model.eval()
    dim = model.backbone.feature_dim if frozen_features else cfg.model.embed_dim
    out = torch.empty(len(records), dim)
    mine: list[torch.Tensor] = []
    for images, _, index in progress_bar(loader, desc=desc, enabled=progress, unit="batch"):
        images = images.to(device, non_blocking=True)
        with autocast(device, dtype):
            emb = model.backbone(images) if frozen_features else model(images)
        out[index] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu()
        mine.append(index)
    model.train(was_training)
    if dist.enabled:
        index = torch.cat(mine) if mine else torch.empty(0, dtype=torch.int64)
        parts = zip(all_gather_varlen(index, dist, "eval/index"), all_gather_varlen(out[index], dist, "eval/emb"),
                    strict=True)
        for idx, emb in parts:
            out[idx] = emb
    return out


def evaluate(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device, dtype: torch.dtype | None,
             split: str = "test", progress: bool = False, frozen_features: bool = False,
             dist: DistContext = SINGLE) -> dict[str, float]:
    """Recall@K (``cfg.eval.recall_ks``), MAP@R and R-Precision on ``split`` (``test`` or ``val``).

    ``test`` uses query-vs-gallery when the dataset defines them (In-Shop), else the test set against itself.
    Distributed: the ranks embed shards, rank 0 computes the metrics once and every rank returns them.
    """
    if not dist.enabled:
        return _evaluate(model, splits, cfg, device, dtype, split, progress, frozen_features, SINGLE, True)
    metrics = _evaluate(model, splits, cfg, device, dtype, split, progress, frozen_features, dist, dist.is_main)
    return broadcast_object(metrics, dist)


def _evaluate(model: PromptDMLModel, splits: Splits, cfg: Config, device: torch.device, dtype: torch.dtype | None,
              split: str, progress: bool, frozen_features: bool, dist: DistContext,
              compute: bool) -> dict[str, float] | None:
    ks = tuple(cfg.eval.recall_ks)
    if split == "test" and splits.query is not None and splits.gallery is not None:
        q = embed_records(model, splits.query, cfg, device, dtype, progress, "embed query", frozen_features, dist)
        g = embed_records(model, splits.gallery, cfg, device, dtype, progress, "embed gallery", frozen_features,
                          dist)
        if not compute:
            return None
        return retrieval_metrics(g, torch.as_tensor(splits.gallery.labels), ks, query_embeddings=q,
                                 query_labels=torch.as_tensor(splits.query.labels), progress=progress)
    records = getattr(splits, split)
    if records is None:
        raise ValueError(f"the data has no '{split}' split")
    emb = embed_records(model, records, cfg, device, dtype, progress, f"embed {split}", frozen_features, dist)
    if not compute:
        return None
    return retrieval_metrics(emb, torch.as_tensor(records.labels), ks, progress=progress)


def evaluate_run(run: str | Path, split: str = "test", overrides: dict[str, Any] | list[str] | None = None,
                 progress: bool | None = None) -> dict[str, float]:
    """Rebuild the model of a run directory (or its ``model.safetensors``) on its frozen backbone and evaluate it.

    ``overrides`` change the run's stored config first, like ``promptdml evaluate --set KEY=VALUE``: e.g.
    ``{"data.root": "elsewhere", "eval.recall_ks": [1, 10]}``. ``progress=None`` follows ``train.progress``.
    Returns Recall@K, MAP@R and R-Precision, as ``promptdml evaluate`` prints them.
    """
    from promptdml.config import parse_override, set_key
    from promptdml.data import build_splits
    from promptdml.engine.checkpoint import load_model, read_checkpoint
    from promptdml.engine.device import resolve_device, resolve_precision

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    _, cfg, _ = read_checkpoint(run)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        set_key(cfg, key, value)
    cfg.validate()
    device = resolve_device(cfg.train.device)
    model, cfg = load_model(run, cfg, device)
    splits = build_splits(cfg.data)
    show = cfg.train.progress if progress is None else progress
    return evaluate(model, splits, cfg, device, resolve_precision(cfg.train.precision, device), split,
                    progress=show)
