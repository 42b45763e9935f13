"""Distances from each query to its own short list of candidates, computed from differences.

Differences, not the ``|a|^2 + |b|^2 - 2 a.b`` expansion: no cancellation, so float32 is
already accurate to a few ulps of the distance itself and float64 serves as the reference.

On CPU this is numpy over row chunks in a small thread pool rather than torch: the work is
a gather plus one fused reduction per chunk, and torch's many short OpenMP regions were
measured 4-20x slower than this on a 2-core machine shared with other jobs (threads
spinning at barriers while a sibling is descheduled). On CUDA it is plain torch.

Deterministic across CPUs. numpy's ``einsum`` picks its SIMD kernel by instruction set, so a
float32 distance may round differently on an AVX2 and an AVX-512 machine, and two candidates
within that rounding could swap. float64 distances are therefore summed in a fixed order
(``np.square`` element-wise, then ``np.add.reduce``'s pairwise sum, the same code on every
CPU), and :func:`rerank` ranks in float32 only where that cannot change the answer: rows
whose float32 distances come closer than their rounding bound are recomputed that way.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mixnn_fast.refresh.neighbours.rows import FeatureRows

# Rows per chunk: keeps the gathered (rows, c, d) block around 1 MiB so it stays in cache.
_CHUNK_BYTES = 1 << 20
# Queries re-ranked per block (each block is sorted and checked for near-ties on its own).
_RERANK_BLOCK = 16384


def _as_rows(x) -> FeatureRows:
    return x if isinstance(x, FeatureRows) else FeatureRows(x)


def squared_distances_to_candidates(queries, base, ids: torch.Tensor, *, dtype: torch.dtype = torch.float64,
                                    num_threads: int = 1) -> torch.Tensor:
    """``out[i, j] = |queries[i] - base[ids[i, j]]|^2``.

    Args:
        queries: Tensor[Q, d] or FeatureRows (row i is query i), on ``base``'s device.
        base: Tensor[N, d] or FeatureRows, floating (half storage is widened a block at a time).
        ids: LongTensor[Q, c], every entry in ``[0, N)``.
        dtype: arithmetic and output dtype: float64 (summed in a fixed order, the same on every
            CPU) or float32 (faster; its rounding may differ between instruction sets).
        num_threads: CPU threads for the chunks.
    Returns:
        Tensor[Q, c] of ``dtype`` on the base's device.
    """
    queries, base = _as_rows(queries), _as_rows(base)
    q_rows, c = ids.shape
    if q_rows == 0 or c == 0:
        return torch.zeros((q_rows, c), dtype=dtype, device=base.device)
    itemsize = torch.finfo(dtype).bits // 8
    rows = max(1, _CHUNK_BYTES // (c * base.d * itemsize))
    if base.device.type != "cpu":
        out = torch.empty((q_rows, c), dtype=dtype, device=base.device)
        for s in range(0, q_rows, rows):
            stop = min(s + rows, q_rows)
            block = base.take(ids[s:stop]).to(dtype)
            block -= queries.rows(s, stop).to(dtype).unsqueeze(1)
            out[s:stop] = block.square_().sum(dim=-1)
        return out

    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    ids_np = ids.numpy()
    out_np = np.empty((q_rows, c), dtype=np_dtype)

    def one_chunk(start: int) -> None:
        stop = min(start + rows, q_rows)
        block = base.take_numpy(ids_np[start:stop], np_dtype)
        block -= queries.take_numpy(np.arange(start, stop), np_dtype)[:, None, :]
        if np_dtype == np.float64:
            np.square(block, out=block)
            out_np[start:stop] = np.add.reduce(block, axis=-1)
        else:
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


def float32_rounding_bound(d: int) -> float:
    """Relative error bound of a float32 squared distance over ``d`` dimensions computed from
    differences: one rounding per difference and per square, ``d - 1`` additions in any order
    (fused or not), doubled for safety."""
    return 2.0 * (d + 3) * torch.finfo(torch.float32).eps


def rerank(queries, base, cand: torch.Tensor, invalid: torch.Tensor, k: int, *,
           num_threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each query's candidates by full-space distance, nearest first.

    Args:
        queries: Tensor[Q, d] or FeatureRows (row i is query i); base: Tensor[N, d] or FeatureRows.
        cand: LongTensor[Q, c] candidate ids (any value where ``invalid``).
        invalid: BoolTensor[Q, c], entries to rank last (padding, the query's own row).
        k: how many to keep, ``k <= c``.
    Returns:
        (squared distances Tensor[Q, k] in the ranking dtype, ids LongTensor[Q, k]); entries that
        ran out of valid candidates have distance inf and id N. float64 features rank in float64;
        the others in float32, with every row whose order within the first k + 1 rests on two
        distances closer than the float32 rounding bound recomputed in float64 (exact ties then
        go to the smaller id): the ids are the same on every CPU. A block of queries at a time,
        so that the sorting's temporaries stay small whatever Q is.
    """
    queries, base = _as_rows(queries), _as_rows(base)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    out_sq = torch.empty((cand.shape[0], k), dtype=dtype, device=base.device)
    out_ids = torch.empty((cand.shape[0], k), dtype=torch.int64, device=base.device)
    for start in range(0, cand.shape[0], _RERANK_BLOCK):
        stop = min(start + _RERANK_BLOCK, cand.shape[0])
        sq, ids = _rerank_block(queries.slice(start, stop), base, cand[start:stop], invalid[start:stop], k, dtype,
                                num_threads)
        if sq.dtype != out_sq.dtype:  # float32 distances overflowed in this block: float64 for all
            out_sq = out_sq.to(torch.float64)
        out_sq[start:stop], out_ids[start:stop] = sq, ids
    return out_sq, out_ids


def _rerank_block(queries: FeatureRows, base: FeatureRows, cand, invalid, k: int, dtype, num_threads: int):
    safe = cand.clamp(0, base.n - 1)
    sq = squared_distances_to_candidates(queries, base, safe, dtype=dtype, num_threads=num_threads)
    if dtype != torch.float64 and not bool(torch.isfinite(sq[~invalid]).all()):
        # float32 squares overflowed (queries far outside the indexed points): float64 ranks them
        dtype = torch.float64
        sq = squared_distances_to_candidates(queries, base, safe, dtype=dtype, num_threads=num_threads)
    sq[invalid] = float("inf")
    cand = cand.masked_fill(invalid, base.n)  # sorts invalid entries last among equal (inf) distances
    sq, cand = sort_by_distance_then_id(sq, cand)
    if dtype == torch.float32 and sq.shape[1] > 1:
        head = sq[:, :k + 1].to(torch.float64)
        gaps = head[:, 1:] - head[:, :-1]
        near = (gaps <= float32_rounding_bound(base.d) * (head[:, 1:] + head[:, :-1])) & torch.isfinite(head[:, 1:])
        rows = torch.nonzero(near.any(dim=1)).squeeze(1)
        if rows.numel():
            exact = squared_distances_to_candidates(queries.take(rows.to(base.device)), base,
                                                    cand[rows].clamp(0, base.n - 1), dtype=torch.float64,
                                                    num_threads=num_threads)
            exact[cand[rows] == base.n] = float("inf")
            exact, cand_rows = sort_by_distance_then_id(exact, cand[rows])
            sq = sq.to(torch.float64)
            sq[rows], cand[rows] = exact, cand_rows
            return sq[:, :k], cand[:, :k]
    return sq[:, :k].to(dtype), cand[:, :k]
