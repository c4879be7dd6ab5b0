"""Tests of promptdml.metrics against a brute-force reference and pytorch-metric-learning.

Most data is *exactly representable*: unit vectors whose entries are signed powers of two (so the
norm is exactly 1 and every dot product is exact in fp32, whatever the summation order), optionally
scaled per row by a power of two. All backends, dtypes and chunk sizes must then give bit-identical
rankings, and there are many exact ties (including duplicate rows) to exercise index tie-breaking.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promptdml.metrics import (
    cluster_metrics,
    count_relevant,
    f1_pair_counting,
    faiss_available,
    kmeans,
    knn_search,
    map_at_r,
    nmi,
    prepare_embeddings,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])
TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# data


def dyadic_unit(n: int, d: int, rng: np.random.Generator, max_splits: int = 5) -> np.ndarray:
    """Rows with entries +-2^-a and squared norm exactly 1 (random 'split one entry in four')."""
    out = np.zeros((n, d))
    for i in range(n):
        vals = [1.0]
        for _ in range(rng.integers(0, max_splits + 1)):
            if len(vals) + 3 > d:
                break
            j = rng.integers(len(vals))
            v = vals.pop(j) / 2
            vals += [v] * 4
        pos = rng.choice(d, size=len(vals), replace=False)
        out[i, pos] = np.array(vals) * rng.choice([-1.0, 1.0], size=len(vals))
    return out


def make_set(n=150, d=16, n_classes=40, seed=0, dup_frac=0.15, singletons=5):
    """Exact embeddings with duplicate rows (some across classes) and a few singleton classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    y[:singletons] = np.arange(1000, 1000 + singletons)  # labels that occur once
    x = dyadic_unit(n, d, rng)
    n_dup = int(dup_frac * n)
    src = rng.integers(0, n, n_dup)
    dst = rng.choice(n, n_dup, replace=False)
    x[dst] = x[src]  # exact duplicates; labels unchanged, so some duplicates cross classes
    x *= 2.0 ** rng.integers(-3, 4, size=(n, 1))  # power-of-two scales: normalisation stays exact
    return x, y


def grid_set(n=120, d=24, n_classes=30, seed=0):
    """Near-unit 'continuous' vectors on a 2^-10 grid: exact dot products, few ties (normalize=False)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    c = rng.standard_normal((n_classes, d))
    x = c[y] + 1.2 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.round(x * 1024) / 1024, y


# ------------------------------------------------------------------------------------------------
# brute force reference: loops over queries, full sort by (-similarity, index)


def brute_ranking(q, ref, exclude_self, normalize=True):
    qp = prepare_embeddings(q, "cpu", normalize).double().numpy()
    rp = prepare_embeddings(ref, "cpu", normalize).double().numpy()
    out = []
    for i in range(len(qp)):
        sims = rp @ qp[i]
        order = sorted(range(len(rp)), key=lambda j: (-sims[j], j))
        if exclude_self:
            order.remove(i)
        out.append((np.array(order, dtype=np.int64), sims[order]))
    return out


def brute_metrics(q, qy, ref, ry, ks, exclude_self, normalize=True):
    ranking = brute_ranking(q, ref, exclude_self, normalize)
    hits = {k: 0 for k in ks}
    ap_sum = rp_sum = 0.0
    n = 0
    for i, (order, _) in enumerate(ranking):
        rel = ry[order] == qy[i]
        big_r = int(rel.sum())  # all other items with the query's label
        if big_r == 0:
            continue
        n += 1
        first = int(np.argmax(rel)) + 1
        for k in ks:
            hits[k] += first <= k
        prec_sum = 0.0
        found = 0
        for pos in range(1, big_r + 1):
            if rel[pos - 1]:
                found += 1
                prec_sum += found / pos
        ap_sum += prec_sum / big_r
        rp_sum += found / big_r
    res = {f"recall@{k}": hits[k] / n for k in ks}
    res.update({"map@r": ap_sum / n, "r_precision": rp_sum / n})
    return res


def assert_close(a: dict, b: dict, tol=TOL):
    for key in b:
        assert key in a, key
        if math.isnan(b[key]):
            assert math.isnan(a[key]), (key, a[key])
        else:
            assert abs(a[key] - b[key]) <= tol, (key, a[key], b[key])


# ------------------------------------------------------------------------------------------------
# knn_search


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 7])
def test_knn_search_exact_with_ties(backend, chunk):
    x, _ = make_set(n=90, seed=1)
    ref = brute_ranking(x, x, True)
    for k in (1, 5, 89):  # 89 = all candidates (no tie margin available)
        sims, idx = knn_search(x, k=k, backend=backend, chunk_size=chunk)
        assert sims.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (90, k)
        exp_idx = np.stack([o[:k] for o, _ in ref])
        exp_sim = np.stack([s[:k] for _, s in ref])
        np.testing.assert_array_equal(idx.numpy(), exp_idx)
        np.testing.assert_allclose(sims.numpy(), exp_sim, atol=1e-6)
        assert not (idx == torch.arange(90)[:, None]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_search_query_gallery_and_self_duplicates(backend):
    x, _ = make_set(n=80, seed=2)
    q, g = x[:30], x[30:]
    sims, idx = knn_search(q, g, k=10, backend=backend, chunk_size=8)
    exp = np.stack([o[:10] for o, _ in brute_ranking(q, g, False)])
    np.testing.assert_array_equal(idx.numpy(), exp)
    # self exclusion is by index: an exact duplicate of the query is still returned first
    y = np.concatenate([x[:1], x[:1], x[1:20]])
    _, idx = knn_search(y, k=1, backend=backend)
    assert idx[0, 0] == 1 and idx[1, 0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_search_grid_unnormalised(backend):
    x, _ = grid_set(seed=3)
    sims, idx = knn_search(x, k=15, normalize=False, backend=backend, chunk_size=50)
    ref = brute_ranking(x, x, True, normalize=False)
    np.testing.assert_array_equal(idx.numpy(), np.stack([o[:15] for o, _ in ref]))
    np.testing.assert_allclose(sims.numpy(), np.stack([s[:15] for _, s in ref]), atol=1e-6)


def test_knn_search_errors():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError):
        knn_search(x, k=4)  # only 3 candidates when excluding self
    with pytest.raises(ValueError):
        knn_search(x, np.eye(3, 4), k=1, exclude_self=True)
    with pytest.raises(ValueError):
        knn_search(x, k=1, backend="nope")
    with pytest.raises(ValueError):
        knn_search(np.array([[np.nan, 1.0]]), np.eye(2), k=1)


# ------------------------------------------------------------------------------------------------
# retrieval_metrics vs brute force


KS = (1, 2, 4, 8, 16, 1000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 13])
def test_self_protocol_matches_brute_force(backend, chunk):
    x, y = make_set(n=160, seed=4)
    exp = brute_metrics(x, y, x, y, KS, True)
    res = retrieval_metrics(x, y, KS, backend=backend, chunk_size=chunk)
    assert set(res) == {f"recall@{k}" for k in KS} | {"map@r", "r_precision"}
    assert all(type(v) is float for v in res.values())
    assert_close(res, exp)
    assert res["recall@1000"] == 1.0  # K beyond N - 1
    assert 0 < res["map@r"] < 1 and 0 < res["recall@1"] < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 9])
def test_query_gallery_protocol_matches_brute_force(backend, chunk):
    x, y = make_set(n=200, seed=5)
    q, qy, g, gy = x[:70], y[:70].copy(), x[70:], y[70:]
    qy[:3] = 5000  # query labels absent from the gallery: R = 0, skipped
    q[10] = g[0]  # a query identical to a gallery item: must NOT be excluded
    exp = brute_metrics(q, qy, g, gy, KS, False)
    res = retrieval_metrics(g, gy, KS, query_embeddings=q, query_labels=qy, backend=backend, chunk_size=chunk)
    assert_close(res, exp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, "numpy64", "numpy32"])
def test_input_dtypes_and_containers(dtype):
    x, y = make_set(n=120, seed=6)
    exp = brute_metrics(x, y, x, y, KS, True)
    if dtype == "numpy64":
        xe, ye = x, y
    elif dtype == "numpy32":
        xe, ye = x.astype(np.float32), y.astype(np.int32)
    else:
        xe, ye = torch.from_numpy(x).to(dtype), torch.from_numpy(y)
    for backend in BACKENDS:
        assert_close(retrieval_metrics(xe, ye, KS, backend=backend, chunk_size=50), exp)


def test_grid_data_torch_and_faiss_agree_with_brute_force():
    # continuous-looking data; the grid is pre-normalised, so compare the low-level API (normalize=False)
    x, y = grid_set(n=150, seed=7)
    ranking = brute_ranking(x, x, True, normalize=False)
    nr = count_relevant(y, y, exclude_self=True)
    k = int(nr.max())
    knn_lab = np.stack([y[o[:16]] for o, _ in ranking])
    exp = brute_metrics(x, y, x, y, (1, 2, 4, 8, 16), True, normalize=False)
    rec = recall_at_k(knn_lab, y, (1, 2, 4, 8, 16), num_relevant=nr)
    for kk in (1, 2, 4, 8, 16):
        assert abs(rec[kk] - exp[f"recall@{kk}"]) <= TOL
    assert abs(map_at_r(knn_lab[:, :k], y, nr) - exp["map@r"]) <= TOL
    assert abs(r_precision(knn_lab[:, :k], y, nr) - exp["r_precision"]) <= TOL
    for backend in BACKENDS:
        _, idx = knn_search(x, k=16, normalize=False, backend=backend, chunk_size=40)
        np.testing.assert_array_equal(y[idx.numpy()], knn_lab)


def test_low_level_functions_and_count_relevant():
    x, y = make_set(n=100, seed=8)
    ranking = brute_ranking(x, x, True)
    nr = count_relevant(y, y, exclude_self=True)
    np.testing.assert_array_equal(nr.numpy(), [(y == v).sum() - 1 for v in y])
    knn_lab = np.stack([y[o] for o, _ in ranking])
    exp = brute_metrics(x, y, x, y, (1, 3, 99), True)
    rec = recall_at_k(torch.from_numpy(knn_lab), y, (1, 3, 99), num_relevant=nr)
    assert_close({f"recall@{k}": v for k, v in rec.items()}, {k: v for k, v in exp.items() if "recall" in k})
    assert abs(map_at_r(knn_lab, y, nr) - exp["map@r"]) <= TOL
    assert abs(r_precision(knn_lab, y, nr) - exp["r_precision"]) <= TOL
    with pytest.raises(ValueError):
        map_at_r(knn_lab[:, :1], y, nr)  # fewer neighbours than max R
    with pytest.raises(ValueError):
        recall_at_k(knn_lab[:, :2], y, (4,))


def test_perfect_embedding_and_singletons():
    rng = np.random.default_rng(9)
    n_classes = 12
    y = np.concatenate([np.repeat(np.arange(n_classes), rng.integers(2, 9, n_classes)), [100, 101]])
    x = np.eye(16)[y % 16] * 2.0 ** rng.integers(-2, 3, size=(len(y), 1))  # same vector for a whole class
    x[-2:] = np.eye(16)[14:16]  # singletons: skipped
    for backend in BACKENDS:
        res = retrieval_metrics(x, y, (1, 2), backend=backend, chunk_size=5)
        assert res["map@r"] == 1.0 and res["r_precision"] == 1.0 and res["recall@1"] == 1.0
    all_single = retrieval_metrics(np.eye(5), np.arange(5), (1,))
    assert all(math.isnan(v) for v in all_single.values())


def test_ties_between_classes_are_broken_by_index():
    # query 0 has a positive (index 3) and two negatives (1, 2) at exactly the same similarity
    x = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [-1, 0]], dtype=np.float32)
    y = np.array([0, 1, 2, 0, 3])
    res = retrieval_metrics(x, y, (1, 2, 3), r_precision=False)
    exp = brute_metrics(x, y, x, y, (1, 2, 3), True)
    assert_close(res, {k: v for k, v in exp.items() if k != "r_precision"})
    # only queries 0 and 3 have R > 0; for both the positive ties with two negatives of lower index
    assert (
        res["recall@1"] == 0.0 and res["recall@2"] == 0.0 and res["recall@3"] == 1.0 and res["map@r"] == 0.0
    )


def test_repeated_runs_are_identical():
    x, y = make_set(n=150, seed=10)
    xt = torch.from_numpy(x).float()
    runs = [retrieval_metrics(xt, y, KS, chunk_size=c) for c in (None, None, 11)]
    assert runs[0] == runs[1] == runs[2]


def test_input_validation():
    x, y = make_set(n=20, seed=11)
    with pytest.raises(ValueError):
        retrieval_metrics(x, y[:-1])
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, query_embeddings=x)
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, backend="gpu")
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, ks=(0,))


# ------------------------------------------------------------------------------------------------
# pytorch-metric-learning's AccuracyCalculator as an oracle for the metric definitions

pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")


class ExactKNN:
    """PML knn_func with the same deterministic ranking (faiss/topk order ties arbitrarily)."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        sims = query.double() @ reference.double().T
        idx = torch.arange(reference.shape[0])
        out = []
        for i in range(query.shape[0]):
            order = sorted(idx.tolist(), key=lambda j, s=sims[i]: (-float(s[j]), j))
            if ref_includes_query:
                order.remove(i)
            out.append(order[:k])
        ind = torch.tensor(out, dtype=torch.long)
        return -sims.gather(1, ind).float(), ind


def pml_metrics(q, qy, ref=None, ry=None):
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=ExactKNN(),
    )
    qt = prepare_embeddings(q, "cpu")
    if ref is None:
        r = calc.get_accuracy(qt, torch.as_tensor(qy))
    else:
        r = calc.get_accuracy(
            qt,
            torch.as_tensor(qy),
            prepare_embeddings(ref, "cpu"),
            torch.as_tensor(ry),
            ref_includes_query=False,
        )
    return {
        "recall@1": r["precision_at_1"],
        "map@r": r["mean_average_precision_at_r"],
        "r_precision": r["r_precision"],
    }


@pytest.mark.parametrize("seed", [12, 13])
def test_matches_pml_self(seed):
    x, y = make_set(n=140, seed=seed)
    exp = pml_metrics(x, y)
    for backend in BACKENDS:
        assert_close(retrieval_metrics(x, y, (1,), backend=backend, chunk_size=33), exp)


def test_matches_pml_query_gallery():
    x, y = make_set(n=180, seed=14)
    q, qy, g, gy = x[:60], y[:60].copy(), x[60:], y[60:]
    qy[:2] = 7000
    exp = pml_metrics(q, qy, g, gy)
    for backend in BACKENDS:
        assert_close(
            retrieval_metrics(g, gy, (1,), query_embeddings=q, query_labels=qy, backend=backend), exp
        )


def test_matches_pml_default_knn_on_generic_data():
    # PML's own faiss search; continuous data (ties unlikely): agreement of the definitions end to end
    rng = np.random.default_rng(15)
    y = rng.integers(0, 25, 200)
    x = rng.standard_normal((25, 32))[y] + 1.0 * rng.standard_normal((200, 32))
    xp = prepare_embeddings(x, "cpu")
    r = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    ).get_accuracy(xp, torch.as_tensor(y))
    res = retrieval_metrics(x, y, (1,))
    assert abs(res["recall@1"] - r["precision_at_1"]) <= TOL
    assert abs(res["map@r"] - r["mean_average_precision_at_r"]) <= TOL
    assert abs(res["r_precision"] - r["r_precision"]) <= TOL


# ------------------------------------------------------------------------------------------------
# clustering


def brute_f1(a, b):
    tp = fp = fn = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            same_a, same_b = a[i] == a[j], b[i] == b[j]
            tp += same_a and same_b
            fp += same_b and not same_a
            fn += same_a and not same_b
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_nmi_f1_against_sklearn_and_hand_computation():
    rng = np.random.default_rng(16)
    a = rng.integers(0, 7, 300)
    b = np.where(rng.random(300) < 0.6, a * 3 + 11, rng.integers(0, 9, 300))  # noisy, relabelled
    assert abs(f1_pair_counting(a, b) - brute_f1(a, b)) <= 1e-12
    assert abs(nmi(a, a[::-1][::-1] * 5 - 2) - 1.0) <= 1e-12
    assert f1_pair_counting(a, a + 100) == 1.0
    skm = pytest.importorskip("sklearn.metrics")
    assert abs(nmi(a, b) - skm.normalized_mutual_info_score(a, b)) <= 1e-9
    assert abs(nmi(torch.from_numpy(a), torch.from_numpy(b)) - skm.normalized_mutual_info_score(a, b)) <= 1e-9
    pc = skm.cluster.pair_confusion_matrix(a, b)  # ordered pairs
    tp, fp, fn = pc[1, 1], pc[0, 1], pc[1, 0]
    assert abs(f1_pair_counting(a, b) - 2 * tp / (2 * tp + fp + fn)) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_and_cluster_metrics(backend):
    rng = np.random.default_rng(17)
    centres = np.eye(8) * 10
    y = np.repeat(np.arange(8), 30)
    x = centres[y] + 0.1 * rng.standard_normal((240, 8))
    a1 = kmeans(x, 8, seed=0, backend="torch")
    a2 = kmeans(torch.from_numpy(x), 8, seed=0, backend="torch")
    assert torch.equal(a1, a2)  # seeded, deterministic
    res = cluster_metrics(x, y, backend=backend)
    assert set(res) == {"nmi", "f1"}
    assert res["nmi"] > 0.95 and res["f1"] > 0.9
    full = retrieval_metrics(x, y, (1,), nmi=True, f1=True, backend=backend)
    assert {"nmi", "f1", "recall@1", "map@r", "r_precision"} == set(full)
    qg = retrieval_metrics(x[::2], y[::2], (1,), query_embeddings=x[1::2], query_labels=y[1::2], nmi=True)
    assert "nmi" in qg and "f1" not in qg


@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_embeddings_all_ties(backend, monkeypatch):
    # every row identical: every cut is ambiguous; force tiny batches in the full-sort fix-up path
    import promptdml.metrics.knn as knn_mod

    monkeypatch.setattr(knn_mod, "_FIXUP_BYTES", 16 * 8 * 5)
    rng = np.random.default_rng(18)
    y = rng.integers(0, 20, 120)
    x = np.ones((120, 8))
    assert_close(
        retrieval_metrics(x, y, (1, 2, 4), backend=backend, chunk_size=17),
        brute_metrics(x, y, x, y, (1, 2, 4), True),
    )
    _, idx = knn_search(x, k=5, backend=backend, chunk_size=17)
    exp = np.array([[j for j in range(6) if j != r][:5] for r in range(120)])
    np.testing.assert_array_equal(idx.numpy(), exp)
