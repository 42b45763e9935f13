"""Clean probabilities from one two-component GMM per class (MixNN+'s ``--plus-gmm-per-class``).

Why: one GMM over every sample's loss calls the right labels of hard classes noisy (Fashion-MNIST's
shirts, pullovers and coats keep high losses when their labels are right), and MixNN+ corrects
what it calls noisy.  Fitted within each class of the labels the losses were measured against,
the clean component is "low loss for this class", as in the class-wise selection of noisy-label
methods such as UNICON's.  Each class's fit is :func:`~mixnn_fast.refresh.gmm.clean_probability`
itself (tested against scikit-learn), on that class's losses alone.
"""
from __future__ import annotations

import warnings

import torch

from mixnn_fast.refresh.gmm import DegenerateLossesWarning, clean_probability

#: Fewer samples than this with one label: that class keeps the global GMM's probabilities
#: (a two-component fit on a handful of losses is noise).
MIN_CLASS_SAMPLES = 20


def clean_probability_per_class(losses: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor, *,
                                min_class_samples: int = MIN_CLASS_SAMPLES, **gmm) -> tuple[torch.Tensor, float]:
    """Each sample's probability of being clean under a GMM fitted on its class's losses only.

    Args:
        losses: (P,) floating, finite: the losses the GMM is fitted on.
        labels: (P,) int64: the label each loss was measured against (the class to fit within).
        fallback: (P,) floating: the probability kept for samples of classes with fewer than
            ``min_class_samples`` samples, or whose losses cannot be split (one distinct value):
            the global GMM's.
        min_class_samples: see :data:`MIN_CLASS_SAMPLES`; at least 2.
        gmm: keyword settings of :func:`~mixnn_fast.refresh.gmm.clean_probability`.

    Returns:
        ((P,) float32 clean probabilities in [0, 1], in the order of ``losses``; the share of
        samples that kept ``fallback``).
    """
    if losses.dim() != 1 or labels.shape != losses.shape or fallback.shape != losses.shape:
        raise ValueError(f"losses, labels, fallback: need three (P,) tensors, got shapes {tuple(losses.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(fallback.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels: need int64, got {labels.dtype}")
    if min_class_samples < 2:
        raise ValueError(f"min_class_samples: must be >= 2, got {min_class_samples}")
    probability = fallback.to(torch.float32).clone()
    kept = torch.ones(len(losses), dtype=torch.bool)
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < min_class_samples:
            continue
        with warnings.catch_warnings():  # a class that cannot be split keeps the global fit: no warning
            warnings.simplefilter("ignore", DegenerateLossesWarning)
            class_prob, model = clean_probability(losses[members], return_model=True, **gmm)
        if model.degenerate_:
            continue
        probability[members] = class_prob.to(torch.float32)
        kept[members] = False
    return probability, float(kept.float().mean())
