"""Exact k-nearest-neighbour search by cosine similarity, chunked over queries.

Conventions (shared by everything in :mod:`promptdml.metrics`):

* **Normalisation.** Embeddings are L2-normalised *inside* (``normalize=True``, the default): inputs
  of any floating dtype (bf16/fp16/fp32/fp64) are normalised (fp64 inputs in fp64, all others in
  fp32) and then cast to **fp32**, which is the precision used for all similarities and ranking.
  Pass ``normalize=False`` if the caller has already normalised (the vectors are then only cast
  to fp32 and the "similarity" is the plain inner product). All-zero rows stay zero.
* **Self exclusion.** With ``exclude_self=True`` (query set == reference set) the query's own
  *index* is removed from its candidate list; identical duplicates of the query are kept.
* **Ordering / ties.** Neighbours are returned in descending fp32 similarity; exactly equal
  similarities are ordered by ascending reference index (lower index first), for both backends.
  ``torch.topk`` and faiss do not order ties, so one extra neighbour is retrieved as a margin:
  rows whose last needed similarity ties with the margin are recomputed with a full stable sort,
  and every candidate list is re-sorted by ``(-similarity, index)``. Hence for a fixed backend,
  device and chunk size the result is deterministic. Different backends / devices / chunk sizes
  may round the same dot product differently in the last fp32 bit; such near-ties can order
  differently, exact ties never do (and with exactly representable data all backends agree).
* **Fast path.** With ``precision="auto"`` (a CPU with native bf16), ``"bf16"`` or ``"fp16"``, the
  candidates come from a reduced-precision block and are re-scored in fp32; an error bound proves
  they are the fp32 top-k (:mod:`promptdml.metrics.fast`). Results equal the fp32 torch path's.
* **Memory.** Queries are processed in chunks; the default chunk size keeps the per-chunk
  similarity block at about ``DEFAULT_CHUNK_BYTES`` (512 MiB), independent of the dataset size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "as_labels",
    "default_chunk_size",
    "faiss_available",
    "knn_search",
    "prepare_embeddings",
    "compute_device",
]

DEFAULT_CHUNK_BYTES = 512 * 2**20
_BACKENDS = ("auto", "torch", "faiss")


@functools.lru_cache(maxsize=1)
def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """True when ``faiss`` can be imported."""
    return _faiss() is not None


def compute_device(device, *tensors) -> torch.device:
    """``device`` if given, else the device of the first torch tensor among ``tensors``, else CPU."""
    if device is not None:
        return torch.device(device)
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _to_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def prepare_embeddings(x, device=None, normalize: bool = True) -> torch.Tensor:
    """Return ``x`` as a contiguous fp32 ``[N, E]`` tensor on ``device``, L2-normalised if asked."""
    t = _to_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, E], got shape {tuple(t.shape)}")
    if not (
        t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
    ):
        raise TypeError(f"unsupported embedding dtype {t.dtype}")
    dev = compute_device(device, t)
    # MPS has no float64: normalise on the source device there, move afterwards
    t = t.to(device=t.device if dev.type == "mps" else dev)
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError("embeddings contain NaN or Inf")
    if normalize:
        t = F.normalize(t, p=2.0, dim=1)
    return t.to(torch.float32).to(dev).contiguous()


def as_labels(y, device=None) -> torch.Tensor:
    """Return labels as a 1-D int64 tensor on ``device``."""
    t = _to_tensor(y)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if t.numel() and not bool((t == t.round()).all()):
            raise ValueError("labels must be integers")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"unsupported label dtype {t.dtype}")
    return t.to(device=compute_device(device, t), dtype=torch.int64)


def default_chunk_size(n_reference: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Number of queries per chunk so that one ``[chunk, n_reference]`` fp32 block fits ``budget_bytes``."""
    return int(max(1, min(65536, budget_bytes // max(1, 4 * n_reference))))


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        if not faiss_available():
            raise ImportError("backend='faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return "faiss"
    if backend == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    return "torch"


def _sort_by_sim_then_index(sims: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (-sim, index): sort by index, then a stable sort by descending similarity."""
    idx, order = torch.sort(idx, dim=1)
    sims = sims.gather(1, order)
    sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return sims, idx.gather(1, order)


_FIXUP_BYTES = 128 * 2**20  # working memory for the (rare) rows that need a full sort


def row_batches(rows: torch.Tensor, n_cols: int, bytes_per_entry: int = 16) -> list[torch.Tensor]:
    """Split ``rows`` into batches whose ``[batch, n_cols]`` temporaries stay within ``_FIXUP_BYTES``."""
    step = max(1, _FIXUP_BYTES // max(1, bytes_per_entry * n_cols))
    return list(torch.split(rows, step))


def _full_row_topk(get_rows, rows: torch.Tensor, n_cols: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k with index tie-breaking on whole rows (only for rows with a tie at the cut).

    ``get_rows(batch)`` returns the full similarity rows of a batch of row numbers; batches are
    sized so that the stable sort's temporaries stay bounded.
    """
    vals, idxs = [], []
    for b in row_batches(rows, n_cols):
        s, i = torch.sort(get_rows(b), dim=1, descending=True, stable=True)
        vals.append(s[:, :k])
        idxs.append(i[:, :k])
    return torch.cat(vals), torch.cat(idxs)


def _fix_cut(
    sims: torch.Tensor, idx: torch.Tensor, k: int, recompute_rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given ``k + margin`` candidates per row, return the exact ordered top-k.

    A row is ambiguous when the k-th and (k+1)-th similarities are equal (which tied items make the
    cut is then arbitrary); those rows are redone by ``recompute_rows(rows) -> (sims, idx)``.
    """
    if sims.shape[1] > k:
        amb = (sims[:, k - 1] == sims[:, k]).nonzero().flatten()
    else:
        amb = sims.new_empty(0, dtype=torch.long)
    sims, idx = _sort_by_sim_then_index(sims[:, :k], idx[:, :k])
    if amb.numel():
        s2, i2 = recompute_rows(amb)
        sims = sims.clone()
        idx = idx.clone()
        sims[amb] = s2
        idx[amb] = i2
    return sims, idx


def _iter_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def similarity_block(q: torch.Tensor, ref: torch.Tensor, start: int, exclude_self: bool) -> torch.Tensor:
    """``q @ ref.T`` in fp32; with ``exclude_self`` the entries ``(r, start + r)`` are set to -inf.

    Computed by :func:`promptdml.metrics.fast.mm_fp32`, whose rounding of a pair does not depend on its
    position in the block (so the fast path can re-score candidates to the same fp32 values).
    """
    from .fast import mm_fp32  # noqa: PLC0415

    s = mm_fp32(q, ref)
    if exclude_self:
        r = torch.arange(q.shape[0], device=q.device)
        s[r, r + start] = float("-inf")
    return s


def _torch_chunk_topk(q, ref, start, k, exclude_self):
    s = similarity_block(q, ref, start, exclude_self)
    n_avail = ref.shape[0] - int(exclude_self)
    kk = min(k + 1, n_avail)
    vals, idx = torch.topk(s, kk, dim=1, largest=True, sorted=True)
    return _fix_cut(vals, idx, k, lambda rows: _full_row_topk(lambda b: s[b], rows, s.shape[1], k))


def _faiss_chunk_topk(index, q, ref, start, k, exclude_self):
    n_ref = ref.shape[0]
    kq = min(k + int(exclude_self) + 1, n_ref)
    qn = q.detach().cpu().numpy()
    dist, nbr = index.search(qn, kq)
    D = torch.from_numpy(dist)
    idx = torch.from_numpy(nbr)
    c = idx.shape[0]
    if exclude_self:
        rows = torch.arange(start, start + c).unsqueeze(1)
        keep = idx != rows
        no_self = keep.all(dim=1)
        keep[no_self, -1] = False  # self not among the candidates: they are all valid, drop the last
        D = D[keep].view(c, kq - 1)
        idx = idx[keep].view(c, kq - 1)

    def rows_sims(b):
        from .fast import mm_fp32  # noqa: PLC0415

        s = mm_fp32(q[b], ref)
        if exclude_self:
            s[torch.arange(len(b)), b + start] = float("-inf")
        return s

    def recompute(amb):
        return _full_row_topk(rows_sims, amb, n_ref, k)

    return _fix_cut(D, idx, k, recompute)


def _faiss_index(ref: torch.Tensor):
    faiss = _faiss()
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref.detach().cpu().numpy())
    return index


def iter_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    backend: str,
    chunk_size: int,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, end, sims, indices)`` for query chunks of prepared (fp32) embeddings."""
    if backend == "faiss":
        index = _faiss_index(reference)
        ref_cpu = reference.cpu()
        for s, e in _iter_chunks(query.shape[0], chunk_size):
            sims, idx = _faiss_chunk_topk(index, query[s:e].cpu(), ref_cpu, s, k, exclude_self)
            yield s, e, sims.to(query.device), idx.to(query.device)
    else:
        for s, e in _iter_chunks(query.shape[0], chunk_size):
            sims, idx = _torch_chunk_topk(query[s:e], reference, s, k, exclude_self)
            yield s, e, sims, idx


def knn_search(
    query,
    reference=None,
    k: int = 1,
    *,
    exclude_self: bool | None = None,
    normalize: bool = True,
    backend: str = "auto",
    device=None,
    chunk_size: int | None = None,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine k-NN of every query among the reference vectors.

    Args:
        query: ``[Q, E]`` tensor or array.
        reference: ``[N, E]``; ``None`` means the query set itself (then ``exclude_self`` defaults to True).
        k: neighbours per query; must be <= the number of candidates (``N``, or ``N - 1`` when excluding self).
        exclude_self: drop index ``i`` from query ``i``'s candidates (requires ``Q == N``, same order).
        normalize: L2-normalise inside (default); False if the caller already did.
        backend: ``"torch"`` (chunked ``torch.mm`` + ``torch.topk``, any device), ``"faiss"``
            (``IndexFlatIP`` on CPU) or ``"auto"`` (faiss when installed and the device is CPU).
        device: where to compute (default: the device of ``query`` if it is a tensor, else CPU).
        chunk_size: queries per chunk (default: :func:`default_chunk_size`).
        precision: ``"auto"`` (bf16 candidates re-scored in fp32 on a CPU with native bf16 dot
            products and a torch / auto backend, else fp32), ``"bf16"``, ``"fp16"``, or ``"fp32"`` (force
            the fp32 path). The result is that of the fp32 torch path in every case (module
            :mod:`promptdml.metrics.fast`).

    Returns:
        ``(sims, indices)``: fp32 ``[Q, k]`` similarities and int64 ``[Q, k]`` reference indices,
        sorted by descending similarity, exact ties by ascending index (see module docstring).
    """
    dev = compute_device(device, query)
    q = prepare_embeddings(query, dev, normalize)
    if reference is None:
        ref = q
        exclude_self = True if exclude_self is None else exclude_self
    else:
        ref = prepare_embeddings(reference, dev, normalize)
        exclude_self = bool(exclude_self)
    if q.shape[1] != ref.shape[1]:
        raise ValueError(f"dimension mismatch: query {q.shape[1]} vs reference {ref.shape[1]}")
    if exclude_self and q.shape[0] != ref.shape[0]:
        raise ValueError("exclude_self requires query and reference to be the same set")
    n_avail = ref.shape[0] - int(exclude_self)
    k = int(k)
    if not 1 <= k <= n_avail:
        raise ValueError(f"k={k} must be in [1, {n_avail}] (number of candidates per query)")
    from . import fast  # noqa: PLC0415

    be = _resolve_backend(backend, dev)
    prec = fast.resolve_precision(precision, dev, "faiss" if backend == "faiss" else "torch")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(ref.shape[0])
    sims = torch.empty(q.shape[0], k, dtype=torch.float32, device=dev)
    idx = torch.empty(q.shape[0], k, dtype=torch.int64, device=dev)
    if prec != "fp32":
        try:
            stats: dict[str, int] = {}
            for s, e, cs, ci in fast.fast_knn_chunks(
                q, ref, k, exclude_self=exclude_self, chunk_size=chunk, precision=prec, stats=stats
            ):
                sims[s:e] = cs
                idx[s:e] = ci
            fast.LAST_STATS.clear()
            fast.LAST_STATS.update(stats)
            return sims, idx
        except fast.BoundViolation as err:
            import warnings  # noqa: PLC0415

            warnings.warn(f"{err}; recomputing on the fp32 path", RuntimeWarning, stacklevel=2)
            be = "torch"
    for s, e, cs, ci in iter_knn(q, ref, k, exclude_self=exclude_self, backend=be, chunk_size=chunk):
        sims[s:e] = cs
        idx[s:e] = ci
    return sims, idx
