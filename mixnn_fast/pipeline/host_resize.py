"""Resizing DALI's decoded windows on the host, with torch.

Where the random-resized crop is resized (``LoaderOptions.resize_backend``, encoded images):
on a GPU, DALI does everything.  On the CPU (the default there, "torch"), DALI decodes the
random windows (ROI decoding) and the loader resizes each window into the batch with
torch's uint8 antialiased bilinear kernel (the same triangle filter as DALI's linear
antialiased ``fn.resize`` and PIL's BILINEAR; within rounding of DALI's result) and mirrors
it when its flip flag says so (the same windows and flags either way): on a 2-core x86
machine DALI's CPU resize took ~1.4 ms per 224×224 image, twice the ROI decode, and torch's
~0.2 ms.  The evaluation views (``EvalLoader``) work the same way on the CPU: DALI decodes
only the source window that the resize-then-centre-crop view shows, and torch resizes it
(bench/eval_loader.py: about 2× the all-DALI path).
"""
from __future__ import annotations

import torch

__all__ = ["HOST_RESIZE_THREADS", "resize_windows"]

#: torch intra-op threads while resizing: one image per call is too little work to share,
#: and DALI's workers hold the other cores.
HOST_RESIZE_THREADS = 1


def resize_windows(windows, mirror, size: int, out: torch.Tensor) -> torch.Tensor:
    """Resize each decoded window to (size, size), antialiased bilinear, into ``out``.

    Args:
        windows: a DALI CPU TensorList of M uint8 HWC images of any sizes (read in place,
            through DLPack).
        mirror: (M,) flags, nonzero = flip horizontally after resizing; or None.
        size: output side.
        out: (>= M, size, size, C) uint8 contiguous; ``out[:M]`` is written and returned.
    """
    upsample = torch.ops.aten._upsample_bilinear2d_aa.out  # the operator behind F.interpolate(antialias=True)
    threads = torch.get_num_threads()
    if threads != HOST_RESIZE_THREADS:
        torch.set_num_threads(HOST_RESIZE_THREADS)
    try:
        for i in range(len(windows)):
            src = torch.from_dlpack(windows[i]).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w), channels-last
            dst = out[i].permute(2, 0, 1).unsqueeze(0)  # this image's slot, also channels-last: written in place
            result = upsample(src, [size, size], False, None, None, out=dst)
            if result.data_ptr() != dst.data_ptr():  # the kernel chose its own buffer
                dst.copy_(result)
            if mirror is not None and mirror[i]:
                out[i].copy_(out[i].flip(1))
    finally:
        if threads != HOST_RESIZE_THREADS:
            torch.set_num_threads(threads)
    return out[:len(windows)]
