"""Checkpoints that hold only what was trained: trainable weights, the proxy container and the config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from promptdml.config import Config, from_dict, to_dict
from promptdml.errors import CorruptFileError
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
    fix = ("it is written at the end of `promptdml train`; train again, or use checkpoints/best.safetensors "
           "if the run has one")
    if file.stat().st_size == 0:
        raise CorruptFileError(f"checkpoint '{file}' is empty (0 bytes); {fix}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CorruptFileError(f"'{file}' is not a promptdml checkpoint (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        int(meta["num_classes"])
    except CorruptFileError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors / json raise their own error types
        raise CorruptFileError(f"checkpoint '{file}' cannot be read ({type(e).__name__}: {e}): truncated or "
                               f"corrupt; {fix}") from None
    cfg = from_dict(config, where=str(file))
    return tensors, cfg, meta


def load_model(path: str | Path, cfg: Config | None = None, device: str | torch.device = "cpu") -> tuple[PromptDMLModel, Config]:
    """Rebuild the model on its frozen backbone and load the trained state.

    ``cfg`` replaces the stored config (e.g. to point at another weights file); the architecture-defining
    keys must agree with the checkpoint's tensors.
    """
    tensors, stored, meta = read_checkpoint(path)
    cfg = cfg or stored
    model = create_model(cfg.model, int(meta["num_classes"]))
    try:
        model.load_trainable_state(tensors)
    except ValueError as e:
        raise CorruptFileError(f"checkpoint '{_checkpoint_file(path)}' does not match the model of its config: {e}") from None
    return model.to(device).eval(), cfg
