"""Datasets, splits, image decoding, transforms and class-balanced sampling."""

from .check import check_dataset, format_report, inspect_dataset
from .images import IMAGE_EXTENSIONS, find_bad_images, image_problem, load_rgb
from .loading import ImageDataset, SeededDataset, build_eval_loader, build_train_loader
from .records import DataError, ImageRecords, Splits
from .sampler import ClassBalancedBatchSampler, ShardedBatchSampler
from .sources import DATASETS, build_splits, default_cache_dir
from .transforms import build_transforms

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ClassBalancedBatchSampler",
    "DataError",
    "ImageDataset",
    "ImageRecords",
    "SeededDataset",
    "ShardedBatchSampler",
    "Splits",
    "build_eval_loader",
    "build_splits",
    "build_train_loader",
    "build_transforms",
    "check_dataset",
    "default_cache_dir",
    "find_bad_images",
    "format_report",
    "image_problem",
    "inspect_dataset",
    "load_rgb",
]
