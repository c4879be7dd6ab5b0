"""Reading datasets from disk: generic class folders, list files, the demo data and the DML benchmarks.

Every reader returns candidate items ``(path, class name, split or None, where listed)``; :func:`build_splits`
then drops unreadable / missing files (each one reported in ``Splits.problems``), assigns unsplit classes by
``data.train_ratio``, numbers the classes of every split from 0 and carves the validation split.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptdml.files import os_reason
from promptdml.registry import DATASETS, DatasetSpec

from .images import IMAGE_EXTENSIONS, find_bad_images, is_image_file
from .records import (
    DataError,
    ImageRecords,
    Splits,
    _natural_key,
    carve_val,
    records_from_pairs,
    split_classes,
)

__all__ = ["build_splits", "default_cache_dir", "DATASETS", "Candidate", "Listing"]

log = logging.getLogger("promptdml.data")

_MAX_LOGGED = 20
_EXTS = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))


@dataclass
class Candidate:
    """One image a reader lists: its path, its class name and its split (None: split by class order)."""

    path: str
    cls: str
    split: str | None = None
    source: str = ""
    """'<file>:<line>' for items listed in an annotation file"""


@dataclass
class Listing:
    """What a dataset reader returns: the candidate images under ``root`` and the problems met listing them."""

    items: list[Candidate]
    root: str
    problems: list[str] = field(default_factory=list)
    class_dir: Callable[[str], str] | None = None
    """class name -> what to name in messages (a folder path)"""
    kind: str = ""
    layout: str = ""


def default_cache_dir() -> Path:
    """``$PROMPTDML_CACHE`` or ``~/.cache/promptdml``."""
    env = os.environ.get("PROMPTDML_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptdml"


# --------------------------------------------------------------------------------------------- helpers
def _need_root(cfg, what: str) -> Path:
    if not str(cfg.root).strip():
        raise DataError(f"data.root is empty; set it to {what} (e.g. --set data.root=/path/to/data)")
    return Path(cfg.root).expanduser().absolute()


def _scandir(folder: str, problems: list[str], what: str = "folder") -> list[os.DirEntry] | None:
    """The entries of ``folder`` sorted by name, or None (reported in ``problems``) when it cannot be read."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        problems.append(f"cannot read {what} '{folder}' ({os_reason(e)}); the images in it are left out. "
                        f"Fix its permissions (e.g. chmod -R u+rX) or move it out of the dataset.")
        return None


def _is_dir(entry: os.DirEntry, problems: list[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for a broken link
    except OSError as e:
        problems.append(f"cannot read '{entry.path}' ({os_reason(e)}); left out")
        return False


def _owner(real: str, owners: dict[str, str]) -> str | None:
    """The class folder (by real path) that holds ``real``, if any."""
    p = real
    while True:
        if p in owners:
            return owners[p]
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _images_under(folder: Path, cls: str, owners: dict[str, str], visited: dict[str, str],
                  problems: list[str]) -> list[str]:
    """Image files below ``folder`` (recursive, hidden entries skipped, sorted; files before sub-folders).

    Symbolic links are followed, but every real folder is scanned once: a link back to the data root or one
    of its parents (a loop), to a folder already scanned, or into another class's folder is reported in
    ``problems`` and not followed. Folders that cannot be read are reported, not skipped silently.
    """
    out: list[str] = []
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in visited:
            problems.append(f"folder '{current}' is the same folder as '{visited[real]}' (a symbolic link loop "
                            f"or a second link to it); not scanned twice. Remove the link.")
            continue
        owner = _owner(real, owners)
        if owner is None or owner != cls:
            target = "the data root or a folder above it" if owner is None else f"the folder of class '{owner}'"
            problems.append(f"folder '{current}' in class '{cls}' is a symbolic link to {target} ('{real}'); "
                            f"not followed, so no image is counted twice or in the wrong class. Remove the link.")
            continue
        visited[real] = current
        entries = _scandir(current, problems)
        if entries is None:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if _is_dir(e, problems):
                subdirs.append(e.path)
            elif is_image_file(e.name):
                out.append(e.path)
        stack.extend(reversed(subdirs))
    return out


def _class_folders(root: Path, layout: str, problems: list[str],
                   keep: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """``root/<class>/**/<image>`` -> {class: [paths]}; empty or unreadable class folders are reported and ignored.

    ``keep(name)`` False: the class folder is not looked into at all (a split that is not wanted)."""
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist. Expected layout: {layout}")
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder. Expected layout: {layout}")
    scan_problems: list[str] = []
    entries = _scandir(str(root), scan_problems, "the image folder")
    if entries is None:
        raise DataError(scan_problems[0])
    by_class: dict[str, list[str]] = {}
    loose = 0
    classes = [e for e in entries if not e.name.startswith(".") and _is_dir(e, problems)]
    loose = sum(1 for e in entries if not e.name.startswith(".") and e not in classes and is_image_file(e.name))
    owners: dict[str, str] = {}
    root_real = os.path.realpath(root)
    for e in classes:
        real = os.path.realpath(e.path)
        if real in owners or _owner(root_real, {real: ""}) is not None:
            what = f"the folder of class '{owners[real]}'" if real in owners else "the data root or a folder above it"
            problems.append(f"class folder '{e.path}' is a symbolic link to {what}; ignored. Remove the link.")
            continue
        owners[real] = e.name
    visited: dict[str, str] = {}
    for e in classes:
        if owners.get(os.path.realpath(e.path)) != e.name:
            continue
        if keep is not None and not keep(e.name):
            continue
        files = _images_under(Path(e.path), e.name, owners, visited, problems)
        if files:
            by_class[e.name] = files
        elif not any(e.path in p for p in problems):
            problems.append(f"class folder '{e.path}' contains no images ({_EXTS}); ignored. "
                            f"Add images to it or delete it.")
    if loose:
        problems.append(f"{loose} image file(s) lie directly in '{root}' (not in a class sub-folder); ignored. "
                        f"Move them into <class>/ folders.")
    if not by_class:
        raise DataError(f"no class folders with images found in '{root}'. Expected layout: {layout}")
    return by_class


def _find_dataset_dir(cfg, names: tuple[str, ...], has: Callable[[Path], bool], layout: str) -> Path:
    """``<root>/<name>`` for the first name that looks right (``root`` itself is accepted too)."""
    root = _need_root(cfg, f"the data root holding {names[0]}/")
    if not root.is_dir():
        raise DataError(f"data root '{root}' does not exist or is not a folder. Expected layout: {layout}")
    candidates = [root / n for n in names] + [root]
    for d in candidates:
        if d.is_dir() and has(d):
            return d
    present = [str(d) for d in candidates[:-1] if d.is_dir()]
    detail = f" Found '{present[0]}' but its contents do not match." if present else ""
    raise DataError(f"{cfg.dataset}: no dataset found under data root '{root}'.{detail} Expected layout: {layout}")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1").splitlines()
    except OSError as e:
        raise DataError(f"cannot read annotation file '{path}': {e}") from None


def _pick_base(rel_paths: list[str], bases: list[Path]) -> Path:
    """The candidate folder under which most of the first listed paths exist."""
    bases = [b for b in bases if b.is_dir()]
    if not bases:
        raise DataError("no image folder found")
    sample = rel_paths[:: max(1, len(rel_paths) // 25)][:25]
    scores = [sum((b / p).exists() for p in sample) for b in bases]
    return bases[int(np.argmax(scores))]


# --------------------------------------------------------------------------------------------- generic
_FOLDER_LAYOUT = "<root>/<class name>/<image> (images found recursively; one sub-folder per class)"


def _read_folder(cfg, with_test: bool = True, progress: bool = False, root: Path | None = None) -> Listing:
    root = root if root is not None else _need_root(cfg, "the folder holding one sub-folder per class")
    problems: list[str] = []
    by_class = _class_folders(root, _FOLDER_LAYOUT, problems)
    items = [Candidate(p, c) for c, ps in by_class.items() for p in ps]
    return Listing(items, str(root), problems, class_dir=lambda c: str(root / c))


def _read_demo(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    try:
        from .synthetic import generate_demo_dataset
    except ImportError as e:  # pragma: no cover - the generator ships with the package
        raise DataError(f"the demo data generator is unavailable ({e}); use data.dataset=folder") from None
    root = Path(cfg.root).expanduser() if str(cfg.root).strip() else default_cache_dir() / "demo"
    root = root.absolute()
    try:
        generate_demo_dataset(root, num_classes=cfg.demo_classes, images_per_class=cfg.demo_images_per_class,
                              image_size=cfg.demo_image_size, seed=0, progress=progress)
    except ValueError as e:
        raise DataError(f"demo data: {e} (data.demo_classes / data.demo_images_per_class / "
                        f"data.demo_image_size)") from None
    except OSError as e:
        raise DataError(f"cannot write the demo data to '{root}': {e}. Set data.root to a writable folder "
                        f"or PROMPTDML_CACHE.") from None
    return _read_folder(cfg, with_test, root=root)


_SPLIT_VALUES = ("train", "test", "query", "gallery")
_HEADER_PATH = {"path", "file", "filename", "file_name", "image", "image_path", "img", "filepath"}


def _read_csv(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    path = _need_root(cfg, "the list file (rows: path,label[,split])")
    if path.is_dir():
        raise DataError(f"data.root '{path}' is a folder, but data.dataset=csv needs a list file with rows "
                        f"'path,label[,split]'. For one sub-folder per class use data.dataset=folder.")
    if not path.is_file():
        raise DataError(f"list file '{path}' does not exist. data.dataset=csv expects a file with rows "
                        f"'path,label[,split]' (paths relative to the file's folder).")
    base = path.parent
    text = _read_lines(path)
    items: list[Candidate] = []
    has_split: bool | None = None
    first = True
    for lineno, row in enumerate(csv.reader(text), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if cells[0].lower() in _HEADER_PATH or (len(cells) > 1 and cells[1].lower() in ("label", "class")):
                continue
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise DataError(f"{path}:{lineno}: expected 'path,label' or 'path,label,split', got {','.join(row)!r}. "
                            f"Quote paths that contain commas.")
        split = None
        if len(cells) == 3 and cells[2]:
            split = cells[2].lower()
            if split not in _SPLIT_VALUES:
                raise DataError(f"{path}:{lineno}: split '{cells[2]}' is not one of {list(_SPLIT_VALUES)}")
        if has_split is None:
            has_split = split is not None
        elif has_split != (split is not None):
            raise DataError(f"{path}:{lineno}: give the split column on every row or on none "
                            f"(rows without it are split by class with data.train_ratio)")
        p = Path(cells[0]).expanduser()
        items.append(Candidate(str(p if p.is_absolute() else base / p), cells[1], split, f"{path}:{lineno}"))
    if not items:
        raise DataError(f"list file '{path}' has no rows; expected 'path,label[,split]' per line")
    splits = {it.split for it in items}
    if "test" in splits and splits & {"query", "gallery"}:
        raise DataError(f"{path}: use either split 'test' (test set against itself) or 'query' + 'gallery', not both")
    if splits & {"query", "gallery"} and not {"query", "gallery"} <= splits:
        raise DataError(f"{path}: split 'query' needs 'gallery' rows too (and vice versa)")
    if has_split and "train" not in splits:
        raise DataError(f"{path}: no rows with split 'train'")
    if has_split and splits == {"train"}:
        raise DataError(f"{path}: only 'train' rows; add 'test' (or 'query'/'gallery') rows or drop the split column")
    return Listing(items, str(path), [], class_dir=lambda c: f"label '{c}' in {path}")


# --------------------------------------------------------------------------------------------- benchmarks
_CUB_LAYOUT = "<root>/cub200/images/001.Black_footed_Albatross/*.jpg ... 200.Common_Yellowthroat/*.jpg"
_CUB_DIR_RE = re.compile(r"^(\d+)\.")


def _cub_images(d: Path) -> Path | None:
    for sub in (d / "images", d / "CUB_200_2011" / "images"):
        if sub.is_dir():
            return sub
    return None


def _cub_is_train(name: str) -> bool:
    m = _CUB_DIR_RE.match(name)
    return m is None or int(m.group(1)) <= 100  # misnamed folders are kept so that they are reported


def _read_cub200(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    d = _find_dataset_dir(cfg, ("cub200", "CUB_200_2011", "cub"), lambda p: _cub_images(p) is not None, _CUB_LAYOUT)
    images = _cub_images(d)
    assert images is not None
    problems: list[str] = []
    by_class = _class_folders(images, _CUB_LAYOUT, problems, keep=None if with_test else _cub_is_train)
    bad = [c for c in by_class if not _CUB_DIR_RE.match(c)]
    if bad:
        raise DataError(f"CUB class folders must be named 'NNN.Name' (e.g. 001.Black_footed_Albatross); "
                        f"in '{images}' found {bad[:5]}. Remove or rename them.")
    if len(by_class) != (200 if with_test else 100):
        expected = "200 classes" if with_test else "100 training classes (1-100)"
        problems.append(f"CUB-200-2011 has {expected}, found {len(by_class)} non-empty class folders in "
                        f"'{images}'; classes 1-100 are still used for training, 101-200 for testing.")
    items = []
    for c, ps in by_class.items():
        split = "train" if int(_CUB_DIR_RE.match(c).group(1)) <= 100 else "test"  # type: ignore[union-attr]
        items.extend(Candidate(p, c, split) for p in ps)
    return Listing(items, str(d), problems, class_dir=lambda c: str(images / c))


_CARS_LAYOUT = "<root>/cars196/images/<class name, e.g. 'Acura Integra Type R 2001'>/*.jpg (196 folders)"


def _read_cars196(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    d = _find_dataset_dir(cfg, ("cars196", "cars", "CARS196"), lambda p: (p / "images").is_dir(), _CARS_LAYOUT)
    images = d / "images"
    problems: list[str] = []
    by_class = _class_folders(images, _CARS_LAYOUT, problems)
    classes = sorted(by_class)
    n_train = len(classes) // 2
    if len(classes) != 196:
        problems.append(f"Cars196 has 196 classes, found {len(classes)} non-empty class folders in '{images}'; "
                        f"the first {n_train} (sorted by name) are used for training, the rest for testing.")
    train = set(classes[:n_train])
    items = [Candidate(p, c, "train" if c in train else "test") for c in classes for p in by_class[c]]
    return Listing(items, str(d), problems, class_dir=lambda c: str(images / c))


_SOP_LAYOUT = ("<root>/online_products/Info_Files/Ebay_train.txt + Ebay_test.txt (header 'image_id class_id "
               "super_class_id path') and the images under <root>/online_products/images/<path> (the original "
               "Stanford_Online_Products/ layout with Ebay_*.txt and bicycle_final/... at the top is accepted too)")


def _sop_list(d: Path, name: str) -> Path | None:
    for p in (d / "Info_Files" / name, d / name):
        if p.is_file():
            return p
    return None


def _read_online_products(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    d = _find_dataset_dir(cfg, ("online_products", "Stanford_Online_Products", "sop"),
                          lambda p: _sop_list(p, "Ebay_train.txt") is not None or (p / "Info_Files").is_dir(),
                          _SOP_LAYOUT)
    items: list[Candidate] = []
    rel: list[str] = []
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt"))[: 2 if with_test else 1]:
        ann = _sop_list(d, name)
        if ann is None:
            raise DataError(f"annotation file '{d / 'Info_Files' / name}' is missing. Expected layout: {_SOP_LAYOUT}")
        lines = _read_lines(ann)
        cols = {"class_id": 1, "path": 3}
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=3)
            if lineno == 1 and not parts[0].isdigit():
                header = [h.lower() for h in line.split()]
                if "class_id" not in header or "path" not in header:
                    raise DataError(f"{ann}:1: expected the header 'image_id class_id super_class_id path', got {line!r}")
                cols = {"class_id": header.index("class_id"), "path": header.index("path")}
                continue
            if len(parts) < 4 or not parts[cols["class_id"]].isdigit():
                raise DataError(f"{ann}:{lineno}: expected 'image_id class_id super_class_id path', got {line!r}")
            p = parts[cols["path"]] if cols["path"] < 3 else parts[3]
            rel.append(p.strip())
            items.append(Candidate(p.strip(), parts[cols["class_id"]], split, f"{ann}:{lineno}"))
    if not items:
        raise DataError(f"'{d}': Ebay_train.txt / Ebay_test.txt list no images")
    base = _pick_base(rel, [d / "images", d])
    for it in items:
        it.path = str(base / it.path)
    return Listing(items, str(d), [])


_INSHOP_LAYOUT = ("<root>/inshop/list_eval_partition.txt (line 1: count, line 2: 'image_name item_id "
                  "evaluation_status', then 'img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train|query|"
                  "gallery') and the images under <root>/inshop/img/...")


def _inshop_list(d: Path) -> Path | None:
    for p in (d / "list_eval_partition.txt", d / "Eval" / "list_eval_partition.txt"):
        if p.is_file():
            return p
    return None


def _read_inshop(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    d = _find_dataset_dir(cfg, ("inshop", "In-shop Clothes Retrieval Benchmark", "InShop", "in-shop"),
                          lambda p: _inshop_list(p) is not None or (p / "img").is_dir() or (p / "Img").is_dir(),
                          _INSHOP_LAYOUT)
    ann = _inshop_list(d)
    if ann is None:
        raise DataError(f"annotation file '{d / 'list_eval_partition.txt'}' is missing. Expected layout: "
                        f"{_INSHOP_LAYOUT}")
    lines = _read_lines(ann)
    problems: list[str] = []
    items: list[Candidate] = []
    declared = None
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if not s:
            continue
        if lineno == 1 and s.isdigit():
            declared = int(s)
            continue
        if lineno <= 2 and s.lower().startswith("image_name"):
            continue
        parts = s.rsplit(maxsplit=2)
        if len(parts) != 3 or parts[2].lower() not in ("train", "query", "gallery"):
            raise DataError(f"{ann}:{lineno}: expected 'image_name item_id evaluation_status' with status "
                            f"train/query/gallery, got {line!r}")
        items.append(Candidate(parts[0], parts[1], parts[2].lower(), f"{ann}:{lineno}"))
    if declared is not None and declared != len(items):
        problems.append(f"{ann}: line 1 declares {declared} images but {len(items)} are listed")
    if not items:
        raise DataError(f"{ann} lists no images. Expected layout: {_INSHOP_LAYOUT}")
    base = _pick_base([it.path for it in items], [ann.parent, d, d / "Img"])
    for it in items:
        it.path = str(base / it.path)
    return Listing(items, str(d), problems)


_INAT_LAYOUT = ("<root>/inaturalist/Inaturalist_train_set1.txt + Inaturalist_test_set1.txt (one path per line, "
                "e.g. train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg) and the images under "
                "<root>/inaturalist/train_val2018/<supercategory>/<species>/")


def _read_inaturalist(cfg, with_test: bool = True, progress: bool = False) -> Listing:
    names = {"train": "Inaturalist_train_set1.txt", "test": "Inaturalist_test_set1.txt"}

    def listing(p: Path, name: str) -> Path | None:
        for f in (p / name, p / "Inat_dataset_splits" / name):
            if f.is_file():
                return f
        return None

    d = _find_dataset_dir(cfg, ("inaturalist", "iNaturalist", "inat"),
                          lambda p: any(listing(p, n) for n in names.values()), _INAT_LAYOUT)
    items: list[Candidate] = []
    for split, name in names.items():
        if split != "train" and not with_test:
            continue
        ann = listing(d, name)
        if ann is None:
            raise DataError(f"annotation file '{d / name}' is missing. Expected layout: {_INAT_LAYOUT}")
        for lineno, line in enumerate(_read_lines(ann), start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if not is_image_file(s):
                first = s.split()[0]
                if is_image_file(first):
                    s = first
                elif lineno == 1:
                    continue  # a header line
                else:
                    raise DataError(f"{ann}:{lineno}: expected an image path like "
                                    f"train_val2018/Plantae/7477/<id>.jpg, got {line!r}")
            parent = Path(s).parent.parts
            if len(parent) < 2:
                raise DataError(f"{ann}:{lineno}: cannot take the class from {s!r}; expected "
                                f"<...>/<supercategory>/<species>/<image>")
            items.append(Candidate(str(d / s), f"{parent[-2]}/{parent[-1]}", split, f"{ann}:{lineno}"))
    return Listing(items, str(d), [])


_CSV_LAYOUT = "a list file with rows 'path,label[,split]', paths relative to the file's folder"

# The package's datasets (registered by name in promptdml/registry.py; a new one is one register_dataset call).
DEMO = DatasetSpec("demo", _read_demo, _FOLDER_LAYOUT, user_data=True,
                   train_classes=lambda d: round(d.demo_classes * d.train_ratio))
FOLDER = DatasetSpec("folder", _read_folder, _FOLDER_LAYOUT, user_data=True)
CSV = DatasetSpec("csv", _read_csv, _CSV_LAYOUT, user_data=True)
CUB200 = DatasetSpec("cub200", _read_cub200, _CUB_LAYOUT, train_classes=100)
CARS196 = DatasetSpec("cars196", _read_cars196, _CARS_LAYOUT, train_classes=98)
ONLINE_PRODUCTS = DatasetSpec("online_products", _read_online_products, _SOP_LAYOUT, train_classes=11318)
INSHOP = DatasetSpec("inshop", _read_inshop, _INSHOP_LAYOUT, train_classes=3997)
INATURALIST = DatasetSpec("inaturalist", _read_inaturalist, _INAT_LAYOUT, train_classes=5690)


# --------------------------------------------------------------------------------------------- assembly
def _report(problems: list[str], new: list[str]) -> None:
    for i, msg in enumerate(new):
        if i < _MAX_LOGGED:
            log.warning(msg)
        elif i == _MAX_LOGGED:
            log.warning("... and %d more data problems (see `promptdml data check`)", len(new) - _MAX_LOGGED)
    problems.extend(new)


def _drop_bad(raw: Listing, check_images: str, problems: list[str], progress: bool = False) -> list[Candidate]:
    bad = find_bad_images([it.path for it in raw.items], check_images, progress=progress)
    if len(raw.items) >= 10 and len(bad) > len(raw.items) // 2:
        i, reason = min(bad.items())
        it = raw.items[i]
        listed = f" (listed in {it.source})" if it.source else ""
        raise DataError(f"{len(bad)} of {len(raw.items)} images of the {raw.kind or 'dataset'} at '{raw.root}' are "
                        f"missing or unreadable, e.g. '{it.path}'{listed}: {reason}. The images are probably not "
                        f"where the layout expects them{': ' + raw.layout if raw.layout else ''}.")
    msgs = []
    for i, reason in sorted(bad.items()):
        it = raw.items[i]
        if it.source:
            fix = "restore the file or delete its line" if "not found" in reason else "replace the file or delete its line"
            msgs.append(f"skipped '{it.path}' (listed in {it.source}): {reason}; {fix}")
        else:
            msgs.append(f"skipped '{it.path}': {reason}; replace or delete the file")
    _report(problems, msgs)
    return [it for i, it in enumerate(raw.items) if i not in bad]


def _describe(it: Candidate) -> str:
    return f"'{it.path}'" + (f" ({it.source})" if it.source else "") + (f" [{it.split}]" if it.split else "")


def _check_duplicates(raw: Listing) -> None:
    """Every real file (symbolic links resolved) may appear once: a duplicate counts an image twice, and a file
    in two splits (or two classes that end up in different splits) puts test images into training."""
    seen: dict[str, int] = {}
    dupes: list[tuple[int, int]] = []
    for i, it in enumerate(raw.items):
        real = os.path.realpath(it.path)
        j = seen.setdefault(real, i)
        if j != i:
            dupes.append((j, i))
    if not dupes:
        return
    cross = [(a, b) for a, b in dupes if raw.items[a].split != raw.items[b].split]
    shown = (cross or dupes)[:10]
    lines = "\n  ".join(f"{_describe(raw.items[a])} and {_describe(raw.items[b])}" +
                        (f" (classes '{raw.items[a].cls}' and '{raw.items[b].cls}')"
                         if raw.items[a].cls != raw.items[b].cls else "") for a, b in shown)
    more = f"\n  ... and {len(cross or dupes) - len(shown)} more" if len(cross or dupes) > len(shown) else ""
    if cross:
        raise DataError(f"{len(cross)} file(s) of the {raw.kind} dataset at '{raw.root}' are in two splits (a test "
                        f"image seen in training inflates every metric):\n  {lines}{more}\nKeep each file in "
                        f"one split only (delete or fix the duplicate rows / links).")
    raise DataError(f"{len(dupes)} file(s) of the {raw.kind} dataset at '{raw.root}' appear twice (the same file, "
                    f"symbolic links resolved; a duplicate counts an image twice and inflates the metrics):\n  "
                    f"{lines}{more}\nDelete the duplicate rows / links.")


def _warn_same_content(splits: Splits, problems: list[str]) -> None:
    """Warn about training and evaluation images with identical bytes (copies of one photo under two names).

    Only files of equal size are hashed, so this costs one ``stat`` per image plus a read of the few
    candidates."""
    from promptdml.files import sha256_file

    train = [p for rec in (splits.train, splits.val) if rec is not None for p in rec.paths]
    evals = [p for rec in (splits.test, splits.query, splits.gallery) if rec is not None for p in rec.paths]

    def sizes(paths: list[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        for p in paths:
            try:
                out[os.path.getsize(p)].append(p)
            except OSError:
                pass
        return out

    a, b = sizes(train), sizes(evals)
    found: list[str] = []
    for size in sorted(set(a) & set(b)):
        digests: dict[str, str] = {}
        for p in a[size]:
            try:
                digests.setdefault(sha256_file(p), p)
            except OSError:
                pass
        for p in b[size]:
            try:
                h = sha256_file(p)
            except OSError:
                continue
            if h in digests:
                found.append(f"training image '{digests[h]}' and evaluation image '{p}' have identical contents "
                             f"(sha256 {h[:12]}); a copy of a test image in training inflates the metrics. "
                             f"Remove one of them.")
    _report(problems, found)


def _records(items: list[Candidate], order: list[str] | None = None) -> ImageRecords:
    return records_from_pairs([it.path for it in items], [it.cls for it in items], order=order)


def _require_classes(rec: ImageRecords, split: str, where: str) -> None:
    if rec.num_classes < 2:
        raise DataError(f"{where}: the {split} split has {rec.num_classes} class(es) with readable images; at "
                        f"least 2 are needed. Check the dataset (see `promptdml data check`).")


def build_splits(cfg, check_images: str = "header", with_test: bool = True, strict: bool = True,
                 progress: bool = False) -> Splits:
    """Read ``cfg.dataset`` under ``cfg.root`` and return its :class:`Splits`.

    ``check_images``: ``"header"`` (default: file exists, non-empty, PIL recognises it), ``"full"``
    (decode every image; slow) or ``"exists"``. Files that fail are excluded and reported in
    ``Splits.problems`` (and logged). Raises :class:`DataError` with a fix for unusable data.

    ``with_test=False`` builds the training split and its validation split only (``data.val_ratio``), for
    model selection and hyper-parameter search: ``test``, ``query`` and ``gallery`` are None and their images
    are never opened or checked. Benchmarks with fixed splits do not even list them (CUB's test class
    folders, SOP's and iNaturalist's test lists are not read); the kinds split by class order (``folder``,
    ``demo``, ``csv`` without a split column, ``cars196``) list every class to number the classes, so the
    training and validation classes are exactly those of a full build.

    ``strict=False`` (``promptdml data check``): problems that would stop training but still leave splits to
    report (training classes with a single image) are listed in ``Splits.blocking`` instead of raised.
    ``progress``: progress bars for the demo data generation and the image checks.
    """
    kind = str(cfg.dataset)
    if kind not in DATASETS:
        raise DataError(f"unknown data.dataset '{kind}'; choose one of {list(DATASETS)}")
    spec: DatasetSpec = DATASETS.get(kind)
    raw = spec.read(cfg, with_test, progress)
    raw.kind = raw.kind or kind
    raw.layout = raw.layout or spec.layout
    problems: list[str] = []
    blocking: list[str] = []
    _report(problems, raw.problems)
    _check_duplicates(raw)
    where = f"{kind} dataset at '{raw.root}'"
    by_class = bool(raw.items) and raw.items[0].split is None
    if by_class:  # split by class: the listed classes, in sorted order
        _assign_split_by_class(raw.items, float(cfg.train_ratio), where)
    if not with_test:  # the other splits' images are never checked nor read
        raw.items = [it for it in raw.items if it.split == "train"]
    items = _drop_bad(raw, check_images, problems, progress)
    if not items:
        raise DataError(f"{where}: no readable images (see the problems above)")

    groups: dict[str, list[Candidate]] = defaultdict(list)
    for it in items:
        groups[it.split].append(it)  # type: ignore[index]
    if not groups.get("train"):
        raise DataError(f"{where}: no readable training images")
    train = _records(groups["train"])
    test = query = gallery = None
    if not with_test:
        pass
    elif "query" in groups or "gallery" in groups:
        q, g = groups.get("query", []), groups.get("gallery", [])
        if not q or not g:
            raise DataError(f"{where}: the query/gallery protocol needs readable images in both query and gallery")
        joint = sorted({it.cls for it in q + g}, key=_natural_key)  # one id space for query and gallery
        query, gallery = _records(q, joint), _records(g, joint)
        no_query = query.num_classes - len(np.unique(query.labels))
        if no_query:
            problems.append(f"{where}: {no_query} of {query.num_classes} query/gallery ids have gallery "
                            f"images only (no query)")
        _require_classes(gallery, "gallery", where)
    else:
        if not groups.get("test"):
            raise DataError(f"{where}: no readable test images")
        test = _records(groups["test"])
        _require_classes(test, "test", where)

    lost = {(it.split, it.cls) for it in raw.items} - {(it.split, it.cls) for it in items}
    if lost:
        _report(problems, [f"class '{c}'{f' ({sp} split)' if sp and not by_class else ''} lost all its images to "
                           f"the problems above; it is left out"
                           for sp, c in sorted(lost, key=lambda x: (x[0] or '', x[1]))])

    train, val = carve_val(train, float(getattr(cfg, "val_ratio", 0.0)))
    _require_classes(train, "train", where)

    counts = train.class_counts()
    single = [train.class_names[c] for c in np.flatnonzero(counts < 2)]
    if single:
        name = raw.class_dir or (lambda c: f"'{c}'")
        shown = ", ".join(name(c) for c in single[:10]) + (f" and {len(single) - 10} more" if len(single) > 10 else "")
        msg = (f"{len(single)} training class(es) have a single image and cannot form a positive pair: {shown}. "
               f"Add images to them or remove them")
        if spec.user_data:
            if strict:
                raise DataError(msg + ".")
            blocking.append(msg + ".")
        else:
            _report(problems, [msg + " (kept: the sampler repeats the image with augmentation)."])

    # data.cache: the training images are served from a decoded-image cache (ImageDataset builds it)
    train.cache = str(getattr(cfg, "cache", "none") or "none")
    splits = Splits(train=train, test=test, query=query, gallery=gallery, val=val, problems=problems,
                    name=kind, root=raw.root, blocking=blocking)
    _warn_same_content(splits, problems)
    return splits


def _assign_split_by_class(items: list[Candidate], train_ratio: float, where: str) -> None:
    """Unsplit items: the first ``round(train_ratio * C)`` of the sorted listed classes train, the rest test.

    Decided on the listed classes, before any image is checked, so that a build without the test split
    (``with_test=False``) has exactly the training classes of a full one."""
    train_classes, _ = split_classes(sorted({it.cls for it in items}, key=_natural_key), train_ratio, where)
    keep = set(train_classes)
    for it in items:
        it.split = "train" if it.cls in keep else "test"
