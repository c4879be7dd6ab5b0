"""``promptdml.load(run)`` -> :class:`Embedder`: the trained model plus its test-time preprocessing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from promptdml.config import Config
from promptdml.data import build_transforms, load_rgb
from promptdml.data.images import is_image_file
from promptdml.data.transforms import eval_resize_size
from promptdml.device import resolve_device, resolve_precision
from promptdml.embedding import embed_batches
from promptdml.models import PromptDMLModel
from promptdml.progress import progress_bar
from promptdml.retrieval import RetrievalError

__all__ = ["Embedder", "EmbedResult", "load", "list_images", "LIST_SUFFIXES"]

ImageInput = Image.Image | str | os.PathLike
LIST_SUFFIXES = (".txt", ".lst", ".list")
"""A file with one of these suffixes given to :func:`list_images` is read as a list of image paths."""


def _read_list_file(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def list_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders / list files / image files into a flat list of image paths.

    * a folder: every image file below it (recursive, hidden files skipped), sorted by path;
    * a ``.txt``/``.lst``/``.list`` file: one path per line (blank lines and ``#`` comments skipped;
      relative paths are relative to the list file's folder);
    * anything else: taken as an image path as is (a missing or unreadable image file is reported later,
      when it is decoded, so it keeps its place in the list); a missing path without an image extension
      (probably a mistyped folder) raises ``FileNotFoundError``.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[str] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*")
                           if is_image_file(f.name) and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise RetrievalError(f"no image files in folder '{p}' (looked for .jpg/.jpeg/.png/.bmp/.gif/"
                                     ".webp/.tif/.tiff, recursively)")
            out += found
        elif p.suffix.lower() in LIST_SUFFIXES:
            if not p.is_file():
                raise FileNotFoundError(f"image list file '{p}' does not exist")
            out += _read_list_file(p)
        elif not p.exists() and not is_image_file(p.name):
            raise FileNotFoundError(f"'{p}' does not exist (expected a folder of images, an image file or a "
                                    f".txt list of image paths)")
        else:
            out.append(str(p))
    return out


@dataclass
class EmbedResult:
    """Embeddings of the readable images: ``embeddings[i]`` belongs to ``paths[i]``.

    ``errors`` lists ``(path, reason)`` of every input that could not be read (skipped, not in ``paths``).
    """

    embeddings: np.ndarray
    paths: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)


class _FileDataset(Dataset):
    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_rgb(self.paths[i])), None
        except Exception as e:  # noqa: BLE001 - any decoding problem is reported with the file
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return i, None, reason


def _collate(items):
    return items


class Embedder:
    """A trained :class:`PromptDMLModel` with its test transform, on one device.

    ``embed(...)`` returns L2-normalised float32 embeddings ``[N, E]`` as a numpy array, computed exactly
    like the evaluation (the same loop, :func:`promptdml.embedding.embed_batches`): Resize(int(S*256/224)) + CenterCrop(S)
    with the backbone's mean/std/interpolation, autocast with the run's precision.
    """

    def __init__(self, model: PromptDMLModel, cfg: Config, device: str | torch.device = "auto",
                 precision: str | None = None, source: str | os.PathLike | None = None) -> None:
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.precision = precision or cfg.train.precision
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise RetrievalError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        self.dtype = resolve_precision(self.precision, self.device)
        self.img_size = int(cfg.model.backbone.img_size)
        self.transform = build_transforms(model.data_config, self.img_size, train=False)
        self.source = str(source) if source is not None else None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------------------------------ info
    @property
    def dim(self) -> int:
        """Embedding dimension E."""
        return int(self.cfg.model.embed_dim)

    @property
    def fingerprint(self) -> str | None:
        """sha256 (first 16 hex digits) of the checkpoint file, to tell models apart; None without one."""
        if self._fingerprint is None and self.source is not None:
            f = Path(self.source)
            f = f / "model.safetensors" if f.is_dir() else f
            if f.is_file():
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def preprocessing(self) -> dict[str, Any]:
        """What :meth:`preprocess` does, as plain data (for exported models and embedding files)."""
        dc = self.model.data_config
        return {"img_size": self.img_size, "resize_shorter_side": eval_resize_size(self.img_size),
                "crop": "center", "interpolation": str(dc.get("interpolation", "bicubic")),
                "mean": [float(m) for m in dc["mean"]], "std": [float(s) for s in dc["std"]],
                "input": "RGB float32 [N,3,S,S] in [0,1] after ToTensor, then (x - mean) / std"}

    def describe(self) -> dict[str, Any]:
        """Provenance stored next to embeddings and indexes."""
        return {"run": self.source, "model_fingerprint": self.fingerprint,
                "backbone": self.cfg.model.backbone.name, "embed_dim": self.dim, "precision": self.precision,
                "preprocessing": self.preprocessing()}

    # ------------------------------------------------------------------------------------- embedding
    def preprocess(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """One image (PIL or path) -> the model input ``[3, S, S]``."""
        if not isinstance(image, Image.Image):
            image = load_rgb(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image)

    def _embed(self, batches, size: int) -> np.ndarray:
        """Rows of ``(images, row index, None)`` batches, through the one embedding loop (as in evaluation)."""
        return embed_batches(self.model, batches, size, self.device, self.dtype, dim=self.dim).numpy()

    def embed_tensor(self, images: torch.Tensor, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed preprocessed images ``[N, 3, S, S]`` (or one ``[3, S, S]``)."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        s = self.img_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise RetrievalError(f"a preprocessed tensor must have shape [N, 3, {s}, {s}] (the model's image size), "
                                 f"got {list(images.shape)}; pass PIL images or file paths to have them "
                                 "resized and normalised, or use embedder.preprocess(image)")
        if not images.is_floating_point():
            raise RetrievalError(f"a preprocessed tensor must be floating point (normalised), got {images.dtype}")
        batch_size = _check_batch_size(batch_size)
        bar = progress_bar(total=images.shape[0], desc="embed", unit="img", enabled=progress)

        def batches():
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start:start + batch_size].float()
                yield chunk, torch.arange(start, start + chunk.shape[0]), None
                bar.update(chunk.shape[0])

        out = self._embed(batches(), images.shape[0])
        bar.close()
        return out

    def embed_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 64, progress: bool = False,
                    num_workers: int = 0) -> EmbedResult:
        """Embed image files; unreadable ones are skipped and listed in ``errors`` with the reason.

        ``result.paths`` holds exactly the files whose rows are in ``result.embeddings`` (input order).
        ``num_workers > 0`` decodes in DataLoader worker processes.
        """
        paths = [str(p) for p in paths]
        batch_size = _check_batch_size(batch_size)
        loader = DataLoader(_FileDataset(paths, self.transform), batch_size=batch_size, shuffle=False,
                            num_workers=max(0, int(num_workers)), collate_fn=_collate,
                            pin_memory=self.device.type == "cuda")
        kept: list[str] = []
        errors: list[tuple[str, str]] = []
        bar = progress_bar(total=len(paths), desc="embed", unit="img", enabled=progress)

        def batches():  # the readable images of each batch, as the next rows
            for items in loader:
                good = [(i, x) for i, x, _ in items if x is not None]
                errors.extend((paths[i], err) for i, x, err in items if x is None)
                if good:
                    yield torch.stack([x for _, x in good]), torch.arange(len(kept), len(kept) + len(good)), None
                    kept.extend(paths[i] for i, _ in good)
                bar.update(len(items))
                if errors:
                    bar.set_postfix(unreadable=len(errors), refresh=False)

        emb = self._embed(batches(), len(paths))[:len(kept)]
        bar.close()
        return EmbedResult(np.ascontiguousarray(emb, dtype=np.float32), kept, errors)

    def embed(self, images: torch.Tensor | ImageInput | Sequence[ImageInput], batch_size: int = 64,
              progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, E]`` (numpy), one row per input image.

        ``images``: a PIL image, an image path, a folder (every image below it, sorted by path: see
        :func:`list_images`), a list of PIL images and/or paths, or a preprocessed tensor ``[N, 3, S, S]``.
        An unreadable file raises :class:`RetrievalError` naming it (use :meth:`embed_files` to skip and
        report unreadable files instead).
        """
        if isinstance(images, torch.Tensor):
            return self.embed_tensor(images, batch_size, progress)
        if isinstance(images, np.ndarray):
            raise RetrievalError("pass a torch tensor [N, 3, S, S], PIL images or file paths, not a numpy array")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        items = list(images)
        if all(not isinstance(x, Image.Image) for x in items):
            result = self.embed_files(list_images(items), batch_size, progress)
            _raise_on_errors(result.errors)
            return result.embeddings
        batch_size = _check_batch_size(batch_size)
        errors: list[tuple[str, str]] = []
        bar = progress_bar(total=len(items), desc="embed", unit="img", enabled=progress)

        def batches():  # after the first unreadable image only the checks go on (the call raises)
            for start in range(0, len(items), batch_size):
                batch = []
                for x in items[start:start + batch_size]:
                    if not isinstance(x, (Image.Image, str, os.PathLike)):
                        raise RetrievalError(f"cannot embed an object of type {type(x).__name__}: pass PIL images, "
                                             "file paths, a folder or a tensor [N, 3, S, S]")
                    if not isinstance(x, Image.Image) and Path(x).is_dir():
                        raise RetrievalError(f"'{x}' is a folder: pass folders on their own, not mixed with PIL "
                                             "images")
                    try:
                        batch.append(self.preprocess(x))
                    except Exception as e:  # noqa: BLE001
                        errors.append((str(x), f"{type(e).__name__}: {e}"))
                        batch.append(torch.zeros(3, self.img_size, self.img_size))
                if not errors:
                    yield torch.stack(batch), torch.arange(start, start + len(batch)), None
                bar.update(len(batch))

        out = self._embed(batches(), len(items))
        bar.close()
        _raise_on_errors(errors)
        return out


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise RetrievalError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def _raise_on_errors(errors: list[tuple[str, str]]) -> None:
    if errors:
        listed = "\n  ".join(f"{p}: {r}" for p, r in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise RetrievalError(f"{len(errors)} image(s) could not be read:\n  {listed}{more}\n"
                             "Fix or remove them, or use Embedder.embed_files(...) to skip and report them.")


def load(run_dir_or_checkpoint: str | os.PathLike, device: str | torch.device = "auto",
         precision: str | None = None, weights: str | None = None) -> Embedder:
    """Load a trained model for inference.

    ``run_dir_or_checkpoint``: a run directory written by ``promptdml train`` or its ``model.safetensors``.
    ``device``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    ``precision``: autocast precision (``auto``/``fp32``/``bf16``/``fp16``); default: the run's
    ``train.precision``, which reproduces its evaluation. ``weights``: backbone weights file to use instead
    of the one recorded in the run (e.g. when the run was trained on another machine).
    """
    from promptdml.checkpoint import load_model, read_checkpoint
    from promptdml.config import set_key

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    cfg = None
    if weights:
        _, cfg, _ = read_checkpoint(run_dir_or_checkpoint)
        set_key(cfg, "model.backbone.weights", str(weights))
    model, cfg = load_model(run_dir_or_checkpoint, cfg, dev)
    return Embedder(model, cfg, dev, precision, source=run_dir_or_checkpoint)
