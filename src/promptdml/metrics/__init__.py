"""Exact retrieval and clustering metrics for deep metric learning (docs/evaluate.md, 'The metrics').

Main entry point: :func:`retrieval_metrics`. Embeddings are L2-normalised inside and ranked by
fp32 cosine similarity; exact ties are broken by ascending reference index.
"""

from .clustering import cluster_metrics, contingency, f1_pair_counting, kmeans, nmi
from .geometry import mean_pairwise_cosine
from .knn import DEFAULT_CHUNK_BYTES, default_chunk_size, faiss_available, knn_search, prepare_embeddings
from .retrieval import count_relevant, map_at_r, r_precision, recall_at_k, retrieval_metrics

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "cluster_metrics",
    "contingency",
    "count_relevant",
    "default_chunk_size",
    "f1_pair_counting",
    "faiss_available",
    "kmeans",
    "knn_search",
    "map_at_r",
    "mean_pairwise_cosine",
    "nmi",
    "prepare_embeddings",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]
