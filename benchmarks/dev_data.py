"""Real dev datasets for ``benchmarks/real_data.py``, built from Debian packages into a git-ignored cache.

Every dataset is written as a folder of class folders (``<root>/<class>/<image>.png``) and read with
``data.dataset=folder``, ``data.train_ratio=0.5``: the sorted classes, first half train, second half test.

- ``wesnoth``: unit sprites of ``wesnoth-1.16-data``; class = sprite folder + the file name before the
  first ``-``; classes with >= 5 images; composited on white, padded square.
- ``glyphs``: Han characters (CJK Unified Ideographs, U+4E00-U+9FFF) rendered in every face of the CJK
  font packages below (each face of a ``.ttc`` is one font). Class = code point; image = the glyph in one
  face, centred, black on white, padded square. A face whose cmap lacks the code point gives no image (a
  fallback box is never drawn); renderings identical to another face's are dropped (regional faces of
  Noto CJK share most glyphs). Code points with at least ``min_faces`` distinct renderings are eligible; a
  seeded sample of ``classes`` of them is taken and each keeps ``per_class`` renderings (seeded choice).
- ``<name>-2shot``: the same classes and the same test half; each training class keeps 2 of its images
  (seeded choice, recorded in ``fewshot.json``). Files are hard links into the full dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"

WESNOTH_PACKAGE = "wesnoth-1.16-data"
WESNOTH_UNITS = "usr/share/games/wesnoth/1.16/data/core/images/units"
FONT_PACKAGES = (
    "fonts-noto-cjk", "fonts-noto-cjk-extra", "fonts-arphic-ukai", "fonts-arphic-uming",
    "fonts-arphic-bkai00mp", "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp",
    "fonts-wqy-microhei", "fonts-wqy-zenhei", "fonts-ipafont-gothic", "fonts-ipafont-mincho",
    "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho", "fonts-vlgothic", "fonts-hanazono",
    "fonts-lxgw-wenkai", "fonts-morisawa-bizud-gothic", "fonts-morisawa-bizud-mincho", "fonts-klee",
    "fonts-unfonts-core",
)
HAN = range(0x4E00, 0xA000)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
GLYPH_DEFAULTS = {"classes": 2000, "per_class": 4, "min_faces": 8, "seed": 0, "size": 96}
FEWSHOT_SEED = 0
DATASETS = ("wesnoth", "wesnoth-2shot", "glyphs", "glyphs-2shot")


# ------------------------------------------------------------------------------------------ packages
def fetch_packages(packages: Sequence[str], cache: Path) -> Path:
    """``apt-get download`` each package once into ``cache/debs`` and unpack into ``cache/extract``."""
    debs_dir, extract = cache / "debs", cache / "extract"
    done = cache / ".extracted"
    if done.is_file() and done.read_text().split() == sorted(packages):
        return extract
    debs_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs_dir.glob(f"{p}_*.deb"))]
    if missing:
        print(f"downloading {len(missing)} Debian package(s) with apt-get: {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs_dir, check=True)
    for p in packages:
        deb = sorted(debs_dir.glob(f"{p}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extract)], check=True)
    done.write_text("\n".join(sorted(packages)))
    return extract


def _write_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


# ------------------------------------------------------------------------------------------- wesnoth
def build_wesnoth(cache: Path, min_images: int = 5) -> Path:
    """``cache/dataset/<folder>__<prefix>/<name>.png``: sprites composited on white, padded square."""
    out = cache / "dataset"
    if (out / ".complete").is_file():
        return out
    units = fetch_packages([WESNOTH_PACKAGE], cache) / WESNOTH_UNITS
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(units.rglob("*.png")):
        rel = path.parent.relative_to(units)
        groups[f"{str(rel).replace('/', '__')}__{path.stem.split('-', 1)[0]}"].append(path)
    for cls, paths in sorted(groups.items()):
        if len(paths) < min_images:
            continue
        for p in paths:
            img = Image.open(p).convert("RGBA")
            side = max(img.size)
            canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2), img)
            _write_png(canvas.convert("RGB"), out / cls / p.name)
    (out / ".complete").write_text("ok")
    return out


# -------------------------------------------------------------------------------------------- glyphs
@dataclass(frozen=True)
class Face:
    """One font face: a file and, for collections (``.ttc``/``.otc``), the face's index in it."""

    path: Path
    index: int
    name: str


def list_faces(folder: Path) -> list[Face]:
    """Every face of every font file below ``folder``, in a stable order (path, then face index)."""
    from fontTools.ttLib import TTCollection, TTFont

    faces = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()):
        if path.suffix.lower() in (".ttc", ".otc"):
            n = len(TTCollection(str(path), lazy=True).fonts)
        else:
            n = 1
        for i in range(n):
            font = TTFont(str(path), fontNumber=i, lazy=True) if n > 1 else TTFont(str(path), lazy=True)
            family = font["name"].getDebugName(4) or f"{path.stem}#{i}"
            faces.append(Face(path, i, family))
            font.close()
    return faces


def face_codepoints(face: Face, codepoints: Iterable[int]) -> set[int]:
    """The code points of ``codepoints`` that the face's cmap maps to a glyph (no fallback glyphs)."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(face.path), fontNumber=face.index, lazy=True)
    cmap = font.getBestCmap() or {}
    notdef = {".notdef", "uniFFFD"}
    out = {cp for cp in codepoints if cp in cmap and cmap[cp] not in notdef}
    font.close()
    return out


def render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int) -> Image.Image | None:
    """The glyph centred on a white square, black ink, 8% margin; None when the glyph draws no ink."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    w, h = right - left, bottom - top
    canvas = Image.new("L", (w, h), 255)
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, fill=0)
    if canvas.getextrema()[0] == 255:
        return None
    side = int(round(max(w, h) * 1.16))
    square = Image.new("L", (side, side), 255)
    square.paste(canvas, ((side - w) // 2, (side - h) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _render_face(job: tuple[Face, list[int], int, int]) -> list[tuple[int, str, bytes]]:
    """``(code point, digest of the pixels, PNG bytes)`` of each inked rendering of one face."""
    face, cps, size, render_pt = job
    font = ImageFont.truetype(str(face.path), size=render_pt, index=face.index)
    out = []
    for cp in cps:
        img = render_glyph(font, chr(cp), size)
        if img is not None:
            out.append((cp, hashlib.sha256(img.tobytes()).hexdigest(), _png_bytes(img)))
    return out


def build_glyphs_from_faces(faces: Sequence[Face], out: Path, classes: int, per_class: int, min_faces: int,
                            seed: int, size: int, codepoints: Iterable[int] = HAN,
                            render_pt: int = 80) -> dict:
    """Render the glyph dataset into ``out`` (``<decimal code point>/<face index>.png``); return its manifest.

    Deterministic for the same faces and arguments: eligibility comes from the cmaps and the renderings,
    and every random choice uses ``random.Random(seed)``.
    """
    codepoints = list(codepoints)
    cover: dict[int, list[int]] = defaultdict(list)
    for fi, face in enumerate(faces):
        for cp in face_codepoints(face, codepoints):
            cover[cp].append(fi)
    candidates = sorted(cp for cp, fs in cover.items() if len(fs) >= min_faces)
    rng = random.Random(seed)
    # Render a seeded pool somewhat larger than needed: some code points lose faces to identical renderings.
    pool = sorted(rng.sample(candidates, min(len(candidates), int(classes * 1.5) + 16)))
    renders: dict[int, dict[str, tuple[int, bytes]]] = defaultdict(dict)
    by_face: dict[int, list[int]] = defaultdict(list)
    for cp in pool:
        for fi in cover[cp]:
            by_face[fi].append(cp)
    jobs = [(faces[fi], by_face[fi], size, render_pt) for fi in sorted(by_face)]
    # faces render independently (one process per core); results are merged in face order, so the first
    # face of identical renderings wins exactly as in a serial loop
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as ex:
            done = list(ex.map(_render_face, jobs, chunksize=1))
    else:
        done = [_render_face(job) for job in jobs]
    for fi, face_renders in zip(sorted(by_face), done, strict=True):
        for cp, digest, data in face_renders:
            renders[cp].setdefault(digest, (fi, data))
    eligible = [cp for cp in pool if len(renders[cp]) >= max(min_faces, per_class)]
    if len(eligible) < classes:
        raise RuntimeError(f"only {len(eligible)} code points have >= {min_faces} distinct renderings; "
                           f"asked for {classes} classes")
    chosen = sorted(rng.sample(eligible, classes))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    per_image_faces: dict[str, list[str]] = {}
    for cp in chosen:
        variants = sorted(renders[cp].values())
        keep = sorted(rng.sample(variants, per_class))
        cls = str(cp)  # decimal: natural and plain sorting agree, so the split is code point order
        (tmp / cls).mkdir(parents=True)
        for fi, data in keep:
            (tmp / cls / f"{fi:03d}.png").write_bytes(data)
        per_image_faces[cls] = [faces[fi].name for fi, _ in keep]
    manifest = {"classes": classes, "per_class": per_class, "min_faces": min_faces, "seed": seed, "size": size,
                "faces": [f"{f.path.name}#{f.index} {f.name}" for f in faces],
                "eligible_codepoints": len(candidates), "images": classes * per_class}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def build_glyphs(cache: Path, **kwargs) -> Path:
    """The glyph dataset at ``cache/dataset`` (rebuilt only when the arguments change)."""
    params = GLYPH_DEFAULTS | kwargs
    out = cache / "dataset"
    manifest = out / "manifest.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if all(old.get(k) == v for k, v in params.items()):
            return out
    extract = fetch_packages(FONT_PACKAGES, cache)
    faces = list_faces(extract / "usr" / "share" / "fonts")
    print(f"rendering glyphs from {len(faces)} font faces ...", flush=True)
    build_glyphs_from_faces(faces, out, **params)
    return out


# ------------------------------------------------------------------------------------------ few-shot
def class_folders(root: Path) -> list[str]:
    """Class folders as promptdml's folder reader sorts them (the split depends on this order)."""
    from promptdml.data.records import _natural_key

    return sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=_natural_key)


def build_fewshot(src: Path, out: Path, shots: int = 2, seed: int = FEWSHOT_SEED, train_ratio: float = 0.5) -> dict:
    """Copy of ``src`` (hard links) whose training classes keep ``shots`` images each; test half unchanged."""
    marker = out / "fewshot.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old.get("shots") == shots and old.get("seed") == seed and old.get("source") == str(src):
            return old
    classes = class_folders(src)
    n_train = int(round(train_ratio * len(classes)))
    rng = random.Random(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    chosen: dict[str, list[str]] = {}
    for i, cls in enumerate(classes):
        files = sorted(f.name for f in (src / cls).iterdir() if f.is_file())
        keep = sorted(rng.sample(files, min(shots, len(files)))) if i < n_train else files
        if i < n_train:
            chosen[cls] = keep
        (tmp / cls).mkdir(parents=True)
        for name in keep:
            try:
                os.link(src / cls / name, tmp / cls / name)
            except OSError:
                shutil.copy2(src / cls / name, tmp / cls / name)
    info = {"source": str(src), "shots": shots, "seed": seed, "train_classes": n_train,
            "test_classes": len(classes) - n_train, "train_images": sum(len(v) for v in chosen.values()),
            "chosen": chosen}
    (tmp / "fewshot.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def build(name: str, cache: Path = CACHE) -> Path:
    """The folder of dev dataset ``name`` (one of :data:`DATASETS`), built on first use."""
    if name not in DATASETS:
        raise ValueError(f"unknown dev dataset '{name}'; choose from {', '.join(DATASETS)}")
    base, _, variant = name.partition("-")
    src = build_wesnoth(cache / "wesnoth") if base == "wesnoth" else build_glyphs(cache / "glyphs")
    if not variant:
        return src
    out = cache / base / variant
    build_fewshot(src, out, shots=int(variant.removesuffix("shot")))
    return out


def statistics(root: Path, train_ratio: float = 0.5) -> dict:
    """Classes, images and images per class of each half (as the folder reader will split them)."""
    classes = class_folders(root)
    n_train = int(round(train_ratio * len(classes)))
    out = {}
    for split, part in (("train", classes[:n_train]), ("test", classes[n_train:])):
        counts = [sum(1 for f in (root / c).iterdir() if f.suffix.lower() == ".png") for c in part]
        out[split] = {"classes": len(part), "images": sum(counts), "min": min(counts), "max": max(counts),
                      "mean": round(sum(counts) / len(counts), 2)}
    return out
