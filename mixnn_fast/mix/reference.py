"""Plain-torch versions of the mixer: the test oracle, the fallback, and the benchmark baseline.

Written with ordinary torch ops (index, cast, multiply-add, normalise, permute) so
that it shares no code with the fused kernels it checks.  With
``compute_dtype=torch.float64`` it is the oracle the tests compare against; with
``torch.float32`` it is the "plain torch implementation" the benchmark measures.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _as_channel_vector(values, channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype, device=device).reshape(channels)


def _term_indices(anchors: torch.Tensor, partners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, K+1) int64: each row's anchor, then its partners. K is read from the weights, since
    reshape(B, -1) cannot infer it for an empty batch (B = 0)."""
    batch = anchors.shape[0]
    return torch.cat([anchors.reshape(batch, 1), partners.reshape(batch, weights.shape[-1] - 1)], dim=1).long()


def cast_output(mixed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Cast a floating result to ``out_dtype``; integer outputs round half to even and saturate."""
    if out_dtype == torch.uint8:
        return mixed.round().clamp(0, 255).to(torch.uint8)
    return mixed.to(out_dtype)


def mix_images_reference(
    images: torch.Tensor,
    anchors: torch.Tensor,
    partners: torch.Tensor,
    weights: torch.Tensor,
    *,
    in_layout: str = "NHWC",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    out_layout: str = "NCHW",
    out_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Σ_j w_ij · normalise(images[idx_ij]) with plain torch ops; no input validation.

    Args:
        images: (M, H, W, C) for ``in_layout="NHWC"`` or (M, C, H, W) for "NCHW"; any real dtype.
        anchors: (B,) integer indices into ``images``.
        partners: (B, K) integer indices into ``images``.
        weights: (B, K+1); column 0 weighs the anchor, columns 1..K the partners.
        mean, std: per-channel (C,) normalisation, ``(x - mean) / std``; None = identity.
        compute_dtype: the precision of the arithmetic (float64 for the oracle).

    Returns:
        (B, C, H, W) for ``out_layout="NCHW"`` or (B, H, W, C) for "NHWC", in ``out_dtype``.
    """
    nchw = images if in_layout == "NCHW" else images.permute(0, 3, 1, 2)
    channels = nchw.shape[1]
    idx = _term_indices(anchors, partners, weights)
    gathered = nchw[idx].to(compute_dtype)  # (B, K+1, C, H, W)
    if mean is not None:
        gathered = gathered - _as_channel_vector(mean, channels, compute_dtype, images.device).view(1, 1, -1, 1, 1)
    if std is not None:
        gathered = gathered / _as_channel_vector(std, channels, compute_dtype, images.device).view(1, 1, -1, 1, 1)
    mixed = (gathered * weights.to(compute_dtype).view(*idx.shape, 1, 1, 1)).sum(dim=1)
    if out_layout == "NHWC":
        mixed = mixed.permute(0, 2, 3, 1)
    return cast_output(mixed, out_dtype).contiguous()


def mix_targets_reference(
    targets: torch.Tensor,
    anchors: torch.Tensor,
    partners: torch.Tensor,
    weights: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, C) soft targets → (B, C) mixed targets Σ_j w_ij · targets[idx_ij]; no input validation."""
    idx = _term_indices(anchors, partners, weights)
    mixed = (targets[idx].to(compute_dtype) * weights.to(compute_dtype).unsqueeze(-1)).sum(dim=1)
    return mixed.to(out_dtype)
