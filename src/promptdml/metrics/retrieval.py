"""Retrieval metrics: Recall@K, MAP@R, R-Precision (and NMI / pair-counting F1 on request).

Definitions (docs/evaluate.md, 'The metrics'). For a query with label ``y``, ``R`` is the number of *other*
items labelled ``y`` in the reference set (the query itself is excluded by index in the
test-set-against-itself protocol; in the query/gallery protocol nothing is excluded). Queries
with ``R = 0`` are skipped by every retrieval metric (they are not counted in the mean).

* Recall@K: 1 if any of the K nearest neighbours has label ``y``.
* MAP@R: ``(1/R) * sum_{i<=R} P(i) * rel(i)``, so a perfect embedding scores exactly 1.0.
* R-Precision: (number of relevant items among the R nearest) / R.

Neighbours are ranked by descending fp32 cosine similarity, exact ties by ascending reference
index (see :mod:`promptdml.metrics.knn`); the metrics are therefore those of a full stable sort.

Two exact evaluation paths:

* ``"torch"`` (any device): per query chunk one ``torch.mm`` block, then ``torch.topk`` for only
  ``max R + 1`` items (MAP@R / R-Precision) and, for Recall@K at *any* K, the rank of the first
  relevant item obtained by counting how many items score above the best relevant one
  (elementwise passes over the block, no large-k top-k at all).
* ``"faiss"`` (CPU): ``IndexFlatIP`` search for ``max(max K, max R)`` (+1 tie margin) neighbours.

* exact fast path (``precision="auto"`` on a CPU with native bf16, or ``"bf16"`` / ``"fp16"``): the
  torch path's block in reduced precision, candidates re-scored in fp32 and certified by an error
  bound (:mod:`promptdml.metrics.fast`); the metrics are those of the fp32 torch path.

``backend="auto"`` uses the torch path (it is the faster one; see BENCHMARKS.md, eval_speed).
Both paths give identical metrics whenever the two backends compute identical fp32 similarities;
otherwise only pairs of items whose similarities differ in the last fp32 bit can order
differently (on 60k SOP-like embeddings: MAP@R differed by 2e-7 in one run, 0 in others).
Recall@K for K >= the number of candidates is 1 for every query with R > 0. Per-query values are
summed once at the end, so the summation order does not depend on ``chunk_size``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch

from promptdml.progress import progress_bar

from . import fast
from .knn import (
    _full_row_topk,
    _iter_chunks,
    _resolve_backend,
    _sort_by_sim_then_index,
    as_labels,
    compute_device,
    default_chunk_size,
    iter_knn,
    prepare_embeddings,
    row_batches,
    similarity_block,
)

__all__ = [
    "count_relevant",
    "map_at_r",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]


# --------------------------------------------------------------------------------------------------
# label bookkeeping


class _LabelGroups:
    """Reference items grouped by label (ascending index inside each group)."""

    def __init__(self, ref_labels: torch.Tensor):
        self.order = torch.sort(ref_labels, stable=True).indices
        self.uniq, self.counts = torch.unique_consecutive(ref_labels[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def group_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Group id of each label, -1 where the label does not occur in the reference set."""
        if self.uniq.numel() == 0:
            return torch.full_like(labels, -1)
        pos = torch.searchsorted(self.uniq, labels).clamp(max=self.uniq.numel() - 1)
        return torch.where(self.uniq[pos] == labels, pos, torch.full_like(pos, -1))

    def size_of(self, groups: torch.Tensor) -> torch.Tensor:
        return torch.where(groups >= 0, self.counts[groups.clamp(min=0)], torch.zeros_like(groups))

    def members(self, groups: torch.Tensor, width: int) -> torch.Tensor:
        """``[len(groups), width]`` reference indices of each group's members, padded with -1."""
        g = groups.clamp(min=0)
        j = torch.arange(width, device=groups.device)
        ok = (j < self.size_of(groups)[:, None]) & (groups[:, None] >= 0)
        pos = (self.starts[g][:, None] + j).clamp(max=max(0, self.order.numel() - 1))
        return torch.where(ok, self.order[pos], torch.full_like(pos, -1))


def count_relevant(query_labels, reference_labels, exclude_self: bool) -> torch.Tensor:
    """R per query: number of reference items with the query's label, minus the query itself if
    ``exclude_self`` (then query and reference are the same set)."""
    ref_y = as_labels(reference_labels)
    qy = as_labels(query_labels, ref_y.device)
    groups = _LabelGroups(ref_y)
    return groups.size_of(groups.group_of(qy)) - int(exclude_self)


# --------------------------------------------------------------------------------------------------
# per-query quantities


def _ap_rp(rel: torch.Tensor, num_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP@R and R-Precision per row from ranked relevance ``rel`` [c, k] (k >= R of each valid row)."""
    if rel.device.type == "mps":  # no float64 on MPS; these arrays are small ([chunk, max R + 1])
        rel, num_rel = rel.cpu(), num_rel.cpu()
    k = rel.shape[1]
    pos = torch.arange(1, k + 1, device=rel.device)
    relw = rel & (pos <= num_rel[:, None])
    cum = torch.cumsum(relw, dim=1, dtype=torch.int64)
    prec = cum.to(torch.float64) / pos.to(torch.float64)
    denom = num_rel.clamp(min=1).to(torch.float64)
    ap = (prec * relw).sum(1) / denom
    rp = relw.sum(1).to(torch.float64) / denom
    return ap, rp


def _first_hit(rel: torch.Tensor) -> torch.Tensor:
    """1-based rank of the first relevant item per row, ``k + 1`` when none is relevant."""
    k = rel.shape[1]
    pos = torch.arange(1, k + 1, device=rel.device).expand_as(rel)
    return torch.where(rel, pos, torch.full_like(pos, k + 1)).min(1).values


class _Acc:
    """Accumulates per-query results; sums happen once at the end, so chunking cannot change them."""

    def __init__(self, ks: Sequence[int], n_queries: int = 0, device=None):
        self.ks = list(ks)
        self.n = 0
        self.hits = [0] * len(self.ks)
        self.ap = torch.zeros(n_queries, dtype=torch.float64)  # per query, on CPU
        self.rp = torch.zeros(n_queries, dtype=torch.float64)

    def add(self, s: int, valid, first=None, ap=None, rp=None):
        self.n += int(valid.sum())
        if first is not None:
            for i, k in enumerate(self.ks):
                self.hits[i] += int(((first <= k) & valid).sum())
        if ap is not None:
            e = s + valid.shape[0]
            valid = valid.cpu()
            zero = torch.zeros((), dtype=torch.float64)
            self.ap[s:e] = torch.where(valid, ap.cpu(), zero)
            self.rp[s:e] = torch.where(valid, rp.cpu(), zero)

    def result(self, map_r: bool, rprec: bool) -> dict[str, float]:
        n = self.n
        out = {f"recall@{k}": (h / n if n else float("nan")) for k, h in zip(self.ks, self.hits, strict=True)}
        if map_r:
            out["map@r"] = float(self.ap.sum()) / n if n else float("nan")
        if rprec:
            out["r_precision"] = float(self.rp.sum()) / n if n else float("nan")
        return out


# --------------------------------------------------------------------------------------------------
# lower-level metric functions on ranked neighbour labels


def _check_knn_labels(knn_labels, query_labels, num_relevant):
    kl = (
        as_labels(knn_labels.reshape(-1)).reshape(knn_labels.shape)
        if not isinstance(knn_labels, torch.Tensor)
        else knn_labels.to(torch.int64)
    )
    if kl.ndim != 2:
        raise ValueError("knn_labels must be [Q, k]")
    qy = as_labels(query_labels, kl.device)
    if qy.shape[0] != kl.shape[0]:
        raise ValueError("knn_labels and query_labels disagree in the number of queries")
    if num_relevant is None:
        nr = None
    else:
        nr = torch.as_tensor(num_relevant, device=kl.device).to(torch.int64)
        if nr.shape != qy.shape:
            raise ValueError("num_relevant must be [Q]")
    return kl, qy, nr


def recall_at_k(knn_labels, query_labels, ks: Iterable[int] = (1,), num_relevant=None) -> dict[int, float]:
    """Recall@K from ranked neighbour labels ``[Q, k]`` (ordered nearest first, self excluded).

    Queries with ``num_relevant == 0`` are skipped when ``num_relevant`` (see :func:`count_relevant`)
    is given. Every K must be <= k.
    """
    kl, qy, nr = _check_knn_labels(knn_labels, query_labels, num_relevant)
    ks = _check_ks(ks)
    if ks and ks[-1] > kl.shape[1]:
        raise ValueError(f"K={ks[-1]} exceeds the {kl.shape[1]} neighbours given")
    valid = nr > 0 if nr is not None else torch.ones_like(qy, dtype=torch.bool)
    acc = _Acc(ks)
    acc.add(0, valid, first=_first_hit(kl == qy[:, None]))
    return {k: v for k, v in zip(ks, acc.result(False, False).values(), strict=True)}


def _ap_rp_metric(knn_labels, query_labels, num_relevant) -> tuple[float, float]:
    kl, qy, nr = _check_knn_labels(knn_labels, query_labels, num_relevant)
    if nr is None:
        raise ValueError("num_relevant is required")
    valid = nr > 0
    if valid.any() and int(nr[valid].max()) > kl.shape[1]:
        raise ValueError(f"need at least max R = {int(nr[valid].max())} neighbours, got {kl.shape[1]}")
    acc = _Acc((), qy.shape[0], qy.device)
    ap, rp = _ap_rp(kl == qy[:, None], nr)
    acc.add(0, valid, ap=ap, rp=rp)
    res = acc.result(True, True)
    return res["map@r"], res["r_precision"]


def map_at_r(knn_labels, query_labels, num_relevant) -> float:
    """MAP@R from ranked neighbour labels ``[Q, k]`` with ``k >= max R``; R=0 queries skipped."""
    return _ap_rp_metric(knn_labels, query_labels, num_relevant)[0]


def r_precision(knn_labels, query_labels, num_relevant) -> float:
    """R-Precision from ranked neighbour labels ``[Q, k]`` with ``k >= max R``; R=0 queries skipped."""
    return _ap_rp_metric(knn_labels, query_labels, num_relevant)[1]


def _check_ks(ks) -> list[int]:
    if ks is None:
        return []
    if isinstance(ks, int):
        ks = (ks,)
    out = sorted({int(k) for k in ks})
    if out and out[0] < 1:
        raise ValueError(f"every K must be >= 1, got {ks}")
    return out


# --------------------------------------------------------------------------------------------------
# evaluation paths


def _query_chunks(n: int, num_rel: torch.Tensor, chunk: int, bar=None):
    """``(start, end, relevant counts, valid)`` of each chunk of queries that has a query with a relevant item
    (``valid``: those queries); advances the progress bar over every chunk."""
    for s, e in _iter_chunks(n, chunk):
        if bar is not None:
            bar.update(e - s)
        rc = num_rel[s:e]
        valid = rc > 0
        if bool(valid.any()):
            yield s, e, rc, valid


def _eval_torch(q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, bar=None) -> _Acc:
    n_ref = ref.shape[0]
    n_avail = n_ref - int(exclude_self)
    groups = _LabelGroups(ref_y)
    q_groups = groups.group_of(qy)
    acc = _Acc(ks, q.shape[0], q.device)
    col = torch.arange(n_ref, device=q.device)
    sum_dtype = torch.float32 if n_ref < 2**24 else torch.float64
    for s, e, rc, valid in _query_chunks(q.shape[0], num_rel, chunk, bar):
        c = e - s
        rows = torch.arange(c, device=q.device)
        S = similarity_block(q[s:e], ref, s, exclude_self)
        ap = rp = first = None
        if need_rank:
            kk = min(int(rc.max()) + 1, n_avail)
            vals, idx = torch.topk(S, kk, dim=1, largest=True, sorted=True)
            cut = rc.clamp(min=1, max=kk)
            amb = valid & (cut < kk) & (vals[rows, cut - 1] == vals[rows, cut.clamp(max=kk - 1)])
            vals, idx = _sort_by_sim_then_index(vals, idx)
            if bool(amb.any()):
                amb = amb.nonzero().flatten()
                _, idx[amb] = _full_row_topk(S.__getitem__, amb, n_ref, kk)
            ap, rp = _ap_rp(ref_y[idx] == qy[s:e, None], rc)
        if ks:
            g = q_groups[s:e]
            width = int(groups.size_of(g).max())
            mem = groups.members(g, width)  # [c, width] reference indices of the query's class
            ok = mem >= 0
            if exclude_self:
                ok &= mem != (rows + s)[:, None]
            ps = S.gather(1, mem.clamp(min=0))
            ps = torch.where(ok, ps, torch.full_like(ps, float("-inf")))
            best = ps.max(1).values  # similarity of the best relevant item
            is_best = ok & (ps == best[:, None])
            n_best = is_best.sum(1)
            best_idx = torch.where(is_best, mem, torch.full_like(mem, n_ref)).min(1).values
            best = torch.where(valid, best, torch.zeros_like(best))
            # rank of the best relevant item = 1 + #items ranked before it (higher sim, or equal sim and
            # lower index). sign(S - best) is exact: 1 above, 0 equal, -1 below (self is -inf).
            S.sub_(best[:, None]).sign_()
            ssum = S.sum(1, dtype=sum_dtype)
            S.abs_()
            asum = S.sum(1, dtype=sum_dtype)
            above = ((asum + ssum) / 2).round().to(torch.int64)
            equal = n_ref - asum.round().to(torch.int64)
            first = 1 + above
            tie = valid & (equal > n_best)  # other (non-relevant) items tie with the best relevant one
            if bool(tie.any()):  # count the tied items with a lower index than the best relevant one
                for b in row_batches(tie.nonzero().flatten(), n_ref, bytes_per_entry=8):
                    first[b] += ((S[b] == 0) & (col < best_idx[b][:, None])).sum(1)
        acc.add(s, valid, first=first, ap=ap, rp=rp)
        del S
    return acc


def _eval_fast(q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, precision, bar=None) -> _Acc:
    """The exact fast path (:mod:`promptdml.metrics.fast`): same metrics as :func:`_eval_torch`.

    Per chunk one reduced-precision block (a set against itself of at least two panels: the candidates of
    :func:`fast.symmetric_candidates`, which computes each pair once, and reduced rows recomputed only
    for the queries that need more); MAP@R / R-Precision from the certified fp32 top-R; the rank
    of the best relevant item (Recall@K) from the candidates when it is certified among them, else by
    counting the items whose reduced value is provably above it plus the fp32 re-scored items of the
    uncertain band around it.
    """
    n_ref = ref.shape[0]
    n_avail = n_ref - int(exclude_self)
    red = fast.Reduced(q, ref, precision)
    groups = _LabelGroups(ref_y)
    q_groups = groups.group_of(qy)
    acc = _Acc(ks, q.shape[0], q.device)
    stats = {"queries": 0, "wider": 0, "fp32_rows": 0, "rank_count_rows": 0, "band_pairs": 0, "symmetric": 0}
    fast.LAST_STATS.clear()
    cand = None
    if fast.use_symmetric(red, exclude_self):  # a set against itself: each pair once
        need = torch.where(num_rel > 0, num_rel, torch.zeros_like(num_rel)) if need_rank else num_rel[:0]
        width = max(1, int(need.max()) if need.numel() else 1)
        cand = fast.symmetric_candidates(red, min(n_avail, width + fast.CANDIDATE_MARGIN), bar=bar, stats=stats)
        stats["symmetric"] = 1
        bar = None
    for s, e, rc, valid in _query_chunks(q.shape[0], num_rel, chunk, bar):
        c = e - s
        stats["queries"] += c
        qc = q[s:e]
        src = fast.chunk_source(red, cand, s, e, exclude_self)
        with fast.small_op_threads(q.device):
            acc_args = _fast_chunk(src, qc, s, e, ref, ref_y, qy, rc, valid, groups, q_groups, ks, need_rank,
                                   exclude_self, red, n_avail, stats)
        acc.add(s, valid, **acc_args)
        del src
    fast.LAST_STATS.update(stats)
    return acc


def _fast_chunk(src, qc, s, e, ref, ref_y, qy, rc, valid, groups, q_groups, ks, need_rank, exclude_self, red,
                n_avail, stats) -> dict:
    """One chunk of :func:`_eval_fast`: ``first`` / ``ap`` / ``rp`` for :meth:`_Acc.add`."""
    c = e - s
    n_ref = ref.shape[0]
    need = torch.where(valid, rc, torch.zeros_like(rc)) if need_rank else torch.zeros_like(rc)
    width = max(1, int(need.max()))
    rows = torch.arange(c, device=qc.device)
    mem = ok = None
    if ks:  # the query's class members, re-scored together with the candidates
        g = q_groups[s:e]
        mem = groups.members(g, int(groups.size_of(g).max()))
        ok = mem >= 0
        if exclude_self:
            ok &= mem != (rows + s)[:, None]
    sims, idx, info = fast.exact_topk_chunk(
        src, qc, ref, s, need, width, exclude_self, red, n_avail, None if mem is None else mem.clamp(min=0)
    )
    stats["wider"] += info["wider"]
    stats["fp32_rows"] += info["fp32_rows"]
    ap = rp = first = None
    if need_rank:
        ap, rp = _ap_rp(ref_y[idx] == qy[s:e, None], rc)
    if ks:
        ps = info["extra_sims"]
        ps = torch.where(ok, ps, torch.full_like(ps, float("-inf")))
        best = ps.max(1).values  # fp32 similarity of the best relevant item
        best_idx = torch.where(ok & (ps == best[:, None]), mem, torch.full_like(mem, n_ref)).min(1).values
        # certified among the candidates: everything that precedes it is a candidate too
        cs, ci = info["cand_sims"], info["cand_idx"]
        before = (cs > best[:, None]) | ((cs == best[:, None]) & (ci < best_idx[:, None]))
        first = 1 + before.sum(1)
        count = (valid & ~(best.double() > info["upper"])).nonzero().flatten()
        stats["rank_count_rows"] += int(count.numel())
        for b in row_batches(count, n_ref, bytes_per_entry=8):
            first[b], n_band = _rank_by_band(src.rows(b), qc[b], ref, best[b], best_idx[b], red)
            stats["band_pairs"] += n_band
    return {"first": first, "ap": ap, "rp": rp}


def _rank_by_band(sb, qb, ref, best, best_idx, red) -> tuple[torch.Tensor, int]:
    """1-based fp32 rank of ``(best, best_idx)`` in each row of a reduced block (see module fast)."""
    sf = sb.float()
    hi = fast._round_up32(fast._above_threshold(best.double(), red.a, red.b))[:, None]
    lo = fast._round_down32(fast._below_threshold(best.double(), red.a, red.b))[:, None]
    above = (sf > hi).sum(1)
    r, c = ((sf >= lo) & (sf <= hi)).nonzero(as_tuple=True)
    sv = fast.rescore_pairs(qb, ref, r, c)
    fast.check_bound(sf[r, c], sv, red.a, red.b)
    br, bi = best[r], best_idx[r]
    prec = (sv > br) | ((sv == br) & (c < bi))
    above.index_add_(0, r, prec.to(above.dtype))
    return 1 + above, int(r.numel())


def _eval_knn(q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, backend, bar=None) -> _Acc:
    n_avail = ref.shape[0] - int(exclude_self)
    valid_all = num_rel > 0
    max_r = int(num_rel[valid_all].max()) if bool(valid_all.any()) else 0
    kk = min(max(ks[-1] if ks else 0, max_r if need_rank else 0, 1), n_avail)
    acc = _Acc(ks, q.shape[0], q.device)
    for s, e, _, idx in iter_knn(q, ref, kk, exclude_self=exclude_self, backend=backend, chunk_size=chunk):
        if bar is not None:
            bar.update(e - s)
        rc = num_rel[s:e]
        rel = ref_y[idx] == qy[s:e, None]
        ap = rp = None
        if need_rank:
            ap, rp = _ap_rp(rel, rc)
        acc.add(s, rc > 0, first=_first_hit(rel) if ks else None, ap=ap, rp=rp)
    return acc


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    *,
    query_embeddings=None,
    query_labels=None,
    map_r=True,
    r_precision=True,
    nmi=False,
    f1=False,
    backend="auto",
    device=None,
    chunk_size=None,
    seed=0,
    progress=False,
    precision="auto",
) -> dict[str, float]:
    """Exact retrieval metrics of an embedding.

    Args:
        embeddings, labels: ``[N, E]`` float and ``[N]`` int (torch or numpy); L2-normalised inside,
            ranked in fp32 (see :mod:`promptdml.metrics.knn`).
        ks: the K list for Recall@K (any K, also K > N-1, where Recall@K = 1).
        query_embeddings, query_labels: if given, these are the queries and ``embeddings`` is the
            gallery (query/gallery protocol, e.g. In-Shop; no self exclusion). Otherwise the set is
            evaluated against itself with each query's own index excluded.
        map_r, r_precision: compute MAP@R / R-Precision.
        nmi, f1: k-means (k = number of classes, seeded with ``seed``) NMI / pair-counting F1, on the
            evaluated set (query and gallery together in the query/gallery protocol).
        backend: ``"auto"`` | ``"torch"`` | ``"faiss"`` (see module docstring); also used for k-means.
        device: compute device (default: that of ``embeddings`` if a tensor, else CPU).
        chunk_size: queries per chunk (default keeps each ``[chunk, N]`` block near 512 MiB).
        progress: show a progress bar over the queries (on a terminal; about a minute at SOP size on a CPU).
        precision: similarity precision of the candidate search: ``"auto"`` (bf16 candidates on a CPU
            with native bf16 dot products, else fp32), ``"bf16"``, ``"fp16"`` or ``"fp32"`` (force the
            fp32 path). Every setting gives the metrics of the fp32 path (see :mod:`promptdml.metrics.fast`).

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ..., "nmi": ..., "f1": ...}`` as python
        floats (NaN when no query has a relevant item).
    """
    dev = compute_device(device, embeddings, query_embeddings)
    ref = prepare_embeddings(embeddings, dev)
    ref_y = as_labels(labels, dev)
    if ref.shape[0] != ref_y.shape[0]:
        raise ValueError(f"{ref.shape[0]} embeddings but {ref_y.shape[0]} labels")
    if query_embeddings is None:
        if query_labels is not None:
            raise ValueError("query_labels given without query_embeddings")
        q, qy, exclude_self = ref, ref_y, True
    else:
        if query_labels is None:
            raise ValueError("query_embeddings given without query_labels")
        q = prepare_embeddings(query_embeddings, dev)
        qy = as_labels(query_labels, dev)
        exclude_self = False
        if q.shape[0] != qy.shape[0]:
            raise ValueError(f"{q.shape[0]} query embeddings but {qy.shape[0]} query labels")
        if q.shape[1] != ref.shape[1]:
            raise ValueError(f"dimension mismatch: query {q.shape[1]} vs gallery {ref.shape[1]}")
    ks = _check_ks(ks)
    need_rank = bool(map_r or r_precision)
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    prec = fast.resolve_precision(precision, dev, "faiss" if backend == "faiss" else "torch")
    out: dict[str, float] = {}
    if (ks or need_rank) and ref.shape[0] > int(exclude_self) and q.shape[0] > 0:
        num_rel = count_relevant(qy, ref_y, exclude_self)
        chunk = int(chunk_size) if chunk_size else default_chunk_size(ref.shape[0])
        with progress_bar(total=q.shape[0], desc="metrics", unit="query", enabled=bool(progress)) as bar:
            if backend == "faiss":
                acc = _eval_knn(
                    q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, _resolve_backend("faiss", dev),
                    bar,
                )
            else:
                acc = None
                if prec != "fp32":
                    try:
                        acc = _eval_fast(q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, prec, bar)
                    except fast.BoundViolation as err:
                        warnings.warn(f"{err}; recomputing the metrics on the fp32 path", RuntimeWarning, stacklevel=2)
                        bar.reset()
                if acc is None:
                    acc = _eval_torch(q, qy, ref, ref_y, num_rel, ks, need_rank, exclude_self, chunk, bar)
        out.update(acc.result(bool(map_r), bool(r_precision)))
    else:
        out.update(_Acc(ks).result(bool(map_r), bool(r_precision)))
    if nmi or f1:
        from .clustering import cluster_metrics  # noqa: PLC0415

        if exclude_self:
            x, y = ref, ref_y
        else:
            x, y = torch.cat([q, ref]), torch.cat([qy, ref_y])
        out.update(cluster_metrics(x, y, nmi=nmi, f1=f1, seed=seed, backend=backend, normalize=False))
    return {k: float(v) for k, v in out.items()}
