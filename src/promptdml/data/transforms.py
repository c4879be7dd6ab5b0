"""Train / test image transforms built from the backbone's pretrained data config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["build_transforms", "eval_resize_size"]

_INTERP = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def eval_resize_size(img_size: int) -> int:
    """Shorter-side resize before the test centre crop: ``int(S * 256 / 224)``."""
    return int(img_size * 256 / 224)


def _interpolation(value: Any) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    if value in (None, "", "random"):
        return InterpolationMode.BICUBIC
    try:
        return _INTERP[str(value).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {value!r} in the backbone data config; "
                         f"expected one of {sorted(_INTERP)}") from None


def build_transforms(data_config: Mapping[str, Any], img_size: int, train: bool) -> T.Compose:
    """Image transform for training (``train=True``) or evaluation.

    ``data_config`` is ``timm.data.resolve_data_config({}, model=backbone)``; its ``mean``/``std`` (and
    ``interpolation``) are used, never hard-coded values. Train: RandomResizedCrop(S) + horizontal flip.
    Test: Resize(int(S * 256 / 224)) + CenterCrop(S). Both end with ToTensor + Normalize.
    """
    for key in ("mean", "std"):
        if key not in data_config:
            raise ValueError(f"data_config has no '{key}': pass timm.data.resolve_data_config({{}}, model=backbone)")
    mean = tuple(float(m) for m in data_config["mean"])
    std = tuple(float(s) for s in data_config["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"expected 3-channel mean/std in data_config, got mean={mean} std={std}")
    img_size = int(img_size)
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    interp = _interpolation(data_config.get("interpolation"))
    if train:
        geometry = [T.RandomResizedCrop(img_size, interpolation=interp), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(eval_resize_size(img_size), interpolation=interp), T.CenterCrop(img_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])
