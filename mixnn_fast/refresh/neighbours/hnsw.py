"""hnswlib graph search: the default, approximate backend.

A thin wrapper: the float32 vectors go to hnswlib once, a block of rows at a time (hnswlib
keeps its own copy, so the caller need not hold them all); queries return candidate ids as
int64 torch tensors. Ranking and self-exclusion happen in ``index.py`` on full-space
distances, so this module does not deal with them.
"""
from __future__ import annotations

import numpy as np
import torch

# Below this many queries, sorting them for cache locality is not worth the copy.
_SORT_QUERIES_FROM = 1024
# Queries per hnswlib call: enough to keep its threads busy, a few MiB of copies.
_QUERY_BLOCK = 16384
#: Up to this many points the graph is built with one thread, whatever ``num_threads`` says:
#: hnswlib's threaded build inserts points in a varying order, so the graph (and now and then a
#: neighbour) differs from run to run, and so does everything trained on it.  One thread keeps
#: small runs bit-reproducible (the demo, the results table) at a small cost: measured on this
#: 2-core machine, 2,000 points took 0.12 s against 0.07 s with two threads, 20,000 took 2.1 s
#: against 1.3 s; above the limit (Clothing1M's pools) the build uses every thread.
SINGLE_THREAD_BUILD_MAX_POINTS = 50_000


class HnswSearcher:
    """An hnswlib ``Index`` (L2) over ``vectors``.

    Args:
        vectors: blocks ``(start, float32 Tensor[m, p] on CPU)`` covering rows 0..n-1 in order
            (the full features or their PCA projection).
        n: the number of rows.
        M: graph degree (hnswlib ``M``); more is slower to build, better recall.
        ef_construction: candidate list size while building.
        ef: candidate list size while searching (hnswlib raises it to the number asked for).
        num_threads: threads for batch queries, and for building above
            :data:`SINGLE_THREAD_BUILD_MAX_POINTS` points.
        seed: hnswlib's level-assignment seed. A build with more than one thread still varies
            the insertion order, so the graph (and rare results) can differ between runs.
    """

    def __init__(self, vectors, n: int, *, M: int, ef_construction: int, ef: int,
                 num_threads: int, seed: int):
        import hnswlib  # imported here so `import mixnn_fast.refresh.neighbours` works without it

        self.ef = ef
        self.num_threads = num_threads
        build_threads = 1 if n <= SINGLE_THREAD_BUILD_MAX_POINTS else num_threads
        self.index = None
        for start, block in vectors:
            if self.index is None:
                self.index = hnswlib.Index(space="l2", dim=block.shape[1])
                self.index.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=seed)
            self.index.add_items(np.ascontiguousarray(block.numpy(), dtype=np.float32),
                                 np.arange(start, start + block.shape[0]), num_threads=build_threads)

    def search(self, queries: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` approximately nearest ids of each query row: LongTensor[Q, n], nearest first
        (all -1 when hnswlib could not fill every row)."""
        self.index.set_ef(max(self.ef, n))
        q = queries.numpy()
        # Queries sorted along the first axis (the top principal axis after PCA) walk nearby
        # parts of the graph one after another, so more of it is still in cache: measured
        # ~20% off the query-all time at N = 50,000. The results do not depend on the order.
        # They go to hnswlib a block at a time: no sorted copy of all the queries.
        order = np.argsort(q[:, 0], kind="stable") if q.shape[0] >= _SORT_QUERIES_FROM else np.arange(q.shape[0])
        labels = np.empty((q.shape[0], n), dtype=np.int64)
        for s in range(0, q.shape[0], _QUERY_BLOCK):
            rows = order[s:s + _QUERY_BLOCK]
            try:
                found, _ = self.index.knn_query(np.ascontiguousarray(q[rows], dtype=np.float32), k=n,
                                                num_threads=self.num_threads)
            except RuntimeError:
                # hnswlib found fewer than n points for some query ("Cannot return the results in a
                # contiguous 2D array"): report every row as found short, as faiss does with -1;
                # the index searches such rows exactly.
                return torch.full((queries.shape[0], n), -1, dtype=torch.int64)
            labels[rows] = found
        return torch.from_numpy(labels)
