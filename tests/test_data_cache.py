"""The decoded-image cache (data.cache): hit / miss / invalidation, integrity, equality, workers."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from data_fixtures import write_image, write_truncated_jpeg
from PIL import Image

from promptdml.config import Config, ConfigError
from promptdml.data import ImageDataset, ImageRecords, build_train_loader, build_transforms
from promptdml.data.cache import CACHE_SCALE, CachedTrainTransform, ImageCache, resolve_cache_dir
from promptdml.data.images import load_rgb
from promptdml.data.loading import SeededDataset

DC = {"mean": (0.5, 0.25, 0.125), "std": (0.5, 0.5, 0.25), "interpolation": "bicubic"}
SIDE = 24


def make_images(tmp, n=8, sizes=((40, 30), (24, 24), (17, 50), (64, 48))):
    return [str(write_image(tmp / "img" / f"{i:02d}.png", size=sizes[i % len(sizes)], seed=i)) for i in range(n)]


def direct(path, side=SIDE):
    return np.asarray(load_rgb(path).resize((side, side), Image.BICUBIC))


def test_hit_miss_and_equality_with_direct_decoding(tmp_path):
    paths = make_images(tmp_path)
    c1 = ImageCache(tmp_path / "c", paths, SIDE)
    assert c1.built and c1.ok.all()
    c2 = ImageCache(tmp_path / "c", paths, SIDE)
    assert not c2.built and c2.key == c1.key  # hit
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(c2.array(i), direct(p))
        w, h = Image.open(p).size
        assert tuple(c2.sizes[i]) == (h, w)
        assert torch.equal(c2.tensor(i), torch.from_numpy(np.array(direct(p))).permute(2, 0, 1))


def test_invalidation_on_files_and_size(tmp_path):
    paths = make_images(tmp_path)
    base = ImageCache(tmp_path / "c", paths, SIDE)
    assert not ImageCache(tmp_path / "c", paths, SIDE).built
    assert ImageCache(tmp_path / "c", paths, SIDE + 2).built  # another image size
    assert ImageCache(tmp_path / "c", paths[:-1], SIDE).built  # a file fewer
    write_image(paths[3], size=(33, 21), seed=99)  # new content, size and mtime
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = ImageCache(tmp_path / "c", paths, SIDE)
    assert c.built and c.key != base.key
    np.testing.assert_array_equal(c.array(3), direct(paths[3]))
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched only: rebuilt as well
    assert ImageCache(tmp_path / "c", paths, SIDE).built


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "bad_meta"])
def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, damage):
    paths = make_images(tmp_path)
    c = ImageCache(tmp_path / "c", paths, SIDE)
    if damage == "flip":
        with open(c.data_path, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(c.data_path, "r+b") as f:
            f.truncate(c.nbytes // 2)
    elif damage == "no_meta":
        c.meta_path.unlink()
    else:
        c.meta_path.write_text('{"version": 1, "key": "')
    c2 = ImageCache(tmp_path / "c", paths, SIDE)
    assert c2.built
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(c2.array(i), direct(p))
    assert not list((tmp_path / "c").glob("*.tmp*"))  # no temporary files left behind


def _build_in_process(args):
    folder, paths = args
    c = ImageCache(folder, paths, SIDE)
    return c.key, [int(c.array(i).sum()) for i in range(len(paths))]


def test_concurrent_builders_and_readers(tmp_path):
    paths = make_images(tmp_path, n=12)
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.map(_build_in_process, [(str(tmp_path / "c"), paths)] * 3)
    assert len({r[0] for r in results}) == 1 and all(r[1] == results[0][1] for r in results)
    c = ImageCache(tmp_path / "c", paths, SIDE)
    assert not c.built
    assert results[0][1] == [int(direct(p).sum()) for p in paths]


def test_dataset_workers_read_the_same_tensors(tmp_path):
    paths = make_images(tmp_path, n=16)
    rec = ImageRecords(paths, np.arange(16) % 4, ["a", "b", "c", "d"])
    tf = build_transforms(DC, 12, train=True)
    ds = SeededDataset(ImageDataset(rec, tf, cache=str(tmp_path / "c")))
    assert ds.dataset.cache is not None and ds.dataset.cache.side == CACHE_SCALE * 12
    keys = [(i, 1000 + i) for i in range(16)]

    def run(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=keys, num_workers=workers)
        return torch.cat([b[0] for b in loader])

    single, multi = run(0), run(2)
    assert single.shape == (16, 3, 12, 12) and single.dtype == torch.float32
    assert torch.equal(single, multi)
    # the real training loader builder picks the setting up from the records (data.cache)
    rec.cache = str(tmp_path / "c")
    loader = build_train_loader(rec, tf, 8, 2, 2, seed=0, num_workers=2, device_type="cpu")
    assert loader.dataset.cache is not None and not loader.dataset.cache.built
    x, y, _ = next(iter(loader))
    assert x.shape == (8, 3, 12, 12) and torch.isfinite(x).all()


def test_same_crop_boxes_and_close_pixels_as_the_file_path(tmp_path):
    """Originals of exactly the stored size: the cache path differs from today's only in the resampler."""
    s = 12
    paths = [str(write_image(tmp_path / f"{i}.png", size=(CACHE_SCALE * s,) * 2, seed=i)) for i in range(6)]
    for p in paths:  # smooth images, so that the two bicubic implementations agree closely
        Image.open(p).resize((6, 6)).resize((CACHE_SCALE * s,) * 2, Image.BILINEAR).save(p)
    rec = ImageRecords(paths, np.arange(6) % 2, ["a", "b"])
    tf = build_transforms(DC, s, train=True)
    files = ImageDataset(rec, tf, cache="none")
    cached = ImageDataset(rec, tf, cache=str(tmp_path / "c"))
    assert files.cache is None and cached.cache is not None
    diffs = []
    for i in range(6):
        for seed in range(5):
            torch.manual_seed(seed)
            a = files[i][0]
            state_a = torch.rand(1)
            torch.manual_seed(seed)
            b = cached[i][0]
            state_b = torch.rand(1)
            assert torch.equal(state_a, state_b)  # the same random numbers were drawn
            diffs.append(float((a - b).abs().mean()))
    assert max(diffs) < 0.05, diffs


def test_unreadable_image_is_substituted(tmp_path):
    paths = make_images(tmp_path, n=4)
    paths[1] = str(write_truncated_jpeg(tmp_path / "bad.jpg"))
    rec = ImageRecords(paths, [0, 0, 1, 1], ["a", "b"])
    ds = ImageDataset(rec, build_transforms(DC, 12, train=True), cache=str(tmp_path / "c"))
    assert ds.cache.ok.tolist() == [True, False, True, True]
    x, label, idx = ds[1]
    assert x.shape == (3, 12, 12) and label == 0 and idx == 1 and ds.failed_loads == 1


def test_config_and_resolution(tmp_path, monkeypatch):
    assert Config().data.cache == "none"
    cfg = Config()
    cfg.data.cache = ""
    with pytest.raises(ConfigError):
        cfg.validate()
    assert resolve_cache_dir("none") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir("auto") == tmp_path / "promptdml" / "images"
    assert resolve_cache_dir(str(tmp_path / "x")) == tmp_path / "x"
    # an eval transform is not served from the cache
    paths = make_images(tmp_path, n=2)
    ds = ImageDataset(ImageRecords(paths, [0, 0], ["a"]), build_transforms(DC, 12, train=False), cache="auto")
    assert ds.cache is None
    assert CachedTrainTransform.from_compose(build_transforms(DC, 12, train=False)) is None


def test_build_splits_passes_the_setting(tmp_path):
    from promptdml.config import DataConfig
    from promptdml.data import build_splits

    for cls in ("a", "b", "c", "d"):
        for j in range(2):
            write_image(tmp_path / "f" / cls / f"{j}.png", seed=j)
    d = DataConfig(dataset="folder", root=str(tmp_path / "f"), cache=str(tmp_path / "c"))
    assert build_splits(d).train.cache == str(tmp_path / "c")


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_transform_of_a_memory_map_view_equals_that_of_the_whole_tensor(tmp_path, interpolation):
    """The dataset hands the transform a view of the memory map and only the crop box is copied: the same
    pixels as cropping and resizing the whole stored tensor, for the same random numbers."""
    paths = make_images(tmp_path)
    tf = CachedTrainTransform.from_compose(build_transforms({**DC, "interpolation": interpolation}, 12, train=True))
    cache = ImageCache(tmp_path / "c", paths, SIDE, tf.interpolation)
    for i in range(len(paths)):
        for seed in range(4):
            torch.manual_seed(seed)
            a = tf(cache.tensor(i), tuple(cache.sizes[i]))
            torch.manual_seed(seed)
            b = tf(cache.array(i), tuple(cache.sizes[i]))
            assert torch.equal(a, b)
