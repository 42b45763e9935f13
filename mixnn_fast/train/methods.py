"""What each training method does in an epoch: its phase (which inputs it mixes) and its loss."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.losses import generalized_cross_entropy, soft_cross_entropy, symmetric_cross_entropy


def phase_of(cfg: TrainConfig, epoch: int) -> str:
    """What epoch ``epoch`` trains with: "plain" (one-hot given labels), "mixup" (in-batch random
    partners, one λ per batch) or "mixnn" (the refresh's partner table and soft targets).

    MixNN warms up with plain epochs; with ``authors_schedule`` it trains plain mixup between the
    warm-up and the start of label correction, as the authors' code does."""
    if cfg.method == "mixup":
        return "mixup"
    if not cfg.refreshes or epoch < cfg.warmup_epochs:
        return "plain"
    if cfg.authors_schedule and epoch < cfg.correction_start:
        return "mixup"
    return "mixnn"


def loss_function(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits (B, C), targets (B, C) soft) -> 0-d`` of the method: GCE (also MixNN+'s
    default, on its mixed targets), SCE, or the soft cross-entropy (CE, mixup, MixNN)."""
    if cfg.method == "gce" or (cfg.method == "mixnn_plus" and cfg.plus_loss == "gce"):
        return functools.partial(generalized_cross_entropy, q=cfg.gce_q)
    if cfg.method == "sce":
        return functools.partial(symmetric_cross_entropy, alpha=cfg.sce_alpha, beta=cfg.sce_beta)
    return soft_cross_entropy
