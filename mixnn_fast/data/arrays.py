"""In-memory images and labels (numpy arrays, torch tensors, anything ``np.asarray`` takes)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mixnn_fast.data.description import DatasetDescription

LAYOUTS = ("NHWC", "NCHW", "NHW")


def from_arrays(
    images: Any,
    labels: Any,
    *,
    classes: Sequence[str] | int | None = None,
    clean_labels: Any = None,
    layout: str = "NHWC",
    name: str = "arrays",
) -> DatasetDescription:
    """Describe images held in memory.

    ``images``: uint8, (N, H, W, C) for ``layout="NHWC"``, (N, C, H, W) for "NCHW" or
    (N, H, W) grey-scale for "NHW"; stored as a C-contiguous (N, H, W, C) uint8 array (a copy
    only when the layout or memory order requires it). Float images are refused rather than
    guessed at: scale and convert them to uint8 first.
    ``labels``, ``clean_labels``: (N,) integers in [0, C). ``classes``: names or their number;
    default ``max(labels, clean_labels) + 1`` classes named "0", "1", ... .
    """
    if layout not in LAYOUTS:
        raise ValueError(f"from_arrays: layout must be one of {LAYOUTS}, got {layout!r}")
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"from_arrays: images must be uint8 (scale floats to [0, 255] and convert), got {array.dtype}")
    expected_ndim = 3 if layout == "NHW" else 4
    if array.ndim != expected_ndim:
        raise ValueError(f"from_arrays: layout {layout} needs a {expected_ndim}-D array, got shape {array.shape}")
    if layout == "NCHW":
        array = array.transpose(0, 2, 3, 1)
    elif layout == "NHW":
        array = array[..., None]
    array = np.ascontiguousarray(array)

    labels = np.asarray(labels)
    clean = None if clean_labels is None else np.asarray(clean_labels)
    if classes is None:
        highest = max([int(x.max()) for x in (labels, clean) if x is not None and x.size and x.dtype.kind in "iu"], default=-1)
        names = [str(i) for i in range(highest + 1)]
    elif isinstance(classes, (int, np.integer)):
        names = [str(i) for i in range(int(classes))]
    else:
        names = [str(c) for c in classes]
    # DatasetDescription checks label shapes, dtypes and range, with messages naming `name`.
    return DatasetDescription(name=name, classes=names, labels=labels, clean_labels=clean, images=array)
