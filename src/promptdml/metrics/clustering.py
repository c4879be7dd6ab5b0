"""Clustering metrics: seeded k-means (torch, or faiss when installed), NMI and pair-counting F1.

* ``nmi``: normalised mutual information with the arithmetic-mean normalisation
  ``MI / ((H(true) + H(pred)) / 2)`` (sklearn's default); 1.0 when both labelings are a single
  cluster.
* ``f1_pair_counting``: over unordered pairs of items, a pair is "predicted positive" when both
  items share a cluster and "positive" when they share a class; F1 = 2PR / (P + R). When neither
  labeling has any pair in a common group, F1 = 1.0 (perfect agreement); when only one has, 0.0.
"""

from __future__ import annotations

import numpy as np
import torch

from .knn import _faiss, _iter_chunks, _resolve_backend, as_labels, compute_device, prepare_embeddings

__all__ = ["cluster_metrics", "contingency", "f1_pair_counting", "kmeans", "nmi"]


def contingency(
    labels_true, labels_pred
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Sparse contingency table of two labelings.

    Returns ``(row, col, cell, class_sizes, cluster_sizes, n)``: for every nonzero cell its class id,
    cluster id and count (int64 numpy arrays), the marginals, and the number of items.
    """
    a = as_labels(labels_true, "cpu")
    b = as_labels(labels_pred, "cpu")
    if a.shape != b.shape:
        raise ValueError("labelings must have the same length")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    nb = int(bi.max()) + 1 if bi.numel() else 1
    keys, cells = torch.unique(ai * nb + bi, return_counts=True)
    return (
        (keys // nb).numpy(),
        (keys % nb).numpy(),
        cells.numpy().astype(np.int64),
        torch.bincount(ai).numpy().astype(np.int64),
        torch.bincount(bi).numpy().astype(np.int64),
        int(a.numel()),
    )


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0].astype(np.float64) / n
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic normalisation, natural log)."""
    ci, cj, nij, a, b, n = contingency(labels_true, labels_pred)
    if n == 0:
        return float("nan")
    if len(a) == len(b) == 1:
        return 1.0
    nij = nij.astype(np.float64)
    # MI = sum_ij n_ij/n * log(n * n_ij / (a_i b_j))
    mi = float(
        (
            nij
            / n
            * (np.log(nij) + np.log(n) - np.log(a[ci].astype(np.float64)) - np.log(b[cj].astype(np.float64)))
        ).sum()
    )
    mi = max(mi, 0.0)
    h = (_entropy(a, n) + _entropy(b, n)) / 2.0
    return float(mi / h) if h > 0 else 0.0


_nmi = nmi


def f1_pair_counting(labels_true, labels_pred) -> float:
    """Pair-counting F1 between a class labeling and a clustering."""
    _, _, cells, a, b, n = contingency(labels_true, labels_pred)

    def pairs(x: np.ndarray) -> int:
        x = x.astype(np.int64)
        return int((x * (x - 1) // 2).sum())

    tp, pos_true, pos_pred = pairs(cells), pairs(a), pairs(b)
    if pos_true == 0 and pos_pred == 0:
        return 1.0
    if tp == 0:
        return 0.0
    precision = tp / pos_pred
    recall = tp / pos_true
    return float(2 * precision * recall / (precision + recall))


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared L2) per point, chunked: returns (assignment, squared distance)."""
    half_sq = 0.5 * (c * c).sum(1)
    x_sq = (x * x).sum(1)
    assign = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s, e in _iter_chunks(x.shape[0], chunk):
        score = torch.mm(x[s:e], c.T).sub_(half_sq)  # x.c - |c|^2/2: larger is nearer
        best, arg = score.max(1)
        assign[s:e] = arg
        dist[s:e] = (x_sq[s:e] - 2 * best).clamp_(min=0)
    return assign, dist


def _kmeans_pp_init(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling); uniform draws from a seeded CPU generator, so any device works."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(k, generator=gen, dtype=torch.float64).tolist()
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    first = min(int(u[0] * n), n - 1)
    chosen = [first]
    d2 = (x_sq - 2 * torch.mv(x, x[first]) + x_sq[first]).clamp_(min=0)
    for i in range(1, k):
        cum = torch.cumsum(d2.to(torch.float32 if x.device.type == "mps" else torch.float64), 0)
        total = float(cum[-1])
        if total <= 0:  # fewer distinct points than k: take the next unused index
            used = set(chosen)
            nxt = next(j for j in range(n) if j not in used)
        else:
            nxt = min(
                int(
                    torch.searchsorted(cum, torch.tensor([u[i] * total], dtype=cum.dtype, device=cum.device))
                ),
                n - 1,
            )
        chosen.append(nxt)
        d2 = torch.minimum(d2, (x_sq - 2 * torch.mv(x, x[nxt]) + x_sq[nxt]).clamp_(min=0))
    return x[torch.tensor(chosen, device=x.device)].clone()


def kmeans(
    x,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    backend: str = "auto",
    device=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Lloyd k-means (squared L2) on the rows of ``x``; returns the cluster id of every row.

    ``backend="torch"``: seeded k-means++ initialisation, ``niter`` Lloyd
    iterations (stops early when assignments no longer change); an empty cluster is re-seeded with
    the point farthest from its centroid. ``"faiss"``: ``faiss.Kmeans`` with the same seed/niter.
    ``"auto"``: torch. Deterministic for a fixed seed and device.
    """
    dev = compute_device(device, x)
    xt = prepare_embeddings(x, dev, normalize=False)
    n = xt.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if backend == "faiss" and _resolve_backend("faiss", dev) == "faiss":
        faiss = _faiss()
        km = faiss.Kmeans(xt.shape[1], k, niter=niter, seed=seed, verbose=False)
        xn = xt.cpu().numpy()
        km.train(xn)
        _, idx = km.index.search(xn, 1)
        return torch.from_numpy(idx[:, 0].astype(np.int64)).to(dev)
    c = _kmeans_pp_init(xt, k, int(seed))
    chunk = int(chunk_size) if chunk_size else max(1, (256 * 2**20) // (4 * k))
    assign, dist = _assign(xt, c, chunk)
    for _ in range(niter):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, xt)
        nonempty = counts > 0
        c = torch.where(nonempty[:, None], sums / counts.clamp(min=1)[:, None].to(sums.dtype), c)
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            far = torch.sort(dist, descending=True, stable=True).indices[: empty.numel()]
            c[empty] = xt[far]
        new_assign, dist = _assign(xt, c, chunk)
        if torch.equal(new_assign, assign) and not empty.numel():
            break
        assign = new_assign
    return assign


def cluster_metrics(
    embeddings,
    labels,
    *,
    nmi: bool = True,
    f1: bool = True,
    seed: int = 0,
    niter: int = 20,
    backend: str = "auto",
    device=None,
    normalize: bool = True,
) -> dict[str, float]:
    """k-means with k = number of classes on (L2-normalised) embeddings, then NMI and/or F1."""
    dev = compute_device(device, embeddings)
    x = prepare_embeddings(embeddings, dev, normalize=normalize)
    y = as_labels(labels, dev)
    out: dict[str, float] = {}
    if not (nmi or f1):
        return out
    k = int(torch.unique(y).numel())
    pred = kmeans(x, k, niter=niter, seed=seed, backend=backend, device=dev)
    if nmi:
        out["nmi"] = _nmi(y, pred)
    if f1:
        out["f1"] = f1_pair_counting(y, pred)
    return out
