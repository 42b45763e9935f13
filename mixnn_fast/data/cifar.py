"""CIFAR-10 and CIFAR-100, "python version" pickles, read without trusting the pickle.

Expected layout (``root`` may be the extracted directory itself or its parent)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

The files are Python 2 pickles of dicts holding a uint8 array ``data`` (N, 3072) — each row
1024 red, 1024 green, 1024 blue values of a 32×32 image in row-major order — and label lists
(``labels``; for CIFAR-100 ``fine_labels`` and ``coarse_labels``). ``pickle.load`` on such a
file would execute whatever callable the file names; :class:`RestrictedUnpickler` resolves
only the handful of numpy constructors an array needs, and refuses everything else. It is
built on the pure-Python unpickler: the C one sizes its memo table by the largest index an
opcode names, so a damaged 7-byte file (``None``, then a memo store at index 0x3fffffff) made
it allocate and zero 16 GB before returning.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import struct
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


def _plain_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # numpy pickles a dtype as dtype("u1", False, True) (Python 2: dtype("u1", 0, 1)) and sends
    # the details with the state; a type string is all a file needs to pass. (Other specs, such
    # as nested tuples or lists, reach numpy's parser and its error messages, which print them.)
    if not isinstance(spec, str) or len(spec) > 16 or not isinstance(align, (bool, int)) \
            or not isinstance(copy, (bool, int)):
        raise pickle.UnpicklingError("numpy.dtype is only allowed as numpy pickles it: dtype(type string, align, copy)")
    # Object arrays would pickle their elements as arbitrary objects; the CIFAR files hold uint8.
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


# The array reconstructor numpy pickles reference; taken from numpy itself rather than a private
# module path, which moved from numpy.core to numpy._core in numpy 2.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class _NdarrayReference:
    """What a pickle's ``numpy.ndarray`` resolves to. numpy's pickles only pass the class to
    ``_reconstruct``; the real class would also be callable, letting a file allocate an array
    of any size it names (``ndarray((10**12,))``)."""

    __slots__ = ()


_NDARRAY = _NdarrayReference()


def _empty_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy writes _reconstruct(ndarray, (0,), b"b"): an empty placeholder whose real shape and
    # data come with the state (BUILD), where __setstate__ checks them against each other.
    # Any other shape would be an allocation of the file's choosing.
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError("_reconstruct is only allowed as numpy writes it: (ndarray, (0,), dtype)")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,  # written by numpy 1.x (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,  # written by numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _checked_latin1_encode,
}


_CONTAINERS = (list, tuple, dict, set, frozenset)
#: Limits on what a CIFAR pickle may build: nesting depth and the size of its containers
#: counted as a tree (a shared sub-list counts wherever it appears). The published files hold
#: a dict of a few lists and arrays: depth 2, about 150,000 entries for CIFAR-100's train file.
MAX_NESTING = 32
MAX_TREE_SIZE = 10_000_000
#: The same limits for a dict key or set member, which is hashed while the file is read.
MAX_KEY_TREE_SIZE = 10_000


def _nesting_problem(obj: Any, max_depth: int, max_size: int) -> str | None:
    """Why the containers in ``obj`` are too deep, too large or circular, or None.

    What a damaged or hostile pickle can build cheaply and the rest of Python handles badly:
    a tuple nested a million deep (hashing it overflows the C stack: a segmentation fault),
    tuples sharing their halves 60 times over (hashing, printing or ``np.asarray`` visit 2**60
    entries: a hang), a list that contains itself. Iterative and memoised by object, so it
    costs one visit per distinct container whatever its expanded size.
    """
    if not isinstance(obj, _CONTAINERS):
        return None
    # ids are stable here: every container visited is reachable from obj, which the caller holds
    depth: dict[int, int] = {}  # id -> nesting depth below it (-1: being visited)
    size: dict[int, int] = {}   # id -> size as a tree, capped at max_size + 1
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = [x for pair in node.items() for x in pair] if isinstance(node, dict) else node
        if not finished:
            if key in depth:
                if depth[key] < 0:
                    return "a container holds itself"
                continue
            depth[key] = -1
            stack.append((node, True))
            for child in children:
                if isinstance(child, _CONTAINERS):
                    if depth.get(id(child)) == -1:
                        return "a container holds itself"
                    stack.append((child, False))
            continue
        below = [c for c in children if isinstance(c, _CONTAINERS)]
        depth[key] = 1 + max((depth[id(c)] for c in below), default=0)
        size[key] = min(max_size + 1, 1 + (len(children) - len(below)) + sum(size[id(c)] for c in below))
        if depth[key] > max_depth:
            return f"containers nested more than {max_depth} deep"
        if size[key] > max_size:
            return f"more than {max_size} entries when shared containers are counted wherever they appear"
    return None


def _hashing_guard(opcode: bytes, keys: Any) -> Any:
    """pickle._Unpickler's handler of ``opcode``, preceded by a check of the objects it is about
    to hash (``keys(stack)``: the dict keys or set members on the unpickler's stack)."""
    load = pickle._Unpickler.dispatch[opcode[0]]

    def guarded(self: "RestrictedUnpickler") -> None:
        for key in keys(self.stack):
            problem = _nesting_problem(key, MAX_NESTING, MAX_KEY_TREE_SIZE)
            if problem is not None:
                raise pickle.UnpicklingError(f"a dict key or set member that cannot be hashed safely: {problem}")
        load(self)
    return guarded


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that resolves only numpy's array constructors (and the latin-1 bytes
    helper of Python 3 pickles); any other global raises pickle.UnpicklingError naming it.

    Pure Python (``pickle._Unpickler``), so its memo is a dict: the C unpickler grows an array
    to the largest memo index a file names, gigabytes for a few corrupt bytes (see the module
    docstring). CIFAR's pickles are a few large byte strings and short label lists, which the
    Python unpickler reads about as fast.
    """

    # The opcodes that hash objects from the file (dict keys, set members) check them first.
    # After a MARK the pure-Python unpickler keeps the marked items as its whole stack.
    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.SETITEM[0]] = _hashing_guard(pickle.SETITEM, lambda stack: stack[-2:-1])
    dispatch[pickle.SETITEMS[0]] = _hashing_guard(pickle.SETITEMS, lambda stack: stack[0::2])
    dispatch[pickle.DICT[0]] = _hashing_guard(pickle.DICT, lambda stack: stack[0::2])
    dispatch[pickle.ADDITEMS[0]] = _hashing_guard(pickle.ADDITEMS, lambda stack: stack)
    dispatch[pickle.FROZENSET[0]] = _hashing_guard(pickle.FROZENSET, lambda stack: stack)

    def _load_build(self) -> None:
        # numpy's __setstate__ parses its argument as a tuple without checking that it is one:
        # a dict there (one flipped bit: TUPLE -> DICT) raised SystemError from descriptor.c.
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, (np.dtype, np.ndarray)) and not isinstance(state, tuple):
            raise pickle.UnpicklingError(f"the state of a numpy {type(target).__name__} must be a tuple, "
                                         f"got {type(state).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

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
        loaded = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
        # before anything prints, hashes or converts it (see _nesting_problem)
        problem = _nesting_problem(loaded, MAX_NESTING, MAX_TREE_SIZE)
        if problem is not None:
            raise pickle.UnpicklingError(problem)
        return loaded
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError, RecursionError, struct.error, SystemError) as exc:
        # The pickle VM reports malformed input through many exception types; they all mean
        # "this is not a CIFAR pickle", and the user needs the file name more than the type.
        # (OverflowError: an array state with a size beyond ssize_t; RecursionError: numpy's
        # guard on nested specs; struct.error: a short integer operand; SystemError: numpy's
        # setstate functions trusting the types of their arguments, see _load_build.)
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {_clip(exc)})") from exc


def _clip(value: Any, limit: int = 200) -> str:
    """str(value) cut to ``limit`` characters: error messages quote pieces of damaged files."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _key_names(batch: dict) -> list[str]:
    # str() of an arbitrary key from a damaged file may be huge or recurse without end (a
    # tuple nested a million deep); the user needs the names of string keys, the rest by type.
    names = sorted(k if isinstance(k, str) else k.decode("latin1") if isinstance(k, bytes) else f"<{type(k).__name__}>"
                   for k in batch)
    return [_clip(n, 40) for n in names[:20]] + (["..."] if len(names) > 20 else [])


def _field(batch: dict, key: str, path: str) -> Any:
    # Python 2 pickles decode keys as str under latin-1; files re-saved with encoding='bytes'
    # have bytes keys. Accept both.
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"{path}: no {key!r} entry (keys: {_key_names(batch)})")


def _find_directory(root: str, directory: str) -> str:
    for candidate in (os.path.join(root, directory), root):
        if os.path.isdir(candidate) and os.path.basename(os.path.normpath(candidate)) == directory:
            return candidate
    raise FileNotFoundError(f"{directory}/ not found at or under {root}")


def _names(path: str, key: str) -> list[str]:
    meta = load_restricted_pickle(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a dict, got {type(meta).__name__}")
    names = _field(meta, key, path)
    # a list of str (Python 2 files read as latin-1) or of bytes; anything else (a number, a
    # nested list) would otherwise fail below with a TypeError that names no file
    if not isinstance(names, (list, tuple, np.ndarray)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise ValueError(f"{path}: {key!r} must be a list of class names (str or bytes), got {_clip(type(names).__name__)}")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: a class name in {key!r} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _labels(batch: dict, key: str, path: str, n: int, num_classes: int) -> np.ndarray:
    try:
        labels = np.asarray(_field(batch, key, path))
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists, unconvertible objects
        raise ValueError(f"{path}: {key!r} must be {n} integers ({type(exc).__name__}: {_clip(exc)})") from exc
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
    published; simulate noise with :func:`mixnn_fast.data.noise.corrupt` and ``with_labels``).
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
