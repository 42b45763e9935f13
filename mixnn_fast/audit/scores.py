"""How well a label audit finds the wrong labels: precision, recall and F1 of its flags, AUROC of
its ranking (:func:`~mixnn_fast.separation.auroc`, handed on here as part of the audit's API)."""
from __future__ import annotations

import numpy as np

from mixnn_fast.separation import auroc

__all__ = ["auroc", "evaluate_issues"]


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
