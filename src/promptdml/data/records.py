"""Split containers (:class:`ImageRecords`, :class:`Splits`), :class:`DataError` and split helpers."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from promptdml.errors import DataError

log = logging.getLogger("promptdml.data")

__all__ = ["DataError", "ImageRecords", "Splits", "records_from_pairs", "split_by_class", "split_classes",
           "carve_val"]




@dataclass
class ImageRecords:
    """One split: image paths, integer labels (contiguous ``0..C-1`` within the split) and class names.

    ``class_names[label]`` is the class of an image. For the query/gallery protocol (InShop) the query and
    gallery records share one label space (same ``class_names``), so a class may have no image in one of
    them.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.class_names = [str(c) for c in self.class_names]
        if len(self.paths) != len(self.labels):
            raise ValueError(f"ImageRecords: {len(self.paths)} paths but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"ImageRecords: labels must lie in [0, {len(self.class_names)}), "
                             f"got [{self.labels.min()}, {self.labels.max()}]")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> np.ndarray:
        """Number of images of every class (length ``num_classes``)."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, keep: Sequence[int] | np.ndarray) -> ImageRecords:
        """The images at positions ``keep``, classes re-indexed to ``0..C'-1`` (order of first label)."""
        keep = np.asarray(keep, dtype=np.int64)
        old = self.labels[keep]
        used = np.unique(old)
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return ImageRecords([self.paths[i] for i in keep], remap[old], [self.class_names[c] for c in used])

    def summary(self) -> str:
        counts = self.class_counts()
        if len(counts) == 0:
            return "0 classes, 0 images"
        return (f"{self.num_classes} classes, {len(self)} images "
                f"(per class min {counts.min()}, median {int(np.median(counts))}, max {counts.max()})")


@dataclass
class Splits:
    """All splits of one dataset.

    ``test`` is set for the self-retrieval protocol (test set against itself); ``query``/``gallery`` for
    the query-vs-gallery protocol (InShop), which share one label space. ``val`` holds training classes
    held out when ``data.val_ratio > 0``. ``problems`` lists every warning raised while building (skipped
    files, empty folders, ...).
    """

    train: ImageRecords
    test: ImageRecords | None
    query: ImageRecords | None = None
    gallery: ImageRecords | None = None
    val: ImageRecords | None = None
    problems: list[str] = field(default_factory=list)
    name: str = ""
    """dataset kind (``cfg.dataset``)"""
    root: str = ""
    """the folder / list file the images were read from"""
    blocking: list[str] = field(default_factory=list)
    """problems that stop training (only with ``build_splits(strict=False)``; otherwise they are raised)"""

    @property
    def protocol(self) -> str:
        """``"self"`` (test against itself) or ``"query_gallery"``."""
        return "query_gallery" if self.query is not None else "self"

    @property
    def has_test(self) -> bool:
        """False for splits built without the test split (``build_splits(..., with_test=False)``)."""
        return self.test is not None or self.query is not None

    def named_splits(self) -> list[tuple[str, ImageRecords]]:
        out = [("train", self.train)]
        for n in ("val", "test", "query", "gallery"):
            r = getattr(self, n)
            if r is not None:
                out.append((n, r))
        return out


_DIGITS = re.compile(r"(\d+)", re.ASCII)


def _natural_key(name: str) -> tuple:
    """Natural order: runs of digits compare as numbers (``class2 < class10``, ``2 < 10``), the rest as text;
    names that tie (``a01`` / ``a1``) fall back to plain string order."""
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in _DIGITS.split(name) if t)
    return parts, name


def records_from_pairs(paths: Sequence[str], class_names: Sequence[str],
                       order: Sequence[str] | None = None) -> ImageRecords:
    """Build records from (path, class name) pairs; classes numbered in ``order`` (default: sorted)."""
    if order is None:
        order = sorted(set(class_names), key=_natural_key)
    index = {c: i for i, c in enumerate(order)}
    labels = np.fromiter((index[c] for c in class_names), dtype=np.int64, count=len(class_names))
    return ImageRecords(list(paths), labels, list(order))


def split_classes(classes: Sequence[str], train_ratio: float, where: str) -> tuple[list[str], list[str]]:
    """The first ``round(train_ratio * C)`` of ``classes`` (in the given order) train, the rest test."""
    n = len(classes)
    n_train = int(round(train_ratio * n))
    if n < 4 or n_train < 2 or n - n_train < 2:
        raise DataError(
            f"{where}: {n} usable classes with data.train_ratio={train_ratio} gives {n_train} training and "
            f"{n - n_train} test classes; each split needs at least 2 classes. Add class folders/labels or "
            f"change data.train_ratio.")
    return list(classes[:n_train]), list(classes[n_train:])


def split_by_class(by_class: dict[str, list[str]], train_ratio: float, where: str) -> tuple[ImageRecords, ImageRecords]:
    """First ``round(train_ratio * C)`` of the sorted classes train, the rest test."""
    classes = sorted(by_class, key=_natural_key)
    out = []
    for part in split_classes(classes, train_ratio, where):
        paths = [p for c in part for p in by_class[c]]
        names = [c for c in part for _ in by_class[c]]
        out.append(records_from_pairs(paths, names, order=part))
    return out[0], out[1]


def carve_val(train: ImageRecords, val_ratio: float) -> tuple[ImageRecords, ImageRecords | None]:
    """Move the last ``round(val_ratio * C_train)`` training classes into a validation split."""
    if val_ratio <= 0:
        return train, None
    c = train.num_classes
    n_val = int(round(val_ratio * c))
    if n_val < 2 or c - n_val < 2:
        need = 2.0 / max(c, 1)
        raise DataError(
            f"data.val_ratio={val_ratio} of {c} training classes gives {n_val} validation and {c - n_val} "
            f"training classes; both need at least 2. Use a val_ratio between {need:.3g} and "
            f"{1 - need:.3g}, or val_ratio=0 for no validation split.")
    is_val = train.labels >= c - n_val
    return train.subset(np.flatnonzero(~is_val)), train.subset(np.flatnonzero(is_val))
