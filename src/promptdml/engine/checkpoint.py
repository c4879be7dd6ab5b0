"""Checkpoints that hold only what was trained: trainable weights, the proxy container and the config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from promptdml.config import Config, from_dict, to_dict
from promptdml.files import atomic_write
from promptdml.models import PromptDMLModel, create_model

CHECKPOINT_NAME = "model.safetensors"
FORMAT = "promptdml/1"


def save_checkpoint(model: PromptDMLModel, cfg: Config, path: str | Path, class_names: list[str] | None = None) -> Path:
    """Write the trainable state + container as safetensors, config in the metadata; atomic (temp + rename)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state().items()}
    meta = {"format": FORMAT, "config": json.dumps(to_dict(cfg)), "num_classes": str(model.num_classes),
            "class_names": json.dumps(class_names or [])}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}': pass a run directory written by `promptdml train` "
                                f"(it contains {CHECKPOINT_NAME}) or the checkpoint file itself")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, str]]:
    """(tensors, config, metadata) of a checkpoint file or run directory."""
    file = _checkpoint_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"'{file}' is not a promptdml checkpoint (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = from_dict(json.loads(meta["config"]), where=str(file))
    return tensors, cfg, meta


def load_model(path: str | Path, cfg: Config | None = None, device: str | torch.device = "cpu") -> tuple[PromptDMLModel, Config]:
    """Rebuild the model on its frozen backbone and load the trained state.

    ``cfg`` replaces the stored config (e.g. to point at another weights file); the architecture-defining
    keys must agree with the checkpoint's tensors.
    """
    tensors, stored, meta = read_checkpoint(path)
    cfg = cfg or stored
    model = create_model(cfg.model, int(meta["num_classes"]))
    model.load_trainable_state(tensors)
    return model.to(device).eval(), cfg
