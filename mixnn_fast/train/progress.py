"""Progress a person can watch: a bar on a terminal, one line per epoch anywhere else.

Off a terminal (CI, ``nohup``, a log file) a progress bar writes hundreds of carriage-return
updates per epoch, which turn a log into noise; there the trainer prints one line per epoch
instead (:func:`epoch_line`) and the bars are off.
"""
from __future__ import annotations

import sys


def progress_on_terminal() -> bool:
    """True when stderr, where the bars go, is a terminal."""
    return sys.stderr.isatty()


class _Silent:
    """The bar's interface, doing nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1, **postfix) -> None:
        return None


class _Bar:
    """A tqdm bar over images; ``update(n, loss=..., wait=...)`` also shows the running loss and
    the share of time spent waiting for the loader."""

    def __init__(self, total: int, desc: str, initial: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="img", initial=initial, leave=False, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, n: int = 1, **postfix) -> None:
        self._bar.update(n)
        if postfix:
            shown = {k: (f"{100 * v:.0f}%" if k == "wait" else f"{v:.3f}") for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)


def progress_bar(total: int, desc: str, enabled: bool, *, initial: int = 0):
    """A context manager with ``update(n, **postfix)``: a bar when ``enabled`` and stderr is a
    terminal, else silent."""
    if enabled and progress_on_terminal():
        return _Bar(total, desc, initial)
    return _Silent()


def epoch_line(row: dict, epochs: int) -> str:
    """``epoch 3/60 mixnn, loss 1.2345, 812 img/s, loader wait 12%, test 71.20%`` for a metrics row."""
    parts = [f"epoch {row['epoch'] + 1}/{epochs} {row['phase']}", f"loss {row['train_loss']:.4f}",
             f"{row['images_per_second']:.0f} img/s", f"loader wait {100 * row['loader_wait_fraction']:.0f}%"]
    if row.get("test_accuracy") is not None:
        parts.append(f"test {100 * row['test_accuracy']:.2f}%")
    return ", ".join(parts)
