"""Checks of the audit's inputs: each failure is a ValueError or TypeError naming the argument,
raised before anything is computed."""
from __future__ import annotations

import numpy as np


def _array(value, name: str) -> np.ndarray:
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(value, (str, bytes, dict, set)):
        raise TypeError(f"{name}: expected an array, got {type(value).__name__}")
    try:
        if hasattr(value, "detach"):  # a torch tensor, on any device
            value = value.detach().cpu().numpy()
        return np.asarray(value)
    except Exception as exc:  # ragged lists, objects numpy cannot hold as numbers
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None


def check_num_classes(num_classes) -> None:
    """``num_classes``: None or an integer >= 2 (not a bool)."""
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool)
                                    or num_classes < 2):
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")


def labels_array(value, name: str, *, n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """(N,) int64 class indices in [0, num_classes).  Booleans and floats are refused (a float
    array of labels is usually a probability column passed in the wrong place)."""
    a = _array(value, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class indices, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (N,), got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: expected {n} entries (one per sample), got {len(a)}")
    if len(a) and a.min() < 0:
        raise ValueError(f"{name}: class indices must be >= 0, got {int(a.min())}")
    if num_classes is not None and len(a) and a.max() >= num_classes:
        raise ValueError(f"{name}: class indices must be < {num_classes} (the number of classes), "
                         f"got {int(a.max())}")
    return a.astype(np.int64, copy=False)


def probability_vector(value, name: str, n: int) -> np.ndarray:
    """(N,) float64 probabilities: finite, in [0, 1]."""
    a = _array(value, name)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{name}: expected floating-point probabilities, got dtype {a.dtype}")
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name}: expected shape ({n},) (one probability per sample), got {a.shape}")
    a = a.astype(np.float64)
    _check_unit_interval(a, name)
    return a


def probability_matrix(value, name: str, n: int, num_classes: int | None) -> np.ndarray:
    """(N, C) float64 rows of class probabilities: finite, in [0, 1], each row summing to 1
    (within 1e-2, so float16 soft targets pass; rows are then renormalised)."""
    a = _array(value, name)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise TypeError(f"{name}: expected floating-point probabilities, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n}, C) (one row per sample), got {a.shape}")
    if a.shape[1] < 2:
        raise ValueError(f"{name}: expected at least 2 classes (columns), got {a.shape[1]}")
    if num_classes is not None and a.shape[1] != num_classes:
        raise ValueError(f"{name}: expected {num_classes} columns (num_classes), got {a.shape[1]}")
    a = a.astype(np.float64)
    _check_unit_interval(a, name)
    sums = a.sum(1)
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-2)
    if len(bad):
        raise ValueError(f"{name}: each row must sum to 1; row {int(bad[0])} sums to {sums[bad[0]]:.4g} "
                         "(pass probabilities, e.g. a softmax, not logits)")
    return a / sums[:, None]


def transition_matrix(value, name: str) -> np.ndarray:
    """(C, C) float64 ``T[y, s] = P(given s | true y)``: square, C >= 2, finite, >= 0, each row
    summing to 1 (within 1e-6)."""
    t = _array(value, name).astype(np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise ValueError(f"{name}: expected a square (C, C) matrix with C >= 2, got shape {t.shape}")
    if not np.isfinite(t).all() or t.min() < 0:
        raise ValueError(f"{name}: expected finite probabilities >= 0")
    sums = t.sum(1)
    if np.abs(sums - 1).max() > 1e-6:
        row = int(np.abs(sums - 1).argmax())
        raise ValueError(f"{name}: each row must sum to 1 (P(given | true)); row {row} sums to {sums[row]:.6g}")
    return t


def _check_unit_interval(a: np.ndarray, name: str) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        where = np.argwhere(~finite)[0]
        raise ValueError(f"{name}: must be finite, got {a[tuple(where)]} at index {tuple(int(i) for i in where)}")
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise ValueError(f"{name}: probabilities must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
    np.clip(a, 0.0, 1.0, out=a)


def mask_array(value, name: str, n: int) -> np.ndarray:
    """(N,) bool."""
    a = _array(value, name)
    if a.dtype != np.bool_:
        raise TypeError(f"{name}: expected a boolean array, got dtype {a.dtype}")
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    return a
