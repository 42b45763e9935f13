"""CIFAR-10 and CIFAR-100, "python version" pickles, read without trusting the pickle.

Expected layout (``root`` may be the extracted directory itself or its parent)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

The files are Python 2 pickles of dicts holding a uint8 array ``data`` (N, 3072) — each row
1024 red, 1024 green, 1024 blue values of a 32×32 image in row-major order — and label lists
(``labels``; for CIFAR-100 ``fine_labels`` and ``coarse_labels``). ``pickle.load`` on such a
file would execute whatever callable the file names; :class:`RestrictedUnpickler` resolves
only the handful of numpy constructors an array needs, and refuses everything else.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

from mixnn_fast.data.description import DatasetDescription

_LAYOUT = {
    "cifar10": {
        "directory": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "directory": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
    },
}
CIFAR100_COARSE_CLASSES = 20


def _checked_latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles (protocol <= 2) store bytes as _codecs.encode(str, 'latin1'); allowing
    # codecs.encode in general would let a file run any codec, so only that one use is allowed.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _plain_dtype(*args: Any) -> np.dtype:
    # Object arrays would pickle their elements as arbitrary objects; the CIFAR files hold uint8.
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


# The array reconstructor numpy pickles reference; taken from numpy itself rather than a private
# module path, which moved from numpy.core to numpy._core in numpy 2.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by numpy 1.x (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _checked_latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy's array constructors (and the latin-1 bytes
    helper of Python 3 pickles); any other global raises pickle.UnpicklingError naming it."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_restricted_pickle(path: str) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`. Python 2 ``str`` objects are decoded
    as latin-1 (the documented setting for numpy arrays pickled by Python 2). Any failure —
    forbidden global, truncation, garbage — raises ValueError naming the file."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError) as exc:
        # The pickle VM reports malformed input through many exception types; they all mean
        # "this is not a CIFAR pickle", and the user needs the file name more than the type.
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc


def _field(batch: dict, key: str, path: str) -> Any:
    # Python 2 pickles decode keys as str under latin-1; files re-saved with encoding='bytes'
    # have bytes keys. Accept both.
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(map(str, batch))})")


def _find_directory(root: str, directory: str) -> str:
    for candidate in (os.path.join(root, directory), root):
        if os.path.isdir(candidate) and os.path.basename(os.path.normpath(candidate)) == directory:
            return candidate
    raise FileNotFoundError(f"{directory}/ not found at or under {root}")


def _names(path: str, key: str) -> list[str]:
    meta = load_restricted_pickle(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a dict, got {type(meta).__name__}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, key, path)]


def _labels(batch: dict, key: str, path: str, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(_field(batch, key, path))
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: {key!r} must be {n} integers, got {labels.dtype} {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"{path}: {key}[{bad[0]}] = {labels[bad[0]]} is out of range [0, {num_classes})")
    return labels.astype(np.int64)


def cifar(root: str | os.PathLike, which: str, split: str = "train") -> DatasetDescription:
    """CIFAR-10 (``which="cifar10"``) or CIFAR-100 (``"cifar100"``), ``split`` "train" or "test".

    Returns ``images`` (N, 32, 32, 3) uint8 (HWC, RGB), ``labels`` (N,) int64 (CIFAR-100: the
    fine labels), ``classes`` from the meta file, ``clean_labels`` None (the labels as
    published; simulate noise with :func:`mixnn_fast.noise.corrupt` and ``with_labels``).
    CIFAR-100 adds ``extra['coarse_labels']`` (N,) int64 and ``extra['coarse_classes']``.
    Raises FileNotFoundError for a missing file and ValueError naming the file for anything
    malformed (wrong shapes, labels out of range, a pickle naming a forbidden global).
    """
    if which not in _LAYOUT:
        raise ValueError(f"cifar: which must be one of {tuple(_LAYOUT)}, got {which!r}")
    if split not in ("train", "test"):
        raise ValueError(f"cifar: split must be 'train' or 'test', got {split!r}")
    layout = _LAYOUT[which]
    directory = _find_directory(os.path.abspath(os.fspath(root)), layout["directory"])
    num_classes = layout["num_classes"]

    meta_path = os.path.join(directory, layout["meta"])
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{which} meta file not found: {meta_path}")
    classes = _names(meta_path, layout["names_key"])
    if len(classes) != num_classes:
        raise ValueError(f"{meta_path}: {len(classes)} class names, expected {num_classes}")

    images, labels, coarse = [], [], []
    for name in layout[split]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{which} {split} file not found: {path}")
        batch = load_restricted_pickle(path)
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
        data = _field(batch, "data", path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise ValueError(f"{path}: 'data' must be a (N, 3072) uint8 array, got {type(data).__name__} {shape}")
        n = len(data)
        images.append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(_labels(batch, layout["label_key"], path, n, num_classes))
        if which == "cifar100":
            coarse.append(_labels(batch, "coarse_labels", path, n, CIFAR100_COARSE_CLASSES))

    extra: dict = {"split": split}
    if which == "cifar100":
        extra["coarse_labels"] = np.concatenate(coarse)
        extra["coarse_classes"] = _names(meta_path, "coarse_label_names")
    return DatasetDescription(
        name=f"{which}/{split}", classes=classes, labels=np.concatenate(labels),
        images=np.ascontiguousarray(np.concatenate(images)), root=directory, extra=extra,
    )
