"""Class-balanced batches (``B / k`` distinct classes with ``k`` images each) and their split across ranks.

:class:`ClassBalancedBatchSampler` draws the global batches (one RNG stream, the same in every process);
:class:`ShardedBatchSampler` gives each rank its slice of whole classes of every global batch. Training always
goes through both (one process: the slice is the whole batch), so 1 and N processes see the same images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from promptdml.errors import DistributedError

__all__ = ["ClassBalancedBatchSampler", "ShardedBatchSampler"]


def batch_too_large(num_classes: int, batch_size: int, samples_per_class: int) -> str | None:
    """The error for a batch that needs more classes than the training split has, with the flag to pass
    (None when the batch fits)."""
    k = samples_per_class
    need = batch_size // k
    if num_classes >= need:
        return None
    fits = num_classes * k
    fix = (f"Pass --batch-size {fits} (data.batch_size={fits}: {num_classes} classes x {k} images)"
           if num_classes >= 2 else "Add classes to the training split")
    return (f"a batch of data.batch_size={batch_size} with data.samples_per_class={k} images per class holds "
            f"{need} distinct classes, but the training split has only {num_classes} classes. {fix}, or use more "
            "classes (see docs/train-your-data.md).")


class _Cycle:
    """Draws items from a set in shuffled passes; ``take(n)`` never returns duplicates."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items = items
        self.rng = rng
        self.order = rng.permutation(items)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        left = self.order[self.pos:]
        if len(left) >= n:
            self.pos += n
            return left[:n]
        fresh = self.rng.permutation(self.items)
        fresh = fresh[~np.isin(fresh, left)]  # keep the leftovers of this pass, start a new one
        self.order = np.concatenate([left, fresh])
        self.pos = n
        return self.order[:n]


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of dataset indices: ``batch_size / k`` distinct classes, ``k`` images per class.

    * Each class's ``k`` images are contiguous in the batch (class 1 x k, class 2 x k, ...).
    * Classes are visited in shuffled passes (every class once per pass); images of a class are drawn
      without replacement in shuffled passes. A class with fewer than ``k`` images is sampled with
      replacement.
    * Epoch length: ``num_batches``, or (``None``/0) ``len(labels) // batch_size``.
    * Deterministic for ``(seed, epoch)``; call :meth:`set_epoch` before each epoch.
    * Distributed: wrap it in :class:`ShardedBatchSampler` (the same global batches in every process).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, samples_per_class: int,
                 num_batches: int | None = None, seed: int = 0):
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels).reshape(-1)
        if len(labels) == 0:
            raise ValueError("ClassBalancedBatchSampler: no labels (the training split is empty)")
        batch_size, k = int(batch_size), int(samples_per_class)
        if k < 1 or batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and samples_per_class ({k}) must be >= 1")
        if batch_size % k != 0:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by samples_per_class ({k}): a batch "
                             f"holds batch_size / k classes with k images each")
        classes, inverse = np.unique(labels, return_inverse=True)
        m = batch_size // k
        if len(classes) < m:
            from .records import DataError

            raise DataError(batch_too_large(len(classes), batch_size, k))
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self.class_indices: list[np.ndarray] = np.split(order, bounds)
        self.classes = classes
        self.batch_size = batch_size
        self.samples_per_class = k
        self.classes_per_batch = m
        self.seed = int(seed)
        if num_batches is None or num_batches <= 0:
            num_batches = max(1, len(labels) // batch_size)
        self.num_batches = int(num_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        k, m = self.samples_per_class, self.classes_per_batch
        class_cycle = _Cycle(np.arange(len(self.class_indices)), rng)
        pools: dict[int, _Cycle] = {}
        out = []
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in class_cycle.take(m):
                idx = self.class_indices[c]
                if len(idx) < k:
                    chosen = rng.choice(idx, size=k, replace=True)
                else:
                    pool = pools.get(int(c))
                    if pool is None:
                        pool = pools[int(c)] = _Cycle(idx, rng)
                    chosen = pool.take(k)
                batch.extend(int(i) for i in chosen)
            out.append(batch)
        yield from out


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Splits each *global* class-balanced batch into ``world_size`` contiguous slices of whole classes.

    ``base`` is a :class:`ClassBalancedBatchSampler` over the global batch size B (same seed on every rank, so
    the same global sequence as a 1-process run). Rank r gets the images ``[r B/N, (r+1) B/N)`` of every global
    batch; B/N must be a multiple of k so no class is split. Items are ``(dataset_index, sample_seed)``: the
    seed fixes the sample's augmentation (:class:`promptdml.data.loading.SeededDataset`), independent of the
    rank, worker and process count. ``len`` is the number of (global) steps per epoch.
    """

    def __init__(self, base: ClassBalancedBatchSampler, rank: int = 0, world_size: int = 1) -> None:
        b, k = base.batch_size, base.samples_per_class
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if b % (k * world_size):
            raise DistributedError(
                f"data.batch_size={b} (the global batch) must be divisible by samples_per_class * world_size = "
                f"{k} * {world_size}: each rank takes batch_size / world_size = {b / world_size:g} images, which "
                f"must be whole classes of k={k} images. Choose a batch size that is a multiple of {k * world_size}.")
        self.base, self.rank, self.world_size = base, rank, world_size
        self.per_rank = b // world_size

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = list(iter(self.base))
        if not batches:
            return
        seeds = np.random.default_rng([self.base.seed, self.base.epoch, 0xA06]).integers(
            0, 2**62, size=(len(batches), len(batches[0])), dtype=np.int64)
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for batch, row in zip(batches, seeds, strict=True):
            yield [(int(i), int(s)) for i, s in zip(batch[lo:hi], row[lo:hi], strict=True)]
