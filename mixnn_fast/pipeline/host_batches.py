"""The host path: in-memory images augmented with NumPy, without DALI.

Which path runs when (``LoaderOptions.backend``, resolved by
:func:`~mixnn_fast.pipeline.options.resolve_backend` when a loader is built):

- image files (``description.paths``): always DALI (decoding is DALI's job);
- in-memory arrays (``description.images``, (N, H, W, C) uint8: Fashion-MNIST, CIFAR,
  scikit-learn's digits), "auto" (the default): the host path on the CPU; on a GPU, DALI
  when it is installed, else the host path.  "host" and "dali" force one or the other.

Why on the host, for arrays: there is nothing to decode, and the training view is a shift by
up to ``pad`` pixels and a flip.  On a 2-core CPU a batch of 128 takes the host path about
0.3 ms of CPU (28×28×1) and 0.5 ms (32×32×3), the DALI round trip about 1.5 and 2.3 ms
(bench/README.md, loader section: a fifth of the CPU time, 3-5× the batches per second
depending on the machine's load).  And a machine without DALI (a GPU test machine where
nothing can be installed) can still train on in-memory data: nothing on this path imports
DALI.

Why "auto" keeps DALI on a GPU when it is installed: there DALI applies the shifts on the
device and its threads prepare the next batches while the model runs; the host path's
NumPy work runs in the training thread.  The GPU case has not been measured; choose
``backend="host"`` to compare.

What the host path computes is what the DALI graph computes, bit for bit
(tests/test_host_batches.py): the same plan, the same skipped samples (the loader's
:class:`~mixnn_fast.pipeline.feeder.Feeder` serves both), the same augmentation parameters
(:class:`~mixnn_fast.pipeline.augment_params.ShiftFlip`, drawn per (seed, epoch, batch, slot)),
applied as DALI applies them: ``fn.slice(start=(dy, dx), out_of_bounds_policy="pad",
fill_values=0)`` -- output pixel (y, x) is input pixel (y + dy, x + dx), zero outside -- and
then ``fn.flip(horizontal=...)``.  The evaluation view's central crop starts where DALI's
``fn.crop`` starts it (:func:`center_window`).  Normalisation in the pipeline
(``normalize_in_pipeline``) and the NCHW layout are done by the fused mixer at K = 0 (as for
the host-resized JPEG views): the layout change is exact, the normalisation the same
float32 arithmetic as DALI's ``crop_mirror_normalize`` (``(x - mean) * (1 / std)``; equal bit
for bit with the AVX-512 kernel, the tests allow one rounding).

On a GPU the uint8 batch is written into pinned host memory and copied to the device once,
without waiting (``non_blocking``; torch's pinned-memory allocator keeps the block until the
copy is done), so the mixer runs on CUDA.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["ShiftFlipKernel", "center_window"]


def center_window(size: int, crop: int) -> int:
    """Where DALI's ``fn.crop`` (``crop_pos`` 0.5) starts a ``crop`` window on an axis of
    ``size`` pixels: ``0.5 * (size - crop)`` rounded half away from zero."""
    return (size - crop + 1) // 2


class ShiftFlipKernel:
    """Shift (zero fill) and horizontal flip of a batch of in-memory images, vectorised.

    How, without a loop over pixels or images: the batch is written once into a scratch
    buffer with ``pad`` zero pixels on every side (the flipped images already mirrored), and
    each output image is then the window of that buffer at offset (pad + dy, pad ± dx), all
    taken in one NumPy gather from a strided view of every possible window.  The border
    of the scratch buffer is never written, so it stays zero: that is the fill.

    Args:
        pad: the largest shift, pixels (>= 0).

    The scratch buffer, (capacity, H + 2 pad, W + 2 pad, C) uint8, is kept between calls
    (grown when a batch is larger or the image shape changes).  Not thread-safe: one per loader.
    """

    def __init__(self, pad: int) -> None:
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
            raise ValueError(f"pad: must be an integer >= 0, got {pad!r}")
        self.pad = int(pad)
        self._scratch: np.ndarray | None = None

    def _scratch_for(self, m: int, shape: tuple[int, int, int]) -> np.ndarray:
        p = self.pad
        h, w, c = shape
        s = self._scratch
        if s is None or s.shape[1:] != (h + 2 * p, w + 2 * p, c) or len(s) < m:
            s = self._scratch = np.zeros((max(m, 1), h + 2 * p, w + 2 * p, c), dtype=np.uint8)
        return s

    def __call__(self, images: np.ndarray, ids: np.ndarray, shifts: np.ndarray | None, flips: np.ndarray | None,
                 out: np.ndarray) -> np.ndarray:
        """Write the augmented images ``images[ids]`` into ``out``.

        Args:
            images: (N, H, W, C) uint8, the data set (read only).
            ids: (M,) int, the batch's sample ids (repeats allowed).
            shifts: (M, 2) int (dy, dx), each in [-pad, pad]; None: no shift.
            flips: (M,) int 0/1 (1: mirror horizontally, after the shift); None: no flips.
            out: (M, H, W, C) uint8, C-contiguous; every element is written.

        Returns ``out``: ``out[m, y, x] = images[ids[m], y + dy, x + dx]`` (0 where that is
        outside the image), then mirrored along x where ``flips[m]``.
        """
        ids = np.asarray(ids)
        m = len(ids)
        h, w, c = images.shape[1:]
        if out.shape != (m, h, w, c) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous uint8 array of shape {(m, h, w, c)}, got {out.dtype} "
                             f"{out.shape}")
        if not m:
            return out
        p = self.pad
        dy = np.zeros(m, dtype=np.int64) if shifts is None else np.asarray(shifts, dtype=np.int64)[:, 0]
        dx = np.zeros(m, dtype=np.int64) if shifts is None else np.asarray(shifts, dtype=np.int64)[:, 1]
        if shifts is not None and m and (np.abs(dy).max() > p or np.abs(dx).max() > p):
            raise ValueError(f"shifts: every shift must lie in [-{p}, {p}] (the kernel's pad)")
        mirrored = np.zeros(m, dtype=bool) if flips is None else np.asarray(flips).astype(bool)
        if not p and not mirrored.any():
            np.take(images, ids, axis=0, out=out)  # nothing to do but gather
            return out
        scratch = self._scratch_for(m, (h, w, c))
        inner = scratch[:, p:p + h, p:p + w]
        # the images kept as they are first, then the mirrored ones: each output image takes
        # its window from its own row of the scratch buffer (``row``)
        plain, flipped = np.flatnonzero(~mirrored), np.flatnonzero(mirrored)
        k = len(plain)
        row = np.empty(m, dtype=np.int64)
        row[plain] = np.arange(k)
        row[flipped] = np.arange(k, m)
        if k:
            inner[:k] = images[ids[plain]]
        if len(flipped):
            source = images[ids[flipped]]
            # one strided copy per channel: with the channel innermost (C bytes), NumPy's
            # mirrored copy goes pixel by pixel; per channel, its inner loop runs along a row
            for channel in range(c):
                inner[k:m, :, :, channel] = source[:, :, ::-1, channel]
        # mirrored then shifted: flip(shift(x, (dy, dx))) == shift(flip(x), (dy, -dx))
        dx = np.where(mirrored, -dx, dx)
        s0, s1, s2, s3 = scratch.strides
        windows = as_strided(scratch, shape=(len(scratch), 2 * p + 1, 2 * p + 1, h, w, c),
                             strides=(s0, s1, s2, s1, s2, s3), writeable=False)
        out[...] = windows[row, p + dy, p + dx]
        return out
