"""Decoded-image cache for small-image training (``data.cache``).

Every training image is decoded once (:func:`load_rgb`), resized to a fixed ``side x side`` square
(``side = CACHE_SCALE * img_size``, bicubic, antialiased) and stored as uint8 in one memory-mapped
file ``<key>.u8`` with a small ``<key>.json`` next to it (original sizes, unreadable images, checksum).
The training augmentation (RandomResizedCrop + horizontal flip + normalisation) is then applied to
the cached tensor by :class:`CachedTrainTransform`.

**Distribution.** The crop box is drawn exactly as today: ``RandomResizedCrop.get_params`` on the
*original* image size, with the same random numbers (so with the same seed the same boxes), mapped to
the stored square and resampled to ``img_size`` there. The only difference is resize-then-crop instead
of crop-on-original: pixels are interpolated twice and a crop smaller than ``1/CACHE_SCALE`` of a side of
a large original is taken from the downscaled copy (less detail), box edges are rounded to stored pixels
(at most half a stored pixel). Therefore the cache is off by default (``data.cache: none``) and existing
results do not change.

**Invalidation.** The file name is a hash of the cache format version, ``side``, the interpolation and,
for every image, its absolute path, size in bytes and modification time (ns). Any added, removed,
renamed, resized or touched file, or another image size, gives another key: a miss and a rebuild. A
content change that keeps both size and mtime is not detected (``touch`` the file). Old keys are
left in the folder (delete it to reclaim the space).

**Safety.** The data file is written under a unique temporary name, fsynced and renamed; the json
(written atomically last) holds a CRC-32 of the data. On open the size and the checksum are verified;
a missing, partial or corrupt cache is rebuilt, never used. Concurrent builders write identical
content and rename atomically; readers (DataLoader workers included) open the file read-only and
lazily in each process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

from promptdml.files import atomic_write, atomic_write_text, ensure_dir

from .images import load_rgb

__all__ = ["CACHE_SCALE", "CachedTrainTransform", "ImageCache", "cache_key", "resolve_cache_dir"]

log = logging.getLogger("promptdml.data")

CACHE_VERSION = 1
CACHE_SCALE = 2  # stored side = CACHE_SCALE * img_size
_PIL_INTERP = {
    T.InterpolationMode.NEAREST: Image.NEAREST,
    T.InterpolationMode.BILINEAR: Image.BILINEAR,
    T.InterpolationMode.BICUBIC: Image.BICUBIC,
    T.InterpolationMode.LANCZOS: Image.LANCZOS,
    T.InterpolationMode.BOX: Image.BOX,
    T.InterpolationMode.HAMMING: Image.HAMMING,
}


def resolve_cache_dir(value: str) -> Path | None:
    """``data.cache`` -> folder: ``none``/empty = no cache, ``auto`` = the user cache folder
    (``$XDG_CACHE_HOME/promptdml/images``, default ``~/.cache/promptdml/images``), else the path given."""
    v = str(value or "").strip()
    if v.lower() in ("", "none", "off", "false"):
        return None
    if v.lower() == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "promptdml" / "images"
    return Path(v).expanduser()


def cache_key(paths: Sequence[str], side: int, interpolation: str) -> str:
    """Hash of the format, the stored size, the interpolation and every file's (path, size, mtime_ns)."""
    h = hashlib.sha256(f"promptdml-image-cache v{CACHE_VERSION} side={side} interp={interpolation}\n".encode())
    for p in paths:
        ap = os.path.abspath(p)
        try:
            st = os.stat(ap)
            h.update(f"{ap}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{ap}\0missing\n".encode())
    return h.hexdigest()[:32]


def _crc_file(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class ImageCache:
    """The cached ``[n, side, side, 3]`` uint8 images of ``paths`` in ``folder`` (built if needed).

    ``ok[i]`` is False for images that could not be decoded (their slot is blank); ``sizes[i]`` is the
    original ``(height, width)``. Picklable: workers reopen the memory map lazily.
    """

    def __init__(self, folder: str | os.PathLike, paths: Sequence[str], side: int,
                 interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC, workers: int = 4):
        self.folder = Path(folder)
        self.side = int(side)
        self.interpolation = interpolation
        self.n = len(paths)
        self.key = cache_key(paths, self.side, interpolation.value)
        self.data_path = self.folder / f"{self.key}.u8"
        self.meta_path = self.folder / f"{self.key}.json"
        self.built = False  # True when this call (re)built the cache, False on a hit
        meta = self._valid_meta()
        if meta is None:
            self._build(paths, workers)
            meta = self._valid_meta()
            if meta is None:
                raise RuntimeError(f"the image cache {self.data_path} failed verification right after building")
            self.built = True
        self.sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(self.n, 2)
        self.ok = np.asarray(meta["ok"], dtype=bool)
        self._mm: np.memmap | None = None
        self._pid = -1

    @property
    def nbytes(self) -> int:
        return self.n * self.side * self.side * 3

    def _valid_meta(self) -> dict | None:
        """The json when the cache is complete and intact, else None (and the reason is logged)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        try:
            ok = (meta["version"] == CACHE_VERSION and meta["key"] == self.key and meta["n"] == self.n
                  and meta["side"] == self.side and len(meta["ok"]) == self.n and len(meta["sizes"]) == self.n)
            if ok and self.data_path.stat().st_size != self.nbytes:
                log.warning("image cache %s has the wrong size; rebuilding it", self.data_path)
                return None
            if ok and _crc_file(self.data_path) != meta["crc32"]:
                log.warning("image cache %s is corrupt (checksum mismatch); rebuilding it", self.data_path)
                return None
        except (OSError, KeyError, TypeError):
            return None
        return meta if ok else None

    def _decode(self, path: str) -> tuple[np.ndarray | None, tuple[int, int]]:
        try:
            img = load_rgb(path)
        except Exception:  # noqa: BLE001 - unreadable images are flagged; the dataset substitutes them
            return None, (0, 0)
        w, h = img.size
        img = img.resize((self.side, self.side), _PIL_INTERP[self.interpolation])
        return np.asarray(img, dtype=np.uint8), (h, w)

    def _build(self, paths: Sequence[str], workers: int) -> None:
        ensure_dir(self.folder, "image cache folder")
        log.info("building the image cache %s (%d images, %d px, %.0f MiB)", self.data_path, self.n, self.side,
                 self.nbytes / 2**20)
        sizes = np.zeros((self.n, 2), dtype=np.int64)
        ok = np.zeros(self.n, dtype=bool)
        crc = 0

        def write(tmp: Path) -> None:
            nonlocal crc
            if self.n == 0:
                tmp.write_bytes(b"")
            else:
                mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(self.n, self.side, self.side, 3))
                with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
                    for i, (arr, hw) in enumerate(ex.map(self._decode, paths)):
                        if arr is not None:
                            mm[i] = arr
                            ok[i] = True
                            sizes[i] = hw
                mm.flush()
                del mm
            crc = _crc_file(tmp)

        # a name unique per builder: two processes building the same cache never write one temporary file
        atomic_write(self.data_path, write, tmp_name=f"{self.data_path.name}.tmp-{os.getpid()}-{id(self)}")
        meta = {"version": CACHE_VERSION, "key": self.key, "n": self.n, "side": self.side,
                "interpolation": self.interpolation.value, "crc32": crc, "ok": ok.tolist(),
                "sizes": sizes.tolist()}
        atomic_write_text(self.meta_path, json.dumps(meta))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def array(self, i: int) -> np.ndarray:
        """The stored ``[side, side, 3]`` uint8 image ``i`` (read-only view of the memory map)."""
        if self._mm is None or self._pid != os.getpid():
            self._mm = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(self.n, self.side, self.side, 3))
            self._pid = os.getpid()
        return self._mm[i]

    def tensor(self, i: int) -> torch.Tensor:
        """Image ``i`` as a ``[3, side, side]`` uint8 tensor (a copy)."""
        return torch.from_numpy(np.array(self.array(i))).permute(2, 0, 1)


class CachedTrainTransform:
    """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize on a cached uint8 image.

    Called with ``(uint8 [3, side, side], (orig_h, orig_w))``; draws the crop box on the original size
    with ``RandomResizedCrop.get_params`` (the same random numbers as the file path) and resamples it
    from the stored square.
    """

    def __init__(self, crop: T.RandomResizedCrop, flip_p: float, mean, std):
        self.size = [int(s) for s in (crop.size if isinstance(crop.size, (tuple, list)) else (crop.size,) * 2)]
        self.scale = tuple(crop.scale)
        self.ratio = tuple(crop.ratio)
        self.interpolation = crop.interpolation
        self.flip_p = float(flip_p)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    @classmethod
    def from_compose(cls, transform) -> CachedTrainTransform | None:
        """The tensor version of :func:`build_transforms`' train pipeline, None for any other transform."""
        ts = getattr(transform, "transforms", None)
        if (not ts or len(ts) != 4 or not isinstance(ts[0], T.RandomResizedCrop)
                or not isinstance(ts[1], T.RandomHorizontalFlip) or not isinstance(ts[2], T.ToTensor)
                or not isinstance(ts[3], T.Normalize)):
            return None
        return cls(ts[0], ts[1].p, ts[3].mean, ts[3].std)

    def __call__(self, img: torch.Tensor | np.ndarray, orig_hw: tuple[int, int]) -> torch.Tensor:
        """``img``: the stored image as a uint8 ``[3, S, S]`` tensor or an ``[S, S, 3]`` array (e.g. a view of the
        memory map: only the crop box is copied, then resized, the same values as cropping the whole tensor)."""
        h0, w0 = int(orig_hw[0]), int(orig_hw[1])
        side = img.shape[-1] if torch.is_tensor(img) else img.shape[0]
        top, left, h, w = T.RandomResizedCrop.get_params(torch.zeros(()).expand(3, h0, w0), self.scale, self.ratio)
        sy, sx = side / h0, side / w0
        t2, l2 = math.floor(top * sy + 0.5), math.floor(left * sx + 0.5)
        b2 = min(side, max(t2 + 1, math.floor((top + h) * sy + 0.5)))
        r2 = min(side, max(l2 + 1, math.floor((left + w) * sx + 0.5)))
        t2, l2 = min(t2, b2 - 1), min(l2, r2 - 1)
        if torch.is_tensor(img):
            out = F2.resized_crop(img, t2, l2, b2 - t2, r2 - l2, self.size, interpolation=self.interpolation,
                                  antialias=True)
        else:
            box = torch.from_numpy(np.array(img[t2:b2, l2:r2])).permute(2, 0, 1)  # a writable copy of the box
            out = F2.resize(box, self.size, interpolation=self.interpolation, antialias=True)
        if torch.rand(1) < self.flip_p:
            out = out.flip(-1)
        return (out.float() - self.mean).mul_(self.inv_std)
