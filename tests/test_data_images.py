"""load_rgb: every odd image mode ends up as 8-bit RGB with the right size; image checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_fixtures import write_garbage, write_image, write_truncated_jpeg
from PIL import Image

from promptdml.data import image_problem, load_rgb
from promptdml.data.images import find_bad_images, is_image_file


def _check(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    return np.asarray(img)


def test_rgb_and_grayscale(tmp_path):
    _check(load_rgb(write_image(tmp_path / "a.jpg", size=(20, 10))), (20, 10))
    g = tmp_path / "g.png"
    Image.fromarray(np.full((7, 9), 77, np.uint8), "L").save(g)
    arr = _check(load_rgb(g), (9, 7))
    assert (arr == 77).all()
    b = tmp_path / "b.png"
    Image.new("1", (5, 4), 1).save(b)
    assert (_check(load_rgb(b), (5, 4)) == 255).all()


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(p, format="JPEG", quality=95)  # red in CMYK
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    arr = _check(load_rgb(p), (16, 12)).astype(int)
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60 and arr[..., 2].mean() < 60


def test_palette_with_transparency_on_white(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (10, 6), 0)
    img.putpalette([0, 0, 0] + [200, 10, 10] * 255)
    img.paste(1, (5, 0, 10, 6))  # right half colour 1 (opaque red), left half colour 0 (transparent)
    img.save(p, transparency=0)
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" in im.info
    arr = _check(load_rgb(p), (10, 6))
    assert (arr[:, :5] == 255).all()  # transparent -> white, not black
    assert tuple(arr[0, 7]) == (200, 10, 10)
    q = tmp_path / "pal_opaque.gif"
    img.save(q)
    _check(load_rgb(q), (10, 6))


def test_rgba_and_la_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((4, 6, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, :3, 3] = 0  # left transparent
    arr[:, 3:, 3] = 255
    Image.fromarray(arr, "RGBA").save(p)
    out = _check(load_rgb(p), (6, 4))
    assert (out[:, :3] == 255).all()
    assert (out[:, 3:] == (255, 0, 0)).all()
    la = tmp_path / "la.png"
    Image.fromarray(np.stack([np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA").save(la)
    assert (_check(load_rgb(la), (3, 3)) == 255).all()


def test_16bit_grayscale(tmp_path):
    p = tmp_path / "g16.png"
    a = np.full((5, 8), 65535, np.uint16)
    a[:, :4] = 0
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = _check(load_rgb(p), (8, 5))
    assert (out[:, 4:] == 255).all() and (out[:, :4] == 0).all()
    t = tmp_path / "g16.tif"
    Image.fromarray(np.full((5, 8), 32896, np.uint16)).save(t)
    assert abs(int(_check(load_rgb(t), (8, 5))[0, 0, 0]) - 128) <= 1


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(p, format="JPEG", exif=exif.tobytes())
    with Image.open(p) as im:
        assert im.size == (30, 10)
    _check(load_rgb(p), (10, 30))


def test_multiframe_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    arr = _check(load_rgb(p), (6, 6))
    assert arr[0, 0, 0] > 200


def test_load_rgb_accepts_file_objects_and_raises_on_garbage(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    buf.seek(0)
    _check(load_rgb(buf), (4, 4))
    with pytest.raises(Exception):  # noqa: B017 - PIL raises UnidentifiedImageError (an OSError)
        load_rgb(write_garbage(tmp_path / "bad.jpg"))


def test_image_problem_levels(tmp_path):
    good = write_image(tmp_path / "ok.png")
    assert image_problem(good) is None and image_problem(good, full=True) is None
    assert "not found" in image_problem(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty" in image_problem(tmp_path / "empty.jpg")
    assert "unreadable" in image_problem(write_garbage(tmp_path / "bad.png"))
    trunc = write_truncated_jpeg(tmp_path / "trunc.jpg")
    assert image_problem(trunc) is None  # header fine
    assert "unreadable" in image_problem(trunc, full=True)
    paths = [str(good), str(tmp_path / "missing.png"), str(trunc)]
    assert set(find_bad_images(paths, "header")) == {1}
    assert set(find_bad_images(paths, "full")) == {1, 2}
    assert set(find_bad_images(paths * 100, "exists")) == {1 + 3 * i for i in range(100)}


def test_is_image_file():
    assert is_image_file("a/B.JPEG") and is_image_file("x.TiF") and is_image_file("ü n.webp")
    assert not is_image_file("notes.txt") and not is_image_file(".hidden.jpg")
