"""Distances from each query to its own short list of candidates, computed from differences.

Differences, not the ``|a|^2 + |b|^2 - 2 a.b`` expansion: no cancellation, so float32 is
already accurate to a few ulps of the distance itself and float64 serves as the reference.

On CPU this is numpy over row chunks in a small thread pool rather than torch: the work is
a gather plus one fused reduction per chunk, and torch's many short OpenMP regions were
measured 4-20x slower than this on a 2-core machine shared with other jobs (threads
spinning at barriers while a sibling is descheduled). On CUDA it is plain torch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Rows per chunk: keeps the gathered (rows, c, d) block around 4 MiB so it stays in cache.
_CHUNK_BYTES = 1 << 22


def squared_distances_to_candidates(queries: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, *,
                                    dtype: torch.dtype = torch.float64, num_threads: int = 1) -> torch.Tensor:
    """``out[i, j] = |queries[i] - base[ids[i, j]]|^2``.

    Args:
        queries: Tensor[Q, d], floating, on ``base.device``.
        base: Tensor[N, d], floating.
        ids: LongTensor[Q, c], every entry in ``[0, N)``.
        dtype: arithmetic and output dtype (float32 or float64).
        num_threads: CPU threads for the chunks.
    Returns:
        Tensor[Q, c] of ``dtype`` on ``base.device``.
    """
    q_rows, c = ids.shape
    if q_rows == 0 or c == 0:
        return torch.zeros((q_rows, c), dtype=dtype, device=base.device)
    itemsize = torch.finfo(dtype).bits // 8
    rows = max(1, _CHUNK_BYTES // (c * base.shape[1] * itemsize))
    if base.device.type != "cpu":
        out = torch.empty((q_rows, c), dtype=dtype, device=base.device)
        for s in range(0, q_rows, rows):
            block = base[ids[s:s + rows].reshape(-1)].reshape(-1, c, base.shape[1]).to(dtype)
            block -= queries[s:s + rows].to(dtype).unsqueeze(1)
            out[s:s + rows] = block.square_().sum(dim=-1)
        return out

    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    base_np, queries_np, ids_np = base.numpy(), queries.numpy(), ids.numpy()
    out_np = np.empty((q_rows, c), dtype=np_dtype)

    def one_chunk(start: int) -> None:
        stop = min(start + rows, q_rows)
        block = np.take(base_np, ids_np[start:stop], axis=0).astype(np_dtype, copy=False)
        block -= queries_np[start:stop, None, :].astype(np_dtype, copy=False)
        out_np[start:stop] = np.einsum("rcd,rcd->rc", block, block)

    starts = range(0, q_rows, rows)
    if num_threads <= 1 or len(starts) == 1:
        for s in starts:
            one_chunk(s)
    else:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            list(pool.map(one_chunk, starts))  # list() re-raises a worker's exception here
    return torch.from_numpy(out_np)


def sort_by_distance_then_id(dist: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of (dist, ids) by distance, exact ties by the smaller id (deterministic).

    Args: dist Tensor[Q, c], ids LongTensor[Q, c]. Returns the sorted pair.
    """
    by_id = ids.argsort(dim=1)
    dist, ids = dist.gather(1, by_id), ids.gather(1, by_id)
    order = dist.argsort(dim=1, stable=True)
    return dist.gather(1, order), ids.gather(1, order)
