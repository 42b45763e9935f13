"""``NeighbourIndex`` and ``nearest_neighbours``: each sample's K nearest *other* samples.

One pipeline for every backend:

1. prepare the vectors for the metric (cosine: unit rows, then Euclidean);
2. propose candidates: ``exact`` (chunked torch matmul, proven exact), ``hnsw`` (hnswlib
   graph, by default on a PCA projection to 64 dims) or ``faiss`` (IndexFlatL2; for
   float16/bfloat16 features an IndexScalarQuantizer that stores them as they are);
3. for the approximate backends, rank the candidates by their full-space distance
   computed from differences, drop the query's own row, keep the k nearest
   (``distances.rerank``: float32, and float64 wherever float32 cannot tell two apart,
   so that the answer is the same on every CPU).

float16 and bfloat16 features are searched as stored: no float32 copy of the matrix is made
(``rows.FeatureRows`` widens a block of rows where one is needed), and the results are those
of the same features upcast to float32.

Step 3 is what makes the reduced-dimension graph search safe: PCA only has to put the
true neighbour among a few candidates, not at the top.

Default settings (``M=16, ef_construction=64, ef=16, pca_dim=64, candidates=4``) were
chosen by measurement on N = 50,000 penultimate-layer-like features (d = 512, 10 clusters
in a 32-dim latent space, 10% isotropic noise; bench/refresh_neighbours.py), 2 threads:
recall@1 0.98 (over 5 data seeds) in ~2.4 s build + query-all on an otherwise idle
machine; in a bench run with other jobs on the machine, 3.6 s median, against 12.9 s for
faiss IndexFlatL2 and 19 s for hnswlib's usual M=16 / ef_construction=200 / ef=50 on all
512 dims (recall 0.999). What the measurements showed:

- recall is limited by the graph, not by the PCA: the true neighbour is among the 4
  nearest in PCA-64 space for 99.9% of samples (8 candidates gave the same recall);
- PCA-32 instead of PCA-64 saved no measurable time on this data;
- ef_construction below 64 saves 10-25% but made recall seed-dependent (0.92-0.98 over
  graph seeds at ef_construction=40), so 64 is the floor of the defaults;
- recall falls with N at fixed ef: 0.93 at N = 200,000 (ef=32 gives 0.96, ef=48 0.975).

Features with no low-dimensional structure lose recall under PCA (isotropic Gaussian
features, 50,000 x 512: recall@1 0.005 with PCA-64 against 0.37 without), so when the
kept axes explain less than ``pca_min_variance`` (80%) of the variance the index searches
the full space instead, and warns that it did.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from mixnn_fast.refresh.neighbours._validation import (
    as_feature_matrix,
    check_k,
    check_metric,
    check_positive_int,
    prepare_for_metric,
    squared_to_metric,
    times_power_of_two,
)
from mixnn_fast.refresh.neighbours.distances import rerank
from mixnn_fast.refresh.neighbours.exact import ExactSearcher
from mixnn_fast.refresh.neighbours.rows import HALF_DTYPES, FeatureRows

BACKENDS = ("hnsw", "exact", "faiss")

# faiss flat is exact up to float32 cancellation: a few spare candidates absorb it.
_FAISS_MARGIN = 8
# Largest |feature| of Euclidean features searched as given. Outside this range float32 squared
# distances under- or overflow (float64 ones beyond ~1e154), and the features are searched scaled
# by a power of two instead: exact, and it changes no ranking. Ordinary features never get there.
_MAGNITUDE_RANGE = (2.0 ** -50, 2.0 ** 50)
# Largest |query value| (at the scale the features are searched at) whose float64 squares, summed
# over any dimension, stay finite; float32 indexes are limited by the cast to float32 first.
_QUERY_LIMIT = 2.0 ** 500
# More threads than any machine has cores: hnswlib starts one std::thread per requested thread.
_MAX_THREADS = 1024
# Rows per block handed to hnswlib/faiss when the float32 vectors are made a block at a time.
_GRAPH_CHUNK_ROWS = 16384


def _scale_exponent(top: float) -> int:
    """0 when the largest |feature| ``top`` lies in the searchable range, else the power of two
    the features are scaled down (or up) by: ``top = m * 2**e`` with m in [0.5, 1)."""
    if top > 0 and not _MAGNITUDE_RANGE[0] <= top <= _MAGNITUDE_RANGE[1]:
        return math.frexp(top)[1]
    return 0


def _stacklevel_outside_package() -> int:
    """The ``warnings.warn`` stacklevel, from the calling function, of the first frame
    outside this package, so a warning points at the user's line whichever entry point
    (``NeighbourIndex`` or ``nearest_neighbours``) they called."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


class NeighbourIndex:
    """A reusable nearest-neighbour index over ``features`` (build once, query many times).

    Args:
        features: Tensor[N, d] or ndarray, floating, finite, N >= 2. CPU or CUDA tensor;
            results come back on its device. float16/bfloat16 features are kept as they are
            (widened a block of rows at a time) and give the results of their float32 upcast.
        backend: ``"hnsw"`` (hnswlib; default), ``"exact"`` (chunked torch matmul on the
            features' device, the reference) or ``"faiss"`` (IndexFlatL2, needs faiss).
        metric: ``"euclidean"`` (default) or ``"cosine"``.
        pca_dim: hnsw only. Build the graph on the top ``pca_dim`` principal components
            when ``pca_dim < d``; ``None`` searches the full space.
        pca_min_variance: hnsw only. If the ``pca_dim`` axes keep a smaller share of the
            variance than this, the PCA is dropped (with a warning) and the graph is built
            on the full features; 0 always keeps the PCA.
        candidates: hnsw with PCA only. Candidates fetched per wanted neighbour and
            re-ranked by exact full-space distance.
        M, ef_construction, ef: hnswlib graph degree, build-time and query-time list sizes.
        num_threads: threads for hnswlib/faiss and the re-ranking; default
            ``torch.get_num_threads()`` (torch's own ops, e.g. the exact backend's matmuls,
            follow ``torch.set_num_threads``).
        seed: seeds the PCA sample and hnswlib's level assignment.
        pca_sample: rows used to estimate the principal axes.
    """

    def __init__(self, features, *, backend: str = "hnsw", metric: str = "euclidean",
                 pca_dim: int | None = 64, pca_min_variance: float = 0.8, candidates: int = 4,
                 M: int = 16, ef_construction: int = 64, ef: int = 16, num_threads: int | None = None,
                 seed: int = 0, pca_sample: int = 10000):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.metric = check_metric(metric)
        self.pca_dim = check_positive_int(pca_dim, "pca_dim", allow_none=True)
        if isinstance(pca_min_variance, bool) or not isinstance(pca_min_variance, (int, float)) \
                or not 0.0 <= pca_min_variance <= 1.0:
            raise ValueError(f"pca_min_variance must be a number in [0, 1], got {pca_min_variance!r}")
        self.candidates = check_positive_int(candidates, "candidates")
        M = check_positive_int(M, "M", minimum=2)
        ef_construction = check_positive_int(ef_construction, "ef_construction")
        ef = check_positive_int(ef, "ef")
        self.num_threads = check_positive_int(
            torch.get_num_threads() if num_threads is None else num_threads, "num_threads", maximum=_MAX_THREADS)
        seed = check_positive_int(seed, "seed", minimum=0, maximum=2**64 - 1)  # hnswlib's size_t, torch's seeds
        pca_sample = check_positive_int(pca_sample, "pca_sample", minimum=2)

        features = as_feature_matrix(features, "features")
        self.n, self.dim = features.shape
        self.device = features.device
        # distances come back in float32, float64 for float64 features
        self._out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        self._exponent = 0  # the features are searched as features * 2**-_exponent
        if features.dtype in HALF_DTYPES:
            # float16/bfloat16 stay as given: every consumer widens a block of rows at a time
            if self.metric == "euclidean":
                self._exponent = _scale_exponent(FeatureRows(features).max_abs())
            self._rows = FeatureRows(features, metric=self.metric, exponent=self._exponent)
        else:
            base = prepare_for_metric(features, self.metric, "features")
            if self.metric == "euclidean":
                self._exponent = _scale_exponent(FeatureRows(base).max_abs())
                if self._exponent:
                    base = times_power_of_two(base, -self._exponent)
            self._rows = FeatureRows(base)
        self._exact = None  # built on demand: the fallback for rows an approximate search leaves short
        self.pca = None
        self.explained_variance_ratio = None
        self._graph_vectors = None  # the hnsw graph's float32 vectors, kept when they are a PCA projection
        #: wall seconds of each stage so far: pca_fit, pca_project, build, search, rerank (a profile
        #: for benchmarks; the last query's search and rerank)
        self.seconds: dict[str, float] = {}
        start = time.perf_counter()

        if backend == "exact":
            self._searcher = ExactSearcher(self._rows, num_threads=self.num_threads)
        elif backend == "hnsw":
            from mixnn_fast.refresh.neighbours.hnsw import HnswSearcher

            vectors = self._graph_space(pca_min_variance, pca_sample, seed)
            start = time.perf_counter()
            self._searcher = HnswSearcher(vectors, self.n, M=M, ef_construction=ef_construction, ef=ef,
                                          num_threads=self.num_threads, seed=seed)
        else:
            from mixnn_fast.refresh.neighbours.faiss_backend import FaissFlatSearcher

            self._searcher = FaissFlatSearcher(self._graph_chunks(), self.dim, num_threads=self.num_threads,
                                               half=features.dtype if self._rows.lazy and self.metric == "euclidean"
                                               and not self._exponent else None)
        self.seconds["build"] = time.perf_counter() - start  # without PCA: the graph includes the widening

    def _graph_space(self, pca_min_variance: float, pca_sample: int, seed: int):
        """What the hnsw graph is built on: the float32 PCA projection (kept: P x pca_dim is a
        small fraction of the features), or else the prepared features, a block at a time."""
        if self.pca_dim is not None and self.pca_dim < self.dim:
            from mixnn_fast.refresh.neighbours.reduction import PCAProjection

            start = time.perf_counter()
            pca = PCAProjection(self._rows, self.pca_dim, sample=pca_sample, seed=seed)
            self.seconds["pca_fit"] = time.perf_counter() - start
            self.explained_variance_ratio = pca.explained_variance_ratio
            if pca.explained_variance_ratio >= pca_min_variance:
                self.pca = pca
                start = time.perf_counter()
                self._graph_vectors = pca.transform(self._rows).cpu()
                self.seconds["pca_project"] = time.perf_counter() - start
                return [(0, self._graph_vectors)]
            warnings.warn(
                f"the top {self.pca_dim} principal axes keep only {pca.explained_variance_ratio:.0%} of the "
                f"feature variance (< pca_min_variance={pca_min_variance:g}): searching all {self.dim} "
                "dimensions instead, which is slower; set pca_min_variance=0 to keep the PCA anyway",
                UserWarning, stacklevel=_stacklevel_outside_package())
        return self._graph_chunks()

    def _graph_chunks(self):
        """The prepared features as float32 CPU blocks ``(start, Tensor[m, d])``: hnswlib and faiss
        copy what they are given, so the whole float32 matrix never exists twice."""
        for start, block in self._rows.chunks(_GRAPH_CHUNK_ROWS):
            yield start, block.to(device="cpu", dtype=torch.float32)

    def __repr__(self) -> str:
        pca = f", pca_dim={self.pca.dim}" if self.pca is not None else ""
        return (f"NeighbourIndex(n={self.n}, dim={self.dim}, backend={self.backend!r}, "
                f"metric={self.metric!r}{pca}, device={self.device})")

    def query(self, queries, k: int = 1, *, exclude=None, return_distances: bool = False):
        """The k nearest indexed points of each query row, nearest first.

        Args:
            queries: Tensor[Q, d] or ndarray, floating, finite (Q may be 0).
            k: neighbours per query, ``1 <= k <= N`` (``N - 1`` when ``exclude`` is given).
            exclude: optional int Tensor[Q]/ndarray: the indexed row to leave out for each
                query (e.g. the query's own index), ``-1`` for none.
            return_distances: also return the distances.
        Returns:
            LongTensor[Q, k] of indices into the indexed features, on the features' device;
            with ``return_distances``, also Tensor[Q, k] (Euclidean distance, or
            ``1 - cos`` for cosine), dtype float32 (float64 for float64 features).
        """
        queries = as_feature_matrix(queries, "queries", min_rows=0)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries must have {self.dim} columns like the indexed features, "
                             f"got shape {tuple(queries.shape)}")
        work = self._rows.dtype  # float32 for half-precision features: as if they had been upcast
        if self._exponent:  # in the wider of the two dtypes: float32 queries may not survive the scaling
            queries = times_power_of_two(queries.to(torch.promote_types(queries.dtype, work)), -self._exponent)
        cast = queries.to(device=self.device, dtype=work)
        in_range = bool(torch.isfinite(cast).all())
        if in_range and self.metric == "euclidean" and cast.numel():
            in_range = float(cast.abs().max()) <= _QUERY_LIMIT
        if in_range:
            queries = prepare_for_metric(cast, self.metric, "queries")
        elif self.metric == "cosine":  # float64 queries beyond float32: their directions still fit
            queries = prepare_for_metric(queries.to(device=self.device, dtype=torch.float64), "cosine",
                                         "queries").to(work)
        else:
            raise ValueError(f"queries lie too far out for {work} distances at the scale of the indexed "
                             "features (their squares would overflow)")
        if exclude is not None:
            exclude = self._check_exclude(exclude, queries.shape[0])
        k = check_k(k, self.n - (1 if exclude is not None else 0))
        graph_queries = None
        if self.backend != "exact":
            graph_queries = self.pca.transform(queries).cpu() if self.pca is not None else None
        return self._query(queries, graph_queries, k, exclude, return_distances)

    def query_all(self, k: int = 1, *, return_distances: bool = False):
        """Each indexed sample's k nearest *other* samples: LongTensor[N, k] (+ distances).

        A sample's own row is never returned; an exact duplicate of it is a valid neighbour.
        """
        k = check_k(k, self.n - 1)
        exclude = torch.arange(self.n, device=self.device)
        return self._query(self._rows, self._graph_vectors, k, exclude, return_distances)

    def _check_exclude(self, exclude, n_queries: int) -> torch.Tensor:
        if isinstance(exclude, np.ndarray):
            exclude = torch.from_numpy(exclude)
        if not isinstance(exclude, torch.Tensor):
            raise TypeError(f"exclude must be a torch.Tensor or numpy.ndarray, got {type(exclude).__name__}")
        if exclude.is_floating_point() or exclude.is_complex() or exclude.dtype == torch.bool:
            raise TypeError(f"exclude must have an integer dtype, got {exclude.dtype}")
        if exclude.shape != (n_queries,):
            raise ValueError(f"exclude must have shape ({n_queries},) like the queries, "
                             f"got {tuple(exclude.shape)}")
        exclude = exclude.to(device=self.device, dtype=torch.int64)
        if n_queries and (int(exclude.min()) < -1 or int(exclude.max()) >= self.n):
            raise ValueError(f"exclude values must be in [-1, {self.n - 1}]")
        return exclude

    def _query(self, queries, graph_queries: torch.Tensor | None, k: int, exclude: torch.Tensor | None,
               return_distances: bool):
        """``queries``: prepared Tensor[Q, d] or the index's own FeatureRows (query_all);
        ``graph_queries``: their float32 CPU graph-space vectors, None to make them by blocks."""
        count = queries.n if isinstance(queries, FeatureRows) else queries.shape[0]
        if count == 0:
            ids = torch.empty((0, k), dtype=torch.int64, device=self.device)
            sq = torch.empty((0, k), dtype=self._out_dtype, device=self.device)
        elif self.backend == "exact":
            ids, sq = self._searcher.search(queries, k, exclude=exclude)
        else:
            ids, sq = self._propose_and_rerank(queries, graph_queries, k, exclude)
        if not return_distances:
            return ids
        distances = squared_to_metric(sq, self.metric)
        if self._exponent:  # back to the features' units, in float64 (the scaled-back value may not fit float32)
            distances = times_power_of_two(distances.to(torch.float64), self._exponent)
        return ids, distances.to(self._out_dtype)

    def _candidates(self, queries, graph_queries, fetch: int) -> torch.Tensor:
        """(Q, fetch) candidate ids from the graph (or faiss), querying by blocks of prepared rows
        when the graph-space vectors are not at hand."""
        if graph_queries is not None:
            return self._searcher.search(graph_queries, fetch)
        rows = queries if isinstance(queries, FeatureRows) else FeatureRows(queries)
        parts = [self._searcher.search(block.to(device="cpu", dtype=torch.float32), fetch)
                 for _, block in rows.chunks(_GRAPH_CHUNK_ROWS)]
        return torch.cat(parts)

    def _propose_and_rerank(self, queries, graph_queries, k, exclude):
        if self.backend == "faiss":
            wanted = k + _FAISS_MARGIN
        elif self.pca is not None:
            wanted = self.candidates * k
        else:
            wanted = k
        # One spare for the excluded row, which the search may or may not return.
        fetch = min(max(wanted, k) + (1 if exclude is not None else 0), self.n)
        start = time.perf_counter()
        cand = self._candidates(queries, graph_queries, fetch).to(self.device)
        self.seconds["search"] = time.perf_counter() - start
        start = time.perf_counter()
        invalid = cand < 0  # faiss and hnswlib pad with -1 when they find fewer points
        if exclude is not None:
            invalid |= cand == exclude.unsqueeze(1)
        sq, cand = rerank(queries, self._rows, cand, invalid, k, num_threads=self.num_threads)
        short = torch.isinf(sq).any(dim=1)
        if bool(short.any()):
            # The graph (or faiss) found fewer than k admissible points for these rows: search
            # them exactly instead of failing.
            rows = torch.nonzero(short).squeeze(1)
            if self._exact is None:
                self._exact = ExactSearcher(self._rows, num_threads=self.num_threads)
            sub = self._rows.take(rows) if isinstance(queries, FeatureRows) else queries[rows]
            ids_r, sq_r = self._exact.search(sub, k, exclude=None if exclude is None else exclude[rows])
            sq = sq.to(torch.float64)
            cand[rows], sq[rows] = ids_r, sq_r
        self.seconds["rerank"] = time.perf_counter() - start
        return cand, sq


def nearest_neighbours(features, k: int = 1, *, backend: str = "hnsw", metric: str = "euclidean",
                       return_distances: bool = False, **index_options):
    """Each sample's k nearest *other* samples in feature space, nearest first.

    Args:
        features: Tensor[N, d] or ndarray, floating, finite, N >= 2 (CPU or CUDA).
        k: neighbours per sample, ``1 <= k <= N - 1``.
        backend: ``"hnsw"`` (default), ``"exact"`` or ``"faiss"``; see :class:`NeighbourIndex`.
        metric: ``"euclidean"`` or ``"cosine"``.
        return_distances: also return Tensor[N, k] distances (Euclidean, or ``1 - cos``).
        **index_options: ``pca_dim``, ``candidates``, ``M``, ``ef_construction``, ``ef``,
            ``num_threads``, ``seed``, ``pca_sample``, ``pca_min_variance`` (see
            :class:`NeighbourIndex`).
    Returns:
        LongTensor[N, k] on the features' device: row i never contains i; an exact
        duplicate of sample i is a valid neighbour of i.

    Example:
        >>> nn = nearest_neighbours(features, k=1)   # features: Tensor[N, 512] -> LongTensor[N, 1]
    """
    index = NeighbourIndex(features, backend=backend, metric=metric, **index_options)
    return index.query_all(k, return_distances=return_distances)
