"""build_splits for folder / csv / demo, the val split, and every malformed layout."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from data_fixtures import make_csv_dataset, make_folder, make_folder_dataset, write_garbage, write_image

from promptdml.config import DataConfig
from promptdml.data import DataError, Splits, build_splits, check_dataset


def _counts(splits: Splits) -> dict[str, tuple[int, int]]:
    return {n: (r.num_classes, len(r)) for n, r in splits.named_splits()}


def _contiguous(rec) -> None:
    assert rec.labels.dtype == np.int64
    assert sorted(set(rec.labels.tolist())) == list(range(rec.num_classes))


def test_folder_layout(tmp_path):
    fx = make_folder_dataset(tmp_path)
    s = build_splits(DataConfig(dataset="folder", root=str(fx.root)))
    assert _counts(s) == fx.expected
    assert s.train.class_names == ["ant", "bee", "cat", "dog"]
    assert s.test.class_names == ["eel", "fox", "gnu", "hen"]
    _contiguous(s.train)
    _contiguous(s.test)
    assert s.protocol == "self" and s.query is None and s.val is None and s.problems == []
    assert any("ünïcode" in p for p in s.train.paths)
    for p, y in zip(s.train.paths, s.train.labels, strict=True):
        assert os.path.relpath(p, fx.root).split(os.sep)[0] == s.train.class_names[y]


def test_folder_train_ratio_and_val_split(tmp_path):
    root = make_folder(tmp_path / "d", {f"c{i:02d}": 2 for i in range(10)})
    s = build_splits(DataConfig(dataset="folder", root=str(root), train_ratio=0.6))
    assert (s.train.num_classes, s.test.num_classes) == (6, 4)
    s = build_splits(DataConfig(dataset="folder", root=str(root), train_ratio=0.8, val_ratio=0.25))
    assert s.train.class_names == [f"c{i:02d}" for i in range(6)]
    assert s.val.class_names == ["c06", "c07"]
    _contiguous(s.val)
    _contiguous(s.train)
    assert len(s.val) == 4
    with pytest.raises(DataError, match="val_ratio"):
        build_splits(DataConfig(dataset="folder", root=str(root), train_ratio=0.8, val_ratio=0.05))


def test_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*<root>/<class name>/<image>"):
        build_splits(DataConfig(dataset="folder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="data.root is empty"):
        build_splits(DataConfig(dataset="folder", root=""))
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        build_splits(DataConfig(dataset="folder", root=str(tmp_path / "flat")))


def test_folder_empty_class_folder_warns(tmp_path, caplog):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2, "empty": 0, "c": 2, "d": 2})
    write_image(root / "loose.png")
    with caplog.at_level(logging.WARNING, logger="promptdml.data"):
        s = build_splits(DataConfig(dataset="folder", root=str(root)))
    assert s.train.num_classes + s.test.num_classes == 4
    msg = [p for p in s.problems if "empty" in p]
    assert msg and str(root / "empty") in msg[0] and "delete it" in msg[0]
    assert any("directly in" in p for p in s.problems)
    assert any(str(root / "empty") in r.getMessage() for r in caplog.records)


def test_folder_unreadable_images_excluded(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 2, "c": 2, "d": 2})
    bad = write_garbage(root / "a" / "broken.jpg")
    (root / "b" / "zero.png").write_bytes(b"")
    s = build_splits(DataConfig(dataset="folder", root=str(root)))
    assert str(bad) not in s.train.paths and len(s.train) == 5
    assert any(str(bad) in p and "unreadable" in p and "replace or delete" in p for p in s.problems)
    assert any("zero.png" in p and "empty file" in p for p in s.problems)


def test_folder_singleton_train_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 1, "c": 1, "d": 2})
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(dataset="folder", root=str(root)))
    assert str(root / "b") in str(e.value) and "Add images" in str(e.value)
    # a singleton in the test split is fine (skipped by the metrics)
    root2 = make_folder(tmp_path / "e", {"a": 2, "b": 2, "c": 1, "d": 2})
    s = build_splits(DataConfig(dataset="folder", root=str(root2)))
    assert s.test.class_counts().tolist() == [1, 2]


def test_folder_too_few_classes(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match="at least 2 classes"):
        build_splits(DataConfig(dataset="folder", root=str(root)))


def test_class_lost_to_bad_files_is_reported(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2, "c": 2, "d": 2, "e": 0})
    write_garbage(root / "e" / "x.png")
    s = build_splits(DataConfig(dataset="folder", root=str(root)))
    assert any("class 'e' lost all its images" in p for p in s.problems)


def test_csv_with_split(tmp_path):
    fx = make_csv_dataset(tmp_path)
    s = build_splits(DataConfig(dataset="csv", root=str(fx.root)))
    assert _counts(s) == fx.expected
    assert any("ünï,code.png" in p for p in s.train.paths)
    _contiguous(s.train)
    _contiguous(s.test)


def test_csv_without_split_uses_train_ratio(tmp_path):
    fx = make_csv_dataset(tmp_path, with_split=False)
    s = build_splits(DataConfig(dataset="csv", root=str(fx.root)))
    assert _counts(s) == fx.expected
    assert s.train.class_names == ["cat", "dog", "emu"]


def test_csv_query_gallery(tmp_path):
    fx = make_csv_dataset(tmp_path, query_gallery=True)
    s = build_splits(DataConfig(dataset="csv", root=str(fx.root)))
    assert s.test is None and s.protocol == "query_gallery"
    assert _counts(s) == fx.expected
    assert s.query.class_names == s.gallery.class_names


def test_csv_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_splits(DataConfig(dataset="csv", root=str(tmp_path / "x.csv")))
    with pytest.raises(DataError, match="dataset=folder"):
        build_splits(DataConfig(dataset="csv", root=str(tmp_path)))
    fx = make_csv_dataset(tmp_path)
    text = fx.root.read_text().splitlines()
    bad = fx.root.with_name("bad.csv")
    bad.write_text("\n".join(text[:3] + ["cat/y.png,cat,validation"]) + "\n")
    with pytest.raises(DataError, match=r"bad.csv:4: split 'validation'"):
        build_splits(DataConfig(dataset="csv", root=str(bad)))
    bad.write_text("\n".join(text[:3] + ["cat/y.png,cat"]) + "\n")
    with pytest.raises(DataError, match="every row or on none"):
        build_splits(DataConfig(dataset="csv", root=str(bad)))
    bad.write_text("\n".join([*text, "cat/missing file.png,cat,train"]) + "\n")
    s = build_splits(DataConfig(dataset="csv", root=str(bad)))
    assert any("missing file.png" in p and f"{bad}:{len(text) + 1}" in p and "not found" in p for p in s.problems)


def test_demo_dataset(tmp_path, monkeypatch):
    pytest.importorskip("promptdml.data.synthetic")
    monkeypatch.setenv("PROMPTDML_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(dataset="demo", demo_classes=8, demo_images_per_class=3, demo_image_size=16)
    s = build_splits(cfg)
    assert _counts(s) == {"train": (4, 12), "test": (4, 12)}
    assert all(p.startswith(str(tmp_path / "cache" / "demo")) for p in s.train.paths)
    s2 = build_splits(DataConfig(dataset="demo", root=str(tmp_path / "mine"), demo_classes=8,
                                 demo_images_per_class=2, demo_image_size=16, val_ratio=0.5))
    assert _counts(s2) == {"train": (2, 4), "val": (2, 4), "test": (4, 8)}
    assert all(p.startswith(str(tmp_path / "mine")) for p in s2.test.paths)
    with pytest.raises(DataError, match="demo"):
        build_splits(DataConfig(dataset="demo", root=str(tmp_path / "x"), demo_images_per_class=1))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown data.dataset"):
        build_splits(DataConfig(dataset="imagenet", root="/x"))


def test_check_dataset_folder(tmp_path):
    fx = make_folder_dataset(tmp_path)
    write_garbage(fx.root / "eel" / "bad.jpg")
    report = check_dataset(DataConfig(dataset="folder", root=str(fx.root)))
    assert "train    4 classes, 14 images" in report
    assert "test     4 classes, 11 images" in report
    assert "1 class(es) with a single image" in report
    assert "problems: 1" in report and "bad.jpg" in report



def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    make_folder(tmp_path / "rel", {c: 2 for c in "abcd"})
    monkeypatch.chdir(tmp_path)
    s = build_splits(DataConfig(dataset="folder", root="rel"))
    assert all(os.path.isabs(p) for p in s.train.paths + s.test.paths)


def test_check_dataset_csv(tmp_path):
    fx = make_csv_dataset(tmp_path)
    report = check_dataset(DataConfig(dataset="csv", root=str(fx.root)))
    for split, (c, n) in fx.expected.items():
        assert f"  {split:<8} {c} classes, {n} images" in report
