"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from its IDX files.

Expected files in ``root`` (each either gzip-compressed with ``.gz`` or raw)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte    60,000 images
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte     10,000 images

The default root is where Debian's package ``dataset-fashion-mnist`` installs them.
"""
from __future__ import annotations

import os

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.idx import read_idx

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}


def _find(root: str, stem: str) -> str:
    candidates = [os.path.join(root, stem + ".gz"), os.path.join(root, stem)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    hint = " (install the Debian package dataset-fashion-mnist, or pass root=)" if root == DEBIAN_ROOT else ""
    raise FileNotFoundError(f"Fashion-MNIST file not found: looked for {' and '.join(candidates)}{hint}")


def fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> DatasetDescription:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) from ``root`` (default: Debian's location).

    Returns ``images`` (N, 28, 28, 1) uint8, ``labels`` (N,) int64 in [0, 10), ``classes``
    the ten names, ``clean_labels`` None. Raises FileNotFoundError naming the files looked for,
    ValueError naming the file when an IDX file is malformed, the image file is not (N, 28, 28)
    uint8, the counts of images and labels differ, or a label lies outside [0, 10).
    """
    if split not in _PREFIX:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    root = os.path.abspath(os.fspath(root)) if root is not None else DEBIAN_ROOT
    image_path = _find(root, f"{_PREFIX[split]}-images-idx3-ubyte")
    label_path = _find(root, f"{_PREFIX[split]}-labels-idx1-ubyte")
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected (N, 28, 28) uint8 images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_path}: expected (N,) uint8 labels, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path}")
    bad = np.flatnonzero(labels >= len(CLASSES))
    if len(bad):
        raise ValueError(f"{label_path}: label {labels[bad[0]]} at index {bad[0]} is out of range [0, {len(CLASSES)})")
    return DatasetDescription(
        name=f"fashion_mnist/{split}", classes=list(CLASSES), labels=labels.astype(np.int64),
        images=images[..., None], root=root, extra={"split": split},
    )
