"""Tiny on-disk datasets in the exact layouts / annotation formats of the real ones (for the data tests).

Every ``make_*`` builder writes into a given folder and returns a :class:`Fixture` with the data root to
put in ``DataConfig.root`` and the expected ``{split: (num_classes, num_images)}``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Fixture:
    root: Path
    """what goes into DataConfig.root"""
    expected: dict[str, tuple[int, int]]
    """split -> (classes, images)"""
    extra: dict = field(default_factory=dict)


def write_image(path: Path | str, size: tuple[int, int] = (12, 10), mode: str = "RGB", seed: int | None = None) -> Path:
    """A small random image; the format follows the extension (JPEG for .jpg/.JPG, PNG, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed if seed is not None else zlib.crc32(str(path).encode()))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    if fmt == "JPEG" and mode == "RGBA":
        img = img.convert("RGB")
    img.save(path, format=fmt)
    return path


def write_seeded_classes(root: Path, classes: int = 12, per_class: int = 4) -> Path:
    """``root/cXX/NNN.png``: pixels seeded by the relative name, not the temporary path, so every run (and every
    process of a distributed test) sees the same images and float summation-order comparisons are stable."""
    for i in range(classes):
        for j in range(per_class):
            write_image(root / f"c{i:02d}" / f"{j:03d}.png", seed=zlib.crc32(f"c{i:02d}/{j}".encode()))
    return root


def write_garbage(path: Path | str, data: bytes = b"this is not an image\n" * 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_truncated_jpeg(path: Path | str, size: tuple[int, int] = (64, 48)) -> Path:
    """A JPEG whose header is intact but whose data is cut: passes the header check, fails to decode."""
    path = write_image(path, size=size)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


# --------------------------------------------------------------------------------------------- generic
def make_folder(root: Path, spec: dict[str, int], ext: str = ".png") -> Path:
    """``root/<class>/<nnn><ext>`` with ``spec[class]`` images (0 = an empty class folder)."""
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            write_image(root / cls / f"{j:03d}{ext}")
    return root


def make_folder_dataset(tmp: Path) -> Fixture:
    """8 classes (4 train / 4 test with train_ratio 0.5), nested sub-folders, odd names, mixed extensions."""
    root = tmp / "my images"
    spec = {"ant": 3, "bee": 2, "cat": 4, "dog": 2, "eel": 3, "fox": 1, "gnu": 2, "hen": 5}
    make_folder(root, spec)
    # odd names and nested folders: still the class of the top-level folder
    write_image(root / "ant" / "sub dir" / "a photo ünïcode.JPG")
    write_image(root / "bee" / "deep" / "er" / "x.webp")
    write_image(root / "cat" / "Z.TIFF")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "x.png")
    expected = {"train": (4, (3 + 1) + (2 + 1) + (4 + 1) + 2), "test": (4, 3 + 1 + 2 + 5)}
    return Fixture(root, expected)


def make_csv_dataset(tmp: Path, with_split: bool = True, query_gallery: bool = False) -> Fixture:
    base = tmp / "csvdata"
    rows = []
    names = ["img one.png", "ünï,code.png", "sub/x.jpg", "y.png"]
    classes = ["cat", "dog", "emu", "gnu", "owl", "yak"]
    for ci, c in enumerate(classes):
        for j, n in enumerate(names[: 2 + (ci % 3)]):
            rel = f"{c}/{n}"
            write_image(base / rel)
            if not with_split:
                split = None
            elif ci < 3:
                split = "train"
            elif query_gallery:
                split = "query" if j == 0 else "gallery"
            else:
                split = "test"
            rows.append((rel, c, split))
    lines = ["path,label" + (",split" if with_split else "")]
    for rel, c, split in rows:
        q = f'"{rel}"' if "," in rel else rel
        lines.append(f"{q},{c}" + (f",{split}" if split else ""))
    f = base / "list.csv"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n_train = sum(1 for r in rows if r[1] in classes[:3])
    expected = {"train": (3, n_train), "test": (3, len(rows) - n_train)}
    if query_gallery:
        expected = {"train": (3, n_train), "query": (3, 3), "gallery": (3, len(rows) - n_train - 3)}
    return Fixture(f, expected)


# --------------------------------------------------------------------------------------------- benchmarks
def make_cub200(data_root: Path) -> Fixture:
    """All 200 class folders, 2-3 images for classes 1-100 and 1-3 for 101-200 (real CUB file naming)."""
    images = data_root / "cub200" / "images"
    n_train = n_test = 0
    for i in range(1, 201):
        name = "Black_footed_Albatross" if i == 1 else ("Common_Yellowthroat" if i == 200 else f"Species_{i}")
        cls = f"{i:03d}.{name}"
        n = (2 + i % 2) if i <= 100 else (1 + i % 3)
        for j in range(n):
            write_image(images / cls / f"{name}_{j:04d}_{796111 + j}.jpg", size=(8, 8))
        if i <= 100:
            n_train += n
        else:
            n_test += n
    write_image(images / "017.Species_17" / "odd name ünï.jpg", size=(8, 8))
    n_train += 1
    return Fixture(data_root, {"train": (100, n_train), "test": (100, n_test)})


def cars_class_names() -> list[str]:
    names = ["AM General Hummer SUV 2000", "Acura Integra Type R 2001", "Aston Martin V8 Vantage Convertible 2012",
             "Ram C-V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"]
    names += [f"Make{i:03d} Model Sedan 20{i % 13:02d}" for i in range(196 - len(names))]
    return names


def make_cars196(data_root: Path) -> Fixture:
    images = data_root / "cars196" / "images"
    names = cars_class_names()
    train = set(sorted(names)[:98])
    counts = {"train": 0, "test": 0}
    for i, c in enumerate(names):
        n = 2 if c in train else 1 + i % 2
        for j in range(n):
            write_image(images / c / f"{i * 10 + j:06d}.jpg", size=(8, 8))
        counts["train" if c in train else "test"] += n
    return Fixture(data_root, {"train": (98, counts["train"]), "test": (98, counts["test"])},
                   extra={"train_classes": sorted(train)})


_SOP_SUPER = ["bicycle_final", "cabinet_final", "chair_final", "coffee_maker_final", "fan_final"]


def make_online_products(data_root: Path, original_layout: bool = False) -> Fixture:
    """Ebay_train.txt / Ebay_test.txt with the real header; 6 train classes (ids 1-6), 5 test (7-11).

    ``original_layout``: the layout of the official archive (``Stanford_Online_Products/Ebay_*.txt`` and
    ``bicycle_final/...`` at the top); otherwise the seed README's (``online_products/Info_Files/`` and
    ``online_products/images/``).
    """
    if original_layout:
        d = data_root / "Stanford_Online_Products"
        info, img_base = d, d
    else:
        d = data_root / "online_products"
        info, img_base = d / "Info_Files", d / "images"
    info.mkdir(parents=True, exist_ok=True)
    image_id = 1
    counts = {"train": 0, "test": 0}
    listed: dict[str, list[str]] = {"train": [], "test": []}
    for class_id in range(1, 12):
        split = "train" if class_id <= 6 else "test"
        sup = (class_id - 1) % len(_SOP_SUPER)
        n = 2 + class_id % 2
        for j in range(n):
            rel = f"{_SOP_SUPER[sup]}/{111085122870 + class_id}_{j}.JPG"
            write_image(img_base / rel, size=(8, 8))
            listed[split].append(f"{image_id} {class_id} {sup + 1} {rel}")
            image_id += 1
        counts[split] += n
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        (info / name).write_text("image_id class_id super_class_id path\n" + "\n".join(listed[split]) + "\n")
    (info / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    return Fixture(data_root, {"train": (6, counts["train"]), "test": (5, counts["test"])},
                   extra={"info": info, "images": img_base})


def make_inshop(data_root: Path) -> Fixture:
    """list_eval_partition.txt exactly like DeepFashion's (count line, header, padded columns).

    Train: items 1-4. Query/gallery: items 10-14; item 13 has gallery images only, item 14 query only.
    """
    d = data_root / "inshop"
    rows = []

    def add(item: int, cat: str, n: int, status: str, start: int = 1):
        for j in range(start, start + n):
            rel = f"img/{cat}/id_{item:08d}/{j:02d}_{j}_front.jpg"
            write_image(d / rel, size=(8, 8))
            rows.append((rel, f"id_{item:08d}", status))

    for item in range(1, 5):
        add(item, "WOMEN/Dresses", 2, "train")
    for item in (10, 11, 12, 14):
        add(item, "MEN/Denim", 1, "query")
    for item in (10, 11, 12, 13):
        add(item, "MEN/Denim", 2, "gallery", start=5)
    width = max(len(r[0]) for r in rows) + 10
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{r[0]:<{width}}{r[1]} {r[2]}" for r in rows]
    (d / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return Fixture(data_root, {"train": (4, 8), "query": (5, 4), "gallery": (5, 8)})


def make_inaturalist(data_root: Path) -> Fixture:
    d = data_root / "inaturalist"
    listed: dict[str, list[str]] = {"train": [], "test": []}
    species = {"train": [("Plantae", 7477), ("Plantae", 7478), ("Aves", 3001)],
               "test": [("Aves", 3002), ("Insecta", 1200), ("Fungi", 900)]}
    counts = {}
    for split, sp in species.items():
        n_img = 0
        for i, (sup, sid) in enumerate(sp):
            for j in range(2 + i % 2):
                rel = f"train_val2018/{sup}/{sid}/{zlib.crc32(f'{sid}-{j}'.encode()):08x}3b60c9486db1d2ee8.jpg"
                write_image(d / rel, size=(8, 8))
                listed[split].append(rel)
                n_img += 1
        counts[split] = (len(sp), n_img)
    (d / "Inaturalist_train_set1.txt").write_text("\n".join(listed["train"]) + "\n")
    (d / "Inaturalist_test_set1.txt").write_text("\n".join(listed["test"]) + "\n")
    return Fixture(data_root, counts, extra={"listed": listed})
