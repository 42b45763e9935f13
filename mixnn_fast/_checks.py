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


def check_device(device: object, name: str = "device") -> torch.device | None:
    """``device`` (None, a str, int or torch.device) as a torch.device on which tensors can be made
    here (cpu, or cuda with that device present); otherwise a TypeError/ValueError naming ``name``
    rather than torch's RuntimeError from the first allocation."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a str, int or torch.device, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{name} {device!r} is not a device: {exc}") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"{name} {device!r} is not available here ({count} CUDA device(s))")
    elif parsed.type != "cpu":
        raise ValueError(f"{name} must be a cpu or cuda device, got {device!r}")
    return parsed
