"""K nearest *other* samples in feature space: hnswlib (default), exact torch search, faiss.

    nearest_neighbours(features, k)   LongTensor[N, k], each sample's k nearest other samples
    NeighbourIndex(features, ...)     the reusable index behind it (query, query_all)
    recall_at_k(found, features)      recall against exact search on a sample, ties count
    recall_against(found, reference, features)
                                      the same against precomputed exact neighbours

One module per concern: ``index`` (the pipeline), ``exact``, ``hnsw``, ``faiss_backend``
(candidate search), ``reduction`` (PCA), ``distances`` (re-ranking arithmetic),
``recall``, ``_validation``.
"""
from __future__ import annotations

from mixnn_fast.refresh.neighbours.index import BACKENDS, NeighbourIndex, nearest_neighbours
from mixnn_fast.refresh.neighbours.recall import recall_against, recall_at_k

__all__ = ["BACKENDS", "NeighbourIndex", "nearest_neighbours", "recall_against", "recall_at_k"]
