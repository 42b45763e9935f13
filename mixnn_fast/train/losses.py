"""Losses for learning with noisy labels, all taking soft targets (B, C) so that mixed labels,
corrected labels and one-hot labels go through the same code.

- ``soft_cross_entropy``: −Σ_c t_c log softmax(z)_c, MixNN's training loss (and plain CE / mixup
  with one-hot or mixed targets).
- ``generalized_cross_entropy`` (GCE, Zhang & Sabuncu 2018): Σ_c t_c (1 − p_c^q) / q.
- ``symmetric_cross_entropy`` (SCE, Wang et al. 2019): α·CE + β·RCE with
  RCE = −Σ_c p_c log clamp(t_c, 1e-4, 1), i.e. −A(1 − p_y) with A = log 1e-4 for one-hot t.
- ``early_learning_penalty`` (ELR, Liu et al. 2020): log(1 − ⟨p, t⟩) with t a running average of
  the model's earlier predictions, added (times λ) to a loss to keep the predictions near them.
- ``class_balance_penalty`` (Tanaka et al. 2018; DivideMix's regulariser): KL(π ‖ p̄), p̄ the
  batch's mean predicted distribution, added (times λ) to a loss so that the predictions do not
  collapse onto fewer classes than the labels hold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (B, C), got {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets: expected shape {tuple(logits.shape)} like logits, got {tuple(targets.shape)}")


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) int64 labels → (B, C) one-hot in ``dtype``."""
    return F.one_hot(labels.long(), num_classes).to(dtype)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−Σ_c t_c log softmax(logits)_c per row; logits and targets (B, C); mean over rows by default."""
    _check(logits, targets)
    per_sample = -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7,
                              reduction: str = "mean") -> torch.Tensor:
    """GCE: Σ_c t_c (1 − p_c^q) / q, q ∈ (0, 1]; q → 0 recovers CE, q = 1 is MAE."""
    _check(logits, targets)
    if not 0 < q <= 1:
        raise ValueError(f"q: must lie in (0, 1], got {q}")
    probs = F.softmax(logits.float(), dim=1).clamp_min(1e-7)
    per_sample = (targets.float() * (1 - probs.pow(q)) / q).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample


def symmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                            reduction: str = "mean") -> torch.Tensor:
    """SCE: α·CE(t, p) + β·RCE with RCE = −Σ_c p_c log clamp(t_c, 1e-4, 1) (the authors' clamping)."""
    _check(logits, targets)
    ce = soft_cross_entropy(logits, targets, reduction="none")
    probs = F.softmax(logits.float(), dim=1).clamp(1e-7, 1.0)
    rce = -(probs * torch.log(targets.float().clamp(1e-4, 1.0))).sum(dim=1)
    per_sample = alpha * ce + beta * rce
    return per_sample.mean() if reduction == "mean" else per_sample


def early_learning_penalty(logits: torch.Tensor, running: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """ELR's regulariser: log(1 − Σ_c p_c t_c) per row, with p = softmax(logits) clamped to
    [1e-4, 1 − 1e-4] (the authors' clamp) and ``running`` t (B, C) the sample's running average of
    earlier predictions (rows sum to at most 1; all zero: no pull).  Minimising it raises the
    model's agreement with t, its early predictions, which fit the clean labels before the
    network memorises the wrong ones.  Gradients flow through the logits only."""
    _check(logits, running)
    probs = F.softmax(logits.float(), dim=1).clamp(1e-4, 1.0 - 1e-4)
    per_sample = torch.log(1.0 - (probs * running.detach().float()).sum(dim=1))
    return per_sample.mean() if reduction == "mean" else per_sample


def class_balance_penalty(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(π ‖ p̄) = Σ_c π_c log(π_c / p̄_c), a 0-d tensor: ``prior`` π (C,) the class shares the
    predictions should keep (rows of a probability simplex; zeros allowed: 0 log 0 = 0), p̄ (C,) the
    mean of softmax(logits) over the batch's rows, logits (B, C).  Why: where a model cannot tell
    two classes apart, label correction follows it onto one of them (the other class's right
    labels are "corrected" too); keeping the batch's mean prediction near the labels' shares
    pushes back, as Tanaka et al. (2018) and DivideMix do with a uniform π.  Gradients flow
    through the logits only."""
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (B, C), got {tuple(logits.shape)}")
    if prior.shape != logits.shape[1:]:
        raise ValueError(f"prior: expected shape ({logits.shape[1]},), one share per class, got {tuple(prior.shape)}")
    mean_prediction = F.softmax(logits.float(), dim=1).mean(dim=0).clamp_min(1e-12)
    prior = prior.detach().to(mean_prediction)
    return (torch.special.xlogy(prior, prior) - prior * torch.log(mean_prediction)).sum()


LOSSES = {
    "ce": soft_cross_entropy,
    "gce": generalized_cross_entropy,
    "sce": symmetric_cross_entropy,
}
