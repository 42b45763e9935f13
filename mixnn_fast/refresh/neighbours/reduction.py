"""PCA projection used to make the graph search cheaper.

Penultimate-layer features have low intrinsic dimension, so their top principal
components keep the neighbourhood structure well enough to *propose* candidates; the
final ranking is done in the full space (see ``rerank``). The principal axes come from
the covariance of a random sample of rows (one d x d eigendecomposition), which costs a
fraction of a second even for d = 2048 and does not grow with N.
"""
from __future__ import annotations

import torch

# Rows projected per step: bounds the centred temporary to ~32 MiB.
_PROJECT_BYTES = 1 << 25


class PCAProjection:
    """Project rows onto the top ``dim`` principal axes of ``features``.

    Args:
        features: Tensor[N, d] floating, any device.
        dim: output dimension, ``1 <= dim <= d``.
        sample: rows used to estimate the covariance (all rows if ``N <= sample``).
        seed: picks the sample.
    Attributes:
        mean: float32 Tensor[d]; components: float32 Tensor[d, dim] (orthonormal columns);
        explained_variance_ratio: float, share of the total variance the axes keep.
    """

    def __init__(self, features: torch.Tensor, dim: int, *, sample: int = 10000, seed: int = 0):
        n, d = features.shape
        if not 1 <= dim <= d:
            raise ValueError(f"pca_dim must be in [1, {d}] (the feature dimension), got {dim}")
        if n > sample:
            gen = torch.Generator().manual_seed(seed)
            rows = torch.randperm(n, generator=gen)[:sample].to(features.device)
            x = features[rows]
        else:
            x = features
        self.mean = x.to(torch.float64).mean(dim=0)
        # The product in float32 (4x cheaper on CPU); the axes only need to be good, not exact.
        x = (x.to(torch.float64) - self.mean).to(torch.float32)
        cov = (x.T @ x).to(torch.float64) / max(1, x.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        total = float(eigvals.clamp_min(0).sum())
        self.explained_variance_ratio = float(eigvals[-dim:].clamp_min(0).sum()) / total if total > 0 else 1.0
        self.components = eigvecs[:, -dim:].flip(1).to(torch.float32).contiguous()
        self.mean = self.mean.to(torch.float32)
        self.dim = dim

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[M, d] → float32 Tensor[M, dim] (contiguous, on ``x.device``)."""
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=x.device)
        rows = max(1, _PROJECT_BYTES // (4 * x.shape[1]))
        for s in range(0, x.shape[0], rows):
            out[s:s + rows] = (x[s:s + rows].to(torch.float32) - self.mean) @ self.components
        return out
