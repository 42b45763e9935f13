"""The epoch plan's inputs, checked: anchors, partners (a PartnerTable or an (N, K) array), sizes.

Kept apart from :mod:`mixnn_fast.pipeline.plan` so that the plan module holds only what a
plan is and how it is made.  Every failure is a ValueError (TypeError for a wrong kind of
object) naming the argument.  A :class:`~mixnn_fast.refresh.partners.PartnerTable` was checked
when it was built (ids in range, weight rows finite, >= 0, summing to 1): here only its fit to
the plan is checked (every anchor has a row, K suits the mode).  The table's module imports
torch, so it is imported only when a table is actually passed.
"""
from __future__ import annotations

import sys

import numpy as np

MODES = ("coherent", "naive", "plain", "in_batch")
NEEDS_PARTNERS = ("coherent", "naive")


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    return int(batch_size)


def as_index_array(value, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.ndim == ndim:  # an empty list comes in as float64
            return arr.astype(np.int64)
        raise ValueError(f"{name}: must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        shape = "(N_anchor,)" if ndim == 1 else "(N, K)"
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr.astype(np.int64, copy=False)


def check_range(arr: np.ndarray, name: str, n: int, what: str) -> None:
    if arr.size == 0:
        return
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= n:
        bad = np.flatnonzero(((arr < 0) | (arr >= n)).ravel())[0]
        pos = np.unravel_index(bad, arr.shape)
        raise ValueError(f"{name}: entries must lie in [0, {n}) ({what}); "
                         f"{name}[{', '.join(map(str, pos))}] = {arr[pos]}")


def table_arrays(table, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(anchors (P,), partners (P, K), weights (P, K+1), N) of a PartnerTable, as NumPy views."""
    from mixnn_fast.refresh.partners import PartnerTable  # torch comes with it: only when a table is used

    if not isinstance(table, PartnerTable):
        raise TypeError(f"{name}: expected a PartnerTable, got {type(table).__name__}")
    return table.anchors.numpy(), table.partners.numpy(), table.weights.numpy(), int(table.num_samples)


def rows_of(anchors: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64: the table row of each sample id, -1 where the sample is not an anchor of it."""
    rows = np.full(n, -1, dtype=np.int64)
    rows[anchors] = np.arange(len(anchors), dtype=np.int64)
    return rows


def is_table(value) -> bool:
    # No table exists unless its module was imported: arrays never pay for importing torch.
    module = sys.modules.get("mixnn_fast.refresh.partners")
    return module is not None and isinstance(value, module.PartnerTable)


def validate(anchor_order, partners, mode: str,
             num_samples) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """(anchors (A,), partner ids (N, K) or None, rows or None, N): the arguments checked.

    With a PartnerTable the partner ids are read from the table's rows (its checks were made
    when it was built) and ``rows`` (N,) int64 maps each sample id to its row (-1: none)."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    anchors = as_index_array(anchor_order, "anchor_order", 1)
    nbrs = table = None
    if is_table(partners):
        table = table_arrays(partners, "partners")
        k = table[1].shape[1]
        if mode in NEEDS_PARTNERS and k < 1:
            raise ValueError(f"partners: mode {mode!r} needs a table with partners (K >= 1), got K = 0")
        if mode not in NEEDS_PARTNERS and k:
            raise ValueError(f"partners: mode {mode!r} decodes no partners, got a table with K = {k}; attach "
                             "in-batch partners with EpochPlan.with_partners(table)")
    elif mode in NEEDS_PARTNERS:
        if partners is None:
            raise ValueError(f"partners: mode {mode!r} needs a PartnerTable or an (N, K) partner array, got None")
        nbrs = as_index_array(partners, "partners", 2)
        if nbrs.shape[1] < 1:
            raise ValueError(f"partners: needs at least one column (K >= 1), got shape {nbrs.shape}")
    if table is not None:
        n = table[3]
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples: {num_samples} disagrees with the partner table's {n} samples")
    elif nbrs is not None:
        n = nbrs.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples: {num_samples} disagrees with partners' {n} rows")
        check_range(nbrs, "partners", n, "sample ids of the dataset")
    elif num_samples is not None:
        n = int(num_samples)
    else:
        n = int(anchors.max()) + 1 if anchors.size else 0
    check_range(anchors, "anchor_order", n, "sample ids of the dataset")
    if anchors.size:
        counts = np.bincount(anchors, minlength=n)
        if counts.max() > 1:
            dup = int(np.argmax(counts))
            raise ValueError(f"anchor_order: every anchor must appear once; sample {dup} appears {counts[dup]} times")
    rows = None
    if table is not None:
        table_anchors, table_partners, _, _ = table
        rows = rows_of(table_anchors, n)
        missing = anchors[rows[anchors] < 0]
        if missing.size:
            raise ValueError(f"anchor_order: samples {missing[:5].tolist()} have no row in the partner table "
                             f"({missing.size} anchors without partners and weights)")
        if table_partners.shape[1]:
            # (N, K): a sample that is no anchor of the table is its own partner (never read)
            nbrs = np.repeat(np.arange(n, dtype=np.int64)[:, None], table_partners.shape[1], axis=1)
            nbrs[table_anchors] = table_partners
    return anchors, nbrs, rows, n
