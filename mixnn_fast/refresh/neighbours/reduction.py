"""PCA projection used to make the graph search cheaper.

Penultimate-layer features have low intrinsic dimension, so their top principal
components keep the neighbourhood structure well enough to *propose* candidates; the
final ranking is done in the full space (see ``distances.rerank``).

The axes are estimated from a seeded random sample of rows (10,000 by default) by a
randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4):
a few passes of (sample x d) @ (d x (dim + 16)) products instead of the d x d covariance
and its eigendecomposition. On 128k x 2048 penultimate-like float16 features (2 loaded
cores) the covariance fit took 2.4-4.1 s, this one 0.7-1.1 s, and the explained variance of
the 64 axes agreed to 1e-4 (0.9906 and 0.9905). The sample is read a block of rows at a time
into one reused float32 buffer in every pass (features stored in float16 are widened there),
so the fit holds no (sample x d) matrix; the projection of all rows goes the same way. The
axes only have to be good, not exact: candidates are re-ranked in the full space.
"""
from __future__ import annotations

import torch

from mixnn_fast.refresh.neighbours.rows import FeatureRows

# Rows per step of the fit and the projection: bounds the widened and centred temporaries to
# ~8 MiB each (a fraction of the features' memory, which is what the refresh must not exceed).
_PROJECT_BYTES = 1 << 23
# Extra columns of the random range finder, and its power iterations: the standard choices;
# the spectrum of penultimate features decays fast, so two iterations are ample.
_OVERSAMPLE = 16
_POWER_ITERATIONS = 2


class PCAProjection:
    """Project rows onto the top ``dim`` principal axes of ``features``.

    Args:
        features: Tensor[N, d] floating or :class:`FeatureRows`, any device.
        dim: output dimension, ``1 <= dim <= d``.
        sample: rows used to estimate the axes (all rows if ``N <= sample``).
        seed: picks the sample and the random test matrix.
    Attributes:
        mean: float32 Tensor[d]; components: float32 Tensor[d, dim] (orthonormal columns);
        explained_variance_ratio: float, share of the sample's total variance the axes keep.
    """

    def __init__(self, features, dim: int, *, sample: int = 10000, seed: int = 0):
        rows = features if isinstance(features, FeatureRows) else FeatureRows(features)
        n, d = rows.n, rows.d
        if not 1 <= dim <= d:
            raise ValueError(f"pca_dim must be in [1, {d}] (the feature dimension), got {dim}")
        device = rows.device
        gen = torch.Generator().manual_seed(seed)
        picked = torch.randperm(n, generator=gen)[:sample].sort().values if n > sample else torch.arange(n)
        picked = picked.to(device)
        step = max(1, _PROJECT_BYTES // (4 * d))
        blocks = [picked[s:s + step] for s in range(0, len(picked), step)]

        buffer = torch.empty((min(step, len(picked)), d), dtype=torch.float32, device=device)
        mean = torch.zeros(d, dtype=torch.float64, device=device)
        for ids in blocks:
            # block sums in float32, their total in float64 (a dtype= reduction would widen a copy)
            mean += rows.read_into(buffer[:len(ids)], ids=ids).sum(dim=0).to(torch.float64)
        mean /= len(picked)
        self.mean = mean.to(torch.float32)

        def centred(ids: torch.Tensor) -> torch.Tensor:
            """The sample's rows ``ids`` minus the mean, in the one reused float32 buffer (float32:
            the axes only steer the candidate search)."""
            return rows.read_into(buffer[:len(ids)], ids=ids).sub_(self.mean)

        width = min(dim + _OVERSAMPLE, d, len(picked))
        omega = torch.randn(d, width, generator=gen, dtype=torch.float32).to(device)
        total = 0.0
        y_blocks = []
        for ids in blocks:  # Y = X Omega, and the total variance on the way
            x = centred(ids)
            total += float(torch.linalg.vector_norm(x)) ** 2
            y_blocks.append(x @ omega)
        q = torch.linalg.qr(torch.cat(y_blocks)).Q
        for _ in range(_POWER_ITERATIONS):  # Q <- orth(X X^T Q): sharpens the spectrum's top
            z = torch.zeros(d, q.shape[1], dtype=torch.float32, device=device)
            for ids, (s, e) in zip(blocks, _spans(blocks)):
                z += centred(ids).T @ q[s:e]
            z = torch.linalg.qr(z).Q
            q = torch.linalg.qr(torch.cat([centred(ids) @ z for ids in blocks])).Q
        b = torch.zeros(q.shape[1], d, dtype=torch.float64, device=device)  # B = Q^T X, (width, d)
        for ids, (s, e) in zip(blocks, _spans(blocks)):
            b += (q[s:e].T @ centred(ids)).to(torch.float64)
        _, singular, vh = torch.linalg.svd(b, full_matrices=False)
        kept = min(dim, vh.shape[0])
        components = torch.zeros(d, dim, dtype=torch.float64, device=device)
        components[:, :kept] = vh[:kept].T
        self.components = components.to(torch.float32).contiguous()
        self.explained_variance_ratio = float(singular[:kept].square().sum()) / total if total > 0 else 1.0
        self.dim = dim

    def transform(self, x) -> torch.Tensor:
        """Tensor[M, d] or FeatureRows → float32 Tensor[M, dim] (contiguous, on the input's device)."""
        rows = x if isinstance(x, FeatureRows) else FeatureRows(x)
        out = torch.empty((rows.n, self.dim), dtype=torch.float32, device=rows.device)
        step = max(1, _PROJECT_BYTES // (4 * rows.d))
        buffer = torch.empty((min(step, rows.n), rows.d), dtype=torch.float32, device=rows.device)
        for s in range(0, rows.n, step):
            block = rows.read_into(buffer[:min(step, rows.n - s)], start=s).sub_(self.mean)
            torch.mm(block, self.components, out=out[s:s + block.shape[0]])
        return out


def _spans(blocks: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, stop) of each block's rows in the concatenated sample."""
    spans, start = [], 0
    for ids in blocks:
        spans.append((start, start + len(ids)))
        start += len(ids)
    return spans
