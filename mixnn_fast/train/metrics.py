"""Per-epoch metrics and where they go: metrics.jsonl, metrics.csv, TensorBoard."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def read_metrics(out_dir: str | Path, *, while_writing: bool = False) -> list[dict[str, Any]]:
    """The per-epoch rows a run has logged to ``out_dir/metrics.jsonl`` (none if it has no file).
    ``while_writing``: the run may be appending a row now; rows stop before one that does not
    parse (otherwise such a row is an error)."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not while_writing:
                raise
            break
    return rows


class MetricsLog:
    """Appends one row per epoch to ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir``, and to
    TensorBoard when it is installed and wanted.  Rows may gain keys over time (the CSV is
    rewritten with the union of columns)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.csv = self.out_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume:
            self.rows = read_metrics(self.out_dir)
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; metrics go to JSONL and CSV only")

    def truncate(self, epochs_done: int) -> None:
        """Forget rows of epochs >= epochs_done (after resuming from an earlier checkpoint)."""
        self.rows = [r for r in self.rows if r.get("epoch", -1) < epochs_done]
        self._rewrite()

    def log(self, row: dict[str, Any]) -> None:
        row = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in row.items()}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, row.get("epoch", len(self.rows)))
            self.writer.flush()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
