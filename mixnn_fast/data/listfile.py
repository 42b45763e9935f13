"""The one parser for the plain-text lists that image datasets ship.

Two line formats cover Clothing1M, WebVision and user file lists:

- ``path label`` lines (Clothing1M's ``*_label_kv.txt``, WebVision's ``info/*_filelist*.txt``,
  any user list): a relative path, whitespace, a non-negative decimal integer label;
- ``path`` lines (Clothing1M's ``*_key_list.txt``): one relative path a line.

Every check lives here, once: undecodable bytes, a missing label, a label that is not a
plain non-negative integer (or does not fit int64), a path with a NUL byte, a label out of
range, a listed path that leaves the dataset root, a listed image that does not exist.
Each raises an error that names the list file and the 1-based line number, because the
user's next step is to open that file at that line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


class ListFileError(ValueError):
    """A line of a list file that cannot be used; the message names the file and the line."""


#: Largest label a list file may carry: labels are stored as int64.
MAX_LABEL = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class ListEntries:
    """The entries of a list file, in file order.

    ``paths``: the paths exactly as written (relative paths stay relative);
    ``labels``: (N,) int64, or None for a ``path``-only list;
    ``line_numbers``: (N,) int64, the 1-based line each entry came from, so that later
    checks (label range, missing image, unknown key) can still name the line.
    ``source``: the list file's path, for messages.
    """

    source: str
    paths: list[str]
    labels: np.ndarray | None
    line_numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """``"<file>, line <n>"`` for entry ``i``: the prefix of every message about it."""
        return f"{self.source}, line {int(self.line_numbers[i])}"

    def select(self, keep: np.ndarray) -> "ListEntries":
        """The entries where the boolean mask ``keep`` (N,) is true, line numbers kept."""
        keep = np.asarray(keep, dtype=bool)
        return ListEntries(
            source=self.source,
            paths=[p for p, k in zip(self.paths, keep) if k],
            labels=None if self.labels is None else self.labels[keep],
            line_numbers=self.line_numbers[keep],
        )


def require_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as an absolute string if it is an existing file; else FileNotFoundError saying what it is."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise FileNotFoundError(f"{what} {path} exists but is not a regular file")
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each non-blank line, UTF-8, LF or CRLF endings and a BOM tolerated."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ListFileError(f"{path}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.strip()
            # Lines end in LF or CRLF. A CR left inside a line means CR-only line endings (old Mac
            # files, or a file mixing them): read as one line, the whole file would silently
            # become a single entry whose path holds the other lines.
            if "\r" in text:
                raise ListFileError(
                    f"{path}, line {number}: carriage return inside the line (CR line endings? "
                    "list files need LF or CRLF)"
                )
            # Blank lines (typically a trailing newline pair) carry no entry; skipping them
            # loses nothing, whereas a half-written entry is caught by the field checks below.
            if text:
                yield number, text


def _shorten(token: str, limit: int = 40) -> str:
    """``repr(token)``, cut to about ``limit`` characters: a 5,000-digit label must not become a 5,000-character message."""
    return repr(token) if len(token) <= limit else f"{token[:limit]!r}... ({len(token)} characters)"


def _parse_label(token: str, where: str) -> int:
    # int() alone would accept "+3", " 3", "3_0" and non-ASCII digits; a label column with any
    # of those is a sign the line is not what we think it is, so accept plain ASCII digits only.
    if token.startswith("-") and token[1:].isascii() and token[1:].isdigit():
        shown = token if len(token) <= 40 else _shorten(token)
        raise ListFileError(f"{where}: label {shown} is negative")
    if not (token.isascii() and token.isdigit()):
        raise ListFileError(f"{where}: label {_shorten(token)} is not a non-negative integer")
    # Labels are stored as int64: a longer number would end in an OverflowError from NumPy (or,
    # past 4,300 digits, in int()'s own ValueError) that names neither the file nor the line.
    # The length test comes first so that int() never sees a huge string.
    stripped = token.lstrip("0") or "0"
    if len(stripped) > len(str(MAX_LABEL)) or int(stripped) > MAX_LABEL:
        raise ListFileError(f"{where}: label {_shorten(token)} is too large (labels must be at most {MAX_LABEL})")
    return int(stripped)


def _check_path(path: str, where: str) -> str:
    # No file name can hold a NUL byte: os.stat raises ValueError on one, and a loader that
    # opens the path later fails far from this line. Say so here, with the line.
    if "\x00" in path:
        raise ListFileError(f"{where}: path {_shorten(path)} contains a NUL byte")
    return path


def read_path_label_list(path: str | os.PathLike, *, what: str = "list file") -> ListEntries:
    """Parse ``relative/path label`` lines.

    The label is the last whitespace-separated field, so paths containing spaces survive.
    Raises FileNotFoundError when the file is missing, ListFileError (a ValueError) naming the
    file and line for a line without a label or with a label that is not a non-negative integer.
    """
    source = require_file(path, what)
    paths: list[str] = []
    labels: list[int] = []
    numbers: list[int] = []
    for number, text in _numbered_lines(source):
        fields = text.rsplit(None, 1)
        where = f"{source}, line {number}"
        if len(fields) != 2:
            raise ListFileError(f"{where}: expected 'path label', got {_shorten(text, 200)}")
        paths.append(_check_path(fields[0], where))
        labels.append(_parse_label(fields[1], where))
        numbers.append(number)
    return ListEntries(source, paths, np.asarray(labels, dtype=np.int64), np.asarray(numbers, dtype=np.int64))


def read_path_list(path: str | os.PathLike, *, what: str = "list file") -> ListEntries:
    """Parse one-path-a-line lists (labels None). A line with more than one field is an error,
    since a key list that suddenly carries labels means the wrong file was passed."""
    source = require_file(path, what)
    paths: list[str] = []
    numbers: list[int] = []
    for number, text in _numbered_lines(source):
        if len(text.split()) != 1:
            raise ListFileError(f"{source}, line {number}: expected one path, got {_shorten(text, 200)}")
        paths.append(_check_path(text, f"{source}, line {number}"))
        numbers.append(number)
    return ListEntries(source, paths, None, np.asarray(numbers, dtype=np.int64))


def read_names(path: str | os.PathLike, *, what: str = "class-name file") -> list[str]:
    """One class name a line (blank lines skipped), e.g. Clothing1M's ``category_names_eng.txt``."""
    source = require_file(path, what)
    return [text for _, text in _numbered_lines(source)]


def check_label_range(entries: ListEntries, num_classes: int) -> None:
    """Raise ListFileError naming the first line whose label is not in [0, num_classes)."""
    if entries.labels is None or len(entries) == 0:
        return
    bad = np.flatnonzero((entries.labels < 0) | (entries.labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        more = f" ({len(bad) - 1} more lines like it)" if len(bad) > 1 else ""
        raise ListFileError(
            f"{entries.where(i)}: label {int(entries.labels[i])} is out of range [0, {num_classes}){more}"
        )


def check_images_exist(entries: ListEntries, absolute_paths: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the list file, the line and the path of the first listed
    image that is not a file. ``absolute_paths[i]`` is where entry ``i`` resolves to."""
    missing = [i for i, p in enumerate(absolute_paths) if not os.path.isfile(p)]
    if missing:
        i = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"{entries.where(i)}: image {entries.paths[i]!r} not found at {absolute_paths[i]}{more}"
        )


def resolve(root: str, relative_paths: Sequence[str]) -> list[str]:
    """Absolute, normalised paths of ``relative_paths`` under ``root`` (absolute entries are kept).

    No containment check: the dataset readers use :func:`resolve_entries`, which has one."""
    root = os.path.abspath(root)
    return [os.path.normpath(os.path.join(root, p)) for p in relative_paths]


def resolve_entries(
    root: str | os.PathLike, entries: ListEntries, *, allow_outside_root: bool = False
) -> list[str]:
    """Absolute, normalised paths (N str) of ``entries.paths`` relative to ``root``.

    Unless ``allow_outside_root``, every entry must name a path strictly inside ``root``:
    ``../x``, ``a/../../x``, an absolute path elsewhere (``/etc/passwd``) and an entry that is
    ``root`` itself (``.``, ``a/..``) raise ListFileError naming the list file, the line and
    where the entry leads. An absolute entry that lies inside ``root`` is accepted.

    The test is lexical, on the path after ``os.path.normpath``; symbolic links are not
    resolved (``os.path.realpath``), so a link inside the root that points elsewhere is
    followed. Why: datasets are commonly kept as symlink farms (``root/images`` -> a larger
    disk, one link per class folder), and rejecting those would make the check useless to
    the people it protects. What the check is for is the list file, the part of a dataset
    that is downloaded, generated or edited by hand: a line of it must not be able to reach
    outside the tree the user pointed at. Links inside that tree were put there by whoever
    owns it, and following them is their decision, just as ``image_folder`` follows them.
    (realpath would also cost a ``lstat`` per path component, millions for Clothing1M.)

    On POSIX a backslash is an ordinary file-name character: ``..\\..\\x`` is one name inside
    the root, and that is also what the OS opens, so it is accepted as such.
    """
    root = os.path.abspath(os.fspath(root))
    paths = resolve(root, entries.paths)
    if allow_outside_root:
        return paths
    # root is normalised by abspath; "/" already ends with the separator
    prefix = root if root.endswith(os.sep) else root + os.sep
    bad = [i for i, p in enumerate(paths) if p == root or not p.startswith(prefix)]
    if bad:
        i = bad[0]
        more = f" ({len(bad) - 1} more lines like it)" if len(bad) > 1 else ""
        if paths[i] == root:
            problem = f"resolves to the dataset root {root} itself, not to a file inside it"
        else:
            problem = f"resolves to {paths[i]}, outside the dataset root {root}"
        raise ListFileError(
            f"{entries.where(i)}: path {_shorten(entries.paths[i], 200)} {problem}{more}; "
            "pass allow_outside_root=True to read listed files wherever they are"
        )
    return paths
