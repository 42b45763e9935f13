"""How well a score separates two groups of samples (e.g. right from wrong labels): the AUROC.

Used by the refresh (its diagnostics against true labels, where a benchmark has them) and by the
label audit; it sits below both so that neither layer imports the other for it."""
from __future__ import annotations

import numpy as np
import torch


def auroc(scores: torch.Tensor | np.ndarray, positives: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (N,) for the boolean ``positives`` (N,), by the
    Mann-Whitney rank statistic with average ranks for ties; NaN when one class is empty.
    (Written here so the package needs no scikit-learn; tested against sklearn.metrics.)"""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    p = np.asarray(positives.detach().cpu() if isinstance(positives, torch.Tensor) else positives, dtype=bool)
    if s.shape != p.shape or s.ndim != 1:
        raise ValueError(f"scores/positives: expected two (N,) arrays, got {s.shape} and {p.shape}")
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank over each run of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    average = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
