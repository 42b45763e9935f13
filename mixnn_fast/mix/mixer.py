"""The fused neighbour mixer: MixNN's synthetic batch in one pass over memory.

For each anchor row ``b`` with terms ``idx_b0 = anchors[b]`` and
``idx_bk = partners[b, k-1]`` (k = 1..K)::

    out[b] = Σ_j weights[b, j] · normalise(images[idx_bj])      normalise(x) = (x − mean_c) / std_c

gather, convex combination, normalisation, layout change (NHWC → NCHW by default)
and dtype cast are fused.  CPU tensors run the C++/OpenMP kernel (the GIL is
released), CUDA tensors the CUDA kernel on the current torch stream.  NumPy arrays
and any DLPack producer (CuPy, DALI outputs, JAX, ...) are accepted and viewed
without a copy (``inputs.py``).

:func:`mix_images` and :func:`mix_targets` are the user-facing entry points: they convert
the inputs, check the options, and call the registered torch operators
``mixnn_fast::mix_images`` / ``mixnn_fast::mix_targets`` (``op.py``), whose implementation
validates the values and runs the kernel (``core.py``).  So ``torch.compile(fullgraph=True)``
traces a function calling them without a graph break, and compiled code keeps every check.
Every failure is a ``ValueError`` or ``TypeError`` naming the argument.  Inputs that are not
contiguous in their declared layout are copied once (a full extra pass: pass contiguous
batches); integer indices are converted to int64 and weights to float32 (both are small).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mixnn_fast._native import native
from mixnn_fast.mix import op
# Re-exported: trusted.py, the tests and older imports use these names from here.
from mixnn_fast.mix.core import (  # noqa: F401
    MAX_NUM_THREADS, SINGLE_THREAD_ELEMENTS, WEIGHT_SUM_TOLERANCE, _channel_vector, _check_num_threads, _MixCall,
    _params, _prepare, _run, check_options,
)
from mixnn_fast.mix.inputs import as_channel_values, as_tensor  # noqa: F401
from mixnn_fast.mix.outputs import configure_output_pool, output_pool_stats, release_output_pool  # noqa: F401

__all__ = ["mix_images", "mix_targets", "mix_images_cuda_emulated", "cuda_launch_config", "configure_output_pool",
           "output_pool_stats", "release_output_pool"]


def _refuse_grad(function: str, **tensors) -> None:
    """ValueError naming the first tensor that requires grad while grad mode is on: the mixer has
    no backward, and a graph through it would only fail later, at ``backward()``."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            raise ValueError(f"{name}: requires grad, but {function} is not differentiable; pass "
                             f"{name}.detach() or call it under torch.no_grad()")


def mix_images(
    images: Any,
    anchors: Any,
    partners: Any,
    weights: Any,
    *,
    in_layout: str = "NHWC",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    out_layout: str = "NCHW",
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    normalize_weights: bool = False,
    weight_tolerance: float = WEIGHT_SUM_TOLERANCE,
    check_finite: bool = False,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Mix each anchor image with its partners: ``out[b] = Σ_j w_bj · normalise(images[idx_bj])``.

    Args:
        images: the decoded batch of M images, (M, H, W, C) for ``in_layout="NHWC"`` (as decoders
            produce it) or (M, C, H, W) for "NCHW"; uint8, float32, float16 or bfloat16; CPU or
            CUDA.  A torch tensor, a NumPy array or any DLPack producer (CuPy, DALI TensorCPU /
            TensorGPU or a dense TensorList, ...), viewed without a copy.
        anchors: (B,) integer indices into ``images`` (any integer dtype), on the images' device.
        partners: (B, K) integer indices into ``images``; K may be 0.
        weights: (B, K+1) floating; column 0 is the anchor's λ, columns 1..K the partners' β.
            Finite, non-negative, each row summing to 1 within ``weight_tolerance`` — or any
            positive row sums with ``normalize_weights=True``, which divides each row by its sum.
        mean, std: per-channel normalisation (C values, or one scalar for all), in the units of
            the input: for uint8 images with ImageNet statistics pass ``mean=[123.675, 116.28,
            103.53], std=[58.395, 57.12, 57.375]``. None leaves values as they are.
        out_layout: "NCHW" (default, what convolutions want) or "NHWC".
        out_dtype: torch.float32 (default), float16, bfloat16, or uint8 (rounded half to even,
            saturated to [0, 255]).
        out: optional preallocated contiguous output of the right shape, dtype and device.  It is
            written as by a torch in-place op (its version counter is bumped; an inference
            tensor can be written only inside ``torch.inference_mode``).
        check_finite: scan float images for NaN/inf first (an extra pass over the input).
        num_threads: OpenMP threads on the CPU, 1 to ``MAX_NUM_THREADS`` (default:
            ``torch.get_num_threads()``, or one thread for outputs under ``SINGLE_THREAD_ELEMENTS``
            elements).

    Returns:
        (B, C, H, W) for ``out_layout="NCHW"`` or (B, H, W, C) for "NHWC", in ``out_dtype``:
        ``out`` itself, or a new tensor the caller owns.  A new CPU output of 1 MiB or more comes
        from a pool of huge-page buffers (:mod:`mixnn_fast.mix.outputs`): the default call then
        costs about what a call with a reused ``out=`` does.  A buffer re-enters the pool only
        once torch has released every tensor and view of it, so a result is never overwritten
        by a later call; its storage cannot be resized (``configure_output_pool(enabled=False)``
        returns to plain ``torch.empty`` outputs).

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape, device, an
        index out of range, or weights that are not finite, negative or do not sum to 1; a
        ValueError too for inputs that require grad while grad mode is on (the mixer is not
        differentiable).  Index and weight validation reads the tensors, which synchronises
        with a CUDA device.

    Under ``torch.compile`` this function traces into the operator ``mixnn_fast::mix_images``
    (``op.py``) with no graph break: the trace runs the structural checks on fake tensors, and
    the value checks run inside the operator whenever the compiled code calls it.
    """
    images = as_tensor(images, "images")
    anchors = as_tensor(anchors, "anchors")
    partners = as_tensor(partners, "partners")
    weights = as_tensor(weights, "weights")
    check_options(in_layout, out_layout, out_dtype, weight_tolerance)
    num_threads = _check_num_threads(num_threads)
    mean = as_channel_values(mean, "mean")
    std = as_channel_values(std, "std")
    _refuse_grad("mix_images", images=images, weights=weights, mean=mean, std=std, out=out)
    options = dict(in_layout=in_layout, out_layout=out_layout, out_dtype=out_dtype,
                   normalize_weights=bool(normalize_weights), weight_tolerance=float(weight_tolerance),
                   check_finite=bool(check_finite), num_threads=num_threads)
    if out is None:
        return op.mix_images_op(images, anchors, partners, weights, mean, std, **options)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    op.mix_images_out(images, anchors, partners, weights, out, mean, std, **options)
    return out


def mix_targets(
    targets: Any,
    anchors: Any,
    partners: Any,
    weights: Any,
    *,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    normalize_weights: bool = False,
    weight_tolerance: float = WEIGHT_SUM_TOLERANCE,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Mix soft targets the way :func:`mix_images` mixes images: ``out[b] = Σ_j w_bj · targets[idx_bj]``.

    Args:
        targets: (N, C) float32, float16 or bfloat16 soft targets (e.g. ``SoftTargets.targets``),
            a tensor, NumPy array or DLPack producer.
        anchors, partners, weights: as in :func:`mix_images`, indexing rows of ``targets``.
        out: optional contiguous (B, C) output.

    Returns:
        (B, C) in ``out_dtype`` (float32 by default).

    Runs the same kernel as the images, viewing targets as (N, 1, 1, C) NHWC "images", through
    the operator ``mixnn_fast::mix_targets``.  Rows this batch reads must be finite (the (B, C)
    result is checked).  Not differentiable, like :func:`mix_images`.
    """
    targets = as_tensor(targets, "targets")
    anchors = as_tensor(anchors, "anchors")
    partners = as_tensor(partners, "partners")
    weights = as_tensor(weights, "weights")
    check_options("NHWC", "NHWC", out_dtype, weight_tolerance)
    num_threads = _check_num_threads(num_threads)
    _refuse_grad("mix_targets", targets=targets, weights=weights, out=out)
    options = dict(out_dtype=out_dtype, normalize_weights=bool(normalize_weights),
                   weight_tolerance=float(weight_tolerance), num_threads=num_threads)
    if out is None:
        return op.mix_targets_op(targets, anchors, partners, weights, **options)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    op.mix_targets_out(targets, anchors, partners, weights, out, **options)
    return out


def mix_images_cuda_emulated(images, anchors, partners, weights, *, grid: tuple[int, int] = (0, 0), **kwargs):
    """Run the CUDA kernel's own body on the host, over its launch grid (CPU tensors only).

    For tests: executes ``cuda_body::mix_images_thread`` for every block and thread the CUDA
    launcher would use (``grid`` > 0 overrides the grid so the grid-stride loops wrap).  Same
    arguments and result as :func:`mix_images`.
    """
    _check_num_threads(kwargs.pop("num_threads", None))  # sequential by construction
    call = _prepare(images, anchors, partners, weights, **kwargs)
    if call.images.device.type != "cpu":
        raise ValueError("images: the emulator runs on host memory; pass CPU tensors")
    if call.out.numel():
        native().mix_images_cuda_emulated(_params(call), int(grid[0]), int(grid[1]))
    return call.out


def cuda_launch_config(batch: int, height: int, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((grid x, y, z), (block x, y, z)) that the CUDA launcher uses for B anchors of H×W images."""
    params = native().MixImagesParams()
    params.batch, params.height, params.width, params.channels = batch, height, width, 1
    return native().cuda_launch_config(params)
