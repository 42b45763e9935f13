"""Argument checks shared by the per-sample state (soft targets, loss history, mixing weights):
one wording for every "index out of range" or "wrong tensor" error the user may see."""
from __future__ import annotations

import torch


def check_in_range(values: torch.Tensor, name: str, upper: int, upper_name: str = "N") -> None:
    """ValueError unless every entry of the integer tensor ``values`` lies in [0, upper)."""
    if values.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(values))
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper_name}) = [0, {upper}), got values in [{lo}, {hi}]")


def check_sample_ids(indices: object, name: str, num_samples: int, device: torch.device, owner: str) -> torch.Tensor:
    """``indices`` as given if it is a 1-D int64 tensor on ``device`` with values in [0, num_samples);
    otherwise a TypeError/ValueError naming ``name`` (and ``owner``, the state it indexes)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.ndim != 1 or indices.dtype != torch.int64:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device}, {owner} on {device}")
    check_in_range(indices, name, num_samples)
    return indices
