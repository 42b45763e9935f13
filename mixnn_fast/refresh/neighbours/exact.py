"""Exact k-nearest-neighbour search by chunked matrix products: the reference backend.

Distances come from ``|q|^2 + |b|^2 - 2 q.b``, one (chunk x N) block at a time, on the
features' device. In float32 that expansion cancels badly when the features sit far from
the origin or neighbours are close, so it only *proposes* ``k + margin`` candidates per
query; the candidates are then ranked by their float64 distance computed from the
differences (no cancellation). A per-row bound on the float32 rounding error proves the
true k nearest were among the candidates; rows where it cannot (near-ties, many
duplicates) are redone with the expansion in float64. The result is exact up to ties
closer than about 1e-12 relative, which is what a reference needs.

float16/bfloat16 features (:class:`~mixnn_fast.refresh.neighbours.rows.FeatureRows`) get no
float32 working copy: each (query block x column tile) product widens its tile of the base
on the fly, so the search holds the half-precision features plus a few tiles.
"""
from __future__ import annotations

import torch

from mixnn_fast.refresh.neighbours.distances import sort_by_distance_then_id, squared_distances_to_candidates
from mixnn_fast.refresh.neighbours.rows import FeatureRows

# Unit roundoff of the float32 products by matmul precision setting: "highest" is IEEE
# float32; "high" may use TF32 (10-bit mantissa) and "medium" bfloat16 (7-bit) on CUDA,
# and oneDNN may use bfloat16 on CPU. Taking the worst case keeps the proof valid.
_MATMUL_UNIT_ROUNDOFF = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}

# Memory for one (chunk x N) block of distances, in elements (128 MiB of float32).
_BLOCK_ELEMENTS = 1 << 25
# Base rows per column tile when the base is widened tile by tile (half-precision storage): a
# 32 MiB float32 tile at d = 2048, and (query block x tile) products of a quarter of the usual
# block, so that the search's temporaries stay a small fraction of the features.
_TILE_ROWS = 4096
# Elements of the float64 temporaries of the mean and the centring.
_WIDEN_ELEMENTS = 1 << 20


def _mask_excluded(block: torch.Tensor, exclude: torch.Tensor | None, col_start: int = 0) -> None:
    """Set ``block[r, exclude[r] - col_start] = inf`` where that column lies in the block."""
    if exclude is None:
        return
    local = exclude - col_start
    rows = torch.nonzero((local >= 0) & (local < block.shape[1])).squeeze(1)
    block[rows, local[rows]] = float("inf")


class ExactSearcher:
    """Exact k-NN over a fixed set of points ``base`` (Tensor[N, d] float32/float64, or
    :class:`FeatureRows`, e.g. float16 features widened a tile at a time).

    The float32 (or float64) working copy is centred on the base mean, which shrinks the
    norms in the expansion and so its rounding error; everything stays on ``base.device``.
    Half-precision storage has no working copy: its tiles are centred when used.
    """

    def __init__(self, base, *, margin: int = 8, num_threads: int = 1,
                 block_elements: int = _BLOCK_ELEMENTS):
        self.num_threads = num_threads
        self.rows = base if isinstance(base, FeatureRows) else FeatureRows(base)
        self.n, self.d = self.rows.n, self.rows.d
        self.margin = margin
        self.block_elements = block_elements
        work_dtype = torch.float64 if self.rows.dtype == torch.float64 else torch.float32
        self.work_dtype = work_dtype
        self.mean = self._mean64()
        self.tile_rows = min(self.n, _TILE_ROWS) if self.rows.lazy else self.n
        self.work = None if self.rows.lazy else self._centred(0, self.n)
        self.work_sq = torch.empty(self.n, dtype=work_dtype, device=self.rows.device)
        step = max(1, block_elements // (4 * self.d))
        for s in range(0, self.n, step):
            tile = self.work[s:s + step] if self.work is not None else self._centred(s, min(s + step, self.n))
            self.work_sq[s:s + step] = tile.square().sum(dim=1)
        self.max_norm = float(self.work_sq.max().sqrt())
        # Products and squares below the working dtype's smallest normal number lose their
        # relative precision (or are flushed to 0): an absolute error the relative bound misses.
        self.tiny = torch.finfo(work_dtype).tiny
        if work_dtype == torch.float64:
            self.unit_roundoff = 2.0 ** -53
        else:
            self.unit_roundoff = _MATMUL_UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0 ** -8)
        if self.rows.device.type == "cuda" and work_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            self.unit_roundoff = max(self.unit_roundoff, 2.0 ** -11)

    def _mean64(self) -> torch.Tensor:
        # any centre is correct (the bound below holds for the centred values whatever it is);
        # the mean just makes their norms small: block sums in the rows' dtype, totalled in float64
        total = torch.zeros(self.d, dtype=torch.float64, device=self.rows.device)
        step = max(1, _WIDEN_ELEMENTS // self.d)
        for s, block in self.rows.chunks(step):
            total += block.sum(dim=0).to(torch.float64)
        return total / self.n

    def _centred(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the base, centred, in the working dtype."""
        out = torch.empty((stop - start, self.d), dtype=self.work_dtype, device=self.rows.device)
        step = max(1, _WIDEN_ELEMENTS // self.d)
        for s in range(start, stop, step):
            e = min(s + step, stop)
            out[s - start:e - start] = (self.rows.rows(s, e).to(torch.float64) - self.mean).to(self.work_dtype)
        return out

    def _direct(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return squared_distances_to_candidates(q, self.rows, ids, dtype=torch.float64,
                                               num_threads=self.num_threads)

    def _centre_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return (queries.to(torch.float64) - self.mean).to(self.work_dtype)

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None):
        """The k nearest base points of each query, nearest first.

        Args:
            queries: Tensor[Q, d] or FeatureRows (e.g. the base itself), same device as the base.
            k: neighbours per query, ``1 <= k <= N`` (``N - 1`` with ``exclude``).
            exclude: optional LongTensor[Q] of base rows to skip for each query (the query's
                own row for an all-points search); ``-1`` skips nothing.
        Returns:
            (LongTensor[Q, k] indices, float64 Tensor[Q, k] squared distances).
        """
        if not isinstance(queries, FeatureRows):
            queries = FeatureRows(queries)
        q_total = queries.n
        device = self.rows.device
        out_ids = torch.empty((q_total, k), dtype=torch.int64, device=device)
        out_sq = torch.empty((q_total, k), dtype=torch.float64, device=device)
        available = self.n - (1 if exclude is not None else 0)
        n_cand = min(k + self.margin, available)
        rows_per_block = max(1, self.block_elements // (self.tile_rows if self.work is not None else 4 * self.tile_rows))
        for s in range(0, q_total, rows_per_block):
            q = queries.rows(s, min(s + rows_per_block, q_total))
            ex = None if exclude is None else exclude[s:s + rows_per_block]
            ids, sq = self._search_block(q, k, n_cand, available, ex)
            out_ids[s:s + q.shape[0]], out_sq[s:s + q.shape[0]] = ids, sq
        return out_ids, out_sq

    def _search_block(self, q, k, n_cand, available, exclude):
        qc = self._centre_queries(q)
        proxy, cand = self._proxy_candidates(qc, n_cand, exclude)
        sq, cand = sort_by_distance_then_id(self._excluded_to_inf(self._direct(q, cand), cand, exclude), cand)
        if n_cand == available and bool(torch.isfinite(proxy).all()):
            return cand[:, :k], sq[:, :k]  # every admissible point is a candidate: nothing left to prove
        # (an overflowed proxy ties with the masked rows at inf: then only the proof below decides)
        q_sq = qc.to(torch.float64).square().sum(dim=1)
        q_norm = q_sq.sqrt()
        # |fl(expansion) - exact| <= (d + 8) u (|q| + |b|)^2 for the dot product, the norms,
        # the three additions and the centring rounding; doubled for safety. Plus, per operation,
        # the absolute error of a result (or an input) below the smallest normal number.
        bound = 2.0 * (self.d + 8) * (self.unit_roundoff * (q_norm + self.max_norm) ** 2
                                      + self.tiny * (1.0 + q_norm + self.max_norm))
        worst_outside = proxy.max(dim=1).values.to(torch.float64) + q_sq - bound
        proven = worst_outside >= sq[:, k - 1]
        if not bool(proven.all()):
            redo = torch.nonzero(~proven).squeeze(1)
            ex = None if exclude is None else exclude[redo]
            sq_r, cand_r = self._search_rows_float64(q[redo], n_cand, ex)
            sq[redo], cand[redo] = sq_r, cand_r
        return cand[:, :k], sq[:, :k]

    def _proxy_candidates(self, qc: torch.Tensor, n_cand: int, exclude):
        """The ``n_cand`` smallest ``|b|^2 - 2 q.b`` of each centred query and their ids: one
        product over the working copy, or tile by tile (widening each tile) without one. The
        row constant |q|^2 does not change the ranking, so it is added only where the bound
        check needs absolute values."""
        if self.work is not None:
            block = torch.addmm(self.work_sq, qc, self.work.T, beta=1.0, alpha=-2.0)
            _mask_excluded(block, exclude)
            return block.topk(n_cand, dim=1, largest=False, sorted=False)
        best_d = best_i = None
        for c in range(0, self.n, self.tile_rows):
            e = min(c + self.tile_rows, self.n)
            block = torch.addmm(self.work_sq[c:e], qc, self._centred(c, e).T, beta=1.0, alpha=-2.0)
            _mask_excluded(block, exclude, c)
            ids = torch.arange(c, e, device=qc.device).expand(qc.shape[0], -1)
            if best_d is not None:
                block, ids = torch.cat([best_d, block], dim=1), torch.cat([best_i, ids], dim=1)
            best_d, pos = block.topk(min(n_cand, block.shape[1]), dim=1, largest=False, sorted=False)
            best_i = ids.gather(1, pos)
        return best_d, best_i

    def _search_rows_float64(self, q: torch.Tensor, n_cand: int, exclude):
        """The fallback: the expansion in float64, over column blocks, then direct re-ranking."""
        qc = q.to(torch.float64) - self.mean
        q_sq = qc.square().sum(dim=1, keepdim=True)
        cols_per_block = max(n_cand, self.block_elements // max(1, 2 * q.shape[0]))
        best_d = best_i = None
        for c in range(0, self.n, cols_per_block):
            b = self.rows.rows(c, min(c + cols_per_block, self.n)).to(torch.float64) - self.mean
            block = q_sq + b.square().sum(dim=1) - 2.0 * qc @ b.T
            _mask_excluded(block, exclude, c)
            ids = torch.arange(c, c + b.shape[0], device=q.device).expand(q.shape[0], -1)
            if best_d is not None:
                block, ids = torch.cat([best_d, block], dim=1), torch.cat([best_i, ids], dim=1)
            best_d, pos = block.topk(min(n_cand, block.shape[1]), dim=1, largest=False)
            best_i = ids.gather(1, pos)
        return sort_by_distance_then_id(self._excluded_to_inf(self._direct(q, best_i), best_i, exclude), best_i)

    @staticmethod
    def _excluded_to_inf(sq: torch.Tensor, cand: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        """Masked entries can still be proposed: when the expansion overflows, they tie at +inf
        with the others, and their direct distance (0 for a query's own row) would rank them first."""
        if exclude is not None:
            sq[cand == exclude.unsqueeze(1)] = float("inf")
        return sq
