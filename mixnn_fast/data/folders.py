"""Two generic sources: a folder per class (torchvision's ImageFolder layout) and a
``relative/path label`` list file."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.listfile import check_images_exist, check_label_range, read_path_label_list, resolve

#: File endings image_folder treats as images (compared lower-case), as torchvision's ImageFolder does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> DatasetDescription:
    """Images under ``root/<class name>/**``, one sub-directory per class.

    Classes are the sub-directory names in sorted order (label = position), images are found
    recursively and listed in sorted order, so two calls give the same ids. Files whose ending
    is not in ``extensions`` and hidden entries (names starting with '.') are ignored; their
    count is in ``extra['ignored_files']``. ``clean_labels`` is None (the folder names are the
    given labels).

    Raises FileNotFoundError when ``root`` is not a directory, has no class directories, or
    a class directory holds no image (an empty class would silently shift nothing but leave a
    class the model can never learn, which is almost always a copying mistake).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    endings = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    ignored = 0
    for label, name in enumerate(classes):
        found: list[str] = []
        for directory, subdirs, files in os.walk(os.path.join(root, name), followlinks=True):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for f in files:
                if not f.startswith(".") and f.lower().endswith(endings):
                    found.append(os.path.join(directory, f))
                else:
                    ignored += 1
        if not found:
            raise FileNotFoundError(f"{root}: class directory {name!r} holds no image ending in {', '.join(endings)}")
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    return DatasetDescription(
        name=f"image_folder:{os.path.basename(root)}",
        classes=classes,
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        root=root,
        extra={"ignored_files": ignored},
    )


def file_list(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    classes: Sequence[str] | int | None = None,
    check_exists: bool = True,
) -> DatasetDescription:
    """Images named by a list file of ``relative/path label`` lines.

    ``path``: the list file; ``root``: the directory the paths are relative to (default: the
    list file's directory). ``classes``: the class names, or their number; default
    ``max(label) + 1`` classes named "0", "1", ... . Labels must lie in [0, C).
    ``check_exists`` stats every listed image once (FileNotFoundError naming the line of the
    first missing one); turn it off for huge lists on slow file systems — the loader then
    reports a missing image when it reaches it.
    Returns ``paths`` (N absolute), ``labels`` (N,) int64 in file order, ``clean_labels`` None,
    ``extra['line_numbers']`` (N,) int64.
    """
    entries = read_path_label_list(path)
    if root is None:
        root = os.path.dirname(entries.source)
    if classes is None:
        num = int(entries.labels.max()) + 1 if len(entries) else 0
        names = [str(i) for i in range(num)]
    elif isinstance(classes, (int, np.integer)):
        names = [str(i) for i in range(int(classes))]
    else:
        names = [str(c) for c in classes]
    check_label_range(entries, len(names))
    absolute = resolve(os.fspath(root), entries.paths)
    if check_exists:
        check_images_exist(entries, absolute)
    return DatasetDescription(
        name=f"file_list:{os.path.basename(entries.source)}",
        classes=names,
        labels=entries.labels,
        paths=absolute,
        root=os.path.abspath(os.fspath(root)),
        extra={"line_numbers": entries.line_numbers, "list_file": entries.source},
    )
