"""Clothing1M (Xiao et al., CVPR 2015) in the layout it is distributed in.

Expected layout (``root`` is the directory holding the text files)::

    root/category_names_eng.txt        14 class names, one a line (label = line order, 0-13)
    root/noisy_label_kv.txt            "images/a/bc/name.jpg <label>"  web (noisy) labels
    root/clean_label_kv.txt            "images/a/bc/name.jpg <label>"  human (clean) labels
    root/noisy_train_key_list.txt      "images/a/bc/name.jpg"          one key a line
    root/clean_train_key_list.txt
    root/clean_val_key_list.txt
    root/clean_test_key_list.txt
    root/images/a/bc/name.jpg          the images; keys are paths relative to root

Some noisy-train images also have a clean label and some clean images also have a noisy
label; both are kept (see :func:`clothing1m`).
"""
from __future__ import annotations

import math
import os

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.listfile import (
    ListEntries,
    ListFileError,
    check_images_exist,
    check_label_range,
    read_names,
    read_path_label_list,
    read_path_list,
    resolve_entries,
)

SPLITS = ("noisy_train", "clean_train", "clean_val", "clean_test")
UNKNOWN = -1  # marks "this image has no label of that kind" in the partial-label arrays


def _label_table(entries: ListEntries) -> dict[str, int]:
    """key -> label. A key listed twice with different labels is an error naming both lines;
    an exact repeat is harmless and accepted."""
    table = dict(zip(entries.paths, entries.labels.tolist()))
    if len(table) == len(entries):
        return table  # no key repeats: the common case, built at C speed
    table = {}
    first_line: dict[str, int] = {}
    for i, (key, label) in enumerate(zip(entries.paths, entries.labels.tolist())):
        previous = table.get(key)
        if previous is None:
            table[key] = label
            first_line[key] = int(entries.line_numbers[i])
        elif previous != label:
            raise ListFileError(
                f"{entries.where(i)}: {key!r} has label {label}, but line {first_line[key]} gave it {previous}"
            )
    return table


def clothing1m(
    root: str | os.PathLike, split: str, *, check_exists: bool = True, allow_outside_root: bool = False
) -> DatasetDescription:
    """One split of Clothing1M.

    ``split``: "noisy_train" (about 1M images, labels = the noisy web labels),
    "clean_train", "clean_val", "clean_test" (labels = the clean human labels).
    Returns ``paths`` (N absolute, key-list order), ``labels`` (N,) int64,
    ``classes`` (14 names from ``category_names_eng.txt``) and

    - ``clean_labels``: for the clean splits, the same clean labels; for "noisy_train", None
      because only a small part of it has clean labels — those are in
      ``extra['clean_labels_where_known']`` (N,) int64, -1 where unknown;
    - ``extra['noisy_labels_where_known']`` (N,) int64 for the clean splits, likewise.

    Errors (each naming the file and line): a key of the split missing from the label kv
    file, a label outside [0, 14), a malformed line, conflicting labels for one key, and —
    with ``check_exists`` (default) — a listed image that is not on disk. Checking existence
    stats every image once (a few seconds for the 1M noisy keys on a local disk).
    A key that leads outside ``root`` (``../x``, ``/abs/path``, or ``root`` itself) is an
    error naming the key list and line unless ``allow_outside_root=True``; symbolic links
    inside ``root`` are followed (see :func:`mixnn_fast.data.listfile.resolve_entries`).
    """
    if split not in SPLITS:
        raise ValueError(f"clothing1m: split must be one of {SPLITS}, got {split!r}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Clothing1M root directory not found: {root}")
    classes = read_names(os.path.join(root, "category_names_eng.txt"), what="Clothing1M class-name file")
    keys = read_path_list(os.path.join(root, f"{split}_key_list.txt"), what=f"Clothing1M {split} key list")
    noisy = read_path_label_list(os.path.join(root, "noisy_label_kv.txt"), what="Clothing1M noisy label file")
    clean = read_path_label_list(os.path.join(root, "clean_label_kv.txt"), what="Clothing1M clean label file")
    check_label_range(noisy, len(classes))
    check_label_range(clean, len(classes))
    noisy_table, clean_table = _label_table(noisy), _label_table(clean)

    given_table, given_source = (noisy_table, noisy) if split == "noisy_train" else (clean_table, clean)
    other_table = clean_table if split == "noisy_train" else noisy_table
    labels = np.empty(len(keys), dtype=np.int64)
    other = np.full(len(keys), UNKNOWN, dtype=np.int64)
    for i, key in enumerate(keys.paths):
        label = given_table.get(key)
        if label is None:
            raise ListFileError(f"{keys.where(i)}: {key!r} has no label in {given_source.source}")
        labels[i] = label
        other[i] = other_table.get(key, UNKNOWN)

    paths = resolve_entries(root, keys, allow_outside_root=allow_outside_root)
    if check_exists:
        check_images_exist(keys, paths)
    extra: dict = {"split": split}
    if split == "noisy_train":
        extra["clean_labels_where_known"] = other
        clean_labels = None
    else:
        extra["noisy_labels_where_known"] = other
        clean_labels = labels
    return DatasetDescription(
        name=f"clothing1m/{split}", classes=classes, labels=labels, clean_labels=clean_labels,
        paths=paths, root=root, extra=extra,
    )


def balanced_subset(description: DatasetDescription, num_batches: int, batch_size: int, seed: int) -> np.ndarray:
    """The per-epoch class-balanced draw of Clothing1M training (as DivideMix's loader does).

    Shuffle all N sample ids with ``seed``, then walk them keeping a sample while its class has
    fewer than ``ceil(num_batches * batch_size / C)`` kept samples, until ``num_batches *
    batch_size`` are kept; finally shuffle the kept ids. Classes smaller than their share are
    kept whole, so the subset can be smaller than asked for when the data are very unbalanced.

    Returns (M,) int64 indices into ``description`` (M <= num_batches * batch_size), in random
    order: the epoch's anchor order (``description.subset(ids)`` gives the subset itself).
    Uses ``description.labels`` (the noisy labels for "noisy_train"), since the clean ones are
    unknown at training time.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"balanced_subset: num_batches and batch_size must be >= 1, got {num_batches}, {batch_size}")
    wanted = num_batches * batch_size
    num_classes = description.num_classes
    # DivideMix keeps a sample while count < wanted / C (a float), i.e. up to ceil(wanted / C) each.
    cap = math.ceil(wanted / num_classes)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(description))
    labels = description.labels[order]
    # Rank of each shuffled sample within its class (0 for the first of its class in the order,
    # 1 for the second, ...): keeping rank < cap is the sequential cap rule without a Python loop.
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - starts
    kept = order[rank < cap][:wanted]
    return rng.permutation(kept)
