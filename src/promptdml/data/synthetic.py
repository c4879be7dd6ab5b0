"""Procedurally generated demo data for deep metric learning (no download needed).

Every class is a fixed combination of three *identity* factors:

* a motif shape family (circle, square, triangle, star, ...),
* a texture filling the motif (solid, stripes, checker, dots, ...),
* a layout, i.e. how many motif copies are arranged and how (single, pair, triad, quad).

Everything else is a *nuisance* factor that is re-drawn for every image: rotation, scale,
aspect ratio, position, texture frequency and phase, the colours (hue, saturation,
brightness), the background tint / gradient / noise and random clutter shapes (some of
which occlude the motifs). A metric-learning model therefore has to learn to ignore colour
and pose and to focus on shape, texture and arrangement.

The class -> factor assignment is a Latin-square-like schedule: in the first 64 classes every
(shape, texture) pair is used once, and both halves of the sorted class list (the usual
train / test split of DML benchmarks) contain every shape, every texture and every layout,
only in different combinations. Learning invariances on the train half thus transfers to
the (unseen) test half.

Generation is deterministic: the pixels of image ``(class_id, sample_id)`` only depend on
``(class_id, sample_id, image_size, seed)``.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptdml.files import atomic_write, atomic_write_text

__all__ = [
    "LAYOUTS",
    "MANIFEST_NAME",
    "SHAPES",
    "TEXTURES",
    "class_factors",
    "class_name",
    "generate_demo_dataset",
    "max_demo_classes",
    "render_class_image",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "crescent", "heart")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "rings", "zigzag", "grid", "waves")
LAYOUTS: tuple[str, ...] = ("single", "pair", "triad", "quad")

MANIFEST_NAME = ".promptdml_demo.json"
_GENERATOR_VERSION = 1
_SUPERSAMPLE = 2  # draw at 2x and downsample (anti-aliasing)
_CLASS_DIR_RE = re.compile(r"^c\d{3,}_[a-z]+_[a-z]+_[a-z]+$")
_IMAGE_RE = re.compile(r"^\d{3,}\.png$")


# --------------------------------------------------------------------------- class schedule
def max_demo_classes() -> int:
    """Number of distinct (shape, texture, layout) combinations the schedule can produce."""
    return len(SHAPES) * len(TEXTURES) * len(LAYOUTS)


def class_factors(class_id: int) -> tuple[str, str, str]:
    """Return the identity factors ``(shape, texture, layout)`` of ``class_id``.

    Within each block of 64 classes, class ``i`` has shape ``i % 8`` and texture
    ``(i % 8 + i // 8) % 8`` so every (shape, texture) pair occurs exactly once; the layout
    is shifted per block so that all 256 (shape, texture, layout) triples are distinct.
    """
    n_s, n_t, n_l = len(SHAPES), len(TEXTURES), len(LAYOUTS)
    if not 0 <= class_id < max_demo_classes():
        raise ValueError(f"class_id must be in [0, {max_demo_classes()}), got {class_id}")
    block, i = divmod(class_id, n_s * n_t)
    s = i % n_s
    k = i // n_s
    t = (s + k) % n_t
    lay = (s + 2 * k + (k // 4) + block) % n_l
    return SHAPES[s], TEXTURES[t], LAYOUTS[lay]


def class_name(class_id: int) -> str:
    """Sortable folder name of a class, e.g. ``'c003_stripes_star_pair'``."""
    shape, texture, layout = class_factors(class_id)
    return f"c{class_id:03d}_{texture}_{shape}_{layout}"


# --------------------------------------------------------------------------- geometry
def _unit_shape(shape: str) -> list[tuple[np.ndarray, int]]:
    """Polygons (N x 2, roughly inside the unit disc) with fill values (255 add / 0 cut)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return [(np.stack([np.cos(a), np.sin(a)], 1) * 0.9, 255)]
    if shape == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.72, 255)]
    if shape == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [(np.stack([np.cos(a), -np.sin(a)], 1) * 1.0 + [0, 0.15], 255)]
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [(np.stack([np.cos(a) * r, np.sin(a) * r], 1), 255)]
    if shape == "cross":
        w, h = 0.3, 0.95
        pts = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h), (-w, h), (-w, w), (-h, w),
               (-h, -w), (-w, -w)]
        return [(np.array(pts, float), 255)]
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return [(np.stack([np.cos(a), np.sin(a)], 1) * 0.92, 255)]
    if shape == "crescent":
        a = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        circ = np.stack([np.cos(a), np.sin(a)], 1)
        return [(circ * 0.9, 255), (circ * 0.8 + [0.45, -0.15], 0)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 17.0, 255)]
    raise ValueError(f"unknown shape {shape!r}")


_UNIT_SHAPES = {s: _unit_shape(s) for s in SHAPES}

# motif centres (unit square [-1, 1]^2, before a random global rotation) and relative size
_LAYOUT_SPECS: dict[str, tuple[list[tuple[float, float]], float]] = {
    "single": ([(0.0, 0.0)], 0.6),
    "pair": ([(-0.5, 0.0), (0.5, 0.0)], 0.4),
    "triad": ([(0.0, -0.52), (-0.54, 0.4), (0.54, 0.4)], 0.36),
    "quad": ([(-0.46, -0.46), (0.46, -0.46), (-0.46, 0.46), (0.46, 0.46)], 0.33),
}


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Binary-ish texture in [0, 1] on motif-local coordinates (u, v measured in motif radii)."""
    f = rng.uniform(0.85, 1.2)  # frequency jitter
    ph = rng.uniform(0, 2 * np.pi)
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "stripes":
        return (np.sin(u * 7.5 * f + ph) > 0).astype(np.float32)
    if texture == "checker":
        p = 0.7 / f
        return ((np.floor(u / p + ph) + np.floor(v / p)) % 2).astype(np.float32)
    if texture == "dots":
        p = 0.6 / f
        du = (u / p + ph) % 1.0 - 0.5
        dv = (v / p) % 1.0 - 0.5
        return ((du * du + dv * dv) < 0.09).astype(np.float32)
    if texture == "rings":
        return (np.sin(np.sqrt(u * u + v * v) * 11.0 * f + ph) > 0).astype(np.float32)
    if texture == "zigzag":
        tri = np.abs(((u * 2.6 * f) % 2.0) - 1.0)
        return (np.sin((v + 0.4 * tri) * 9.0 * f + ph) > 0).astype(np.float32)
    if texture == "grid":
        p = 0.6 / f
        gu = np.abs((u / p + ph) % 1.0 - 0.5)
        gv = np.abs((v / p) % 1.0 - 0.5)
        return ((gu > 0.34) | (gv > 0.34)).astype(np.float32)
    if texture == "waves":
        return (np.sin(v * 7.0 * f + 1.6 * np.sin(u * 4.5 * f) + ph) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _rand_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    c = _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))
    return tuple(int(x * 255) for x in c)  # type: ignore[return-value]


def _draw_clutter(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, n: int, max_frac: float) -> None:
    for _ in range(n):
        kind = rng.integers(0, 4)
        col = _rand_colour(rng)
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, max_frac) * size
        if kind == 0:  # line
            a = rng.uniform(0, np.pi)
            dx, dy = math.cos(a) * r * 1.5, math.sin(a) * r * 1.5
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=col, width=max(1, int(rng.uniform(0.01, 0.03) * size)))
        elif kind == 1:  # blob
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0)], fill=col)
        elif kind == 2:  # small rectangle / bar
            draw.rectangle([cx - r, cy - r * 0.3, cx + r * rng.uniform(0.2, 1.0), cy + r * 0.3], fill=col)
        else:  # arc
            a0 = float(rng.uniform(0, 360))
            draw.arc([cx - r, cy - r, cx + r, cy + r], a0, a0 + float(rng.uniform(60, 250)), fill=col,
                     width=max(1, int(0.015 * size)))


# --------------------------------------------------------------------------- rendering
def render_class_image(class_id: int, sample_id: int, image_size: int, seed: int) -> Image.Image:
    """Render sample ``sample_id`` of class ``class_id`` as an RGB ``image_size`` x ``image_size`` image.

    Deterministic: identical arguments always give identical pixels.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if sample_id < 0:
        raise ValueError(f"sample_id must be >= 0, got {sample_id}")
    shape, texture, layout = class_factors(class_id)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _GENERATOR_VERSION, class_id, sample_id])
    S = image_size * _SUPERSAMPLE

    # --- background: tinted, with a linear gradient and pixel noise
    bg_h = rng.random()
    bg_a = _hsv(bg_h, rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.95))
    bg_b = _hsv(bg_h + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.95))
    ramp = np.linspace(-0.5, 0.5, S, dtype=np.float32)
    ga = rng.uniform(0, 2 * np.pi)
    g = np.clip(np.float32(np.cos(ga)) * ramp[None, :] + np.float32(np.sin(ga)) * ramp[:, None] + 0.5, 0, 1)
    canvas = bg_a.astype(np.float32) * 255.0 + g[..., None] * ((bg_b - bg_a).astype(np.float32) * 255.0)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")

    # --- background clutter
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, S, rng, int(rng.integers(1, 6)), 0.12)
    canvas = np.asarray(img, dtype=np.float32)

    # --- motif colours: two colours with a random hue, contrasting in value or hue
    h = rng.random()
    col_a = (_hsv(h, rng.uniform(0.45, 1.0), rng.uniform(0.7, 1.0)) * 255.0).astype(np.float32)
    col_b = (_hsv(h + rng.uniform(0.25, 0.75), rng.uniform(0.3, 1.0), rng.uniform(0.05, 0.45)) * 255.0).astype(np.float32)
    if rng.random() < 0.5:
        col_a, col_b = col_b, col_a

    # --- layout: centres, global rotation/scale/translation
    centres, rel = _LAYOUT_SPECS[layout]
    g_rot = rng.uniform(0, 2 * np.pi)
    g_scale = rng.uniform(0.8, 1.05)
    spread = S * 0.5 * g_scale
    margin = S * 0.5 - spread * 0.95
    off = rng.uniform(-1, 1, 2) * max(margin, 0.0) + S * 0.5
    cg, sg = math.cos(g_rot), math.sin(g_rot)
    motif_r = rel * spread
    own_rot_shared = rng.uniform(0, 2 * np.pi)
    for cx0, cy0 in centres:
        cx0 += rng.normal(0, 0.05)
        cy0 += rng.normal(0, 0.05)
        cx = off[0] + (cg * cx0 - sg * cy0) * spread
        cy = off[1] + (sg * cx0 + cg * cy0) * spread
        r = motif_r * rng.uniform(0.85, 1.15)
        rot = own_rot_shared + rng.normal(0, 0.35)
        aspect = rng.uniform(0.85, 1.15)
        cr, sr = math.cos(rot), math.sin(rot)
        # shape mask, drawn and composited only inside the motif's bounding window
        x0, y0 = max(int(cx - 1.3 * r), 0), max(int(cy - 1.3 * r), 0)
        x1, y1 = min(int(cx + 1.3 * r) + 2, S), min(int(cy + 1.3 * r) + 2, S)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        mdraw = ImageDraw.Draw(mask)
        for poly, val in _UNIT_SHAPES[shape]:
            px = poly[:, 0] * aspect * r
            py = poly[:, 1] / aspect * r
            pts = np.stack([cx - x0 + cr * px - sr * py, cy - y0 + sr * px + cr * py], 1)
            mdraw.polygon([tuple(p) for p in pts.tolist()], fill=val)
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        # texture in motif-local coordinates
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        u = (cr * dx + sr * dy) / r
        v = (-sr * dx + cr * dy) / r
        tex = _texture(texture, u, v, rng)[..., None]
        motif = col_a * (1 - tex) + col_b * tex
        win = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = win + (motif - win) * m

    # --- foreground occluders (small), brightness/contrast jitter, pixel noise
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, S, rng, int(rng.integers(0, 3)), 0.07)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - 128.0) * rng.uniform(0.75, 1.15) + 128.0 + rng.uniform(-20, 20)
    arr = arr + rng.normal(0, rng.uniform(1.0, 8.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- dataset on disk
def _manifest(num_classes: int, images_per_class: int, image_size: int, seed: int) -> dict:
    return {
        "generator": "promptdml.data.synthetic",
        "version": _GENERATOR_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "classes": [class_name(c) for c in range(num_classes)],
    }


def _is_complete(root: Path, expected: dict) -> bool:
    path = root / MANIFEST_NAME
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if found != expected:
        return False
    n = expected["images_per_class"]
    for name in expected["classes"]:
        d = root / name
        for j in range(n):
            if not (d / f"{j:03d}.png").is_file():
                return False
    return True


def generate_demo_dataset(root: str | Path, num_classes: int = 64, images_per_class: int = 16,
                          image_size: int = 96, seed: int = 0, progress: bool = False) -> Path:
    """Write ``root/<class_name>/<nnn>.png`` (RGB PNGs) and return ``root``.

    Class names are sortable (``c000_...``, ``c001_...``) so the usual DML split (first half of
    the sorted classes for training, second half for testing) is well defined. Idempotent: a
    manifest (``root/.promptdml_demo.json``) is written last; if it matches the requested
    parameters and all images exist, nothing is rewritten. Stale class folders / images left
    by an earlier generation with other parameters (recognised by their naming pattern) are
    removed; unrelated files in ``root`` are left alone.
    """
    for label, val in (("num_classes", num_classes), ("images_per_class", images_per_class),
                       ("image_size", image_size), ("seed", seed)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise ValueError(f"{label} must be an int, got {val!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (need at least one train and one test class), got {num_classes}")
    if num_classes > max_demo_classes():
        raise ValueError(f"num_classes must be <= {max_demo_classes()} (distinct factor combinations), got {num_classes}")
    if images_per_class < 2:
        raise ValueError(f"images_per_class must be >= 2 (retrieval needs a positive per query), got {images_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    root = Path(root)
    expected = _manifest(int(num_classes), int(images_per_class), int(image_size), int(seed))
    if _is_complete(root, expected):
        return root

    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    wanted = set(expected["classes"])
    for child in root.iterdir():  # stale class folders of an earlier generation
        if child.is_dir() and _CLASS_DIR_RE.match(child.name) and child.name not in wanted:
            shutil.rmtree(child)

    from promptdml.progress import progress_bar

    for c in progress_bar(range(num_classes), desc="demo data", unit="class", enabled=progress):
        d = root / class_name(c)
        d.mkdir(exist_ok=True)
        for stale in d.iterdir():
            if stale.is_file() and _IMAGE_RE.match(stale.name) and int(stale.name[:-4]) >= images_per_class:
                stale.unlink()
        for j in range(images_per_class):
            img = render_class_image(c, j, image_size, seed)
            atomic_write(d / f"{j:03d}.png", lambda t, img=img: img.save(t, format="PNG"), fsync=False,
                         tmp_name=f".{j:03d}.png.tmp")

    atomic_write_text(root / MANIFEST_NAME, json.dumps(expected, indent=1))
    return root
