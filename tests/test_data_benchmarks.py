"""The DML benchmarks in their real on-disk layouts: split protocols, label spaces, malformed data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from data_fixtures import (
    make_cars196,
    make_cub200,
    make_inaturalist,
    make_inshop,
    make_online_products,
    write_garbage,
)

from promptdml.config import DataConfig
from promptdml.data import DataError, build_splits, check_dataset


def _counts(s):
    return {n: (r.num_classes, len(r)) for n, r in s.named_splits()}


def _contiguous(rec):
    assert sorted(set(rec.labels.tolist())) == list(range(rec.num_classes))


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub200(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
    return make_cars196(tmp_path_factory.mktemp("cars"))


def test_cub200_protocol(cub):
    s = build_splits(DataConfig(dataset="cub200", root=str(cub.root)))
    assert _counts(s) == cub.expected
    assert s.train.class_names[0] == "001.Black_footed_Albatross" and s.train.class_names[-1].startswith("100.")
    assert s.test.class_names[0].startswith("101.") and s.test.class_names[-1] == "200.Common_Yellowthroat"
    _contiguous(s.train)
    _contiguous(s.test)
    assert not s.problems
    assert any("ünï" in p for p in s.train.paths)
    report = check_dataset(DataConfig(dataset="cub200", root=str(cub.root)), verify_images=False)
    assert f"train    100 classes, {cub.expected['train'][1]} images" in report
    assert f"test     100 classes, {cub.expected['test'][1]} images" in report


def test_cub200_val_split(cub):
    s = build_splits(DataConfig(dataset="cub200", root=str(cub.root), val_ratio=0.2))
    assert (s.train.num_classes, s.val.num_classes, s.test.num_classes) == (80, 20, 100)
    assert s.val.class_names[0].startswith("081.")
    _contiguous(s.val)


def test_cub200_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_splits(DataConfig(dataset="cub200", root=str(tmp_path / "nowhere")))
    (tmp_path / "cub200").mkdir()
    with pytest.raises(DataError, match=r"Found .*cub200.*cub200/images/001"):
        build_splits(DataConfig(dataset="cub200", root=str(tmp_path)))


def test_cars196_protocol(cars):
    s = build_splits(DataConfig(dataset="cars196", root=str(cars.root)))
    assert _counts(s) == cars.expected
    assert s.train.class_names == cars.extra["train_classes"]
    assert s.train.class_names[:2] == ["AM General Hummer SUV 2000", "Acura Integra Type R 2001"]
    _contiguous(s.train)
    _contiguous(s.test)


def test_cars196_unreadable_and_empty(tmp_path):
    fx = make_cars196(tmp_path)
    images = tmp_path / "cars196" / "images"
    bad = write_garbage(images / "Acura Integra Type R 2001" / "broken image.jpg")
    (images / "Empty Class 2000").mkdir()
    s = build_splits(DataConfig(dataset="cars196", root=str(tmp_path)))
    assert any(str(bad) in p and "unreadable" in p for p in s.problems)
    assert any("Empty Class 2000" in p and "no images" in p for p in s.problems)
    assert _counts(s) == fx.expected


@pytest.mark.parametrize("original", [False, True])
def test_online_products(tmp_path, original):
    fx = make_online_products(tmp_path, original_layout=original)
    s = build_splits(DataConfig(dataset="online_products", root=str(tmp_path)))
    assert _counts(s) == fx.expected
    assert s.train.class_names == [str(i) for i in range(1, 7)]
    assert s.test.class_names == [str(i) for i in range(7, 12)]
    _contiguous(s.train)
    _contiguous(s.test)
    assert all(p.startswith(str(fx.extra["images"])) for p in s.train.paths)
    assert not s.problems


def test_online_products_missing_files(tmp_path):
    fx = make_online_products(tmp_path)
    info, images = fx.extra["info"], fx.extra["images"]
    victim = next(images.glob("*/*.JPG"))
    victim.unlink()
    s = build_splits(DataConfig(dataset="online_products", root=str(tmp_path)))
    hit = [p for p in s.problems if victim.name in p]
    assert hit and "Ebay_" in hit[0] and "not found" in hit[0] and "delete its line" in hit[0]
    assert len(s.train) + len(s.test) == fx.expected["train"][1] + fx.expected["test"][1] - 1
    (info / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"Ebay_test.txt' is missing"):
        build_splits(DataConfig(dataset="online_products", root=str(tmp_path)))
    (info / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x 1\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt:2"):
        build_splits(DataConfig(dataset="online_products", root=str(tmp_path)))


def test_inshop_joint_query_gallery_ids(tmp_path):
    fx = make_inshop(tmp_path)
    s = build_splits(DataConfig(dataset="inshop", root=str(tmp_path)))
    assert s.test is None and s.protocol == "query_gallery"
    assert _counts(s) == fx.expected
    assert s.query.class_names == s.gallery.class_names == [f"id_{i:08d}" for i in (10, 11, 12, 13, 14)]
    _contiguous(s.train)
    for rec in (s.query, s.gallery):  # the same item id has the same label in query and gallery
        for p, y in zip(rec.paths, rec.labels, strict=True):
            assert f"/{rec.class_names[y]}/" in p
    assert set(s.query.labels.tolist()) == {0, 1, 2, 4}
    assert set(s.gallery.labels.tolist()) == {0, 1, 2, 3}
    assert any("gallery images only" in p for p in s.problems)
    report = check_dataset(DataConfig(dataset="inshop", root=str(tmp_path)))
    assert "query against gallery" in report
    assert "query    5 classes, 4 images" in report and "gallery  5 classes, 8 images" in report


def test_inshop_errors(tmp_path):
    make_inshop(tmp_path)
    ann = tmp_path / "inshop" / "list_eval_partition.txt"
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join([*lines, "img/MEN/x.jpg id_00000099 validation"]) + "\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt:\d+: expected"):
        build_splits(DataConfig(dataset="inshop", root=str(tmp_path)))
    ann.write_text("\n".join([*lines, "img/MEN/Denim/id_00000010/99_gone.jpg  id_00000010 gallery"]) + "\n")
    s = build_splits(DataConfig(dataset="inshop", root=str(tmp_path)))
    assert any("99_gone.jpg" in p and "not found" in p for p in s.problems)
    assert any("declares" in p for p in s.problems)
    ann.unlink()
    with pytest.raises(DataError, match=r"list_eval_partition.txt' is missing"):
        build_splits(DataConfig(dataset="inshop", root=str(tmp_path)))


def test_inaturalist(tmp_path):
    fx = make_inaturalist(tmp_path)
    s = build_splits(DataConfig(dataset="inaturalist", root=str(tmp_path)))
    assert _counts(s) == fx.expected
    assert s.train.class_names == ["Aves/3001", "Plantae/7477", "Plantae/7478"]
    assert s.test.class_names == ["Aves/3002", "Fungi/900", "Insecta/1200"]
    _contiguous(s.train)
    report = check_dataset(DataConfig(dataset="inaturalist", root=str(tmp_path)))
    assert "train    3 classes" in report and "problems: none" in report


def test_inaturalist_errors(tmp_path):
    make_inaturalist(tmp_path)
    d = tmp_path / "inaturalist"
    (d / "Inaturalist_test_set1.txt").unlink()
    with pytest.raises(DataError, match=r"Inaturalist_test_set1.txt' is missing"):
        build_splits(DataConfig(dataset="inaturalist", root=str(tmp_path)))
    shutil.rmtree(d)
    with pytest.raises(DataError, match="Inaturalist_train_set1.txt"):
        build_splits(DataConfig(dataset="inaturalist", root=str(tmp_path)))


def test_benchmark_singleton_train_class_warns(tmp_path):
    make_inaturalist(tmp_path)
    d = tmp_path / "inaturalist"
    listed = (d / "Inaturalist_train_set1.txt").read_text().splitlines()
    keep = [ln for ln in listed if "/7478/" not in ln] + [next(ln for ln in listed if "/7478/" in ln)]
    (d / "Inaturalist_train_set1.txt").write_text("\n".join(keep) + "\n")
    s = build_splits(DataConfig(dataset="inaturalist", root=str(tmp_path)))
    assert any("single image" in p and "Plantae/7478" in p for p in s.problems)
    assert np.bincount(s.train.labels).min() == 1


@pytest.mark.parametrize("kind", ["cars196", "online_products", "inshop", "inaturalist"])
def test_check_dataset_counts(tmp_path, kind):
    maker = {"cars196": make_cars196, "online_products": make_online_products, "inshop": make_inshop,
             "inaturalist": make_inaturalist}[kind]
    fx = maker(tmp_path)
    report = check_dataset(DataConfig(dataset=kind, root=str(fx.root)), verify_images=True)
    assert f"dataset: {kind}" in report
    for split, (c, n) in fx.expected.items():
        assert f"  {split:<8} {c} classes, {n} images" in report
    assert f"total    {sum(n for _, n in fx.expected.values())} images" in report


def test_images_folder_in_wrong_place_is_an_error(tmp_path):
    fx = make_online_products(tmp_path)
    fx.extra["images"].rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"of 28 images .* missing or unreadable.*Ebay_train.txt:2.*layout"):
        build_splits(DataConfig(dataset="online_products", root=str(tmp_path)))
