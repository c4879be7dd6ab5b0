"""Resume state of a run: everything needed to continue training exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptdml.files import atomic_write

RESUME_DIR = "checkpoints"
LAST = "last.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, then rename: a crash never leaves a corrupt file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESUME_DIR / LAST
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in '{run_dir}': {path} does not exist (it is written at the "
                                "end of every epoch and on Ctrl-C)")
    return torch.load(path, map_location="cpu", weights_only=False)
