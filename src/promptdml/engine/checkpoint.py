"""Checkpoints live in :mod:`promptdml.checkpoint` (written by training, read by inference); imported here too."""

from promptdml.checkpoint import CHECKPOINT_NAME, FORMAT, load_model, read_checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_NAME", "FORMAT", "load_model", "read_checkpoint", "save_checkpoint"]
