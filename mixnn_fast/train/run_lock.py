"""One writer per run folder: a process that trains into a folder holds an exclusive lock on
``<out_dir>/.train.lock`` (``flock``) while it writes, so that a second ``mixnn train`` (or a
table shard, or a demo) pointed at the same folder stops with an error instead of interleaving
its epochs, metrics and checkpoints with the first one's.  The kernel drops the lock when the
holder exits, also on ``kill -9``: a stale lock file never blocks a resume."""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

LOCK = ".train.lock"


class RunFolderBusy(ValueError):
    """Another process is writing this run folder now."""


def try_lock(path: str | Path) -> IO | None:
    """An exclusive ``flock`` on the file ``path`` (created if missing), without waiting: the
    open handle that holds it (close it to release), or None when another open handle holds it
    (another process, or another open of the same file in this one)."""
    handle = Path(path).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def lock_run_folder(out_dir: str | Path) -> IO:
    """Take ``out_dir``'s writer lock (the folder must exist); returns the open handle that
    holds it (close it to release).  Raises :class:`RunFolderBusy` naming the folder when
    another process holds it."""
    handle = try_lock(Path(out_dir) / LOCK)
    if handle is None:
        raise RunFolderBusy(f"out_dir: {out_dir} is being written by another process now (it holds {LOCK}); "
                            "wait for it to finish, or choose another --out-dir")
    return handle
