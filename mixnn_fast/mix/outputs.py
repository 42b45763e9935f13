"""The output of a mixer call without ``out=``: pooled, huge-page host buffers on the CPU.

A fresh (256, 3, 224, 224) float32 output is 154 MB.  Allocated with ``torch.empty`` it is a
new anonymous mapping every call, and the kernel's first touch of each 4 KiB page faults: on a
2-core AMD EPYC that costs 5-15x the mixing itself (53-106 ms against 6-7 ms into a reused
buffer).  Large CPU outputs therefore come from the native extension (``csrc/cpu/host_buffers``):

- **reuse**: a buffer returns to a small pool when torch destroys the tensor's storage (the
  DLPack deleter, called once no tensor, view, storage, NumPy array or capsule refers to it:
  the moment torch's own CPU allocator would give the memory back to ``malloc``), and the
  next call of the same size gets it with its pages mapped.  A result the caller still holds,
  or any view of it, is never handed out again;
- **huge pages**: new buffers are 2 MiB-aligned mappings advised ``MADV_HUGEPAGE``, so that a
  first touch faults 2 MiB at a time where transparent huge pages are in "madvise" or "always"
  mode; a reused buffer keeps its huge pages, which also makes the kernel's stores cheaper
  than into a 4 KiB-page ``torch.empty`` buffer.

The returned tensor is an ordinary contiguous CPU tensor owned by the caller; its storage is
not resizable (``resize_`` to a larger size raises) and it is not pinned.  CUDA outputs and
small CPU outputs (< ``POOL_MIN_BYTES``, which ``malloc`` recycles anyway) use ``torch.empty``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mixnn_fast._native import native

__all__ = ["empty_output", "configure_output_pool", "output_pool_stats", "release_output_pool", "POOL_MIN_BYTES"]

#: CPU outputs of at least this many bytes come from the pool.
POOL_MIN_BYTES = 1 << 20
# torch dtype -> DLPack (type code, bits): kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4
_DLPACK_DTYPES = {torch.uint8: (1, 8), torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16)}
_enabled = True


def empty_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` and ``dtype`` on ``device`` for the mixer
    to write: from the host pool for large CPU outputs, ``torch.empty`` otherwise."""
    if (not _enabled or device.type != "cpu" or dtype not in _DLPACK_DTYPES
            or math.prod(shape) * dtype.itemsize < POOL_MIN_BYTES):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    code, bits = _DLPACK_DTYPES[dtype]
    return torch.from_dlpack(native().host_empty([int(d) for d in shape], code, bits))


def configure_output_pool(*, enabled: bool | None = None, max_cached_bytes: int | None = None,
                          max_cached_blocks: int | None = None, huge_pages: bool | None = None) -> dict:
    """Change the pool's settings (None keeps one) and return :func:`output_pool_stats`.

    Args:
        enabled: False makes every output a plain ``torch.empty`` (resizable storage, 4 KiB
            pages, a page fault per page on first touch).  Default True.
        max_cached_bytes, max_cached_blocks: how much idle memory the pool may keep for reuse
            (defaults 1 GiB and 4 buffers; 0 keeps none, so every call maps a new buffer).
            Idle buffers beyond the limits are unmapped, the least recently released first.
        huge_pages: whether new buffers are advised ``MADV_HUGEPAGE`` (default True).
    """
    global _enabled
    stats = output_pool_stats()
    limits = {"max_cached_bytes": max_cached_bytes, "max_cached_blocks": max_cached_blocks}
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}: expected an int >= 0 or None, got {value!r}")
    for name, value in {"enabled": enabled, "huge_pages": huge_pages}.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool or None, got {type(value).__name__}")
    native().host_pool_configure(stats["max_cached_bytes"] if max_cached_bytes is None else max_cached_bytes,
                                 stats["max_cached_blocks"] if max_cached_blocks is None else max_cached_blocks,
                                 stats["huge_pages"] if huge_pages is None else huge_pages)
    if enabled is not None:
        _enabled = enabled
    return output_pool_stats()


def output_pool_stats() -> dict:
    """``{enabled, cached_blocks, cached_bytes, live_blocks, live_bytes, hits, misses,
    max_cached_bytes, max_cached_blocks, huge_pages}``: idle buffers kept for reuse, buffers held
    by tensors, and how many requests the pool served (hits) or mapped anew (misses)."""
    return {"enabled": _enabled, **native().host_pool_stats()}


def release_output_pool() -> int:
    """Unmap every idle buffer (the ones tensors still hold are unaffected); returns the bytes freed."""
    return int(native().host_pool_release())
