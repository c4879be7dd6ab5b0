"""Embed a split and compute retrieval metrics on it (sharded over the ranks in distributed training)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

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


@torch.no_grad()
def embed_records(model: PromptDMLModel, records: ImageRecords, cfg: Config, device: torch.device,
                  dtype: torch.dtype | None, progress: bool = False, desc: str = "embed",
                  frozen_features: bool = False, dist: DistContext = SINGLE,
                  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  normalize: bool = True) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[N, E]`` (on the CPU) in the order of ``records``.

    ``frozen_features=True`` embeds with the plain backbone feature instead (no prompts, no head): the
    baseline a user gets from the pretrained ViT alone. ``forward(images, labels)`` replaces the model's
    embedding path (e.g. ``model.head_inputs``), its output width read from the first batch.
    ``normalize=False`` keeps the rows as computed.

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
    out: torch.Tensor | None = None if forward is not None else torch.empty(len(records), dim)
    mine: list[torch.Tensor] = []
    for images, labels, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        with autocast(device, dtype):
            if forward is not None:
                emb = forward(images, labels.to(device))
            else:
                emb = model.backbone(images) if frozen_features else model(images)
        emb = emb.float()
        if out is None:
            out = torch.empty(len(records), emb.shape[1])
        out[index] = (torch.nn.functional.normalize(emb, dim=-1) if normalize else emb).cpu()
        mine.append(index)
    model.train(was_training)
    if out is None:  # this rank had no batch (distributed): the width of a head input
        out = torch.empty(len(records), model.backbone.feature_dim)
    if dist.enabled:
        index = torch.cat(mine) if mine else torch.empty(0, dtype=torch.int64)
        parts = zip(all_gather_varlen(index, dist, "eval/index"), all_gather_varlen(out[index], dist, "eval/emb"),
                    strict=True)
        for idx, emb in parts:
            out[idx] = emb
    return out


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, E]`` mean of each class's rows of ``embeddings`` (zero rows for classes without any)."""
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, labels, embeddings.float())
    return sums / torch.bincount(labels, minlength=num_classes).clamp_min(1)[:, None]


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
                                 query_labels=torch.as_tensor(splits.query.labels))
    records = getattr(splits, split)
    if records is None:
        raise ValueError(f"the data has no '{split}' split")
    emb = embed_records(model, records, cfg, device, dtype, progress, f"embed {split}", frozen_features, dist)
    if not compute:
        return None
    return retrieval_metrics(emb, torch.as_tensor(records.labels), ks)
