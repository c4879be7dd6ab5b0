"""Device, precision and seeding: one place that knows about CPU, CUDA and Apple MPS."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from promptdml.config import check_device_name
from promptdml.errors import ConfigError


def available_devices() -> list[str]:
    """The devices that exist here: ``cpu``, ``cuda:0`` ... and ``mps``."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; a malformed or unavailable device is a :class:`ConfigError` that
    lists the devices that exist."""
    name = str(name).strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device_name(name, "device")
    here = available_devices()
    listed = ", ".join(["auto"] + here)
    if name.startswith("cuda"):
        count = len([d for d in here if d.startswith("cuda")])
        if count == 0:
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; available: {listed}. Use "
                              f"--device auto (or set train.device=auto / cpu).")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= count:
            raise ConfigError(f"device '{name}' does not exist: this machine has {count} CUDA device(s); available: "
                              f"{listed}")
    if name == "mps" and "mps" not in here:
        raise ConfigError(f"device 'mps' requested but Apple MPS is not available here; available: {listed}. Use "
                          f"--device auto.")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). ``auto``: bf16 on CPU, fp16 on CUDA/MPS."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` on ``device`` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling only for fp16 on CUDA (bf16 has the range of fp32)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16 and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
