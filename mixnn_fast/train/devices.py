"""Which device a run trains on, and in which precision."""
from __future__ import annotations

import torch

from mixnn_fast.train.config import TrainConfig


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of a run: none on the CPU or with ``amp=False``; else
    ``amp_dtype`` ("auto": bfloat16 where the GPU has it, float16 otherwise)."""
    if not cfg.amp or device.type != "cuda":
        return None
    if cfg.amp_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but torch sees no CUDA device")
    return device
