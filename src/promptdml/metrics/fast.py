"""Exact fast path: reduced-precision candidate similarities, certified by an error bound, re-scored in fp32.

The fp32 path (:mod:`promptdml.metrics.knn`, :mod:`promptdml.metrics.retrieval`) computes every
query x reference similarity in fp32. This module computes the big ``[chunk, N]`` block with bf16
(CPU with AVX512-BF16 / AMX) or fp16 (CUDA) inputs, keeps a few dozen candidates per query, computes
their fp32 similarities with the *same* fp32 GEMM as the fp32 path (:func:`mm_fp32`) and orders them by
``(-similarity, index)``. A rigorous bound on ``|reduced - fp32|`` decides, per query, whether the
candidates provably contain everything the fp32 path can rank there; queries where it cannot be
proven (ties or near-ties around the cut, many near-duplicates) take more candidates, and then the
full fp32 row. The metrics are therefore those of the fp32 path, not an approximation of them.

A set evaluated against itself (the query set is the reference set) has a symmetric similarity matrix;
:func:`symmetric_candidates` then computes only its upper triangle, each pair once, and hands every row its
top candidates (rows that need more are recomputed alone). The certification below only needs, per row,
that every item outside the candidates has a reduced value no larger than the smallest candidate's, which
that pass guarantees.

Error bound (derivation)
------------------------
Notation: ``x, y`` are the prepared fp32 vectors (L2-normalised, so ``|x|, |y| <= 1`` up to the fp32
rounding of the normalisation; the bound uses the measured maximum norms ``nx, ny``), ``d`` their
dimension, ``p = sum_i x_i y_i`` the exact real dot product, ``s`` the fp32 path's value, ``r`` the
reduced-precision value. ``u`` is the unit roundoff of the reduced input type (bf16: 2^-8, fp16: 2^-11),
``uf = 2^-24`` that of fp32 and ``g = d uf / (1 - d uf)`` (Higham's gamma_d).

1. Inputs. Round-to-nearest gives ``xh_i = x_i (1 + a_i) + e_i`` with ``|a_i| <= u`` and an absolute
   term ``|e_i| <= t`` for (sub)normal underflow: bf16 has fp32's exponent range, but kernels may
   treat bf16 subnormals as zero (DAZ), so ``t = 2^-126``; fp16 subnormals are kept by the GEMMs used
   here (rounding error at most half their spacing, ``t = 2^-25``). Then, with Cauchy-Schwarz
   (``sum|x_i y_i| <= nx ny``, ``sum|x_i| <= sqrt(d) nx``),
   ``|sum xh_i yh_i - p| <= (2u + u^2) nx ny + t (1 + u) sqrt(d) (nx + ny) + d t^2 =: I``.
2. Accumulation. The kernel forms the products exactly (bf16 x bf16 and fp16 x fp16 fit in fp32's
   24 bits) or by fp32 FMA, and sums them in fp32 in *any* order or blocking:
   ``|acc - sum xh_i yh_i| <= g P + d 2^-126`` with ``P = sum |xh_i yh_i| <= nx ny + I`` (the last
   term covers flush-to-zero of up to d partial results).
3. Output. When the GEMM writes the reduced type (torch's CPU bf16 GEMM does), ``r = acc (1 + b) + f``
   with ``|b| <= u``, ``|f| <= t_out``, hence ``|r - acc| <= u/(1-u) (|r| + t_out) + t_out``.
4. The fp32 path, any order: ``|s - p| <= g nx ny + 2 d 2^-126``.

Together: ``|r - s| <= A + B |r|`` with ``A = I + g P + g nx ny + 3 d 2^-126 + t_out (1 + B)`` and
``B = u / (1 - u)`` (``B = 0`` and ``t_out = 0`` when the output is fp32). A and B are computed in
fp64 and inflated by ``2^-20`` relative, which covers the rounding of that computation. For
unit vectors in bf16 with a bf16 output, ``A ~ 2^-7`` and ``B ~ 2^-8``: about 0.0086 at ``r = 0.2``.

Consequences used below (all comparisons in fp64 or with thresholds rounded outward):

* every item that is *not* a candidate has ``r <= t`` (``t`` = the smallest candidate value), so its
  fp32 value is at most ``U = t + A + B|t|``; candidates whose fp32 value is ``> U`` are certified:
  their order, and the fact that nothing else precedes them, is exact;
* ``r > hi(b)`` implies ``s > b`` and ``r < lo(b)`` implies ``s < b`` (thresholds in
  :func:`_above_threshold` / :func:`_below_threshold`); only items in between are re-scored in fp32
  to count exactly how many precede a given item (the rank of the best relevant item, for Recall@K).

The bound relies on the arithmetic model above (IEEE fp32 accumulation of exactly formed or FMA
products, a single final rounding of the output). As a guard, every re-scored candidate is checked
against it; a violation (a GEMM that breaks the model) raises :class:`BoundViolation` and the callers
redo the whole evaluation on the fp32 path, with a warning.

Same fp32 values as the fp32 path
---------------------------------
Ordering candidates "as the fp32 path does" needs the *same* fp32 values, bit for bit: a near-tie
of one ulp otherwise orders differently. fp32 GEMM kernels round a given (row, column) dot product
differently depending on where it falls in the block (remainder rows and thin blocks take other code
paths). :func:`mm_fp32` therefore pads the rows of the left operand to a multiple of 8 and the
right operand to at least 16 columns; the fp32 path uses it for its similarity
blocks too, so that with MKL (tested: ``test_mm_fp32_is_position_independent``) every pair gets the
same fp32 value whether it is computed in a full block or re-scored among candidates. This is about
matching the fp32 path's rounding, not about the exactness proof: the proof only guarantees that the
candidates contain every item the fp32 path can rank there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

__all__ = [
    "PRECISIONS",
    "BoundViolation",
    "dot_error_bound",
    "fast_knn_chunks",
    "mm_fp32",
    "rescore",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}

# candidates kept per query beyond the k the caller needs (then x4 for queries that fail, then fp32)
CANDIDATE_MARGIN = 32
RESCORE_ROWS = 8  # queries per re-scoring GEMM (against the union of their candidate columns)
_ROW_PAD, _COL_PAD = 8, 16

# diagnostics of the last fast-path evaluation (queries, rows that needed more candidates or the fp32 row, ...)
LAST_STATS: dict[str, int] = {}


class BoundViolation(RuntimeError):
    """A re-scored similarity differs from its reduced-precision value by more than the bound."""


@functools.lru_cache(maxsize=1)
def _cpu_bf16_supported() -> bool:
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    try:  # the GEMM is only faster with native bf16 dot products (AVX512-BF16 or AMX)
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, backend: str = "torch") -> str:
    """The candidate precision used: ``auto`` = bf16 on a CPU with native bf16 dot products (and a
    torch backend), fp32 elsewhere (fp16 on CUDA is available on request, not yet the default)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "faiss":
        if precision in _LOW:
            raise ValueError("the reduced-precision fast path uses the torch backend, not faiss")
        return "fp32"
    if precision != "auto":
        return precision
    if os.environ.get("PROMPTDML_EVAL_PRECISION") in PRECISIONS[1:]:  # benchmark / debugging override
        return os.environ["PROMPTDML_EVAL_PRECISION"]
    if device.type == "cpu" and _cpu_bf16_supported():
        return "bf16"
    return "fp32"


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in fp32 with a block shape whose rounding does not depend on the row / column position.

    Rows of ``a`` are padded with zeros to a multiple of 8, ``b`` to at least 16 rows (thin blocks take
    another code path). See the module docstring.
    """
    m, n = a.shape[0], b.shape[0]
    pad_m = (-m) % _ROW_PAD
    if pad_m:
        a = torch.cat([a, a.new_zeros(pad_m, a.shape[1])])
    pad_n = max(0, _COL_PAD - n)
    if pad_n:
        b = torch.cat([b, b.new_zeros(pad_n, b.shape[1])])
    out = torch.mm(a, b.T)
    return out[:m, :n] if (pad_m or pad_n) else out


@contextlib.contextmanager
def small_op_threads(device: torch.device):
    """Run the many small ops (re-scoring GEMMs, bookkeeping) on one CPU thread on small machines (<= 8 threads).

    Each small op is a fork/join of the thread pool; on few cores, and badly so when the cores are
    shared with other processes (a descheduled worker stalls every join), that costs more than the op.
    The rounding of :func:`mm_fp32` does not depend on the thread count (tested).
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or n > 8 or _FULL_THREADS:
        yield
        return
    _FULL_THREADS.append(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _FULL_THREADS.pop()
        torch.set_num_threads(n)


_FULL_THREADS: list[int] = []


@contextlib.contextmanager
def all_threads():
    """Inside :func:`small_op_threads`: the big ops (the similarity block, top-k) use every thread."""
    if not _FULL_THREADS:
        yield
        return
    torch.set_num_threads(_FULL_THREADS[-1])
    try:
        yield
    finally:
        torch.set_num_threads(1)


def rescore(q: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fp32 similarities ``q[i] . ref[idx[i, j]]`` ([c, m]) computed with :func:`mm_fp32`.

    Queries are taken ``RESCORE_ROWS`` at a time against all their candidate columns (one GEMM), of
    which the diagonal blocks are kept.
    """
    out = torch.empty(idx.shape, dtype=torch.float32, device=q.device)
    w = idx.shape[1]
    with small_op_threads(q.device):
        for s in range(0, idx.shape[0], RESCORE_ROWS):
            ib = idx[s : s + RESCORE_ROWS]
            r = ib.shape[0]
            block = mm_fp32(q[s : s + r], torch.index_select(ref, 0, ib.reshape(-1)))
            out[s : s + r] = block.view(r, r, w).diagonal(dim1=0, dim2=1).T
    return out


def rescore_pairs(q: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 similarities of the pairs ``(q[rows[j]], ref[cols[j]])`` (rows sorted ascending)."""
    out = torch.empty(rows.shape, dtype=torch.float32, device=q.device)
    if rows.numel() == 0:
        return out
    urows, counts = torch.unique_consecutive(rows, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    with small_op_threads(q.device):
        for g in range(0, urows.numel(), RESCORE_ROWS):
            gr = urows[g : g + RESCORE_ROWS]
            lo = 0 if g == 0 else ends[g - 1]
            hi = ends[min(g + RESCORE_ROWS, urows.numel()) - 1]
            r, c = rows[lo:hi], cols[lo:hi]
            ucols, inv = torch.unique(c, return_inverse=True)
            block = mm_fp32(q[gr], torch.index_select(ref, 0, ucols))
            out[lo:hi] = block[torch.searchsorted(gr, r), inv]
    return out


# --------------------------------------------------------------------------------------------------
# the bound


def dot_error_bound(dim: int, norm_q: float, norm_r: float, low: str, low_output: bool) -> tuple[float, float]:
    """``(A, B)`` with ``|reduced - fp32| <= A + B |reduced|`` for every pair (module docstring)."""
    u = {"bf16": 2.0**-8, "fp16": 2.0**-11}[low]
    t = {"bf16": 2.0**-126, "fp16": 2.0**-25}[low]
    d = float(dim)
    uf = 2.0**-24
    g = d * uf / (1 - d * uf)
    nxy = norm_q * norm_r
    inp = (2 * u + u * u) * nxy + t * (1 + u) * math.sqrt(d) * (norm_q + norm_r) + d * t * t
    p = nxy + inp
    b = u / (1 - u) if low_output else 0.0
    t_out = t if low_output else 0.0
    a = inp + g * p + g * nxy + 3 * d * 2.0**-126 + t_out * (1 + b)
    inflate = 1 + 2.0**-20
    return a * inflate, b * inflate


def _upper(v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Largest fp32 value an item with reduced value ``<= v`` can have (fp64)."""
    return v + a + b * v.abs()


def _above_threshold(best: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``hi`` (fp64) such that ``r > hi`` implies ``s > best``: ``r - A - B|r| > best``."""
    x = best + a
    return torch.where(x >= 0, x / (1 - b), x / (1 + b))


def _below_threshold(best: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``lo`` (fp64) such that ``r < lo`` implies ``s < best``: ``r + A + B|r| < best``."""
    x = best - a
    return torch.where(x >= 0, x / (1 + b), x / (1 - b))


def _round_up32(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float32)
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _round_down32(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float32)
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


def check_bound(low_vals: torch.Tensor, fp32_vals: torch.Tensor, a: float, b: float) -> None:
    """Raise :class:`BoundViolation` if a re-scored pair breaks ``|r - s| <= A + B|r|``."""
    r = low_vals.double()
    fin = torch.isfinite(r)
    err = (r - fp32_vals.double()).abs()
    if bool(((err > a + b * r.abs()) & fin).any()):
        raise BoundViolation(
            f"reduced-precision similarity off by {float(err[fin].max()):.3g} > bound {a:.3g} + {b:.3g}|r|"
        )


# --------------------------------------------------------------------------------------------------
# candidate blocks


class Reduced:
    """Reduced-precision copies of the prepared embeddings and the bound for their pairs."""

    def __init__(self, q: torch.Tensor, ref: torch.Tensor, precision: str):
        self.low = _LOW[precision]
        self.q = q.to(self.low)
        self.ref = self.q if ref is q else ref.to(self.low)
        nq = float(q.double().norm(dim=1).max()) if q.numel() else 0.0
        nr = nq if ref is q else (float(ref.double().norm(dim=1).max()) if ref.numel() else 0.0)
        self.a, self.b = dot_error_bound(q.shape[1], nq * (1 + 1e-12), nr * (1 + 1e-12), precision, True)

    def block(self, s: int, e: int, exclude_self: bool) -> torch.Tensor:
        """Reduced-precision ``[e - s, N]`` similarities; self entries -inf."""
        with _exact_accumulation(self.q.device), all_threads():
            sb = torch.mm(self.q[s:e], self.ref.T)
        if exclude_self:
            r = torch.arange(e - s, device=sb.device)
            sb[r, r + s] = float("-inf")
        return sb

    def rows(self, rows: torch.Tensor, exclude_self: bool) -> torch.Tensor:
        """Reduced-precision ``[len(rows), N]`` similarities of the given query rows; self entries -inf."""
        with _exact_accumulation(self.q.device), all_threads():
            sb = torch.mm(self.q[rows], self.ref.T)
        if exclude_self:
            sb[torch.arange(rows.numel(), device=sb.device), rows] = float("-inf")
        return sb


@contextlib.contextmanager
def _exact_accumulation(device: torch.device):
    """On CUDA, forbid reduced-precision (fp16 / bf16) split-K reductions, which break the bound."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    old = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = old


class BlockSource:
    """A chunk's reduced-precision similarities, materialised as one ``[c, N]`` block."""

    def __init__(self, sb: torch.Tensor):
        self.sb = sb

    def topk(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``m`` reduced values per row (descending) and their column indices."""
        with all_threads():
            return torch.topk(self.sb, m, dim=1, largest=True, sorted=True)

    def rows(self, b: torch.Tensor) -> torch.Tensor:
        """The full reduced rows ``b`` (chunk-local indices)."""
        return self.sb[b]


class CandidateSource:
    """A chunk's top reduced candidates from :func:`symmetric_candidates`; full rows recomputed on demand.

    ``vals`` / ``idx`` are the chunk's rows of the candidate lists (descending); the few rows that need
    more than the candidates (more candidates, or the rank of an item outside them) are recomputed as
    reduced rows with the same kernel.
    """

    def __init__(self, vals: torch.Tensor, idx: torch.Tensor, red: Reduced, start: int, exclude_self: bool):
        self.vals, self.idx, self.red, self.start, self.exclude_self = vals, idx, red, start, exclude_self

    def topk(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if m <= self.vals.shape[1]:
            return self.vals[:, :m], self.idx[:, :m]
        all_rows = torch.arange(self.vals.shape[0], device=self.vals.device)
        return BlockSource(self.rows(all_rows)).topk(m)

    def rows(self, b: torch.Tensor) -> torch.Tensor:
        return self.red.rows(b + self.start, self.exclude_self)


def use_symmetric(red: Reduced, exclude_self: bool) -> bool:
    """Whether :func:`symmetric_candidates` applies: a set truly against itself, of at least two panels."""
    return exclude_self and red.ref is red.q and red.q.shape[0] >= 2 * SYMMETRIC_PANEL


def chunk_source(red: Reduced, cand, s: int, e: int, exclude_self: bool):
    """The reduced similarities of queries ``s:e``: the full block, or their rows of the symmetric candidates."""
    if cand is None:
        return BlockSource(red.block(s, e, exclude_self))
    return CandidateSource(cand[0][s:e], cand[1][s:e], red, s, exclude_self)


def certified_topk(
    src, q: torch.Tensor, ref: torch.Tensor, m: int, red: Reduced, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-``m`` candidates of a chunk (a :class:`BlockSource` or :class:`CandidateSource`), re-scored and
    ordered as the fp32 path orders them.

    Returns ``(sims, idx, n_cert, upper, extra_sims)``: fp32 similarities and indices sorted by
    ``(-sim, index)``, the number of leading entries that are certified exact per row, the upper
    bound (fp64) on the fp32 similarity of every non-candidate, and the fp32 similarities of the
    ``extra`` ``[c, w]`` reference indices (re-scored in the same GEMMs; None without ``extra``).
    """
    from .knn import _sort_by_sim_then_index  # noqa: PLC0415

    vals, idx = src.topk(m)
    if extra is None:
        s32, extra_sims = rescore(q, ref, idx), None
    else:
        both = rescore(q, ref, torch.cat([idx, extra], dim=1))
        s32, extra_sims = both[:, :m], both[:, m:]
    check_bound(vals, s32, red.a, red.b)
    if m < ref.shape[0]:
        upper = _upper(vals[:, -1].double(), red.a, red.b)
    else:
        upper = torch.full((vals.shape[0],), -math.inf, dtype=torch.float64, device=vals.device)
    sims, idx = _sort_by_sim_then_index(s32, idx)
    n_cert = (sims.double() > upper[:, None]).sum(1)
    return sims, idx, n_cert, upper, extra_sims


def full_rows_topk(
    q: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, start: int, k: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 path for a few queries: full fp32 rows, stable sort, top-k (ordered by (-sim, index))."""
    from .knn import _full_row_topk  # noqa: PLC0415

    def get_rows(b):
        with all_threads():
            s = mm_fp32(q[b], ref)
        if exclude_self:
            s[torch.arange(len(b), device=s.device), b + start] = float("-inf")
        return s

    return _full_row_topk(get_rows, rows, ref.shape[0], k)


def exact_topk_chunk(
    src, q: torch.Tensor, ref: torch.Tensor, start: int, need: torch.Tensor, width: int,
    exclude_self: bool, red: Reduced, n_avail: int, extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Exact fp32 top-``width`` of a chunk; rows need at least ``need[i]`` certified entries.

    Rows whose certified prefix is shorter take 4x more candidates, then the full fp32 row.
    Returns ``(sims, idx, info)`` with ``[c, width]`` tensors (entries past ``need[i]`` of a row are
    the best fp32 guesses, only the first ``need[i]`` are guaranteed), the first round's candidates
    (``cand_sims``, ``cand_idx``, ``upper``), the fp32 similarities of ``extra`` and fallback counts.
    """
    m = min(n_avail, width + CANDIDATE_MARGIN)
    sims, idx, n_cert, upper, extra_sims = certified_topk(src, q, ref, m, red, extra)
    info = {"wider": 0, "fp32_rows": 0, "upper": upper, "cand_sims": sims, "cand_idx": idx,
            "extra_sims": extra_sims}
    sims, idx = sims[:, :width].clone(), idx[:, :width].clone()
    bad = (n_cert < need).nonzero().flatten()
    if bad.numel() and m < n_avail:
        info["wider"] = int(bad.numel())
        m2 = min(n_avail, 4 * m)
        s2, i2, c2, _, _ = certified_topk(BlockSource(src.rows(bad)), q[bad], ref, m2, red)
        ok = c2 >= need[bad]
        sims[bad[ok]] = s2[ok, :width]
        idx[bad[ok]] = i2[ok, :width]
        bad = bad[~ok]
    if bad.numel():
        info["fp32_rows"] = int(bad.numel())
        s3, i3 = full_rows_topk(q, ref, bad, start, width, exclude_self)
        sims[bad] = s3
        idx[bad] = i3
    return sims, idx, info


# --------------------------------------------------------------------------------------------------
# symmetric candidate pass (a set against itself)

SYMMETRIC_PANEL = 2048  # rows per panel of the symmetric candidate pass
_GROUP = 16  # rows per group maximum in the column filter


def symmetric_candidates(red: Reduced, m: int, panel: int | None = None, bar=None, stats=None):
    """Top-``m`` reduced similarities of every row of ``X X^T`` (self excluded), computing only the upper triangle.

    A set evaluated against itself has a symmetric similarity matrix, so each pair is computed once.
    Panels of ``panel`` rows are taken from the last to the first; panel ``I`` computes its rows against
    every column from its own first row on (its diagonal tile and everything right of it). That gives

    * the rows of ``I`` their *own* top-``m`` (``torch.topk`` on wide rows) and with it ``tau``, the
      ``m``-th best own value: a lower bound on the row's final ``m``-th best value;
    * the rows of every later panel ``J`` (already processed, so their ``tau`` is known) the entries of
      their row that lie in ``I``'s columns, read down the columns of ``I``'s panel. Only entries
      ``>= tau[j]`` can be among row ``j``'s top ``m``; they are found without a transpose: the maximum
      of each group of ``_GROUP`` panel rows is taken per column (on the bit patterns as int16, which
      order positive bf16 / fp16 values exactly), and only groups whose maximum reaches ``tau`` are read.
      Columns whose ``tau`` is not positive are read in full.

    Every row then keeps the best ``m`` of its own candidates and the entries found for it. Everything
    not kept has a reduced value ``<=`` the row's last kept value, which is all that
    :func:`certified_topk` needs (ties at the cut are settled there, in fp32). Returns ``(vals, idx)``,
    ``[N, m]``, descending per row.
    """
    if red.ref is not red.q:
        raise ValueError("symmetric_candidates needs a set evaluated against itself (Reduced(x, x, ...))")
    x = red.q
    n = x.shape[0]
    dev = x.device
    b = int(panel or SYMMETRIC_PANEL)
    m = min(m, n - 1)
    neg = float("-inf")
    own_v = torch.full((n, m), neg, dtype=x.dtype, device=dev)
    own_i = torch.full((n, m), -1, dtype=torch.int64, device=dev)
    tau = torch.full((n,), neg, dtype=x.dtype, device=dev)
    starts = list(range(0, n, b))
    # entries found for the rows of panel J, kept per panel so that each is merged on its own (little memory):
    # (row - J's first row, column, value) with int32 indices
    found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in starts]
    n_found = 0
    for s in reversed(starts):
        e = min(n, s + b)
        with _exact_accumulation(dev), all_threads():
            p = torch.mm(x[s:e], x[s:].T)  # [e - s, n - s]
            r = torch.arange(e - s, device=dev)
            p[r, r] = neg
            k = min(m, n - s - 1)
            v, i = torch.topk(p, k, dim=1, largest=True, sorted=True)
        own_v[s:e, :k], own_i[s:e, :k] = v, i + s
        if k == m:
            tau[s:e] = v[:, -1]
        if e < n:
            rows, cols, vals = _column_filter(p[:, e - s :], tau[e:])
            n_found += rows.numel()
            dest = cols + e  # the row these entries belong to
            panel_of = torch.div(dest, b, rounding_mode="floor")
            order = torch.argsort(panel_of, stable=True)
            counts = torch.bincount(panel_of, minlength=len(starts)).tolist()
            dest, src, vals, o = dest[order], rows[order] + s, vals[order], 0
            for j, c in enumerate(counts):
                if c:
                    found[j].append(((dest[o:o + c] - starts[j]).to(torch.int32), src[o:o + c].to(torch.int32),
                                     vals[o:o + c]))
                    o += c
        if bar is not None:
            bar.update(e - s)
        del p
    if stats is not None:
        stats["symmetric_found"] = stats.get("symmetric_found", 0) + n_found
    for j, s in enumerate(starts):
        if found[j]:
            e = min(n, s + b)
            own_v[s:e], own_i[s:e] = _merge_found(own_v[s:e], own_i[s:e], found[j])
            found[j] = []
    return own_v, own_i


def _merge_found(own_v, own_i, found) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the best ``m`` of its own candidates and the entries found for it (``[rows, m]`` each)."""
    nr, m = own_v.shape
    dev = own_v.device
    ok = own_i >= 0
    rows = [torch.arange(nr, dtype=torch.int32, device=dev)[:, None].expand(nr, m)[ok]] + [f[0] for f in found]
    cols = [own_i[ok]] + [f[1].to(torch.int64) for f in found]
    vals = [own_v[ok]] + [f[2] for f in found]
    rows, cols, vals = torch.cat(rows).to(torch.int64), torch.cat(cols), torch.cat(vals)
    # descending value within each row: one sort of (row, order-preserving 16-bit code of the value, reversed)
    order = torch.argsort(rows * 65536 + (65535 - _ordered16(vals)))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=nr)
    if bool((counts < m).any()):  # cannot happen: every row has its own m or all of its entries
        raise RuntimeError("symmetric candidate pass lost entries")
    first = torch.cumsum(counts, 0) - counts
    keep = torch.arange(rows.numel(), device=dev) - first[rows] < m
    return vals[keep].view(nr, m), cols[keep].view(nr, m)


def _ordered16(v: torch.Tensor) -> torch.Tensor:
    """An int64 code in [0, 65535] that orders 16-bit floats (bf16 / fp16) as their values (no NaN)."""
    bits = v.view(torch.int16).to(torch.int64)
    return torch.where(bits >= 0, bits + 32768, -1 - bits)


def _column_filter(c: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, column, value)`` of every entry of ``c`` ``[R, W]`` with ``c[row, column] >= tau[column]``."""
    nr, w = c.shape
    dev = c.device
    pos = tau > 0  # there, ">= tau" is exact on the 16-bit patterns read as int16
    out_r, out_c = [], []
    full = nr - nr % _GROUP
    if full and bool(pos.any()):
        ci = c[:full].view(torch.int16)
        ti = torch.where(pos, tau, torch.zeros_like(tau)).view(torch.int16)
        gmax = ci.view(full // _GROUP, _GROUP, w).amax(1)
        g, col = ((gmax >= ti) & pos).nonzero(as_tuple=True)
        if g.numel():
            lane = torch.arange(_GROUP, device=dev)
            rr = g[:, None] * _GROUP + lane  # [hits, GROUP]
            hit = c[rr, col[:, None]] >= tau[col][:, None]
            out_r.append(rr[hit])
            out_c.append(col[:, None].expand_as(rr)[hit])
    if full < nr and bool(pos.any()):  # the rows of an incomplete last group, directly
        rr, col = (c[full:] >= tau).nonzero(as_tuple=True)
        keep = pos[col]
        out_r.append(rr[keep] + full)
        out_c.append(col[keep])
    slow = (~pos).nonzero().flatten()
    if slow.numel():  # tau <= 0 (or -inf: a row with fewer own entries than m): every row, in float
        rr, j = (c[:, slow] >= tau[slow]).nonzero(as_tuple=True)
        out_r.append(rr)
        out_c.append(slow[j])
    if not out_r:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return empty, empty, torch.empty(0, dtype=c.dtype, device=dev)
    rows, cols = torch.cat(out_r), torch.cat(out_c)
    return rows, cols, c[rows, cols]


def fast_knn_chunks(q, ref, k, *, exclude_self, chunk_size, precision, stats=None):
    """Yield ``(start, end, sims, idx)`` like :func:`promptdml.metrics.knn.iter_knn`, via the fast path."""
    red = Reduced(q, ref, precision)
    n_avail = ref.shape[0] - int(exclude_self)
    cand = None
    if use_symmetric(red, exclude_self):  # a set against itself: each pair once
        cand = symmetric_candidates(red, min(n_avail, k + CANDIDATE_MARGIN), stats=stats)
    for s in range(0, q.shape[0], chunk_size):
        e = min(q.shape[0], s + chunk_size)
        src = chunk_source(red, cand, s, e, exclude_self)
        need = torch.full((e - s,), k, dtype=torch.int64, device=q.device)
        with small_op_threads(q.device):
            sims, idx, info = exact_topk_chunk(src, q[s:e], ref, s, need, k, exclude_self, red, n_avail)
        if stats is not None:
            stats["wider"] = stats.get("wider", 0) + info["wider"]
            stats["fp32_rows"] = stats.get("fp32_rows", 0) + info["fp32_rows"]
        del src
        yield s, e, sims, idx
