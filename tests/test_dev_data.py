"""The glyph dev dataset builder (benchmarks/dev_data.py) on tiny fonts generated here with fontTools."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fontTools")
from fontTools.fontBuilder import FontBuilder  # noqa: E402
from fontTools.pens.ttGlyphPen import TTGlyphPen  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dev_data  # noqa: E402


def _rect(pen: TTGlyphPen, x0: int, y0: int, x1: int, y1: int) -> None:
    pen.moveTo((x0, y0))
    pen.lineTo((x0, y1))
    pen.lineTo((x1, y1))
    pen.lineTo((x1, y0))
    pen.closePath()


def make_font(path: Path, shapes: dict[int, list[tuple[int, int, int, int]]]) -> Path:
    """A TrueType font mapping each code point to the union of the given rectangles (empty list = a glyph
    without ink)."""
    names = [".notdef"] + [f"uni{cp:04X}" for cp in shapes]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({cp: f"uni{cp:04X}" for cp in shapes})
    glyphs = {}
    for name, rects in [(".notdef", [(50, 0, 450, 700)])] + [(f"uni{cp:04X}", r) for cp, r in shapes.items()]:
        pen = TTGlyphPen(None)
        for r in rects:
            _rect(pen, *r)
        glyphs[name] = pen.glyph()
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": path.stem, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=880, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(str(path))
    return path


@pytest.fixture
def fonts(tmp_path):
    d = tmp_path / "fonts"
    d.mkdir()
    bar, block = [(100, 100, 900, 300)], [(200, 100, 500, 800)]
    make_font(d / "a.ttf", {0x4E00: bar, 0x4E01: block, 0x4E02: []})           # U+4E02: no ink
    make_font(d / "b.ttf", {0x4E00: block + bar, 0x4E01: block, 0x4E03: bar})  # U+4E01 identical to a's
    make_font(d / "c.ttf", {0x4E00: [(300, 0, 700, 880)], 0x4E03: block})
    return d


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_faces_and_cmap_coverage(fonts):
    faces = dev_data.list_faces(fonts)
    assert [f.path.name for f in faces] == ["a.ttf", "b.ttf", "c.ttf"]
    cps = range(0x4E00, 0x4E10)
    assert dev_data.face_codepoints(faces[0], cps) == {0x4E00, 0x4E01, 0x4E02}
    assert dev_data.face_codepoints(faces[2], cps) == {0x4E00, 0x4E03}  # never a fallback for U+4E01


def test_only_code_points_with_enough_distinct_inked_renderings(fonts, tmp_path):
    faces = dev_data.list_faces(fonts)
    kw = dict(per_class=2, min_faces=2, seed=0, size=32, codepoints=range(0x4E00, 0x4E10))
    # U+4E00: 3 distinct renderings; U+4E03: 2 (b, c); U+4E01: a == b -> 1 distinct; U+4E02: no ink, one face
    manifest = dev_data.build_glyphs_from_faces(faces, tmp_path / "ds", classes=2, **kw)
    assert manifest["images"] == 4
    classes = sorted(p.name for p in (tmp_path / "ds").iterdir() if p.is_dir())
    assert classes == ["19968", "19971"]
    assert sorted(p.name for p in (tmp_path / "ds" / "19971").iterdir()) == ["001.png", "002.png"]
    with pytest.raises(RuntimeError, match="only 2 code points"):
        dev_data.build_glyphs_from_faces(faces, tmp_path / "ds3", classes=3, **kw)


def test_images_are_black_glyphs_on_white_padded_square(fonts, tmp_path):
    from PIL import Image

    faces = dev_data.list_faces(fonts)
    dev_data.build_glyphs_from_faces(faces, tmp_path / "ds", classes=1, per_class=3, min_faces=3, seed=0,
                                     size=40, codepoints=[0x4E00])
    for p in (tmp_path / "ds" / "19968").iterdir():
        img = Image.open(p)
        assert img.size == (40, 40)
        lo, hi = img.convert("L").getextrema()
        assert lo < 40 and hi == 255
        px = img.convert("L").load()
        assert all(px[x, y] == 255 for x, y in ((0, 0), (39, 0), (0, 39), (39, 39)))  # margin all round


def test_build_is_deterministic_and_fewshot_keeps_the_test_half(fonts, tmp_path):
    faces = dev_data.list_faces(fonts)
    kw = dict(classes=2, per_class=2, min_faces=2, seed=3, size=32, codepoints=range(0x4E00, 0x4E10))
    dev_data.build_glyphs_from_faces(faces, tmp_path / "one", **kw)
    dev_data.build_glyphs_from_faces(faces, tmp_path / "two", **kw)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")

    info = dev_data.build_fewshot(tmp_path / "one", tmp_path / "1shot", shots=1, seed=0)
    assert info["train_classes"] == 1 and info["train_images"] == 1
    assert len(list((tmp_path / "1shot" / "19968").iterdir())) == 1        # train half: 1 image
    assert _tree(tmp_path / "1shot" / "19971") == _tree(tmp_path / "one" / "19971")  # test half unchanged
    assert json.loads((tmp_path / "1shot" / "fewshot.json").read_text())["chosen"]["19968"] == \
        info["chosen"]["19968"]
