"""``ImageDataset`` and the DataLoader helpers used by the trainer and the evaluator."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .cache import CACHE_SCALE, CachedTrainTransform, ImageCache, resolve_cache_dir
from .images import load_rgb
from .records import DataError, ImageRecords
from .sampler import ClassBalancedBatchSampler, ShardedBatchSampler

__all__ = ["ImageDataset", "SeededDataset", "build_train_loader", "build_eval_loader"]

log = logging.getLogger("promptdml.data")


class ImageDataset(Dataset):
    """Decodes ``records.paths[i]`` with :func:`load_rgb`, applies ``transform``.

    ``__getitem__(i)`` returns ``(image, label, i)``. If an image fails to decode, a warning is logged
    once per file (per process), the failure is counted in :attr:`failed_loads` (shared with DataLoader
    workers) and the next readable image of the same class is returned instead, so class-balanced
    batches stay valid and an epoch never crashes on one bad file. If every image of a class fails, a
    :class:`DataError` is raised.

    ``cache`` (default: ``records.cache``, set from ``data.cache`` by ``build_splits`` for the training
    split): ``none``, ``auto`` or a folder; with the training transform, images are served from a
    decoded-image cache (:mod:`promptdml.data.cache`), built here on first use.
    """

    def __init__(self, records: ImageRecords, transform: Callable[[Any], Any] | None, substitute: bool = True,
                 cache: str | None = None):
        self.records = records
        self.transform = transform
        self.substitute = substitute
        self.cache: ImageCache | None = None
        self._cached_transform: CachedTrainTransform | None = None
        self._setup_cache(getattr(records, "cache", "none") if cache is None else cache)
        labels = records.labels
        order = np.argsort(labels, kind="stable")
        bounds = np.cumsum(np.bincount(labels, minlength=records.num_classes))[:-1]
        self._by_class = np.split(order, bounds)
        self._pos_in_class = np.empty(len(labels), dtype=np.int64)
        for members in self._by_class:
            self._pos_in_class[members] = np.arange(len(members))
        self._failed = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._bad: set[int] = set()  # per process

    def _setup_cache(self, setting: str) -> None:
        """``data.cache`` (see :mod:`promptdml.data.cache`): only for the training transform of
        :func:`build_transforms` (RandomResizedCrop + flip + ToTensor + Normalize) with substitution."""
        folder = resolve_cache_dir(setting)
        if folder is None:
            return
        tf = CachedTrainTransform.from_compose(self.transform)
        if tf is None or not self.substitute:
            log.warning("data.cache=%s is ignored here: the decoded-image cache serves the training transform "
                        "(RandomResizedCrop + flip + normalise) only", setting)
            return
        side = CACHE_SCALE * max(tf.size)
        self.cache = ImageCache(folder, self.records.paths, side, tf.interpolation)
        self._cached_transform = tf
        log.info("image cache %s: %s (%d images, %d px)", self.cache.data_path,
                 "built" if self.cache.built else "hit", len(self.records), side)

    @property
    def failed_loads(self) -> int:
        """How many image loads failed (and were replaced) so far, across DataLoader workers."""
        return int(self._failed.item())

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int):
        label = int(self.records.labels[index])
        members = self._by_class[label]
        start = int(self._pos_in_class[index])
        last_error: Exception | None = None
        for step in range(len(members)):
            j = int(members[(start + step) % len(members)])
            if j in self._bad:
                continue
            try:
                return self._read(j)
            except Exception as e:  # noqa: BLE001 - any decoder failure is handled the same way
                last_error = e
                self._bad.add(j)
                self._failed.add_(1)
                log.warning("could not decode image %s (%s: %s); using another image of class '%s' instead. "
                            "Replace or delete the file (`promptdml data check` lists unreadable files).",
                            self.records.paths[j], type(e).__name__, e, self.records.class_names[label])
        raise DataError(f"no image of class '{self.records.class_names[label]}' can be decoded (last error: "
                        f"{last_error}); fix or remove that class's files, e.g. "
                        f"{self.records.paths[int(members[0])]}")

    def _read(self, j: int):
        """A decoded image: from the files, or ``(uint8 [S, S, 3] view of the memory map, (h, w))`` from the
        cache."""
        if self.cache is None:
            return load_rgb(self.records.paths[j])
        if not self.cache.ok[j]:
            raise OSError("the image could not be decoded when the cache was built")
        return self.cache.array(j), tuple(self.cache.sizes[j])

    def __getitem__(self, index: int):
        index = int(index)
        if not self.substitute:
            return self._get_exact(index)
        img = self._load(index)
        if self._cached_transform is not None:
            img = self._cached_transform(*img)
        elif self.transform is not None:
            img = self.transform(img)
        return img, int(self.records.labels[index]), index

    def _get_exact(self, index: int):
        """``(image, label, index, error)``: this very image, or a blank one and the reason it failed."""
        error = ""
        try:
            img = load_rgb(self.records.paths[index])
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the file
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            img = Image.new("RGB", (32, 32))
            self._failed.add_(1)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.records.labels[index]), index, error


def _loader_kwargs(num_workers: int, device_type: str) -> dict[str, Any]:
    num_workers = max(0, int(num_workers))
    kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": str(device_type).startswith("cuda")}
    if num_workers > 0:
        kw["persistent_workers"] = True
        kw["prefetch_factor"] = 2
    return kw


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset whose transform draws from torch's global RNG: item ``(index, seed)`` is produced with
    the RNG seeded to ``seed`` (and the caller's RNG state restored), so augmentation is reproducible. Other
    attributes are those of the wrapped dataset."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed also queues a seeding of
            # every lazy device generator, recording a stack trace each time (a third of a millisecond per image)
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def build_train_loader(records: ImageRecords, transform, batch_size: int, samples_per_class: int,
                       num_batches: int | None, seed: int, num_workers: int, device_type: str,
                       rank: int = 0, world_size: int = 1) -> DataLoader:
    """The training DataLoader: global class-balanced batches of ``batch_size`` split across ``world_size``
    ranks by whole classes (:class:`ShardedBatchSampler`; one process yields the whole global batch), with
    per-sample seeded augmentation, so 1 and N processes see the same images.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch. Decoding happens in the workers
    when ``num_workers > 0`` (persistent); memory is pinned only for CUDA.
    """
    base = ClassBalancedBatchSampler(records.labels, batch_size, samples_per_class, num_batches=num_batches,
                                     seed=seed)
    sampler = ShardedBatchSampler(base, rank, world_size)
    return DataLoader(SeededDataset(ImageDataset(records, transform)), batch_sampler=sampler,
                      **_loader_kwargs(num_workers, device_type))


def build_eval_loader(records: ImageRecords, transform, batch_size: int, num_workers: int,
                      device_type: str, substitute: bool = True) -> DataLoader:
    """Evaluation DataLoader: dataset order, no shuffling, last partial batch kept (``substitute``: see
    :class:`ImageDataset`)."""
    return DataLoader(ImageDataset(records, transform, substitute), batch_size=int(batch_size), shuffle=False,
                      drop_last=False, **_loader_kwargs(num_workers, device_type))
