"""Contact sheets (PNG, one per query) and an HTML page for looking at search results.

Both carry the images they show: the sheets are pictures, and the page embeds a JPEG thumbnail of every image
(``data:`` URIs), so the page keeps working when its folder is moved or the images are gone. Every caption
names the image's class (its label, or the name of its parent folder) and, when the query's class is known,
marks each neighbour as a hit (same class) or a miss.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

from promptdml.data import load_rgb
from promptdml.files import atomic_write, atomic_write_text

__all__ = ["contact_sheet", "write_html", "sheet_name", "class_of"]

_BG = (255, 255, 255)
_TEXT = (20, 20, 20)
_QUERY_FRAME = (30, 110, 220)
_HIT = (20, 140, 40)
_MISS = (200, 30, 30)


def sheet_name(position: int, query_path: str) -> str:
    """``query_0003_<stem>.png`` (stem reduced to safe characters)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(query_path).stem)[:40] or "query"
    return f"query_{position:04d}_{stem}.png"


def class_of(path: str, label: str | None = None) -> str:
    """The class shown for an image: its stored label, else the name of its parent folder."""
    return str(label) if label not in (None, "") else Path(path).parent.name


def _thumbnail(path: str, size: int) -> tuple[Image.Image, bool]:
    """A ``size`` x ``size`` tile of the image (aspect kept) and whether the image could be read."""
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        img = load_rgb(path)
    except Exception:  # noqa: BLE001 - a missing / broken neighbour still gets a tile
        ImageDraw.Draw(tile).text((6, size // 2 - 6), "unreadable", fill=(160, 0, 0), font=_font())
        return tile, False
    img = ImageOps.contain(img, (size, size), Image.Resampling.BICUBIC)  # fit the tile, keep the aspect
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile, True


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _fit(text: str, width_chars: int) -> str:
    return text if len(text) <= width_chars else "..." + text[-(width_chars - 3):]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill, font) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font)
    except UnicodeError:  # the bitmap fallback font only has latin-1
        draw.text(xy, text.encode("ascii", "replace").decode(), fill=fill, font=font)


def _neighbour(nb: Sequence[Any]) -> tuple[str, float, str | None, bool | None]:
    """(path, score[, label[, hit]]) -> all four fields."""
    path, score = nb[0], nb[1]
    label = nb[2] if len(nb) > 2 else None
    hit = nb[3] if len(nb) > 3 else None
    return str(path), float(score), label, hit


def contact_sheet(query: str, neighbours: Sequence[Sequence[Any]], out: str | os.PathLike,
                  thumb: int = 160, query_label: str | None = None, unreadable: list[str] | None = None) -> Path:
    """One row: the query image, then its neighbours in rank order; under each tile its rank and score (with a
    hit/miss mark when the query's class is known), its class and its file name. ``neighbours`` holds
    ``(path, score[, label[, hit]])``. Paths that cannot be read are drawn as 'unreadable' tiles and appended
    to ``unreadable``. Written as PNG to ``out``."""
    pad, text_h = 8, 48
    n = 1 + len(neighbours)
    sheet = Image.new("RGB", (pad + n * (thumb + pad), pad + thumb + text_h), _BG)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    chars = max(8, thumb // 6)
    tiles = [(query, "query", class_of(query, query_label), None)]
    for r, nb in enumerate(neighbours, 1):
        path, score, label, hit = _neighbour(nb)
        mark = "" if hit is None else ("  hit" if hit else "  MISS")
        tiles.append((path, f"#{r}  {score:.4f}{mark}", class_of(path, label), hit))
    for i, (path, label, cls, hit) in enumerate(tiles):
        x = pad + i * (thumb + pad)
        tile, ok = _thumbnail(path, thumb)
        if not ok and unreadable is not None:
            unreadable.append(path)
        sheet.paste(tile, (x, pad))
        frame = _QUERY_FRAME if i == 0 else (None if hit is None else (_HIT if hit else _MISS))
        if frame is not None:
            draw.rectangle([x - 3, pad - 3, x + thumb + 2, pad + thumb + 2], outline=frame, width=3)
        _text(draw, (x, pad + thumb + 4), label, _TEXT if hit is None else frame, font)
        _text(draw, (x, pad + thumb + 18), _fit(cls, chars), (40, 40, 40), font)
        _text(draw, (x, pad + thumb + 32), _fit(Path(path).name, chars), (90, 90, 90), font)
    return atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"), fsync=False)


def _data_uri(path: str, size: int = 160) -> tuple[str, bool]:
    """A JPEG thumbnail of the image as a ``data:`` URI (an 'unreadable' tile if it cannot be read)."""
    tile, ok = _thumbnail(path, size)
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ok


def _file_uri(path: str) -> str:
    try:
        return Path(path).resolve().as_uri()
    except ValueError:  # pragma: no cover - a path that cannot be made absolute
        return quote(path)


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
.q{margin-bottom:2em;border-bottom:1px solid #ddd;padding-bottom:1em}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px;word-break:break-all}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
figure.query img{outline:3px solid #1e6edc}
figure.hit img{outline:3px solid #148c28}figure.miss img{outline:3px solid #c81e1e}
.hit .mark{color:#148c28;font-weight:bold}.miss .mark{color:#c81e1e;font-weight:bold}
.cls{color:#444}.score{font-weight:bold}.err{color:#a00}"""


def write_html(out_dir: str | os.PathLike, results: Sequence[dict[str, Any]],
               errors: Sequence[tuple[str, str]] = (), title: str = "promptdml search",
               unreadable: list[str] | None = None) -> Path:
    """``out_dir/index.html``: per query the query image and its neighbours as embedded thumbnails (each a link
    to the original file), with rank, score, class and a hit/miss mark when ``result["query_label"]`` is
    known, plus a link to its contact sheet (``result["sheet"]``, relative to ``out_dir``). Images that cannot
    be read are appended to ``unreadable``."""
    out_dir = Path(out_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for res in results:
        q = res["query"]
        qlabel = res.get("query_label")
        head = html.escape(f"{class_of(q, qlabel)}/{Path(q).name}")
        pred = res.get("predicted_label")
        if pred is not None:
            verdict = "" if qlabel is None else (" (correct)" if pred == qlabel else " (wrong)")
            head += f" &middot; predicted class: {html.escape(str(pred))}{verdict}"
        parts.append(f"<div class='q'><h2>{head}</h2>")
        if res.get("sheet"):
            parts.append(f"<p><a href='{quote(res['sheet'])}'>contact sheet</a> · "
                         f"<span title='{html.escape(q)}'>{html.escape(q)}</span></p>")
        parts.append("<div class='row'>")
        src, ok = _data_uri(q)
        if not ok and unreadable is not None:
            unreadable.append(q)
        parts.append(f"<figure class='query'><a href='{_file_uri(q)}'><img src='{src}' alt='query'></a>"
                     f"<figcaption>query<br><span class='cls'>{html.escape(class_of(q, qlabel))}</span><br>"
                     f"{html.escape(Path(q).name)}</figcaption></figure>")
        for nb in res["neighbors"]:
            src, ok = _data_uri(nb["path"])
            if not ok and unreadable is not None:
                unreadable.append(nb["path"])
            hit = nb.get("hit")
            kind = "" if hit is None else (" class='hit'" if hit else " class='miss'")
            mark = "" if hit is None else f" <span class='mark'>{'✓ hit' if hit else '✗ miss'}</span>"
            parts.append(f"<figure{kind}><a href='{_file_uri(nb['path'])}'><img src='{src}' alt='#{nb['rank']}'>"
                         f"</a><figcaption>#{nb['rank']} <span class='score'>{nb['score']:.4f}</span>{mark}<br>"
                         f"<span class='cls'>{html.escape(class_of(nb['path'], nb.get('label')))}</span><br>"
                         f"{html.escape(Path(nb['path']).name)}</figcaption></figure>")
        parts.append("</div></div>")
    if errors:
        parts.append("<h2 class='err'>Unreadable queries</h2><ul>")
        parts += [f"<li class='err'>{html.escape(p)}: {html.escape(r)}</li>" for p, r in errors]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return atomic_write_text(out_dir / "index.html", "\n".join(parts))
