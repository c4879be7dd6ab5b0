"""ClassBalancedBatchSampler: batch structure, determinism, distributed split, small classes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptdml.data import ClassBalancedBatchSampler


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
    ranks = [ClassBalancedBatchSampler(labels, 8, 2, num_batches=6, seed=3, rank=r, world_size=world)
             for r in range(world)]
    for r in ranks:
        r.set_epoch(4)
    per_rank = [list(r) for r in ranks]
    assert all(len(p) == 6 for p in per_rank)
    glob = ranks[0].global_batches()
    assert glob == ranks[1].global_batches() and len(glob) == world * 6
    assert per_rank[0] == glob[0::2] and per_rank[1] == glob[1::2]
    as_sets = [{tuple(b) for b in p} for p in per_rank]
    assert not (as_sets[0] & as_sets[1])  # different batches on the two ranks
    # default epoch length splits the data across ranks
    d = ClassBalancedBatchSampler(labels, 8, 2, rank=1, world_size=2)
    assert len(d) == len(labels) // (8 * 2)


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
        ClassBalancedBatchSampler(labels, 4, 2, rank=2, world_size=2)
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
