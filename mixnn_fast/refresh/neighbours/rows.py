"""The vectors a neighbour search ranks by, read a block of rows at a time.

A pool's features may be float16 (or bfloat16) to halve their memory (128k x 2048 is 512 MiB
in float16, 1 GiB in float32). Every search computes in float32 or float64, but a float32 copy
of the whole matrix would undo the saving, so :class:`FeatureRows` keeps the caller's tensor
and widens (and, for the cosine metric, normalises) only the rows asked for. Each row is
prepared exactly as the whole float32 matrix would be (``prepare_for_metric`` and the
power-of-two scaling are row-wise), so a search over float16 features returns what the same
search over the features upcast to float32 returns.
"""
from __future__ import annotations

import numpy as np
import torch

from mixnn_fast.refresh.neighbours._validation import prepare_for_metric, times_power_of_two

HALF_DTYPES = (torch.float16, torch.bfloat16)
# float16 bit pattern -> float32 value: numpy's own float16 cast is scalar code, a table look-up
# of the 65,536 patterns (256 KiB, cache-resident) is several times faster and exact.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


class FeatureRows:
    """``(N, d)`` vectors prepared for a metric, stored as given or already prepared.

    Args:
        stored: Tensor[N, d] floating. float32/float64: the prepared vectors themselves.
            float16/bfloat16: the raw features; rows are widened to float32, normalised
            (``metric="cosine"``) and scaled by ``2**-exponent`` when read.
        metric: "euclidean" or "cosine" (only used for half storage).
        exponent: only for half storage; rows are read as ``row * 2**-exponent``.
    Attributes: ``n``, ``d``, ``device``, ``dtype`` (the dtype rows are read in: float32 for
    half storage, else the stored dtype), ``stored``.
    """

    def __init__(self, stored: torch.Tensor, *, metric: str = "euclidean", exponent: int = 0):
        self.stored = stored
        self.n, self.d = stored.shape
        self.device = stored.device
        self.lazy = stored.dtype in HALF_DTYPES
        self.metric = metric
        self.exponent = exponent
        self.dtype = torch.float32 if self.lazy else stored.dtype

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32)
        if self.metric == "cosine":
            x = prepare_for_metric(x, "cosine", "features")
        if self.exponent:
            x = times_power_of_two(x, -self.exponent)
        return x

    def slice(self, start: int, stop: int) -> "FeatureRows":
        """Rows ``start:stop`` as FeatureRows of their own (a view: nothing is copied)."""
        return FeatureRows(self.stored[start:stop], metric=self.metric, exponent=self.exponent)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` prepared, Tensor[m, d] in ``dtype`` (a view when not lazy)."""
        block = self.stored[start:stop]
        return self._prepare(block) if self.lazy else block

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (LongTensor of any shape, on ``device``) prepared: Tensor[*ids.shape, d]."""
        block = self.stored[ids.reshape(-1)]
        if self.lazy:
            block = self._prepare(block)
        return block.reshape(*ids.shape, self.d)

    def take_numpy(self, ids: np.ndarray, dtype) -> np.ndarray:
        """CPU only: rows ``ids`` (int64 ndarray of any shape) prepared, as an ndarray of ``dtype``
        (float32 or float64): the re-ranking's gather, without torch's per-call overhead."""
        if not self.lazy:
            return np.take(self.stored.numpy(), ids, axis=0).astype(dtype, copy=False)
        if self.metric != "cosine" and not self.exponent:
            bits = np.take(self.stored.view(torch.int16).numpy().view(np.uint16), ids, axis=0)
            if self.stored.dtype == torch.float16:
                block = np.take(_F16_TO_F32, bits)
            else:  # bfloat16 is the top half of a float32: shift its bits into place, exactly
                block = (bits.astype(np.uint32) << 16).view(np.float32)
            return block.astype(dtype, copy=False)
        flat = torch.from_numpy(np.ascontiguousarray(ids).reshape(-1))
        return self.take(flat).numpy().reshape(*ids.shape, self.d).astype(dtype, copy=False)

    def read_into(self, out: torch.Tensor, *, ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Prepared rows into ``out`` (float32 Tensor[m, d] on ``device``): rows ``ids`` (LongTensor[m])
        or ``start:start + m``. Returns ``out``. Plain half-precision rows are gathered into a kept
        half-precision scratch and widened in place, so a loop over blocks allocates nothing
        (freed block-sized temporaries stay in the C allocator's heap, i.e. in the RSS)."""
        m = out.shape[0]
        if ids is not None and ids.shape != (m,):
            raise ValueError(f"ids: expected shape ({m},) like out's rows, got {tuple(ids.shape)}")
        if self.lazy and self.metric != "cosine" and not self.exponent:
            if ids is None:
                return out.copy_(self.stored[start:start + m])
            if getattr(self, "_scratch", None) is None or self._scratch.shape[0] < m:
                self._scratch = torch.empty((m, self.d), dtype=self.stored.dtype, device=self.device)
            torch.index_select(self.stored, 0, ids, out=self._scratch[:m])
            return out.copy_(self._scratch[:m])
        return out.copy_(self.rows(start, start + m) if ids is None else self.take(ids))

    def chunks(self, rows: int):
        """``(start, prepared block)`` over all rows, ``rows`` at a time."""
        for start in range(0, self.n, rows):
            yield start, self.rows(start, min(start + rows, self.n))

    def max_abs(self) -> float:
        """Largest |entry| of the stored tensor, a block at a time (no full-size temporary)."""
        top = 0.0
        step = max(1, (1 << 22) // max(1, self.d))
        for start in range(0, self.n, step):
            block = self.stored[start:start + step]
            if block.numel():
                top = max(top, float(block.abs().max()))
        return top
