"""Resume state of a run: everything needed to continue training exactly where it stopped."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptdml.errors import CorruptFileError, TrainingError
from promptdml.files import atomic_write

log = logging.getLogger("promptdml")

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


_REQUIRED = ("model", "optimizers", "schedulers", "rng", "epoch", "step_in_epoch", "history")


def _read_state(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise CorruptFileError(f"'{path}' is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch/pickle/zip raise many types for a damaged file
        raise CorruptFileError(f"'{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                               f"truncated or corrupt") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise CorruptFileError(f"'{path}' is not a promptdml resume state (missing "
                               f"{[k for k in _REQUIRED if not isinstance(state, dict) or k not in state]})")
    return state


def _epoch_files(folder: Path) -> list[Path]:
    """``epoch_NNNN.pt`` files, newest epoch first."""
    def number(p: Path) -> int:
        digits = p.stem.split("_", 1)[-1]
        return int(digits) if digits.isdigit() else -1

    return sorted(folder.glob("epoch_*.pt"), key=number, reverse=True)


def load_resume_state(run_dir: str | Path) -> dict[str, Any]:
    """The newest intact resume state of a run: ``checkpoints/last.pt``, or, when that is missing or corrupt,
    the newest readable ``checkpoints/epoch_NNNN.pt`` (with a warning). Raises :class:`TrainingError` /
    :class:`CorruptFileError` naming the files when none can be used."""
    folder = Path(run_dir) / RESUME_DIR
    path = folder / LAST
    candidates = ([path] if path.is_file() else []) + _epoch_files(folder)
    if not candidates:
        raise TrainingError(f"nothing to resume in '{run_dir}': {path} does not exist (it is written at the end of "
                            "every epoch and on Ctrl-C)")
    problems = []
    for candidate in candidates:
        try:
            state = _read_state(candidate)
        except CorruptFileError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; resuming from the newest intact state instead: %s (epoch %d)", "; ".join(problems),
                        candidate, state["epoch"])
        return state
    raise CorruptFileError(f"no intact resume state in '{folder}': " + "; ".join(problems) + ". The run cannot be "
                           "resumed; start it again (with --overwrite).")
