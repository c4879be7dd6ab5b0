"""Image decoding (:func:`load_rgb`) and cheap / full readability checks of image files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from promptdml.progress import progress_bar

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_rgb", "image_problem", "find_bad_images"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_WHITE = (255, 255, 255)


def is_image_file(name: str | os.PathLike) -> bool:
    """True for a (non-hidden) file name with an image extension (case-insensitive)."""
    name = os.fspath(name)
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer / float single-channel images (16-bit PNG/TIFF, 32-bit) -> 8-bit grayscale."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr.astype(np.float64) / 257.0
    elif img.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
        arr = arr.astype(np.float64) * 255.0
    arr = np.clip(np.nan_to_num(arr.astype(np.float64)) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image.

    Applies the EXIF orientation; grayscale, CMYK, YCbCr and 16-bit images are converted; images with
    transparency (RGBA, LA, palette + transparency) are composited on a white background. Multi-frame
    files (GIF/TIFF) give their first frame. Raises ``OSError``/``ValueError`` if the file cannot be
    decoded.
    """
    with Image.open(path) as im:
        im.load()
        transparent = "transparency" in im.info
        try:
            img = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the pixels unusable
            img = None
        if img is None or img is im:  # older Pillow returns the same object when nothing changes
            img = im.copy()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if transparent or "transparency" in img.info:
            return _on_white(img)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    if mode in ("L", "1") and transparent:
        return _on_white(img)
    if mode.startswith("I") or mode == "F":
        return _to_8bit(img).convert("RGB")
    return img.convert("RGB")


def image_problem(path: str | os.PathLike, full: bool = False) -> str | None:
    """``None`` if ``path`` looks like a readable image, else a short reason.

    The cheap check (``full=False``) tests that the file exists, is not empty and that PIL recognises its
    header; ``full=True`` decodes the whole image.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read the file ({e.strerror or type(e).__name__})"
    if not p.is_file():
        return "not a file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    try:
        if full:
            load_rgb(p)
        else:
            with Image.open(p) as im:
                _ = im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def find_bad_images(paths: Sequence[str], mode: str = "header", progress: bool = False) -> dict[int, str]:
    """Check many files (threaded); returns ``{position: reason}`` of the bad ones.

    ``mode``: ``"exists"`` (file present and non-empty), ``"header"`` (+ PIL recognises it) or
    ``"full"`` (+ decodes completely). ``progress``: a progress bar over the files.
    """
    if mode not in ("exists", "header", "full"):
        raise ValueError(f"mode must be exists | header | full, got {mode!r}")

    def check(p: str) -> str | None:
        if mode == "exists":
            try:
                st = os.stat(p)
            except FileNotFoundError:
                return "file not found"
            except OSError as e:
                return f"cannot read the file ({e.strerror or type(e).__name__})"
            return "empty file (0 bytes)" if st.st_size == 0 else None
        return image_problem(p, full=(mode == "full"))

    desc = {"exists": "check files", "header": "check images", "full": "decode images"}[mode]
    with progress_bar(total=len(paths), desc=desc, unit="img", enabled=progress) as bar:
        if len(paths) < 256:
            results = []
            for p in paths:
                results.append(check(p))
                bar.update(1)
        else:
            workers = min(32, 4 * (os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as ex:
                results = []
                for r in ex.map(check, paths, chunksize=64):
                    results.append(r)
                    bar.update(1)
    return {i: r for i, r in enumerate(results) if r is not None}
