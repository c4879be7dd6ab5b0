"""ClassBalancedBatchSampler: batch structure, determinism, distributed split, small classes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptdml.data import ClassBalancedBatchSampler, ShardedBatchSampler


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def _check_batch(batch, labels, B, k):
    assert len(batch) == B
    lab = labels[batch]
    groups = lab.reshape(B // k, k)
    assert (groups == groups[:, :1]).all(), "each class's k images must be contiguous"
    assert len(set(groups[:, 0].tolist())) == B // k, "classes in a batch must be distinct"


def test_batches_structure_and_epoch_length():
    labels = _labels([5, 7, 3, 9, 4, 6, 8, 2])
    s = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, seed=1)
    assert len(s) == len(labels) // 8
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        _check_batch(b, labels, 8, 2)
        assert all(isinstance(i, int) for i in b)
        for g in np.reshape(b, (4, 2)):  # classes with >= k images: no repeated image within a class group
            assert len(set(g.tolist())) == 2
    s2 = ClassBalancedBatchSampler(labels, 8, 4, num_batches=13)
    assert len(s2) == 13 and len(list(s2)) == 13
    for b in s2:
        _check_batch(b, labels, 8, 4)


def test_all_classes_and_images_visited():
    labels = _labels([4] * 10)
    s = ClassBalancedBatchSampler(labels, batch_size=10, samples_per_class=2, num_batches=20)
    seen = np.concatenate(list(s))
    assert set(labels[seen].tolist()) == set(range(10))
    assert len(set(seen.tolist())) == len(labels)
    counts = np.bincount(labels[seen], minlength=10)
    assert counts.max() - counts.min() <= 2 * 2  # classes visited in passes -> balanced


def test_deterministic_per_seed_and_epoch():
    labels = _labels([6] * 12)
    a = ClassBalancedBatchSampler(labels, 12, 3, seed=5)
    b = ClassBalancedBatchSampler(labels, 12, 3, seed=5)
    assert list(a) == list(b)
    assert list(a) == list(a)  # same epoch -> same batches
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    c = ClassBalancedBatchSampler(labels, 12, 3, seed=6)
    assert list(c) != e0


def test_distributed_ranks_disjoint_and_cover_global():
    labels = _labels([5] * 16)
    world = 2
    base = ClassBalancedBatchSampler(labels, 8, 2, num_batches=6, seed=3)
    ranks = [ShardedBatchSampler(ClassBalancedBatchSampler(labels, 8, 2, num_batches=6, seed=3), r, world)
             for r in range(world)]
    for r in [base, *ranks]:
        r.set_epoch(4)
    per_rank = [[[i for i, _ in b] for b in r] for r in ranks]
    seeds = [[[s for _, s in b] for b in r] for r in ranks]
    assert all(len(p) == 6 for p in per_rank) and all(r.epoch == 4 for r in ranks)
    glob = list(base)  # the global batches: the same in every process
    assert len(glob) == 6
    assert [a + b for a, b in zip(*per_rank, strict=True)] == glob  # rank slices, in order, are the global batch
    for a, b in zip(*per_rank, strict=True):
        assert not set(labels[a]) & set(labels[b])  # whole classes: no class on two ranks
    assert not set(sum(seeds[0], [])) & set(sum(seeds[1], []))  # every sample its own augmentation seed
    # the epoch length is the number of global steps, the same for every process count
    d = ShardedBatchSampler(ClassBalancedBatchSampler(labels, 8, 2), 1, 2)
    assert len(d) == len(ClassBalancedBatchSampler(labels, 8, 2)) == len(labels) // 8


def test_classes_with_fewer_than_k_images():
    labels = _labels([1, 2, 5, 5, 1, 3])
    s = ClassBalancedBatchSampler(labels, 12, 4, num_batches=30, seed=0)
    small_seen = False
    for b in s:
        _check_batch(b, labels, 12, 4)
        for g in np.reshape(b, (3, 4)):
            n = (labels == labels[g[0]]).sum()
            if n < 4:
                small_seen = True
                assert set(g.tolist()) <= set(np.flatnonzero(labels == labels[g[0]]).tolist())
            else:
                assert len(set(g.tolist())) == 4
    assert small_seen


def test_accepts_tensor_and_noncontiguous_labels():
    labels = torch.tensor([7, 7, 3, 3, 9, 9, 7, 3])
    s = ClassBalancedBatchSampler(labels, 4, 2, num_batches=3)
    for b in s:
        _check_batch(b, labels.numpy(), 4, 2)


def test_errors():
    labels = _labels([3, 3, 3])
    with pytest.raises(ValueError, match="divisible"):
        ClassBalancedBatchSampler(labels, 7, 2)
    with pytest.raises(ValueError, match="only 3 classes"):
        ClassBalancedBatchSampler(labels, 8, 2)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(ClassBalancedBatchSampler(labels, 4, 2), rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        ClassBalancedBatchSampler([], 4, 2)


def test_works_as_dataloader_batch_sampler():
    labels = _labels([4] * 6)
    ds = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    s = ClassBalancedBatchSampler(labels, 6, 2, num_batches=4)
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=s))
    assert len(batches) == 4
    for idx, lab in batches:
        assert (lab == torch.as_tensor(labels)[idx]).all()
