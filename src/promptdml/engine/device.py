"""The device helpers live in :mod:`promptdml.device` (shared by training and inference); imported here too."""

from promptdml.device import (
    autocast,
    available_devices,
    make_grad_scaler,
    resolve_device,
    resolve_precision,
    seed_everything,
)

__all__ = ["autocast", "available_devices", "make_grad_scaler", "resolve_device", "resolve_precision",
           "seed_everything"]
