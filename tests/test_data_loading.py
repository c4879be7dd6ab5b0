"""Transforms, ImageDataset (incl. the bad-file fallback) and the DataLoader helpers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from data_fixtures import make_folder, write_image, write_truncated_jpeg

from promptdml.data import (
    DataError,
    ImageDataset,
    ImageRecords,
    build_eval_loader,
    build_train_loader,
    build_transforms,
)
from promptdml.data.transforms import eval_resize_size

DC = {"mean": (0.5, 0.25, 0.125), "std": (0.5, 0.5, 0.25), "interpolation": "bicubic", "crop_pct": 0.9}


def test_transforms_shapes_and_normalisation():
    from PIL import Image

    img = Image.new("RGB", (50, 30), (255, 0, 128))
    for train in (True, False):
        t = build_transforms(DC, 32, train=train)
        x = t(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    x = build_transforms(DC, 32, train=False)(img)
    expect = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(DC["mean"])) / torch.tensor(DC["std"])
    assert torch.allclose(x[:, 16, 16], expect, atol=1e-5)
    assert eval_resize_size(224) == 256 and eval_resize_size(384) == 438
    names = [type(s).__name__ for s in build_transforms(DC, 32, train=True).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    names = [type(s).__name__ for s in build_transforms(DC, 32, train=False).transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert build_transforms(DC, 32, train=False).transforms[0].size == 36


def test_transforms_from_timm_config():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    dc = timm.data.resolve_data_config({}, model=model)
    norm = build_transforms(dc, 224, train=False).transforms[-1]
    assert tuple(norm.mean) == tuple(dc["mean"]) and tuple(norm.std) == tuple(dc["std"])
    with pytest.raises(ValueError, match="mean"):
        build_transforms({"std": (1, 1, 1)}, 224, train=True)


def _records(tmp_path, spec):
    root = make_folder(tmp_path / "ds", spec)
    paths, labels = [], []
    for c, (cls, n) in enumerate(spec.items()):
        for j in range(n):
            paths.append(str(root / cls / f"{j:03d}.png"))
            labels.append(c)
    return ImageRecords(paths, np.array(labels), list(spec))


def test_image_dataset_items(tmp_path):
    rec = _records(tmp_path, {"a": 2, "b": 3})
    ds = ImageDataset(rec, build_transforms(DC, 16, train=False))
    assert len(ds) == 5
    x, y, i = ds[3]
    assert x.shape == (3, 16, 16) and y == 1 and i == 3
    img, y, i = ImageDataset(rec, None)[0]
    assert img.mode == "RGB" and y == 0


def test_image_dataset_replaces_undecodable_image(tmp_path, caplog):
    rec = _records(tmp_path, {"a": 3, "b": 2})
    bad = write_truncated_jpeg(tmp_path / "trunc.jpg")
    rec.paths[1] = str(bad)
    ds = ImageDataset(rec, build_transforms(DC, 16, train=False))
    with caplog.at_level(logging.WARNING, logger="promptdml.data"):
        x, y, i = ds[1]
        ds[1]
    assert y == 0 and i == 1 and x.shape == (3, 16, 16)
    assert ds.failed_loads == 1  # warned and counted once per file
    warnings = [r for r in caplog.records if "trunc.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "another image of class 'a'" in warnings[0].getMessage()
    # every image of a class broken -> clear error
    rec.paths[3] = rec.paths[4] = str(bad)
    with pytest.raises(DataError, match="class 'b'"):
        ImageDataset(rec, None)[3]


def test_failed_loads_counted_across_workers(tmp_path):
    rec = _records(tmp_path, {"a": 2, "b": 2})
    rec.paths[0] = str(write_truncated_jpeg(tmp_path / "t.jpg"))
    loader = build_eval_loader(rec, build_transforms(DC, 16, train=False), batch_size=2, num_workers=1,
                               device_type="cpu")
    labels = torch.cat([y for _, y, _ in loader])
    assert labels.tolist() == [0, 0, 1, 1]
    assert loader.dataset.failed_loads == 1


@pytest.mark.filterwarnings("ignore:.*pin_memory")
def test_train_and_eval_loaders(tmp_path):
    rec = _records(tmp_path, {c: 3 for c in "abcdef"})
    tf = build_transforms(DC, 16, train=True)
    loader = build_train_loader(rec, tf, batch_size=6, samples_per_class=2, num_batches=3, seed=0,
                                num_workers=0, device_type="cpu")
    assert len(loader) == 3 and not loader.pin_memory
    for x, y, idx in loader:
        assert x.shape == (6, 3, 16, 16)
        assert (y.view(3, 2) == y.view(3, 2)[:, :1]).all()
        assert (torch.as_tensor(rec.labels)[idx] == y).all()
    loader.batch_sampler.set_epoch(1)
    assert loader.batch_sampler.epoch == 1
    ev = build_eval_loader(rec, build_transforms(DC, 16, train=False), batch_size=4, num_workers=0,
                           device_type="cuda")
    assert ev.pin_memory
    idx = torch.cat([i for _, _, i in ev])
    assert idx.tolist() == list(range(len(rec)))
    wl = build_train_loader(rec, tf, 12, 2, None, 0, num_workers=2, device_type="cpu", rank=1, world_size=2)
    assert wl.persistent_workers and wl.num_workers == 2
    assert len(wl) == max(1, len(rec) // 12)
    assert next(iter(wl))[0].shape == (6, 3, 16, 16)


def test_records_validation(tmp_path):
    with pytest.raises(ValueError):
        ImageRecords(["a", "b"], np.array([0]), ["x"])
    with pytest.raises(ValueError):
        ImageRecords(["a"], np.array([2]), ["x"])
    r = ImageRecords(["a", "b", "c"], [0, 1, 1], ["x", "y"])
    assert r.num_classes == 2 and len(r) == 3 and r.labels.dtype == np.int64
    assert r.class_counts().tolist() == [1, 2]
    write_image(tmp_path / "x.png")
