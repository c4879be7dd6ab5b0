"""Nearest-neighbour indexes over L2-normalised embeddings (score = inner product = cosine similarity).

* ``exact`` (default): brute-force inner product in numpy; ties are broken by the lower row index, so
  the result is deterministic and equals a full sort by ``(-score, row)``.
* ``ivf`` / ``hnsw``: approximate faiss indexes (``IVF<nlist>,Flat`` / ``HNSW<M>,Flat``) for large
  collections. At build time their recall@10 against exact search is measured on a sample of the
  collection's own vectors used as queries and stored in the index (``index.info["recall@10"]``).

An index is one ``.safetensors`` file: tensor ``embeddings`` (the normalised vectors, float32
``[N, E]``), for faiss types also ``faiss_index`` (the serialised faiss index, uint8), and string
metadata ``format`` = ``promptdml-index/1``, ``type``, ``paths`` (JSON list), ``params`` and ``info``
(JSON). The safetensors header (which holds the paths) is limited to 100 MB, about a million paths.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptdml.errors import CorruptFileError
from promptdml.files import atomic_write
from promptdml.progress import progress_bar
from promptdml.retrieval import RetrievalError

INDEX_FORMAT = "promptdml-index/1"
KINDS = ("exact", "ivf", "hnsw")

__all__ = ["INDEX_FORMAT", "KINDS", "Index", "build_index", "load_index", "exact_search", "neighbor_recall_at_k",
           "normalize"]


def normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); non-finite values or zero rows are an error."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-D array [N, E], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.shape[0] and float(norms.min()) == 0.0:
        raise RetrievalError(f"{what} contain an all-zero row ({int(np.argmin(norms))}); it has no direction")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _query_chunk(n: int, budget: int = 1 << 25) -> int:
    """Queries per chunk so the [chunk, N] score matrix stays around 128 MB."""
    return max(1, min(4096, budget // max(1, n)))


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``gallery`` by inner product for every query: ``(scores, ids)``, both ``[Q, k']``
    with ``k' = min(k, N)``, sorted by decreasing score, ties by increasing row index."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise RetrievalError(f"query shape {list(q.shape)} does not match gallery shape {list(g.shape)}")
    n = g.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise RetrievalError("k must be >= 1 and the gallery must not be empty")
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    ids = np.empty((q.shape[0], k), dtype=np.int64)
    step = _query_chunk(n)
    for start in range(0, q.shape[0], step):
        s = q[start:start + step] @ g.T
        if k < n:
            kth = np.partition(s, n - k, axis=1)[:, n - k]  # k-th largest score of every row
        for r in range(s.shape[0]):
            row = s[r]
            cand = np.flatnonzero(row >= kth[r]) if k < n else np.arange(n)  # ascending row index
            order = np.argsort(-row[cand], kind="stable")[:k]  # stable: ties keep the lower row first
            ids[start + r] = cand[order]
            scores[start + r] = row[cand[order]]
    return scores, ids


def neighbor_recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-``k`` neighbours that the approximate top-``k`` contains."""
    k = min(k, exact_ids.shape[1])
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx_ids, exact_ids, strict=True)]
    return float(np.mean(hits) / k) if hits else 1.0


def _import_faiss(kind: str):
    try:
        import faiss
    except ImportError:
        raise RetrievalError(f"the '{kind}' index needs faiss, which is not installed: pip install faiss-cpu "
                             "(or pip install 'promptdml[faiss]'); the default exact index needs nothing "
                             "extra") from None
    return faiss


class Index:
    """A searchable collection of L2-normalised embeddings with their image paths."""

    def __init__(self, embeddings: np.ndarray, paths: Sequence[str] | None = None, kind: str = "exact",
                 params: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                 faiss_index: Any = None, labels: Sequence[str] | None = None) -> None:
        if kind not in KINDS:
            raise RetrievalError(f"index type must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind != "exact" and faiss_index is None:
            raise RetrievalError(f"an '{kind}' index needs its faiss index; build it with build_index()")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.paths = [str(p) for p in paths] if paths is not None else [str(i) for i in range(len(self.embeddings))]
        if self.embeddings.ndim != 2 or len(self.paths) != self.embeddings.shape[0]:
            raise RetrievalError(f"index embeddings {list(self.embeddings.shape)} do not match {len(self.paths)} paths")
        self.labels = [str(x) for x in labels] if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise RetrievalError(f"{len(self.labels)} labels for {len(self.paths)} index rows")
        self.kind = kind
        self.params = dict(params or {})
        self.info = dict(info or {})
        self.faiss_index = faiss_index

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __repr__(self) -> str:
        extra = f", recall@10={self.info['recall@10']:.4f}" if "recall@10" in self.info else ""
        return f"Index(type={self.kind}, n={len(self)}, dim={self.dim}{extra})"

    # ---------------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` ``[Q, min(k, N)]``: the nearest rows by cosine similarity, best first.

        Queries are L2-normalised first. Exact: ties by lower row index. Approximate indexes may return
        fewer than ``k`` hits for a query; missing entries have id ``-1`` and score ``-inf``.
        """
        q = normalize(queries, "queries")
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d "
                                 "embeddings: were they made by another model?")
        if int(k) < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            raise RetrievalError("the index is empty")
        k = min(int(k), len(self))
        if self.kind == "exact":
            return exact_search(q, self.embeddings, k)
        index = self.faiss_index
        if self.kind == "hnsw":
            index.hnsw.efSearch = max(int(self.params.get("ef_search", 64)), k)
        else:
            _import_faiss(self.kind).extract_index_ivf(index).nprobe = int(self.params["nprobe"])
        scores, ids = index.search(q, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    # ------------------------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index as one safetensors file (atomic: temp file + rename)."""
        from safetensors.numpy import save_file

        tensors = {"embeddings": self.embeddings}
        if self.faiss_index is not None:
            faiss = _import_faiss(self.kind)
            tensors["faiss_index"] = np.ascontiguousarray(faiss.serialize_index(self.faiss_index), dtype=np.uint8)
        meta = {"format": INDEX_FORMAT, "type": self.kind, "paths": json.dumps(self.paths),
                "params": json.dumps(self.params), "info": json.dumps(self.info)}
        if self.labels is not None:
            meta["labels"] = json.dumps(self.labels)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_index(path: str | os.PathLike) -> Index:
    """Read an index written by :meth:`Index.save` / ``promptdml index build``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file '{path}' does not exist (build one with `promptdml index build`)")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"index file '{path}' is empty (0 bytes); build it again with `promptdml index build`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != INDEX_FORMAT:
                raise RetrievalError(f"'{path}' is not a promptdml index (format {meta.get('format')!r}); "
                                     "build one with `promptdml index build`")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except RetrievalError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptFileError(f"cannot read index '{path}' ({e}): truncated or corrupt; build it again with "
                               f"`promptdml index build`") from None
    try:
        kind = meta["type"]
        faiss_index = None
        if kind != "exact":
            faiss = _import_faiss(kind)
            faiss_index = faiss.deserialize_index(tensors["faiss_index"])
        labels = json.loads(meta["labels"]) if "labels" in meta else None
        return Index(tensors["embeddings"], json.loads(meta["paths"]), kind, json.loads(meta.get("params", "{}")),
                     json.loads(meta.get("info", "{}")), faiss_index, labels)
    except RetrievalError as e:
        if "faiss" in str(e):
            raise
        raise CorruptFileError(f"index '{path}' is damaged: {e}; build it again with `promptdml index build`") from None
    except Exception as e:  # noqa: BLE001 - a damaged header or faiss blob
        raise CorruptFileError(f"index '{path}' is damaged ({type(e).__name__}: {e}); build it again with "
                               f"`promptdml index build`") from None


def default_nlist(n: int) -> int:
    """About 4 * sqrt(N) lists, but at least 39 training vectors per list (faiss' minimum)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def build_index(embeddings: np.ndarray, paths: Sequence[str] | None = None, kind: str = "exact", *,
                nlist: int | None = None, nprobe: int | None = None, m: int = 32, ef_construction: int = 200,
                ef_search: int = 64, recall_queries: int = 1000, seed: int = 0,
                info: dict[str, Any] | None = None, labels: Sequence[str] | None = None,
                progress: bool = False) -> Index:
    """Build an index over ``embeddings`` (normalised here) with ``paths[i]`` naming row i.

    ``kind="ivf"``: ``nlist`` inverted lists (default :func:`default_nlist`), ``nprobe`` lists searched per
    query (default ``max(8, nlist // 32)``, capped at nlist). ``kind="hnsw"``: graph with ``m`` links per
    node, ``ef_construction`` / ``ef_search`` beam widths. For approximate types recall@10 against exact
    search on ``recall_queries`` sampled vectors is stored in ``index.info``. ``progress``: a progress bar over
    the build's stages (k-means training, adding the vectors in chunks, the recall check).
    """
    if kind not in KINDS:
        raise RetrievalError(f"index type must be one of {', '.join(KINDS)}, got {kind!r}")
    x = normalize(embeddings)
    n, d = x.shape
    if n == 0:
        raise RetrievalError("cannot build an index from 0 embeddings")
    info = dict(info or {})
    if kind == "exact":
        return Index(x, paths, "exact", {}, info, labels=labels)
    faiss = _import_faiss(kind)
    start = time.perf_counter()
    add_chunk = 20_000
    bar = progress_bar(total=(kind == "ivf") + n + (recall_queries > 0), desc=f"{kind} index", unit="step",
                       enabled=progress)
    if kind == "ivf":
        nlist = int(nlist) if nlist else default_nlist(n)
        if not 1 <= nlist <= n:
            raise RetrievalError(f"nlist must be between 1 and the number of embeddings ({n}), got {nlist}")
        nprobe = int(nprobe) if nprobe else max(1, min(nlist, max(8, nlist // 32)))
        if nprobe < 1:
            raise RetrievalError(f"nprobe must be >= 1, got {nprobe}")
        params: dict[str, Any] = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train = x
        if n > 256 * nlist:  # faiss' own cap on k-means training points
            train = x[np.random.default_rng(seed).choice(n, 256 * nlist, replace=False)]
        bar.set_postfix_str("k-means")
        index.train(train)
        bar.update(1)
    else:
        if int(m) < 2:
            raise RetrievalError(f"M (links per node) must be >= 2, got {m}")
        params = {"M": int(m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
        index = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
    bar.set_postfix_str("adding vectors")
    for s in range(0, n, add_chunk):  # in chunks, so the bar moves
        index.add(x[s:s + add_chunk])
        bar.update(min(add_chunk, n - s))
    info["build_seconds"] = round(time.perf_counter() - start, 3)
    built = Index(x, paths, kind, params, info, index, labels)
    # recall@10 of the approximate index against exact search on a sample of the collection
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, int(recall_queries)), replace=False)) if recall_queries > 0 else None
    if sample is not None and len(sample):
        bar.set_postfix_str("recall@10 check")
        k = min(10, n)
        _, approx = built.search(x[sample], k)
        _, exact = exact_search(x[sample], x, k)
        built.info["recall@10"] = neighbor_recall_at_k(approx, exact, k)
        built.info["recall_queries"] = int(len(sample))
        built.info["recall_seed"] = int(seed)
    bar.update(bar.total - bar.n)
    bar.close()
    return built
