"""The mixer without per-call validation, for batches whose indices and weights were validated
once upstream: the loader's batches, whose partner slots come from an epoch plan and whose
weights come from a :class:`~mixnn_fast.refresh.partners.PartnerTable` (checked when built).

:func:`mixnn_fast.mix_images` checks every call: index ranges, and weights finite, non-negative
and summing to 1 — reductions over the batch, which on a GPU wait for the device.  Done for
every training batch, that is work repeated for numbers that cannot have changed, and a device
synchronisation per step.  Here only the cheap structural facts are asserted (shapes, dtypes,
devices).  A wrong call still cannot read outside the buffers: the native binding checks every
buffer's size against the call's shapes, and the indices are checked where that costs no wait —
on the CPU by the binding before the kernel runs (IndexError naming the position), on CUDA by the
kernel itself, which writes a row with an index outside the image batch as NaN (0 for uint8)
instead of reading it, and records the row in device memory.  That record comes back to the host
behind the kernels without waiting for the device: a later call raises IndexError once it has,
and :func:`check_index_errors` waits for the device and raises for everything launched so far.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mixnn_fast._native import native
from mixnn_fast.mix.mixer import _channel_vector, _MixCall, _run

__all__ = ["mix_batch_images", "mix_batch_targets", "Normalisation", "check_index_errors"]


class Normalisation:
    """Per-channel ``mean`` and ``1/std`` (in input units) as the kernel reads them, made once
    per loader instead of once per batch.  None leaves values as they are."""

    def __init__(self, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.channels = channels
        self.mean = _channel_vector(mean, channels, "mean", 0.0)
        self.inv_std = (1.0 / _channel_vector(std, channels, "std", 1.0, is_std=True).double()).float()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.inv_std.to(device))
        return self._on[device]


def mix_batch_images(images: torch.Tensor, anchor_slots: torch.Tensor, partner_slots: torch.Tensor,
                     weights: torch.Tensor, normalisation: Normalisation, *, in_layout: str = "NHWC",
                     out_layout: str = "NCHW", out_dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None, num_threads: int | None = None) -> torch.Tensor:
    """:func:`mixnn_fast.mix_images` for a validated batch (see the module docstring).

    Args:
        images: (M, H, W, C) or (M, C, H, W) contiguous, uint8/float32/float16/bfloat16.
        anchor_slots: (B,) int64, partner_slots: (B, K) int64, weights: (B, K+1) float32 — on
            the images' device, contiguous, already validated (slots in [0, M), weight rows
            finite, >= 0, summing to 1).
        normalisation: the loader's :class:`Normalisation`.
        out: optional contiguous output (B, C, H, W) for "NCHW" or (B, H, W, C) for "NHWC".

    Returns the mixed batch in ``out_dtype``.
    """
    if in_layout == "NHWC":
        _, height, width, channels = images.shape
    else:
        _, channels, height, width = images.shape
    batch, k = partner_slots.shape
    if anchor_slots.shape != (batch,) or weights.shape != (batch, k + 1) or channels != normalisation.channels:
        raise ValueError(f"mix_batch_images: anchor_slots {tuple(anchor_slots.shape)}, partner_slots "
                         f"{tuple(partner_slots.shape)}, weights {tuple(weights.shape)} and {channels} channels "
                         f"do not fit together (normalisation for {normalisation.channels})")
    device = images.device
    shape = (batch, channels, height, width) if out_layout == "NCHW" else (batch, height, width, channels)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    mean, inv_std = normalisation.on(device)
    call = _MixCall(images=images.contiguous(), anchors=anchor_slots.contiguous(),
                    partners=partner_slots.contiguous(), weights=weights.contiguous(), mean=mean, inv_std=inv_std,
                    out=out, in_layout=in_layout, out_layout=out_layout, height=height, width=width,
                    channels=channels)
    return _run(call, num_threads)


def mix_batch_targets(targets: torch.Tensor, anchor_ids: torch.Tensor, partner_ids: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_bj · targets[id_bj]`` for a validated batch: (B, C) float32.

    Args:
        targets: (N, C) float32/float16/bfloat16 soft-target table, contiguous.
        anchor_ids: (B,) int64, partner_ids: (B, K) int64 sample ids; weights: (B, K+1) float32;
            on the table's device.

    The same kernel as :func:`mixnn_fast.mix_targets` (the table viewed as (N, 1, 1, C) NHWC
    images), on one thread: (B, C) is too small to share.
    """
    rows, classes = targets.shape
    batch = anchor_ids.shape[0]
    identity = _identity(classes, targets.device)
    out = torch.empty((batch, 1, 1, classes), dtype=torch.float32, device=targets.device)
    call = _MixCall(images=targets.contiguous().view(rows, 1, 1, classes), anchors=anchor_ids.contiguous(),
                    partners=partner_ids.contiguous(), weights=weights.contiguous(), mean=identity[0],
                    inv_std=identity[1], out=out, in_layout="NHWC", out_layout="NHWC", height=1, width=1,
                    channels=classes)
    return _run(call, 1).view(batch, classes)


_IDENTITIES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _identity(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeros, ones) of ``channels`` float32 on ``device``: no normalisation, made once."""
    key = (channels, device)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = (torch.zeros(channels, device=device), torch.ones(channels, device=device))
    return _IDENTITIES[key]


def check_index_errors(device: torch.device | str | int) -> None:
    """IndexError if mixer calls on CUDA ``device`` met an anchor or partner index outside their
    image batch since the last report (those rows came out NaN, or 0 for uint8).  Waits for the
    device: call it where a synchronisation is due anyway (an epoch's end), not per batch.  On
    the CPU there is nothing to check: every call checked its indices before running."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not native().cuda_compiled():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    rows, row, term = native().cuda_take_index_errors(index)
    if rows:
        position = ("position unknown" if row is None else f"anchors[{row}]" if term == 0
                    else f"partners[{row}, {term - 1}]")
        raise IndexError(f"mixer calls on {device} met an index outside their image batch in {rows} row(s) "
                         f"(one of them: {position}); those rows were written as NaN (0 for uint8) instead of read")
