"""A label-free sign of the label noise's structure: whether the model's disagreements with the
given labels spread over many pairs of classes (symmetric noise: a wrong label names any other
class) or gather on a few (class-pair noise: a T-shirt called a shirt, a cat a dog).

Why it exists: MixNN+'s confidence condition at 0.8 gains where the noise is symmetric and loses
at asym-40, where the model is rarely that sure against a label a similar class gave
(docs/mixnn_plus/two_more_candidates.md).  Choosing the threshold
by the noise's structure needs the structure without true labels; this measures it from one
refresh's predictions."""
from __future__ import annotations

import math

import torch


def disagreement_spread(given: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> float:
    """How evenly the samples whose prediction differs from the given label spread over the
    ordered (given, predicted) pairs of classes.

    Args:
        given: (P,) int64 given labels in [0, num_classes).
        predicted: (P,) int64 the model's predictions in [0, num_classes).
        num_classes: C >= 2.

    Returns:
        float in (0, 1]: the effective number of pairs, exp of the Shannon entropy (natural log)
        of the disagreements' distribution over the C (C - 1) ordered pairs, divided by the most
        it can be, min(D, C (C - 1)) for D disagreements.  1: every pair (or every disagreement
        its own pair) equally often, as symmetric noise gives; 1 / min(D, C (C - 1)): all on one
        pair.  0.0 when no prediction differs from its label (nothing to measure).

    Raises:
        ValueError: shapes, dtypes or labels out of range.
    """
    _check_labels(given, predicted, num_classes)
    differs = given != predicted
    disagreements = int(differs.sum())
    if disagreements == 0:
        return 0.0
    pairs = given[differs] * num_classes + predicted[differs]
    counts = torch.bincount(pairs, minlength=num_classes * num_classes).double()
    shares = counts[counts > 0] / disagreements
    effective_pairs = math.exp(float(-(shares * shares.log()).sum()))
    return min(1.0, effective_pairs / min(disagreements, num_classes * (num_classes - 1)))


def prediction_share_gap(given: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> float:
    """How far the predicted classes' shares are from the given labels' shares: the total
    variation distance ½ Σ_c |share of predictions c − share of given labels c|, in [0, 1].

    Label-free (no true label): near 0 where the model predicts each class about as often as the
    labels name it (symmetric noise keeps the shares), large where it has merged classes it cannot
    tell apart (at asym-40 a model that calls most shirts T-shirts).  given, predicted: (P,) int64
    in [0, num_classes); num_classes >= 2.  0.0 for an empty pool.  ValueError: shapes, dtypes or
    labels out of range."""
    _check_labels(given, predicted, num_classes)
    if given.numel() == 0:
        return 0.0
    given_shares = torch.bincount(given, minlength=num_classes).double() / given.numel()
    predicted_shares = torch.bincount(predicted, minlength=num_classes).double() / given.numel()
    return float(0.5 * (given_shares - predicted_shares).abs().sum())


def _check_labels(given: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> None:
    if given.dim() != 1 or predicted.shape != given.shape:
        raise ValueError(f"given and predicted: expected two (P,) tensors of one shape, got "
                         f"{tuple(given.shape)} and {tuple(predicted.shape)}")
    if given.dtype != torch.int64 or predicted.dtype != torch.int64:
        raise ValueError(f"given and predicted: expected int64, got {given.dtype} and {predicted.dtype}")
    if num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    for name, labels in (("given", given), ("predicted", predicted)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
