"""How well a score separates two groups of samples (e.g. right from wrong given labels)."""
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


def evaluate_issues(is_issue, score, noise_mask) -> dict[str, float]:
    """How well a label audit finds the wrong labels, against the true ``noise_mask`` (N,) bool
    (True where the given label is wrong).  ``is_issue`` (N,) bool: the flags; ``score`` (N,)
    float: higher = more likely wrong.  Returns precision, recall and F1 of the flags (NaN where
    undefined: no flags, or no wrong labels), the AUROC of the score, and the counts (flagged,
    wrong, found)."""
    from mixnn_fast.audit._validation import mask_array

    noise = mask_array(noise_mask, "noise_mask", len(np.asarray(noise_mask)))
    n = len(noise)
    flags = mask_array(is_issue, "is_issue", n)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"score: expected shape ({n},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("score: must be finite (leave unscored samples out)")
    found = int((flags & noise).sum())
    flagged, wrong = int(flags.sum()), int(noise.sum())
    precision = found / flagged if flagged else float("nan")
    recall = found / wrong if wrong else float("nan")
    f1 = 2 * found / (flagged + wrong) if flagged + wrong else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc(s, noise),
            "flagged": flagged, "wrong": wrong, "found": found, "samples": n}
