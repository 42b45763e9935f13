"""The one record every dataset source returns, and every loader consumes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class DatasetDescription:
    """A labelled image set, described but not loaded.

    Exactly one of ``paths`` and ``images`` is set:

    - ``paths``: N absolute paths of encoded images (JPEG/PNG), decoded by the loader;
    - ``images``: (N, H, W, C) uint8 array held in memory (CIFAR, Fashion-MNIST, arrays).

    ``labels`` (N,) int64 are the labels training sees (given, possibly noisy);
    ``clean_labels`` (N,) int64 are the true labels where the format has them, else None.
    ``classes`` names the C classes; every label lies in [0, C).
    """

    name: str
    classes: Sequence[str]
    labels: np.ndarray
    clean_labels: np.ndarray | None = None
    paths: Sequence[str] | None = None
    images: np.ndarray | None = None
    root: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.paths is None) == (self.images is None):
            raise ValueError(f"{self.name}: exactly one of paths and images must be given")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{self.name}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if self.paths is not None:
            # No file name holds a NUL byte: opening one raises a bare "embedded null byte"
            # ValueError deep in the loader, naming neither the sample nor the file.
            bad = next((i for i, p in enumerate(self.paths) if "\x00" in os.fspath(p)), None)
            if bad is not None:
                raise ValueError(f"{self.name}: paths[{bad}] = {os.fspath(self.paths[bad])!r} contains a NUL byte")
        n = len(self.paths) if self.paths is not None else len(self.images)
        if len(labels) != n:
            raise ValueError(f"{self.name}: {len(labels)} labels for {n} samples")
        c = len(self.classes)
        if n and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"{self.name}: labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        if self.clean_labels is not None:
            clean = np.asarray(self.clean_labels)
            if clean.shape != labels.shape or clean.dtype.kind not in "iu":
                raise ValueError(f"{self.name}: clean_labels must match labels' shape and be integers")
            if n and (clean.min() < 0 or clean.max() >= c):
                raise ValueError(f"{self.name}: clean labels must lie in [0, {c})")
            object.__setattr__(self, "clean_labels", clean.astype(np.int64, copy=False))
        if self.images is not None:
            images = np.asarray(self.images)
            if images.ndim != 4 or images.dtype != np.uint8:
                raise ValueError(f"{self.name}: images must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, indices: Sequence[int] | np.ndarray) -> "DatasetDescription":
        """The samples at ``indices`` (int array), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            labels=self.labels[idx],
            clean_labels=None if self.clean_labels is None else self.clean_labels[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            images=None if self.images is None else self.images[idx],
        )

    def with_labels(self, labels: np.ndarray, clean_labels: np.ndarray | None = None) -> "DatasetDescription":
        """A copy whose training labels are ``labels`` (e.g. after simulated noise); the
        current labels become the clean labels unless ``clean_labels`` is given."""
        return replace(self, labels=np.asarray(labels),
                       clean_labels=self.labels if clean_labels is None else clean_labels)
