"""Safe file writes (temporary file + rename) and file hashing: the one place that writes artefacts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from promptdml.errors import WriteError

__all__ = ["atomic_write", "atomic_write_text", "ensure_dir", "sha256_file", "os_reason"]


def os_reason(e: BaseException) -> str:
    """A short reason for an OS error: 'Permission denied', 'No space left on device', ..."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def ensure_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and its parents) or raise :class:`WriteError` naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"cannot use '{path}' as the {what}: it is a file, not a folder. Choose another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create the {what} '{path}': {os_reason(e)}. Choose a writable location.") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = True,
                 tmp_name: str | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then rename it onto ``path``.

    ``tmp_name`` names the temporary file (in the same folder; default ``<name>.tmp``): a suffix a writer
    needs (``.onnx``), a hidden name a folder scan must skip, or a name unique per process for concurrent
    writers of one file.

    A crash or a failed write never leaves a partial ``path`` (the previous version stays); a failure raises
    :class:`WriteError` naming the file and the reason, and removes the temporary file.
    """
    path = Path(path)
    ensure_dir(path.parent)
    if path.is_dir():
        raise WriteError(f"cannot write '{path}': it is a folder. Choose a file name.")
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise WriteError(f"cannot write '{path}': {os_reason(e)}") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=False)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
