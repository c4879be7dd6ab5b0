"""Run directories: refuse to overwrite a previous run, one writer at a time (a lock), fingerprints for resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from promptdml.errors import RunDirError
from promptdml.files import ensure_dir, os_reason

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the lock file is informative only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "run_dir_of", "prepare_run_dir", "data_fingerprint", "backbone_fingerprint",
           "compare_fingerprints"]

LOCK_NAME = ".promptdml.lock"
RUN_MARKERS = ("config.yaml", "model.safetensors", "checkpoints", "metrics.json", "log.csv")
"""Entries that make a folder recognisable as a run directory (``--overwrite`` deletes only such folders)."""


def run_dir_of(cfg: Any) -> Path:
    """``train.output_dir / train.run_name`` (a free ``<dataset>-<date>-<time>[-N]`` name when the name is empty)."""
    out = Path(cfg.train.output_dir).expanduser().absolute()
    if cfg.train.run_name:
        return out / cfg.train.run_name
    stamp = f"{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    candidate, n = out / stamp, 1
    while candidate.exists():  # an automatic name never collides with an earlier run (two runs in one second)
        n += 1
        candidate = out / f"{stamp}-{n}"
    return candidate


class RunLock:
    """An exclusive advisory lock on ``RUN_DIR/.promptdml.lock`` for the life of a run (the file is removed when
    the run ends).

    The kernel releases it when the process ends (also on kill -9), so a crashed run never leaves a stale lock
    (a leftover file is not locked and is taken over).
    Re-entrant within one process (a resumed Trainer in the same process may take it again).
    """

    _held: dict[str, list[Any]] = {}  # lock path -> [fd, count]

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.key = os.path.realpath(self.path)
        self.locked = False

    def acquire(self) -> RunLock:
        if self.locked:
            return self
        held = RunLock._held.get(self.key)
        if held is not None:
            held[1] += 1
            self.locked = True
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot write into the run directory '{self.run_dir}': {os_reason(e)}. Choose a "
                                  f"writable --output-dir.") from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(f"another promptdml process ({owner}) is writing to the run directory "
                                  f"'{self.run_dir}'. Wait for it to finish, or train into another directory "
                                  f"(--name NAME).") from None
            try:  # the holder may have removed the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        RunLock._held[self.key] = [fd, 1]
        self.locked = True
        return self

    def release(self) -> None:
        if not self.locked:
            return
        self.locked = False
        held = RunLock._held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del RunLock._held[self.key]
            try:  # the run is over: remove the lock file while still holding the lock, then release it
                os.unlink(self.path)
            except OSError:
                pass
            os.close(held[0])

    def __del__(self) -> None:  # a Trainer dropped without close()
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def _contents(run_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunDirError(f"cannot read the run directory '{run_dir}': {os_reason(e)}") from None


def _probe_lock(run_dir: Path) -> None:
    """Raise if another process holds the run directory's lock (checked early, before any work)."""
    path = run_dir / LOCK_NAME
    if fcntl is None or not path.is_file() or os.path.realpath(path) in RunLock._held:
        return
    RunLock(run_dir).acquire().release()


def check_run_dir(run_dir: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse early (before data and model are built) to start a new run in a directory that holds one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run directory '{run_dir}' is a file; choose another --output-dir or --name")
    if not run_dir.is_dir():
        return
    _probe_lock(run_dir)
    if resume:
        return
    contents = _contents(run_dir)
    if not contents:
        return
    if not overwrite:
        shown = ", ".join(p.name for p in contents[:4]) + (" ..." if len(contents) > 4 else "")
        raise RunDirError(f"the run directory '{run_dir}' already exists and is not empty ({shown}); a new run "
                          f"would overwrite it or mix with it. Continue it with `promptdml train --resume {run_dir}`, "
                          f"replace it with --overwrite, or choose another name (--name NAME).")
    if not any((run_dir / m).exists() for m in RUN_MARKERS):
        raise RunDirError(f"refusing to --overwrite '{run_dir}': it does not look like a promptdml run directory "
                          f"(no {', '.join(RUN_MARKERS)}). Choose another --output-dir or --name.")


def prepare_run_dir(run_dir: Path, overwrite: bool = False, resume: bool = False) -> RunLock:
    """Create ``run_dir``, take its lock, and (for a new run) make sure it is empty; ``overwrite`` empties a
    previous run's directory first. Returns the held lock."""
    check_run_dir(run_dir, overwrite, resume)
    ensure_dir(run_dir, "run directory")
    lock = RunLock(run_dir).acquire()
    try:
        check_run_dir(run_dir, overwrite, resume)  # again, now that no other process can write
        if overwrite and not resume:
            for p in _contents(run_dir):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


# ------------------------------------------------------------------------------------------- fingerprints
def data_fingerprint(splits: Any) -> dict[str, Any]:
    """Class names and image counts per split and a hash of the (relative) file lists and labels.

    Paths are taken relative to the data root, so data moved to another folder (``--data-root``) matches."""
    root = Path(splits.root)
    base = root.parent if root.is_file() else root
    out: dict[str, Any] = {"dataset": splits.name, "splits": {}}
    h = hashlib.sha256()
    for name, rec in splits.named_splits():
        out["splits"][name] = {"classes": len(rec.class_names), "images": len(rec),
                               "class_names_sha256": hashlib.sha256("\n".join(rec.class_names).encode()).hexdigest()[:16]}
        h.update(f"[{name}]\n".encode())
        for p, y in zip(rec.paths, rec.labels.tolist(), strict=True):
            try:
                rel = os.path.relpath(p, base)
            except ValueError:  # another drive (Windows)
                rel = p
            h.update(f"{rel}\t{rec.class_names[y]}\n".encode())
    out["files_sha256"] = h.hexdigest()[:16]
    out["train_class_names"] = list(splits.train.class_names)
    return out


def backbone_fingerprint(cfg: Any) -> str:
    """What the frozen backbone is built from: its architecture and the sha256 (16 hex digits) of the local
    weights file (or the hub tag when the weights come from the model hub)."""
    from promptdml.files import sha256_file
    from promptdml.models.backbone import resolve_weights_file

    b = cfg.model.backbone
    if not b.pretrained:
        return f"{b.name}:random"
    weights = resolve_weights_file(b)
    return f"{b.name}:{sha256_file(weights)[:16] if weights is not None else 'hub'}"


def compare_fingerprints(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between the fingerprint stored with a run and the current one."""
    out = []
    if saved.get("backbone") != now.get("backbone"):
        out.append(f"the backbone weights differ (fingerprint {saved.get('backbone')} -> {now.get('backbone')})")
    a, b = saved.get("data", {}), now.get("data", {})
    for split in sorted(set(a.get("splits", {})) | set(b.get("splits", {}))):
        sa, sb = a.get("splits", {}).get(split), b.get("splits", {}).get(split)
        if sa is None or sb is None:
            out.append(f"the {split} split {'is new' if sa is None else 'is gone'}")
            continue
        if (sa["classes"], sa["images"]) != (sb["classes"], sb["images"]):
            out.append(f"{split}: {sa['classes']} classes / {sa['images']} images -> {sb['classes']} / {sb['images']}")
        elif sa["class_names_sha256"] != sb["class_names_sha256"]:
            out.append(f"{split}: the class names changed")
    ta, tb = a.get("train_class_names", []), b.get("train_class_names", [])
    if ta != tb:
        added = [c for c in tb if c not in ta][:5]
        removed = [c for c in ta if c not in tb][:5]
        if added or removed:
            out.append("training classes " + ", ".join(
                ([f"added {added}"] if added else []) + ([f"removed {removed}"] if removed else [])))
        else:
            out.append("the training classes are in another order")
    if not out and a.get("files_sha256") != b.get("files_sha256"):
        out.append("the list of image files changed (same counts, other files)")
    return out


def write_json(path: Path, data: Any) -> Path:
    from promptdml.files import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2))
