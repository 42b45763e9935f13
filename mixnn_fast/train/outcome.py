"""What a finished run concluded about its training labels, handed to the report."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixnn_fast.data.description import DatasetDescription


@dataclass
class LabelRecord:
    """One training run's view of its labels.

    method: the training method.  train: the training set (given labels, paths, classes, true
    labels when known).  rows: the per-epoch metrics.  corrected: (N,) int64 the label the run
    believes (MixNN: its soft targets' argmax; baselines: the model's prediction).  clean_prob:
    (N,) float64 the clean probability (NaN for samples that were not scored, e.g. unreadable).
    """

    method: str
    train: DatasetDescription
    rows: list[dict]
    corrected: np.ndarray
    clean_prob: np.ndarray


def summarise(method: str, rows: list[dict], epochs: int, *, noise_rate: float | None,
              correction_accuracy: float | None, skipped_files: dict[str, str] | None) -> dict:
    """A run's summary from its metrics rows: test accuracy at the end and at its best, the
    share of training time spent waiting for the loader, the last refresh's clean-detection
    AUROCs, and what was passed in (``None`` values are left out, except the noise rate)."""
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
