"""Two generic sources: a folder per class (torchvision's ImageFolder layout) and a
``relative/path label`` list file."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.listfile import (
    ListFileError,
    check_images_exist,
    check_label_range,
    read_path_label_list,
    resolve_entries,
)

#: File endings image_folder treats as images (compared lower-case), as torchvision's ImageFolder does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: The most classes file_list infers from the labels alone (max label + 1) when ``classes`` is
#: not given: above 4M identities (more than the largest face-recognition sets) a label is far
#: more likely a corrupt line than a class, and naming that many classes would take gigabytes.
MAX_INFERRED_CLASSES = 1 << 22


def _walk_error(root: str):
    # os.walk skips a directory it cannot list unless told otherwise: the images under it
    # would silently be missing from the data set.
    def raise_it(err: OSError) -> None:
        raise ValueError(f"{root}: cannot list {err.filename}: {err.strerror or err}") from err
    return raise_it


def _class_images(root: str, class_dir: str, endings: tuple[str, ...]) -> tuple[list[str], int]:
    """Image files under ``class_dir`` (following symbolic links) and the number of ignored files.

    Raises ValueError when a symbolic link leads back to a directory being walked (a loop:
    os.walk would follow it until the path grew too long, listing the same images again and
    again, and then swallow the error).
    """
    found: list[str] = []
    ignored = 0
    # (device, inode) of each walked directory and of its ancestors, by walked path; seeded
    # with the directories above class_dir (root, its parents, "/"), so that a link back to
    # one of those is named where it is, not one lap of the loop later
    above = set()
    parent = os.path.dirname(class_dir)
    while True:
        st = os.stat(parent)
        above.add((st.st_dev, st.st_ino))
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    ancestry: dict[str, frozenset] = {class_dir: frozenset(above)}
    for directory, subdirs, files in os.walk(class_dir, followlinks=True, onerror=_walk_error(root)):
        stat = os.stat(directory)
        chain = ancestry.pop(directory, frozenset()) | {(stat.st_dev, stat.st_ino)}
        kept = []
        for d in subdirs:
            if d.startswith("."):
                continue
            child = os.path.join(directory, d)
            try:
                child_stat = os.stat(child)
            except OSError as exc:  # a broken link listed as a directory, or a race
                raise ValueError(f"{root}: cannot read directory {child}: {exc.strerror or exc}") from exc
            if (child_stat.st_dev, child_stat.st_ino) in chain:
                raise ValueError(
                    f"{root}: symbolic link loop: {child} leads back to {os.path.realpath(child)}, "
                    "a directory that contains it"
                )
            ancestry[child] = chain
            kept.append(d)
        subdirs[:] = kept
        for f in files:
            if not f.startswith(".") and f.lower().endswith(endings):
                found.append(os.path.join(directory, f))
            else:
                ignored += 1
    found.sort()
    return found, ignored


def image_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> DatasetDescription:
    """Images under ``root/<class name>/**``, one sub-directory per class.

    Classes are the sub-directory names in sorted order (label = position), images are found
    recursively and listed in sorted order, so two calls give the same ids. Files whose ending
    is not in ``extensions`` and hidden entries (names starting with '.') are ignored; their
    count is in ``extra['ignored_files']``. ``clean_labels`` is None (the folder names are the
    given labels).

    Symbolic links are followed (datasets are often kept as symlink farms); a link that
    leads back to a directory containing it raises ValueError naming it, as does a directory
    that cannot be listed (its images would otherwise be silently missing).

    Raises FileNotFoundError when ``root`` is not a directory, has no class directories, or
    a class directory holds no image (an empty class would silently shift nothing but leave a
    class the model can never learn, which is almost always a copying mistake).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:  # e.g. permission denied: an OSError would not say what was being read
        raise ValueError(f"image folder {root}: cannot list it: {exc.strerror or exc}") from exc
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    endings = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    ignored = 0
    for label, name in enumerate(classes):
        found, skipped = _class_images(root, os.path.join(root, name), endings)
        ignored += skipped
        if not found:
            raise FileNotFoundError(f"{root}: class directory {name!r} holds no image ending in {', '.join(endings)}")
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
    allow_outside_root: bool = False,
) -> DatasetDescription:
    """Images named by a list file of ``relative/path label`` lines.

    ``path``: the list file; ``root``: the directory the paths are relative to (default: the
    list file's directory). ``classes``: the class names, or their number; default
    ``max(label) + 1`` classes named "0", "1", ... (at most ``MAX_INFERRED_CLASSES``: a larger
    label is reported with its line; pass ``classes`` if it is right). Labels must lie in [0, C).
    ``check_exists`` stats every listed image once (FileNotFoundError naming the line of the
    first missing one); turn it off for huge lists on slow file systems — the loader then
    reports a missing image when it reaches it.
    A listed path that leads outside ``root`` (``../x``, an absolute path elsewhere, or ``root``
    itself) raises ListFileError naming the line unless ``allow_outside_root=True``; symbolic
    links inside ``root`` are followed (see :func:`mixnn_fast.data.listfile.resolve_entries`).
    Returns ``paths`` (N absolute), ``labels`` (N,) int64 in file order, ``clean_labels`` None,
    ``extra['line_numbers']`` (N,) int64.
    """
    entries = read_path_label_list(path)
    if root is None:
        root = os.path.dirname(entries.source)
    if classes is None:
        num = int(entries.labels.max()) + 1 if len(entries) else 0
        if num > MAX_INFERRED_CLASSES:
            i = int(np.argmax(entries.labels))
            raise ListFileError(
                f"{entries.where(i)}: label {num - 1} would make {num} classes, more than file_list infers "
                f"on its own ({MAX_INFERRED_CLASSES}); pass classes= (the names or their number) if it is right"
            )
        names = [str(i) for i in range(num)]
    elif isinstance(classes, (int, np.integer)):
        names = [str(i) for i in range(int(classes))]
    else:
        names = [str(c) for c in classes]
    check_label_range(entries, len(names))
    absolute = resolve_entries(root, entries, allow_outside_root=allow_outside_root)
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
