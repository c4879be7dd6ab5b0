"""The validation protocol: data.val_ratio on every dataset kind, and builds without the test split."""

from pathlib import Path

import pytest
from data_fixtures import (
    make_cars196,
    make_cub200,
    make_folder,
    make_inaturalist,
    make_inshop,
    make_online_products,
    write_garbage,
    write_image,
)

from promptdml.config import DataConfig
from promptdml.data import build_splits
from promptdml.data import sources as data_sources

KINDS = ["folder", "demo", "csv", "csv_split", "cub200", "cars196", "online_products", "inshop", "inaturalist"]


def _csv(tmp: Path, with_split: bool) -> Path:
    root = make_folder(tmp / "csvdata", {f"k{i}": 3 for i in range(8)})
    rows = ["path,label" + (",split" if with_split else "")]
    for i in range(8):
        for j in range(3):
            rows.append(f"k{i}/{j:03d}.png,k{i}" + ((",train" if i < 4 else ",test") if with_split else ""))
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root / "list.csv"


def dataset(kind: str, tmp: Path) -> DataConfig:
    """A small dataset of ``kind`` with at least 4 training classes and a validation split of 2+ classes."""
    if kind == "folder":
        return DataConfig(dataset="folder", root=str(make_folder(tmp / "f", {f"c{i:02d}": 3 for i in range(10)})),
                          val_ratio=0.4)
    if kind == "demo":
        return DataConfig(dataset="demo", root=str(tmp / "demo"), demo_classes=10, demo_images_per_class=2,
                          demo_image_size=16, val_ratio=0.4)
    if kind in ("csv", "csv_split"):
        return DataConfig(dataset="csv", root=str(_csv(tmp, kind == "csv_split")), val_ratio=0.5)
    if kind == "cub200":
        return DataConfig(dataset="cub200", root=str(make_cub200(tmp).root), val_ratio=0.2)
    if kind == "cars196":
        return DataConfig(dataset="cars196", root=str(make_cars196(tmp).root), val_ratio=0.2)
    if kind == "online_products":
        return DataConfig(dataset="online_products", root=str(make_online_products(tmp).root), val_ratio=0.34)
    if kind == "inshop":
        return DataConfig(dataset="inshop", root=str(make_inshop(tmp).root), val_ratio=0.5)
    fx = make_inaturalist(tmp)  # 3 training species: add a fourth so that 2 can be held out
    extra = [f"train_val2018/Aves/3003/{j}.jpg" for j in range(2)]
    for rel in extra:
        write_image(fx.root / "inaturalist" / rel, size=(8, 8))
    listing = fx.root / "inaturalist" / "Inaturalist_train_set1.txt"
    listing.write_text(listing.read_text() + "\n".join(extra) + "\n")
    return DataConfig(dataset="inaturalist", root=str(fx.root), val_ratio=0.5)


def _test_paths(splits) -> list[str]:
    return splits.test.paths if splits.test is not None else splits.query.paths + splits.gallery.paths


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_carves_a_class_disjoint_val_split_and_can_skip_test(kind, tmp_path, monkeypatch):
    cfg = dataset(kind, tmp_path)
    full = build_splits(cfg)
    assert full.has_test and full.val is not None and full.val.num_classes >= 2
    assert not set(full.val.class_names) & set(full.train.class_names)

    checked: list[str] = []
    real_check = data_sources.find_bad_images

    def spy(paths, mode, **kwargs):
        checked.extend(paths)
        return real_check(paths, mode, **kwargs)

    monkeypatch.setattr(data_sources, "find_bad_images", spy)
    only = build_splits(cfg, with_test=False)
    assert only.test is None and only.query is None and only.gallery is None and not only.has_test
    # exactly the training and validation classes and images of the full build
    assert (only.train.class_names, only.train.paths) == (full.train.class_names, full.train.paths)
    assert (only.val.class_names, only.val.paths) == (full.val.class_names, full.val.paths)
    test_paths = set(_test_paths(full))
    assert checked and not test_paths & set(checked)  # no test image was even checked
    assert [n for n, _ in only.named_splits()] == ["train", "val"]

    # with every test image unreadable the train-only build is unchanged and reports nothing about them
    for p in test_paths:
        write_garbage(p)
    again = build_splits(cfg, with_test=False)
    assert (again.train.paths, again.val.paths) == (only.train.paths, only.val.paths)
    assert not [m for m in again.problems if any(p in m for p in test_paths)]
    assert again.problems == only.problems


@pytest.mark.parametrize("kind", ["csv_split", "cub200", "online_products", "inshop", "inaturalist"])
def test_fixed_split_kinds_build_without_test_images_at_all(kind, tmp_path):
    """Benchmarks with fixed splits need neither the test images nor (SOP, iNaturalist) the test lists."""
    cfg = dataset(kind, tmp_path)
    full = build_splits(cfg)
    for p in _test_paths(full):
        Path(p).unlink()
    if kind == "cub200":  # the test class folders go too
        for folder in Path(full.root, "images").iterdir():
            if int(folder.name[:3]) > 100:
                folder.rmdir()
    for name in ("Info_Files/Ebay_test.txt", "Inaturalist_test_set1.txt"):
        if (Path(full.root) / name).is_file():
            (Path(full.root) / name).unlink()
    only = build_splits(cfg, with_test=False)
    assert only.problems == [] and only.test is None
    assert (only.train.paths, only.val.paths) == (full.train.paths, full.val.paths)


def test_split_by_class_is_decided_on_the_listed_classes(tmp_path):
    """A class whose images are all unreadable keeps its place in the class order, so a build without the test
    split has the same training classes as a full one."""
    root = make_folder(tmp_path / "d", {f"c{i}": 2 for i in range(8)})
    for p in (root / "c5").iterdir():
        write_garbage(p)
    full = build_splits(DataConfig(dataset="folder", root=str(root)))
    assert full.train.class_names == ["c0", "c1", "c2", "c3"]
    assert full.test.class_names == ["c4", "c6", "c7"]
    assert any("class 'c5' lost all its images" in p for p in full.problems)
    only = build_splits(DataConfig(dataset="folder", root=str(root)), with_test=False)
    assert only.train.class_names == full.train.class_names and only.problems == []
