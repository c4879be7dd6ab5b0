"""Embedding files written by ``promptdml embed``.

Two formats, chosen by the file name:

* ``FILE.safetensors`` (default): tensor ``embeddings`` float32 ``[N, E]``; string metadata
  ``format`` = ``promptdml-embeddings/1``, ``paths`` (JSON list of N image paths, row i <-> paths[i]),
  ``errors`` (JSON list of ``[path, reason]`` of skipped unreadable inputs), ``info`` (JSON: run,
  model fingerprint, backbone, preprocessing) and, with ``--labels-from-folder``, ``labels`` (JSON list of N
  class names).
* ``FILE.npy``: the ``[N, E]`` float32 array (``numpy.load``) plus ``FILE.txt``, one path per line (and
  ``FILE.npy.labels.txt``, one label per line, with ``--labels-from-folder``).

Paths are stored absolute, so the files work from any folder.

With either format, unreadable inputs are also listed in ``FILE.errors.txt`` (``path<TAB>reason``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptdml.errors import CorruptFileError
from promptdml.files import atomic_write, atomic_write_text
from promptdml.retrieval import RetrievalError

EMBEDDINGS_FORMAT = "promptdml-embeddings/1"
SUFFIXES = (".safetensors", ".npy")

__all__ = ["EMBEDDINGS_FORMAT", "EmbeddingFile", "save_embeddings", "load_embeddings", "errors_file", "labels_file"]


@dataclass
class EmbeddingFile:
    embeddings: np.ndarray
    """``[N, E]`` float32"""
    paths: list[str]
    """``paths[i]`` is the image of row i"""
    errors: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    """``labels[i]`` is the class of row i (``promptdml embed --labels-from-folder``), or None"""


def labels_file(path: str | os.PathLike) -> Path:
    """``<out>.labels.txt`` next to a ``.npy`` embedding file (one label per line)."""
    path = Path(path)
    return path.with_name(path.name + ".labels.txt")


def errors_file(path: str | os.PathLike) -> Path:
    """``<out>.errors.txt`` next to an embedding file."""
    path = Path(path)
    return path.with_name(path.name + ".errors.txt")


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RetrievalError(f"embedding file '{path}' must end with .safetensors (embeddings + paths in one file) "
                             "or .npy (array + .txt sidecar with one path per line)")
    return suffix


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, paths: Sequence[str],
                    errors: Sequence[tuple[str, str]] = (), info: dict[str, Any] | None = None,
                    labels: Sequence[str] | None = None) -> list[Path]:
    """Write embeddings + paths (+ labels) (see the module docstring); returns the files written. Every file is
    written atomically; a failure raises :class:`~promptdml.errors.WriteError` naming the file."""
    path = Path(path)
    suffix = _check_suffix(path)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    paths = [str(p) for p in paths]
    if emb.ndim != 2 or emb.shape[0] != len(paths):
        raise RetrievalError(f"embeddings {list(emb.shape)} do not match {len(paths)} paths (need [N, E])")
    if labels is not None and len(labels) != len(paths):
        raise RetrievalError(f"{len(labels)} labels for {len(paths)} paths")
    written = []
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {"format": EMBEDDINGS_FORMAT, "paths": json.dumps(paths), "errors": json.dumps([list(e) for e in errors]),
                "info": json.dumps(info or {})}
        if labels is not None:
            meta["labels"] = json.dumps([str(x) for x in labels])
        written.append(atomic_write(path, lambda tmp: save_file({"embeddings": emb}, str(tmp), metadata=meta)))
    else:
        bad = [p for p in paths if "\n" in p or "\r" in p]
        if bad:
            raise RetrievalError(f"path {bad[0]!r} contains a line break and cannot be stored in a .txt sidecar; "
                                 "write a .safetensors file instead")
        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, emb)

        written.append(atomic_write(path, write_npy))
        written.append(atomic_write_text(path.with_suffix(".txt"), "".join(p + "\n" for p in paths)))
        if labels is not None:
            written.append(atomic_write_text(labels_file(path), "".join(f"{' '.join(str(x).split())}\n" for x in labels)))
    err_file = errors_file(path)
    if errors:
        written.append(atomic_write_text(err_file, "".join(f"{p}\t{' '.join(str(r).split())}\n" for p, r in errors)))
    elif err_file.exists():
        err_file.unlink()  # stale report of an earlier run
    return written


def load_embeddings(path: str | os.PathLike) -> EmbeddingFile:
    """Read a file written by :func:`save_embeddings` (or any ``.npy`` ``[N, E]`` with a ``.txt`` of paths)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file '{path}' does not exist (write one with `promptdml embed`)")
    errors: list[tuple[str, str]] = []
    info: dict[str, Any] = {}
    labels: list[str] | None = None
    if path.stat().st_size == 0:
        raise CorruptFileError(f"embedding file '{path}' is empty (0 bytes); write it again with `promptdml embed`")
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if "embeddings" not in f.keys():
                    raise RetrievalError(f"'{path}' has no tensor 'embeddings' (tensors: {sorted(f.keys())})")
                emb = f.get_tensor("embeddings")
        except RetrievalError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptFileError(f"cannot read '{path}' as safetensors ({e}): truncated or corrupt; write it again "
                                   f"with `promptdml embed`") from None
        if "paths" not in meta:
            raise RetrievalError(f"'{path}' has no 'paths' metadata; write it with `promptdml embed`")
        try:
            paths = json.loads(meta["paths"])
            errors = [(str(p), str(r)) for p, r in json.loads(meta.get("errors", "[]"))]
            info = json.loads(meta.get("info", "{}"))
            labels = json.loads(meta["labels"]) if "labels" in meta else None
        except (ValueError, TypeError) as e:
            raise CorruptFileError(f"the metadata of '{path}' is damaged ({e}); write it again with "
                                   f"`promptdml embed`") from None
    else:
        try:
            emb = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises ValueError / EOFError / OSError for a damaged file
            raise CorruptFileError(f"cannot read '{path}' as a .npy array ({type(e).__name__}: {e}): truncated or "
                                   f"corrupt; write it again with `promptdml embed`") from None
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            raise FileNotFoundError(f"no paths file '{sidecar}' next to '{path}' (one image path per line)")
        paths = sidecar.read_text(encoding="utf-8").splitlines()
        err_file = errors_file(path)
        if err_file.is_file():
            for line in err_file.read_text(encoding="utf-8").splitlines():
                p, _, r = line.partition("\t")
                errors.append((p, r))
        if labels_file(path).is_file():
            labels = labels_file(path).read_text(encoding="utf-8").splitlines()
    if emb.ndim != 2:
        raise RetrievalError(f"embeddings in '{path}' must be 2-D [N, E], got shape {list(emb.shape)}")
    if emb.shape[0] != len(paths):
        raise RetrievalError(f"'{path}' holds {emb.shape[0]} embeddings but {len(paths)} paths")
    if labels is not None and len(labels) != len(paths):
        raise CorruptFileError(f"'{path}' holds {len(paths)} paths but {len(labels)} labels")
    return EmbeddingFile(np.ascontiguousarray(emb, dtype=np.float32), [str(p) for p in paths], errors, info,
                         [str(x) for x in labels] if labels is not None else None)
