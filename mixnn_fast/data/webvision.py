"""(mini-)WebVision 1.0 (Li et al., 2017) and its ILSVRC2012 validation counterpart.

Expected layout (``root`` as used by DivideMix and MixNN-style code)::

    root/info/train_filelist_google.txt   "google/q0001/000001.jpg <label>"  paths relative to root
    root/info/val_filelist.txt            "val000001.jpg <label>"            relative to val_images_256/
    root/info/synsets.txt                 optional: "n01440764 tench, Tinca tinca", one class a line
    root/google/q0001/000001.jpg ...      training images (the resized version is fine)
    root/val_images_256/val000001.jpg ... validation images

The ILSVRC2012 validation images of the same classes (split "imagenet_val") are read from
either of two layouts, the first that exists:

    root/imagenet/val_filelist.txt        "relative/path <label>", relative to root/imagenet/,
                                          label = WebVision class index (0-999)
    root/imagenet/val/<label>/<image>     a folder per WebVision class index (DivideMix's layout:
                                          folders "0" ... "49" for mini-WebVision)

``imagenet_root`` overrides ``root/imagenet``. WebVision's class indices follow the sorted
ILSVRC2012 synsets, so an ImageNet image's WebVision label is its synset's position in that order.

mini-WebVision is the first 50 classes: lines with label >= ``num_classes`` are dropped
(65,944 train and 2,500 val images remain for 50 classes).
"""
from __future__ import annotations

import os

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.folders import IMAGE_EXTENSIONS
from mixnn_fast.data.listfile import (
    ListEntries,
    check_images_exist,
    check_label_range,
    read_names,
    read_path_label_list,
    resolve_entries,
)

SPLITS = ("train", "val", "imagenet_val")
WEBVISION_CLASSES = 1000  # WebVision 1.0 uses the 1000 ILSVRC2012 classes


def _class_names(root: str, num_classes: int) -> list[str]:
    """The first ``num_classes`` lines of info/synsets.txt when present (the whole line, e.g.
    "n01440764 tench, Tinca tinca"), else "0", "1", ... ."""
    path = os.path.join(root, "info", "synsets.txt")
    if not os.path.isfile(path):
        return [str(i) for i in range(num_classes)]
    # read_names, not open(): a byte that is not UTF-8 is then reported with the file and line
    names = read_names(path, what="WebVision synsets file")
    if len(names) < num_classes:
        raise ValueError(f"{path}: {len(names)} class names, fewer than num_classes={num_classes}")
    return names[:num_classes]


def _imagenet_entries(
    imagenet_root: str, num_classes: int, check_exists: bool, allow_outside_root: bool
) -> tuple[list[str], np.ndarray]:
    """Absolute paths and labels of the ILSVRC12 validation images with label < num_classes."""
    list_path = os.path.join(imagenet_root, "val_filelist.txt")
    if os.path.isfile(list_path):
        entries = read_path_label_list(list_path, what="ILSVRC12 validation list")
        check_label_range(entries, WEBVISION_CLASSES)
        entries = entries.select(entries.labels < num_classes)
        paths = resolve_entries(imagenet_root, entries, allow_outside_root=allow_outside_root)
        if check_exists:
            check_images_exist(entries, paths)
        return paths, entries.labels
    folder = os.path.join(imagenet_root, "val")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"ILSVRC12 validation data not found: expected {list_path} or class folders {folder}/<label>/"
        )
    paths: list[str] = []
    labels: list[int] = []
    endings = tuple(IMAGE_EXTENSIONS)
    for label in range(num_classes):
        directory = os.path.join(folder, str(label))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"ILSVRC12 validation folder for class {label} not found: {directory}")
        found = sorted(
            os.path.join(directory, f) for f in os.listdir(directory)
            if not f.startswith(".") and f.lower().endswith(endings)
        )
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64)


def webvision(
    root: str | os.PathLike,
    split: str,
    num_classes: int = 50,
    *,
    imagenet_root: str | os.PathLike | None = None,
    check_exists: bool = True,
    allow_outside_root: bool = False,
) -> DatasetDescription:
    """One split of (mini-)WebVision, keeping the classes with index < ``num_classes``.

    ``split``: "train" (Google images, web labels: ``clean_labels`` None), "val" (WebVision's
    human-checked validation set) or "imagenet_val" (ILSVRC2012 validation images of the same
    classes); the two validation sets carry ``clean_labels`` equal to ``labels``.
    Returns ``paths`` (N absolute, list order), ``labels`` (N,) int64.

    Errors name the list file and line: a malformed line, a label outside [0, 1000), and with
    ``check_exists`` a listed image missing on disk. A listed path that leads outside the
    directory its list is relative to (``root`` for "train", ``root/val_images_256`` for
    "val", the ImageNet root for "imagenet_val"), by ``..``, an absolute path, or being that
    directory itself, is an error too unless ``allow_outside_root=True``; symbolic links are
    followed (see :func:`mixnn_fast.data.listfile.resolve_entries`).
    """
    if split not in SPLITS:
        raise ValueError(f"webvision: split must be one of {SPLITS}, got {split!r}")
    if not 1 <= num_classes <= WEBVISION_CLASSES:
        raise ValueError(f"webvision: num_classes must lie in [1, {WEBVISION_CLASSES}], got {num_classes}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"WebVision root directory not found: {root}")
    classes = _class_names(root, num_classes)

    if split == "imagenet_val":
        base = os.path.abspath(os.fspath(imagenet_root)) if imagenet_root is not None else os.path.join(root, "imagenet")
        paths, labels = _imagenet_entries(base, num_classes, check_exists, allow_outside_root)
        return DatasetDescription(
            name=f"webvision{num_classes}/imagenet_val", classes=classes, labels=labels, clean_labels=labels,
            paths=paths, root=base, extra={"split": split},
        )

    list_name, image_dir = {
        "train": ("train_filelist_google.txt", root),
        "val": ("val_filelist.txt", os.path.join(root, "val_images_256")),
    }[split]
    entries: ListEntries = read_path_label_list(os.path.join(root, "info", list_name), what=f"WebVision {split} list")
    # Every line must carry a valid WebVision label before the class filter, so a corrupt label
    # (e.g. 5000) is reported rather than silently dropped as "not one of the first 50 classes".
    check_label_range(entries, WEBVISION_CLASSES)
    entries = entries.select(entries.labels < num_classes)
    paths = resolve_entries(image_dir, entries, allow_outside_root=allow_outside_root)
    if check_exists:
        check_images_exist(entries, paths)
    return DatasetDescription(
        name=f"webvision{num_classes}/{split}", classes=classes, labels=entries.labels,
        clean_labels=None if split == "train" else entries.labels,
        paths=paths, root=root, extra={"split": split, "line_numbers": entries.line_numbers},
    )
