"""What a finished run concluded about its training labels, handed to the report."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixnn_fast.data.description import DatasetDescription


#: LabelRecord's per-sample arrays (N,), in the order a saved record (audit/run_folder.py) keeps them
PER_SAMPLE_FIELDS = ("corrected", "clean_prob", "clean_prob_given", "prob_given", "predicted", "confidence",
                     "target_given")


@dataclass
class LabelRecord:
    """One training run's view of its labels, one entry per training sample (N,).

    method: the training method.  train: the training set (given labels, paths, classes, true
    labels when known).  rows: the per-epoch metrics.
    corrected: int64, the label the run believes (MixNN: its soft targets' argmax, MixNN+ with
    ``plus_final_correction`` after its last correction; baselines:
    the model's prediction).  clean_prob: float64, the run's clean probability (MixNN: its last
    refresh's, against the labels it trained on then; baselines: = clean_prob_given).
    From a final pass after training (NaN / -1 for samples that could not be read):
    clean_prob_given: the GMM's clean posterior fitted on the losses against the given labels;
    prob_given: the model's probability of the given label; predicted, confidence: its most
    likely class and that class's probability.  target_given: the soft target's probability of
    the given label (1 where labels were not corrected).  final_corrections: how many reported
    labels MixNN+'s last correction from the final pass changed (``plus_final_correction``; None
    where it did not act); ``corrected`` includes them.
    """

    method: str
    train: DatasetDescription
    rows: list[dict]
    corrected: np.ndarray
    clean_prob: np.ndarray
    clean_prob_given: np.ndarray
    prob_given: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    target_given: np.ndarray
    final_corrections: int | None = None


def summarise(method: str, rows: list[dict], epochs: int, *, noise_rate: float | None,
              correction_accuracy: float | None, skipped_files: dict[str, str] | None) -> dict:
    """A run's summary from its metrics rows: test accuracy at the end and at its best, the
    share of training time spent waiting for the loader, the run's wall time (``wall_seconds``:
    the epochs' ``epoch_seconds`` summed, so a resumed run counts every epoch once; left out when
    a row lacks it), the last refresh's clean-detection AUROCs, and what was passed in (``None``
    values are left out, except the noise rate)."""
    tested = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    wait = sum(r.get("loader_wait_seconds", 0) for r in rows)
    train_seconds = float(sum(r.get("train_seconds", 0) for r in rows))
    summary = {
        "method": method,
        "epochs": epochs,
        "final_test_accuracy": tested[-1] if tested else float("nan"),
        "best_test_accuracy": max(tested) if tested else float("nan"),
        "noise_rate_realised": noise_rate,
        "train_seconds": train_seconds + float(sum(r.get("refresh_seconds") or 0 for r in rows)),
        "loader_wait_fraction": wait / train_seconds if train_seconds else float("nan"),
    }
    # rows of runs started before epoch_seconds existed cannot say what the whole run cost
    if rows and all("epoch_seconds" in r for r in rows):
        summary["wall_seconds"] = float(sum(r["epoch_seconds"] for r in rows))
    if correction_accuracy is not None:
        summary["correction_accuracy"] = correction_accuracy
    for key in ("clean_auroc", "clean_auroc_current_labels"):  # the last refresh's
        values = [r[key] for r in rows if key in r]
        if values:
            summary[key] = values[-1]
    if skipped_files is not None:
        summary["skipped_images"] = len(skipped_files)
        summary["skipped_files"] = skipped_files
    return summary


def probability_of_labels(targets, labels: torch.Tensor, block: int = 1 << 16) -> np.ndarray:
    """(N,) float64: each sample's soft-target probability of ``labels`` (N,) int64 — of its
    given label, say — read a block of rows at a time (no (N, C) copy of a large store)."""
    n = len(labels)
    out = np.empty(n)
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n))
        out[rows.numpy()] = targets.rows(rows).gather(1, labels[rows].unsqueeze(1).to(
            targets.device)).squeeze(1).cpu().numpy()
    return out
