"""Contact sheets (PNG, one per query) and an HTML page for looking at search results."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

from promptdml.data import load_rgb

__all__ = ["contact_sheet", "write_html", "sheet_name"]

_BG = (255, 255, 255)
_TEXT = (20, 20, 20)
_QUERY_FRAME = (30, 110, 220)


def sheet_name(position: int, query_path: str) -> str:
    """``query_0003_<stem>.png`` (stem reduced to safe characters)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(query_path).stem)[:40] or "query"
    return f"query_{position:04d}_{stem}.png"


def _thumbnail(path: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        img = load_rgb(path)
    except Exception:  # noqa: BLE001 - a missing / broken neighbour still gets a tile
        ImageDraw.Draw(tile).text((6, size // 2 - 6), "unreadable", fill=(160, 0, 0), font=_font())
        return tile
    img = ImageOps.contain(img, (size, size), Image.Resampling.BICUBIC)  # fit the tile, keep the aspect
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _fit(text: str, width_chars: int) -> str:
    return text if len(text) <= width_chars else "..." + text[-(width_chars - 3):]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill, font) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font)
    except UnicodeError:  # the bitmap fallback font only has latin-1
        draw.text(xy, text.encode("ascii", "replace").decode(), fill=fill, font=font)


def contact_sheet(query: str, neighbours: Sequence[tuple[str, float]], out: str | os.PathLike,
                  thumb: int = 160) -> Path:
    """One row: the query image, then its neighbours in rank order; under each tile its rank, score and
    file name. Written as PNG to ``out``."""
    pad, text_h = 8, 34
    n = 1 + len(neighbours)
    sheet = Image.new("RGB", (pad + n * (thumb + pad), pad + thumb + text_h), _BG)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    chars = max(8, thumb // 6)
    tiles = [(query, "query", None)] + [(p, f"#{r}  {s:.4f}", s) for r, (p, s) in enumerate(neighbours, 1)]
    for i, (path, label, _) in enumerate(tiles):
        x = pad + i * (thumb + pad)
        sheet.paste(_thumbnail(path, thumb), (x, pad))
        if i == 0:
            draw.rectangle([x - 3, pad - 3, x + thumb + 2, pad + thumb + 2], outline=_QUERY_FRAME, width=3)
        _text(draw, (x, pad + thumb + 4), label, _TEXT, font)
        _text(draw, (x, pad + thumb + 18), _fit(Path(path).name, chars), (90, 90, 90), font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _href(target: str, base: Path) -> str:
    """A relative link from ``base`` to ``target`` (absolute file URL if no relative path exists)."""
    target_abs = Path(target).resolve()
    try:
        rel = os.path.relpath(target_abs, base.resolve())
    except ValueError:  # another drive on Windows
        return target_abs.as_uri()
    return quote(Path(rel).as_posix())


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
.q{margin-bottom:2em;border-bottom:1px solid #ddd;padding-bottom:1em}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px;word-break:break-all}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
figure.query img{outline:3px solid #1e6edc}
.score{font-weight:bold}.err{color:#a00}"""


def write_html(out_dir: str | os.PathLike, results: Sequence[dict[str, Any]],
               errors: Sequence[tuple[str, str]] = (), title: str = "promptdml search") -> Path:
    """``out_dir/index.html``: per query the query image and its neighbours (relative image links), scores
    and a link to its contact sheet (``result["sheet"]``, relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for res in results:
        q = res["query"]
        parts.append(f"<div class='q'><h2>{html.escape(Path(q).name)}</h2>")
        if res.get("sheet"):
            parts.append(f"<p><a href='{quote(res['sheet'])}'>contact sheet</a> · "
                         f"<span title='{html.escape(q)}'>{html.escape(q)}</span></p>")
        parts.append("<div class='row'>")
        parts.append(f"<figure class='query'><a href='{_href(q, out_dir)}'><img src='{_href(q, out_dir)}' "
                     f"alt='query'></a><figcaption>query</figcaption></figure>")
        for nb in res["neighbors"]:
            link = _href(nb["path"], out_dir)
            parts.append(f"<figure><a href='{link}'><img src='{link}' alt='#{nb['rank']}' loading='lazy'></a>"
                         f"<figcaption>#{nb['rank']} <span class='score'>{nb['score']:.4f}</span><br>"
                         f"{html.escape(Path(nb['path']).name)}</figcaption></figure>")
        parts.append("</div></div>")
    if errors:
        parts.append("<h2 class='err'>Unreadable queries</h2><ul>")
        parts += [f"<li class='err'>{html.escape(p)}: {html.escape(r)}</li>" for p, r in errors]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
