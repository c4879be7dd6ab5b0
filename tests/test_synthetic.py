"""Tests for the procedurally generated demo dataset (promptdml.data.synthetic)."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from promptdml.data.synthetic import (
    LAYOUTS,
    MANIFEST_NAME,
    SHAPES,
    TEXTURES,
    class_factors,
    class_name,
    generate_demo_dataset,
    max_demo_classes,
    render_class_image,
)


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --------------------------------------------------------------------------- rendering
def test_render_mode_size_and_determinism():
    a = render_class_image(3, 5, 48, seed=7)
    b = render_class_image(3, 5, 48, seed=7)
    assert a.mode == "RGB" and a.size == (48, 48)
    assert np.array_equal(_px(a), _px(b))
    c = render_class_image(3, 5, 48, seed=8)
    assert np.abs(_px(a) - _px(c)).mean() > 5.0


def test_intra_class_variation():
    imgs = [_px(render_class_image(10, j, 64, seed=0)) for j in range(6)]
    for x, y in itertools.combinations(imgs, 2):
        assert np.abs(x - y).mean() > 10.0  # pose / colour / background differ strongly


def _spectrum_descriptor(img: Image.Image) -> np.ndarray:
    """Colour- and translation-invariant statistic: log radial power spectrum of z-scored grey image."""
    g = np.asarray(img.convert("L"), dtype=np.float64)
    g = (g - g.mean()) / (g.std() + 1e-6)
    p = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    n = g.shape[0]
    yy, xx = np.indices(p.shape) - n // 2
    r = np.sqrt(xx**2 + yy**2).astype(int).ravel()
    rad = np.bincount(r, p.ravel()) / np.bincount(r)
    return np.log(rad[1 : n // 2])


def test_classes_are_distinct_beyond_nuisances():
    classes = list(range(0, 64, 5))  # 13 classes with mixed shapes / textures / layouts
    per = 8
    desc = {c: np.stack([_spectrum_descriptor(render_class_image(c, j, 64, seed=0)) for j in range(per)])
            for c in classes}
    within = np.mean([np.linalg.norm(a - b) for c in classes for a, b in itertools.combinations(desc[c], 2)])
    between = np.mean([np.linalg.norm(a - b) for c1, c2 in itertools.combinations(classes, 2)
                       for a in desc[c1] for b in desc[c2]])
    assert between > 1.1 * within, (between, within)
    # leave-one-out nearest-centroid classification is far above chance (1/13 ~ 0.08)
    correct = 0
    for c in classes:
        for j in range(per):
            cents = {k: (desc[k].sum(0) - desc[k][j]) / (per - 1) if k == c else desc[k].mean(0) for k in classes}
            pred = min(cents, key=lambda k: np.linalg.norm(desc[c][j] - cents[k]))
            correct += pred == c
    assert correct / (len(classes) * per) > 3.0 / len(classes)


def test_class_schedule_distinct_and_balanced_halves():
    triples = [class_factors(c) for c in range(max_demo_classes())]
    assert len(set(triples)) == len(triples)
    names = [class_name(c) for c in range(64)]
    assert names == sorted(names) and len(set(names)) == 64
    assert all(re.fullmatch(r"c\d{3}_[a-z]+_[a-z]+_[a-z]+", n) for n in names)
    first64 = triples[:64]
    assert len({(s, t) for s, t, _ in first64}) == 64  # every (shape, texture) pair once
    # train half and test half contain every factor value (only in different combinations)
    for half in (first64[:32], first64[32:]):
        assert {s for s, _, _ in half} == set(SHAPES)
        assert {t for _, t, _ in half} == set(TEXTURES)
        assert {lay for _, _, lay in half} == set(LAYOUTS)
    with pytest.raises(ValueError):
        class_factors(max_demo_classes())


# --------------------------------------------------------------------------- dataset on disk
def test_generate_counts_folders_and_manifest(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", num_classes=6, images_per_class=3, image_size=32, seed=1)
    assert root == tmp_path / "demo"
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    assert [d.name for d in dirs] == [class_name(c) for c in range(6)]
    for d in dirs:
        files = sorted(p.name for p in d.iterdir())
        assert files == ["000.png", "001.png", "002.png"]
        with Image.open(d / "001.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["num_classes"] == 6 and manifest["images_per_class"] == 3
    assert manifest["image_size"] == 32 and manifest["seed"] == 1
    # files on disk are exactly the rendered images
    with Image.open(dirs[4] / "002.png") as im:
        assert np.array_equal(_px(im), _px(render_class_image(4, 2, 32, 1)))


def test_generate_is_deterministic_bytes(tmp_path):
    kw = dict(num_classes=3, images_per_class=2, image_size=32, seed=5)
    a = generate_demo_dataset(tmp_path / "a", **kw)
    b = generate_demo_dataset(tmp_path / "b", **kw)
    c = generate_demo_dataset(tmp_path / "c", **{**kw, "seed": 6})
    for cls in range(3):
        for j in range(2):
            rel = f"{class_name(cls)}/{j:03d}.png"
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
            assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_generate_idempotent_no_rewrite(tmp_path):
    kw = dict(num_classes=3, images_per_class=2, image_size=32, seed=0)
    root = generate_demo_dataset(tmp_path, **kw)
    files = sorted(root.rglob("*.png")) + [root / MANIFEST_NAME]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert generate_demo_dataset(str(tmp_path), **kw) == root
    assert {p: p.stat().st_mtime_ns for p in files} == stamps


def test_generate_repairs_incomplete_and_replaces_stale(tmp_path):
    kw = dict(num_classes=4, images_per_class=3, image_size=32, seed=0)
    root = generate_demo_dataset(tmp_path, **kw)
    missing = root / class_name(2) / "001.png"
    missing.unlink()
    generate_demo_dataset(root, **kw)
    assert missing.is_file()
    # other parameters: stale class folders / images of the old generation disappear
    (root / "notes.txt").write_text("keep me")
    generate_demo_dataset(root, num_classes=2, images_per_class=2, image_size=32, seed=0)
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == [class_name(0), class_name(1)]
    assert sorted(p.name for p in (root / class_name(0)).iterdir()) == ["000.png", "001.png"]
    assert (root / "notes.txt").read_text() == "keep me"
    assert json.loads((root / MANIFEST_NAME).read_text())["num_classes"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_classes=1), "num_classes must be >= 2"),
        (dict(num_classes=0), "num_classes must be >= 2"),
        (dict(images_per_class=1), "images_per_class must be >= 2"),
        (dict(num_classes=10_000), "num_classes must be <="),
        (dict(image_size=8), "image_size must be >= 16"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # validation happens before touching the disk
