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
