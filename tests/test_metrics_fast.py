"""The exact fast path (bf16 / fp16 candidates re-scored in fp32) gives the fp32 path's results exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promptdml.metrics import fast, knn_search, retrieval_metrics
from promptdml.metrics.knn import prepare_embeddings

KS = (1, 2, 5, 10, 50, 1000)


def adversarial_set(n=700, d=48, n_classes=90, seed=0):
    """Continuous clustered data plus exact duplicates, 1-ulp near-duplicates and tied groups."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    x = centres[y] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup = rng.choice(n, 60, replace=False)
    x[dup[:30]] = x[dup[30:]]  # exact duplicates (labels differ in general): exact ties
    near = rng.choice(n, 40, replace=False)
    x[near[:20]] = np.nextafter(x[near[20:]], np.float32(2.0))  # differ by one ulp in every entry
    grp = rng.choice(n, 12, replace=False)
    x[grp] = x[grp[0]]  # a group of 12 identical vectors: ties across the k-th boundary
    return x.astype(np.float32), y


def fp32_and_fast(fn, **kw):
    ref = fn(precision="fp32", **kw)
    out = fn(precision="bf16", **kw)
    return ref, out


def assert_metrics_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= 1e-6, (k, a[k], b[k])


def test_mm_fp32_is_position_independent():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(4101, 64), dim=1)  # N not a multiple of 16
    full = torch.cat([fast.mm_fp32(ref[s : s + 997], ref) for s in range(0, 4101, 997)])
    gen = torch.Generator().manual_seed(1)
    for m, n in [(1, 1), (3, 7), (8, 16), (13, 40), (64, 333), (100, 4101)]:
        rows = torch.randperm(4101, generator=gen)[:m]
        cols = torch.randperm(4101, generator=gen)[:n]
        assert torch.equal(fast.mm_fp32(ref[rows], ref[cols]), full[rows][:, cols]), (m, n)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fast.mm_fp32(ref[:50], ref), full[:50])
    finally:
        torch.set_num_threads(old)
    # re-scoring of arbitrary (query, candidate) pairs gives the block's values bit for bit
    idx = torch.randint(0, 4101, (37, 9), generator=gen)
    assert torch.equal(fast.rescore(ref[:37], ref, idx), full[torch.arange(37)[:, None], idx])
    r = torch.sort(torch.randint(0, 37, (200,), generator=gen)).values
    c = torch.randint(0, 4101, (200,), generator=gen)
    assert torch.equal(fast.rescore_pairs(ref[:37], ref, r, c), full[r, c])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_error_bound_holds(precision):
    """|reduced - fp32| <= A + B|reduced| on random, sparse, spiky and constant unit vectors."""
    torch.manual_seed(2)
    d = 96
    x = [torch.randn(300, d), torch.eye(d)[:40], torch.ones(5, d), torch.randn(50, d) ** 9]
    x.append(torch.randn(30, d) * (torch.rand(30, d) < 0.05))
    x = prepare_embeddings(torch.cat(x))
    red = fast.Reduced(x, x, precision)
    s32 = fast.mm_fp32(x, x)
    low = red.block(0, x.shape[0], exclude_self=False).double()
    err = (low - s32.double()).abs()
    assert bool((err <= red.a + red.b * low.abs()).all())
    assert float(err.max()) > 0  # the reduced path does differ: the bound is doing work
    a, b = fast.dot_error_bound(d, 1.0, 1.0, precision, True)
    u = 2.0**-8 if precision == "bf16" else 2.0**-11
    assert 2 * u < a < 2.1 * u and b == pytest.approx(u / (1 - u), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_metrics_identical_self_protocol(seed, dtype):
    x, y = adversarial_set(seed=seed)
    xt = torch.from_numpy(x).to(dtype)
    ref, out = fp32_and_fast(lambda **kw: retrieval_metrics(xt, y, KS, **kw), chunk_size=None)
    assert_metrics_equal(out, ref)
    assert fast.LAST_STATS["queries"] == len(y)


@pytest.mark.parametrize("chunk", [None, 61])
def test_metrics_identical_query_gallery(chunk):
    x, y = adversarial_set(n=800, seed=3)
    q, qy, g, gy = x[:250].copy(), y[:250].copy(), x[250:], y[250:]
    q[:5] = g[:5]  # queries identical to gallery items (not excluded in this protocol)
    qy[5:8] = 10_000  # no relevant item: skipped
    fn = lambda **kw: retrieval_metrics(g, gy, KS, query_embeddings=q, query_labels=qy, chunk_size=chunk, **kw)  # noqa: E731
    ref, out = fp32_and_fast(fn)
    assert_metrics_equal(out, ref)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_knn_identical_indices_and_sims(exclude_self, precision):
    x, _ = adversarial_set(n=600, seed=4)
    kw = dict(k=25, backend="torch", chunk_size=97)
    if exclude_self:
        s0, i0 = knn_search(x, precision="fp32", **kw)
        s1, i1 = knn_search(x, precision=precision, **kw)
    else:
        s0, i0 = knn_search(x[:200], x[200:], precision="fp32", **kw)
        s1, i1 = knn_search(x[:200], x[200:], precision=precision, **kw)
    assert torch.equal(i0, i1)
    assert torch.equal(s0, s1)


def test_fallbacks_exercised_and_exact(monkeypatch):
    """No margin at all: ties / near-ties at the cut need more candidates, then the full fp32 row."""
    monkeypatch.setattr(fast, "CANDIDATE_MARGIN", 0)
    rng = np.random.default_rng(5)
    x, y = adversarial_set(n=500, seed=5)
    x[:150] = x[0] + 1e-3 * rng.standard_normal((150, x.shape[1])).astype(np.float32)  # a dense blob
    y[:150] = np.arange(150) % 10
    s0, i0 = knn_search(x, k=10, precision="fp32", backend="torch")
    s1, i1 = knn_search(x, k=10, precision="bf16")
    assert torch.equal(i0, i1) and torch.equal(s0, s1)
    assert fast.LAST_STATS["wider"] > 0 and fast.LAST_STATS["fp32_rows"] > 0
    ref, out = fp32_and_fast(lambda **kw: retrieval_metrics(x, y, KS, **kw))
    assert_metrics_equal(out, ref)
    st = fast.LAST_STATS
    assert st["wider"] > 0 and st["fp32_rows"] > 0 and st["rank_count_rows"] > 0 and st["band_pairs"] > 0


def test_bound_violation_falls_back_to_fp32(monkeypatch):
    x, y = adversarial_set(n=300, seed=6)
    ref = retrieval_metrics(x, y, KS, precision="fp32")
    monkeypatch.setattr(fast, "dot_error_bound", lambda *a, **k: (0.0, 0.0))  # a "kernel" that breaks the model
    with pytest.warns(RuntimeWarning, match="fp32 path"):
        out = retrieval_metrics(x, y, KS, precision="bf16")
    assert_metrics_equal(out, ref)
    with pytest.warns(RuntimeWarning, match="fp32 path"):
        _, idx = knn_search(x, k=5, precision="bf16")
    assert torch.equal(idx, knn_search(x, k=5, precision="fp32", backend="torch")[1])


def test_precision_option_resolution():
    cpu = torch.device("cpu")
    assert fast.resolve_precision("fp32", cpu) == "fp32"
    assert fast.resolve_precision("fp16", cpu) == "fp16"
    assert fast.resolve_precision("auto", cpu, "faiss") == "fp32"
    assert fast.resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ValueError):
        fast.resolve_precision("int8", cpu)
    with pytest.raises(ValueError):
        knn_search(np.eye(4), k=1, backend="faiss", precision="bf16")
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(4), np.arange(4), precision="nope")
    x, y = adversarial_set(n=200, seed=7)
    fast.LAST_STATS.clear()
    retrieval_metrics(x, y, KS, precision="fp32")
    assert fast.LAST_STATS == {}  # fp32 forces the fp32 path


# --------------------------------------------------------------------------------------------------
# the symmetric candidate pass (a set against itself)


def _integer_set(n, d=24, seed=0):
    """Small-integer vectors: every dot product is an integer of magnitude <= 216, exact in bf16 and fp16,
    so the reduced values do not depend on the kernel's blocking and a brute-force top-k is an oracle."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, d), generator=g).float()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("n,panel,m", [(300, 64, 5), (300, 64, 40), (257, 50, 12), (130, 64, 70), (97, 16, 1)])
def test_symmetric_candidates_are_the_top_m(precision, n, panel, m):
    x = _integer_set(n, seed=n + m)
    red = fast.Reduced(x, x, precision)
    vals, idx = fast.symmetric_candidates(red, m, panel=panel)
    full = torch.mm(red.q, red.q.T)
    full.fill_diagonal_(float("-inf"))
    want = torch.topk(full.float(), m, dim=1).values
    assert vals.dtype == red.q.dtype and vals.shape == idx.shape == (n, m)
    assert torch.equal(vals.float(), want)  # the same values, in descending order, per row
    rows = torch.arange(n)[:, None]
    assert torch.equal(full[rows, idx].float(), want)  # each index holds its value (no self, no stale entry)
    assert bool((idx != rows).all())
    assert all(len(set(r.tolist())) == m for r in idx)  # no pair twice


def test_column_filter_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(75, 130, generator=g).bfloat16()
    c = big[:, 10:110]  # a non-contiguous view, rows not a multiple of the group size
    tau = torch.randn(100, generator=g).bfloat16() + 0.8
    tau[::7] = float("-inf")
    tau[3::11] = 0.0
    tau[5::13] = -0.5
    rows, cols, vals = fast._column_filter(c, tau)
    got = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    want = sorted(map(tuple, (c.float() >= tau.float()).nonzero().tolist()))
    assert got == want and len(want) > 0
    assert torch.equal(vals, c[rows, cols])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_identical_symmetric_pass(monkeypatch, precision, seed):
    monkeypatch.setattr(fast, "SYMMETRIC_PANEL", 96)
    x, y = adversarial_set(n=900, seed=seed)
    ref = retrieval_metrics(x, y, KS, precision="fp32")
    out = retrieval_metrics(x, y, KS, precision=precision)
    assert fast.LAST_STATS["symmetric"] == 1 and fast.LAST_STATS["symmetric_found"] > 0
    assert_metrics_equal(out, ref)


def test_symmetric_pass_fallbacks_exercised_and_exact(monkeypatch):
    """No candidate margin: rows that need more candidates or the rank outside them recompute their rows."""
    monkeypatch.setattr(fast, "SYMMETRIC_PANEL", 80)
    monkeypatch.setattr(fast, "CANDIDATE_MARGIN", 0)
    rng = np.random.default_rng(5)
    x, y = adversarial_set(n=500, seed=5)
    x[:150] = x[0] + 1e-3 * rng.standard_normal((150, x.shape[1])).astype(np.float32)  # a dense blob
    y[:150] = np.arange(150) % 10
    ref, out = fp32_and_fast(lambda **kw: retrieval_metrics(x, y, KS, **kw))
    assert_metrics_equal(out, ref)
    st = fast.LAST_STATS
    assert st["symmetric"] == 1
    assert st["wider"] > 0 and st["fp32_rows"] > 0 and st["rank_count_rows"] > 0 and st["band_pairs"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_knn_identical_symmetric_pass(monkeypatch, precision):
    monkeypatch.setattr(fast, "SYMMETRIC_PANEL", 128)
    x, _ = adversarial_set(n=700, seed=8)
    s0, i0 = knn_search(x, k=25, precision="fp32", backend="torch")
    s1, i1 = knn_search(x, k=25, precision=precision, backend="torch")
    assert fast.LAST_STATS.get("symmetric_found", 0) > 0
    assert torch.equal(i0, i1) and torch.equal(s0, s1)
    # a reference passed separately (exclude_self=True: the caller says it is the same set) is not assumed
    # to equal the queries: the full blocks are computed
    other = x.copy()
    other[:50] = x[50:100]
    s2, i2 = knn_search(x, other, k=25, precision=precision, backend="torch", exclude_self=True)
    assert "symmetric_found" not in fast.LAST_STATS
    s3, i3 = knn_search(x, other, k=25, precision="fp32", backend="torch", exclude_self=True)
    assert torch.equal(i2, i3) and torch.equal(s2, s3)
