"""A pool of host buffers that the loaders lend to their batches and take back on release.

Why a pool: a fresh tensor per batch costs page faults on the CPU (a 64×224×224 float32
batch is ~38 MB, and the kernel maps it page by page the first time it is written), more
than the copy or the mix that fills it.  Reusing the buffers of batches that are finished
saves that.  Why explicit: only the consumer knows when a batch is finished.  A buffer goes
back to the pool when its batch is released (:meth:`LoaderBatch.release
<mixnn_fast.pipeline.LoaderBatch.release>`, which the training loop calls after the optimiser
step); a batch that is never released keeps its buffers for good, and the pool allocates new
ones for the next batches.  The pool knows which buffers it has lent and never lends one twice
before it is given back; it keeps no reference to a lent buffer that would keep it alive (a
buffer whose batch is dropped without release is simply freed).

Use after release is made visible: the tensor that was lent is resized to zero elements when
it is given back, so reading it fails (an index error, a shape error, or autograd's "modified
by an inplace operation" if a graph saved it).  Other views taken of it cannot be tracked:
they must not outlive the release.
"""
from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["BufferPool"]


class BufferPool:
    """Reusable host tensors, lent with :meth:`take` and returned with :meth:`give_back`.

    Buffers are grouped by (shape without the first axis, dtype); a buffer may have more rows
    than asked for (``capacity``) and is lent as a view of its first rows, so one buffer serves
    batches of varying sizes.

    Args:
        keep: free buffers kept per group (more are freed when given back).
        device: where the buffers live (``torch.device`` or its name; the loaders use "cpu").
        min_rows: rows of a new buffer at least (a loader's batch size: then its last,
            smaller batch of an epoch does not leave a buffer too small for the next epoch's).
    """

    def __init__(self, keep: int = 4, device: str | torch.device = "cpu", min_rows: int = 0) -> None:
        for name, value in (("keep", keep), ("min_rows", min_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        self.keep = keep
        self.min_rows = min_rows
        self.device = torch.device(device)
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lent: dict[int, tuple[torch.Tensor, tuple]] = {}  # id(lent view) -> (its buffer, group)
        self._lock = threading.Lock()

    @property
    def lent(self) -> int:
        """Buffers lent and neither given back nor garbage-collected."""
        return len(self._lent)

    @property
    def free(self) -> int:
        """Buffers ready to be lent again."""
        return sum(len(v) for v in self._free.values())

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, *, capacity: int | None = None) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` that nobody else is lent.

        A buffer given back earlier when one with enough rows is free, else a new one with
        ``max(shape[0], capacity, min_rows)`` rows.  Its content is whatever was there: write it all.
        """
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 0:
            raise ValueError(f"shape: expected a non-empty shape of sizes >= 0, got {shape}")
        rows, group = shape[0], (shape[1:], dtype)
        with self._lock:
            free = self._free.get(group, [])
            base = next((buf for buf in free if len(buf) >= rows), None)
            if base is not None:
                free.remove(base)
        if base is None:
            base = torch.empty((max(rows, capacity or 0, self.min_rows),) + shape[1:], dtype=dtype, device=self.device)
        view = base[:rows]
        token = id(view)
        with self._lock:
            self._lent[token] = (base, group)
        # A lent view dropped without give_back: forget it (the buffer is freed with it).  Its
        # id cannot be reused before this runs, because the view is alive until then.
        weakref.finalize(view, self._forget, token)
        return view

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a tensor that :meth:`take` lent; it is emptied (resized to 0 elements).

        Raises:
            ValueError: ``buffer`` was not lent by this pool, or was given back already.
        """
        with self._lock:
            entry = self._lent.pop(id(buffer), None)
        if entry is None:
            raise ValueError("buffer: not lent by this pool, or already given back (a released batch's buffers "
                             "must not be used again)")
        base, group = entry
        buffer.resize_(0)  # any later use of the lent tensor sees an empty tensor, not another batch's data
        with self._lock:
            free = self._free.setdefault(group, [])
            if len(free) < self.keep:
                free.append(base)

    def clear(self) -> None:
        """Drop the free buffers (lent ones stay with their holders)."""
        with self._lock:
            self._free.clear()

    def _forget(self, token: int) -> None:
        with self._lock:
            self._lent.pop(token, None)
