"""Writing files so that a crash (power loss, ``kill -9``) at any moment leaves either the old
file or the new one, never a torn mix: write a temporary file in the same folder, flush it to the
disk, rename it over the target, and flush the folder entry."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO


def fsync_directory(folder: str | Path) -> None:
    """Flush a folder's entries (renames) to the disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories: nothing more can be done
        pass
    finally:
        os.close(fd)


def _keep_copy(path: Path, previous: Path) -> None:
    """Make ``previous`` hold what ``path`` holds now, without ever removing ``path``: a second
    name for the same file (a hard link), renamed over ``previous``; a copy where the file
    system has no hard links."""
    staging = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    if staging.exists():
        staging.unlink()
    try:
        try:
            os.link(path, staging)
        except OSError:
            import shutil

            shutil.copyfile(path, staging)
        os.replace(staging, previous)
    finally:
        if staging.exists():
            staging.unlink()


def write_atomic(path: str | Path, data: bytes | Callable[[IO[bytes]], None], *,
                 keep_previous: str | Path | None = None) -> Path:
    """Replace ``path`` with ``data`` (bytes, or a function writing to a binary file object).

    ``keep_previous``: where the file being replaced is kept (linked there once the new file is
    complete on disk, before it takes the old one's place), so that a reader who finds the new
    file unusable can go back one step.  ``path`` itself is never missing.  Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)  # ``path`` always exists: the old file until this instant, then the new
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)
    return path
