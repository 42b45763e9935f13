"""faiss flat (exact, BLAS) search, for users who already have faiss installed.

Only the candidate proposal is faiss's; like the hnswlib backend, its results are
re-ranked by full-space distances computed from differences (faiss's own float32
distances come from the cancellation-prone expansion).

Speed note: the faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15.1) that does
not recognise recent Xeons and falls back to a generic kernel; on such a CPU with AVX-512,
``OPENBLAS_CORETYPE=SkylakeX`` set before faiss is imported made IndexFlatL2 ~4x faster
here (bench/refresh_neighbours.py does this for its faiss baseline).
"""
from __future__ import annotations

import numpy as np
import torch


def import_faiss():
    """Return the ``faiss`` module or raise ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs the faiss package: `pip install faiss-cpu` "
                          "(or faiss-gpu); backend='hnsw' and backend='exact' work without it") from exc
    return faiss


class FaissFlatSearcher:
    """An exact faiss index over ``vectors``: blocks ``(start, float32 Tensor[m, d] on CPU)``
    covering the rows in order, added a block at a time.

    ``IndexFlatL2`` (float32 storage) by default; with ``half`` = torch.float16 or bfloat16 (the
    features' own dtype, whose values the blocks hold exactly) an ``IndexScalarQuantizer`` of that
    type, which stores them in 2 bytes and searches them exactly: no float32 copy of the features.
    """

    def __init__(self, vectors, d: int, *, num_threads: int, half: torch.dtype | None = None):
        self.faiss = import_faiss()
        self.num_threads = num_threads
        faiss = self.faiss
        if half is None:
            self.index = faiss.IndexFlatL2(d)
        else:
            kind = faiss.ScalarQuantizer.QT_fp16 if half == torch.float16 else faiss.ScalarQuantizer.QT_bf16
            self.index = faiss.IndexScalarQuantizer(d, kind, faiss.METRIC_L2)
        for _, block in vectors:
            self.index.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))

    def search(self, queries: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` nearest ids of each query row: LongTensor[Q, n] (-1 where faiss found none)."""
        # faiss's thread count is process-global OpenMP state: set it for this call only.
        previous = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(self.num_threads)
        try:
            _, labels = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), n)
        finally:
            self.faiss.omp_set_num_threads(previous)
        return torch.from_numpy(labels.astype(np.int64))
