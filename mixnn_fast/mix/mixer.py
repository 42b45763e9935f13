"""The fused neighbour mixer: MixNN's synthetic batch in one pass over memory.

For each anchor row ``b`` with terms ``idx_b0 = anchors[b]`` and
``idx_bk = partners[b, k-1]`` (k = 1..K)::

    out[b] = Σ_j weights[b, j] · normalise(images[idx_bj])      normalise(x) = (x − mean_c) / std_c

gather, convex combination, normalisation, layout change (NHWC → NCHW by default)
and dtype cast are fused.  CPU tensors run the C++/OpenMP kernel (the GIL is
released), CUDA tensors the CUDA kernel on the current torch stream.  NumPy arrays
and any DLPack producer (CuPy, DALI outputs, JAX, ...) are accepted and converted
without a copy.

Validation happens here, before any kernel runs; every failure is a ``ValueError``
or ``TypeError`` naming the argument.  Inputs that are not contiguous in their
declared layout are copied once (a full extra pass: pass contiguous batches);
integer indices are converted to int64 and weights to float32 (both are small).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mixnn_fast._native import native

# dtype codes shared with csrc/mix_math.h (enum DType)
_DTYPE_CODES = {torch.uint8: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_LAYOUT_CODES = {"NHWC": 0, "NCHW": 1}
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Default tolerance on |Σ_j w_ij − 1| per row.
WEIGHT_SUM_TOLERANCE = 1e-3
#: Outputs smaller than this run on one CPU thread: waking an OpenMP team costs more than the
#: work (measured: a (64, 10) target mix took 11 ms of CPU on 2 threads, 0.13 ms on one).
SINGLE_THREAD_ELEMENTS = 1 << 16
#: Most OpenMP threads one call may ask for: libgomp aborts ("Out of memory allocating ...")
#: or segfaults when asked for 10^5 or more, and no CPU this runs on has more cores.
MAX_NUM_THREADS = 1024


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A torch view of ``value`` (Tensor, NumPy array, or any ``__dlpack__`` producer), without a copy
    (NumPy arrays with negative strides or a non-native byte order, which torch cannot view, are copied)."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.dtype.itemsize == 8 and name == "images":
            raise TypeError(f"{name}: float64 images are not supported; use uint8, float32, float16 or bfloat16")
        if not value.dtype.isnative or any(step < 0 for step in value.strides):
            value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        elif not value.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write inputs
            value = value.copy()
        try:
            tensor = torch.from_numpy(value)
        except TypeError as exc:  # a dtype torch has no equivalent of (object, str, datetime, ...)
            raise TypeError(f"{name}: NumPy dtype {value.dtype} is not supported ({exc})") from exc
    elif hasattr(value, "__dlpack__"):
        try:
            tensor = torch.from_dlpack(value)
        except (RuntimeError, TypeError, BufferError) as exc:
            raise TypeError(f"{name}: could not be imported through DLPack: {exc}") from exc
    elif isinstance(value, (list, tuple)) and name not in ("images", "targets"):
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # ragged, None, str, > int64
            raise TypeError(f"{name}: could not be read as a tensor of numbers ({exc})") from exc
        if tensor.numel() == 0 and name in ("anchors", "partners"):
            tensor = tensor.long()  # an empty list carries no dtype; torch's default would be float32
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor, a NumPy array or a DLPack producer, got {type(value).__name__}"
        )
    if tensor.layout != torch.strided:  # sparse and other layouts have no data pointer for the kernels
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {tensor.layout}")
    return tensor


def _check_index_tensor(index: torch.Tensor, name: str, shape: tuple, num_images: int, device) -> torch.Tensor:
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {index.dtype}")
    if tuple(index.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name}: is on {index.device} but images are on {device}; move it with .to({str(device)!r})")
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_images:
            raise ValueError(
                f"{name}: indices must lie in [0, {num_images}) (the number of images), got [{low}, {high}]"
            )
    return index.to(torch.int64).contiguous()


def _check_weights(weights: torch.Tensor, shape: tuple, device, normalize: bool, tol: float) -> torch.Tensor:
    if weights.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weights: expected a floating tensor, got dtype {weights.dtype}")
    if tuple(weights.shape) != shape:
        raise ValueError(f"weights: expected shape {shape} (batch, 1 + num_partners), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights: is on {weights.device} but images are on {device}")
    given = weights
    weights = weights.to(torch.float32).contiguous()
    if weights.numel() == 0:
        return weights
    if not bool(torch.isfinite(given).all()):
        raise ValueError("weights: contain NaN or infinity")
    if bool((given < 0).any()):
        raise ValueError("weights: must be non-negative (MixNN mixes convexly)")
    sums = weights.sum(dim=1)
    if normalize:
        if bool(torch.isfinite(sums).all()) and bool((sums > 0).all()):
            return (weights / sums.unsqueeze(1)).contiguous()
        # The float32 sums overflowed (weights near float32's maximum) or a row vanished in the cast
        # (float64 weights below float32's range): normalise in float64, each row first divided by
        # its largest entry so that its sum cannot overflow either.
        exact = given.to(torch.float64)
        largest = exact.amax(dim=1, keepdim=True)
        if bool((largest <= 0).any()):
            raise ValueError("weights: a row sums to 0 and cannot be normalised")
        exact = exact / largest
        return (exact / exact.sum(dim=1, keepdim=True)).to(torch.float32).contiguous()
    worst = float((sums - 1).abs().max())
    if worst > tol:
        raise ValueError(
            f"weights: each row must sum to 1 (largest deviation {worst:.3g} > tolerance {tol:g}); "
            "pass normalize_weights=True to rescale them"
        )
    return weights


def _channel_vector(value, channels: int, name: str, default: float, is_std: bool = False) -> torch.Tensor:
    if value is None:
        return torch.full((channels,), default, dtype=torch.float32)
    if isinstance(value, torch.Tensor) and (value.is_complex() or value.layout != torch.strided):
        raise TypeError(f"{name}: expected real numbers, got a {value.dtype} tensor with layout {value.layout}")
    try:
        vec = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                              dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # str, None, complex, ragged lists
        raise TypeError(f"{name}: expected a number or {channels} numbers (one per channel), got {value!r}") from exc
    # The values are checked before a scalar is broadcast: a bad value is bad even for zero channels.
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{name}: contains NaN or infinity")
    single = vec.to(torch.float32)  # the kernels compute in float32
    if is_std and bool((single <= 0).any()):  # also what is positive in float64 but rounds to 0 in float32
        raise ValueError(f"{name}: every channel's std must be > 0 (at least float32's smallest number)")
    if single.numel() == 1:
        single = single.reshape(1).expand(channels)
    if single.ndim != 1 or single.numel() != channels:
        raise ValueError(f"{name}: expected {channels} values (one per channel), got shape {tuple(vec.shape)}")
    return single.contiguous()  # the kernels read C values from the data pointer


def _check_num_threads(num_threads) -> int | None:
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads: expected an int or None, got {type(num_threads).__name__}")
    if not 1 <= num_threads <= MAX_NUM_THREADS:
        raise ValueError(f"num_threads: must be in [1, {MAX_NUM_THREADS}], got {num_threads}")
    return int(num_threads)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


@dataclass
class _MixCall:
    """A validated call: contiguous tensors on one device, plus the sizes the kernel needs."""

    images: torch.Tensor
    anchors: torch.Tensor
    partners: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor
    out: torch.Tensor
    in_layout: str
    out_layout: str
    height: int
    width: int
    channels: int


def _prepare(images, anchors, partners, weights, *, in_layout="NHWC", mean=None, std=None, out_layout="NCHW",
             out_dtype=torch.float32, out=None, normalize_weights=False, weight_tolerance=WEIGHT_SUM_TOLERANCE,
             check_finite=False) -> _MixCall:
    images = as_tensor(images, "images")
    # isinstance first: an unhashable value would make the dict lookup raise a TypeError naming nothing
    if not isinstance(in_layout, str) or in_layout not in _LAYOUT_CODES:
        raise ValueError(f"in_layout: must be 'NHWC' or 'NCHW', got {in_layout!r}")
    if not isinstance(out_layout, str) or out_layout not in _LAYOUT_CODES:
        raise ValueError(f"out_layout: must be 'NHWC' or 'NCHW', got {out_layout!r}")
    if images.dtype not in _DTYPE_CODES:
        raise TypeError(f"images: dtype must be uint8, float32, float16 or bfloat16, got {images.dtype}")
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype: must be torch.float32, float16, bfloat16 or uint8, got {out_dtype}")
    if isinstance(weight_tolerance, bool) or not isinstance(weight_tolerance, numbers.Real) \
            or not 0 <= weight_tolerance < math.inf:
        raise ValueError(f"weight_tolerance: must be a finite number >= 0, got {weight_tolerance!r}")
    if images.ndim != 4:
        raise ValueError(f"images: expected a 4-D batch ({in_layout}), got shape {tuple(images.shape)}")
    device = images.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"images: device {device} is not supported (cpu or cuda)")
    if in_layout == "NHWC":
        num_images, height, width, channels = images.shape
    else:
        num_images, channels, height, width = images.shape

    anchors = as_tensor(anchors, "anchors")
    if anchors.ndim != 1:
        raise ValueError(f"anchors: expected shape (B,), got {tuple(anchors.shape)}")
    batch = anchors.shape[0]
    partners = as_tensor(partners, "partners")
    if partners.ndim != 2:
        raise ValueError(f"partners: expected shape (B, K), got {tuple(partners.shape)}")
    num_partners = partners.shape[1]
    anchors = _check_index_tensor(anchors, "anchors", (batch,), num_images, device)
    partners = _check_index_tensor(partners, "partners", (batch, num_partners), num_images, device)
    weights = _check_weights(as_tensor(weights, "weights"), (batch, num_partners + 1), device,
                             normalize_weights, weight_tolerance)

    mean_vec = _channel_vector(mean, channels, "mean", 0.0)
    std_vec = _channel_vector(std, channels, "std", 1.0, is_std=True)
    inv_std = (1.0 / std_vec.double()).float()

    if check_finite and images.dtype != torch.uint8 and not bool(torch.isfinite(images).all()):
        raise ValueError("images: contain NaN or infinity")

    out_shape = (batch, channels, height, width) if out_layout == "NCHW" else (batch, height, width, channels)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != out_shape or out.dtype != out_dtype or out.device != device:
            raise ValueError(
                f"out: expected {out_dtype} of shape {out_shape} on {device}, "
                f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out: must be contiguous")
    images = images.contiguous()
    # Checked on what the kernel reads (contiguous copies of strided inputs are not shared): the
    # kernel reads each input while it writes out, so a shared byte gives a silently wrong result.
    for name, tensor in (("images", images), ("anchors", anchors), ("partners", partners), ("weights", weights)):
        if _overlap(out, tensor):
            raise ValueError(f"out: overlaps {name} in memory; the mixer cannot write in place")

    return _MixCall(
        images=images, anchors=anchors, partners=partners, weights=weights,
        mean=mean_vec.to(device), inv_std=inv_std.to(device), out=out,
        in_layout=in_layout, out_layout=out_layout, height=height, width=width, channels=channels,
    )


def _params(call: _MixCall):
    p = native().MixImagesParams()
    p.images = call.images.data_ptr()
    p.in_dtype = _DTYPE_CODES[call.images.dtype]
    p.in_layout = _LAYOUT_CODES[call.in_layout]
    p.num_images = call.images.shape[0]
    p.height, p.width, p.channels = call.height, call.width, call.channels
    p.anchors = call.anchors.data_ptr()
    p.partners = call.partners.data_ptr()
    p.weights = call.weights.data_ptr()
    p.batch, p.num_partners = call.partners.shape
    p.mean = call.mean.data_ptr()
    p.inv_std = call.inv_std.data_ptr()
    p.out = call.out.data_ptr()
    p.out_dtype = _DTYPE_CODES[call.out.dtype]
    p.out_layout = _LAYOUT_CODES[call.out_layout]
    # Declare every buffer's size, so the binding checks each against the call's shapes
    # (a raw address carries none): the kernel can then never read or write past a buffer.
    for name in ("images", "anchors", "partners", "weights", "mean", "inv_std", "out"):
        tensor = getattr(call, name)
        setattr(p, f"{name}_nbytes", tensor.numel() * tensor.element_size())
    return p


def _run(call: _MixCall, num_threads: int | None) -> torch.Tensor:
    num_threads = _check_num_threads(num_threads)
    if call.out.numel() == 0:
        return call.out
    params = _params(call)
    if call.images.device.type == "cpu":
        if num_threads is None:
            num_threads = 1 if call.out.numel() < SINGLE_THREAD_ELEMENTS else torch.get_num_threads()
        native().mix_images_cpu(params, num_threads)
    else:
        if not native().cuda_compiled():
            raise RuntimeError(
                "images: CUDA tensors need the CUDA kernel, but mixnn_fast was built without nvcc; "
                "rebuild with nvcc on PATH (CMAKE_ARGS=-DMIXNN_CUDA=ON)"
            )
        with torch.cuda.device(call.images.device):
            native().mix_images_cuda(params, torch.cuda.current_stream(call.images.device).cuda_stream)
    return call.out


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
            produce it) or (M, C, H, W) for "NCHW"; uint8, float32, float16 or bfloat16; CPU or CUDA.
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
        out: optional preallocated contiguous output of the right shape, dtype and device.
        check_finite: scan float images for NaN/inf first (an extra pass over the input).
        num_threads: OpenMP threads on the CPU, 1 to ``MAX_NUM_THREADS`` (default:
            ``torch.get_num_threads()``, or one thread for outputs under ``SINGLE_THREAD_ELEMENTS``
            elements).

    Returns:
        (B, C, H, W) for ``out_layout="NCHW"`` or (B, H, W, C) for "NHWC", in ``out_dtype``.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape, device, an
        index out of range, or weights that are not finite, negative or do not sum to 1.
        Index validation reads the indices, which synchronises with a CUDA device.
    """
    call = _prepare(images, anchors, partners, weights, in_layout=in_layout, mean=mean, std=std,
                    out_layout=out_layout, out_dtype=out_dtype, out=out, normalize_weights=normalize_weights,
                    weight_tolerance=weight_tolerance, check_finite=check_finite)
    return _run(call, num_threads)


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
        targets: (N, C) float32, float16 or bfloat16 soft targets (e.g. ``SoftTargets.targets``).
        anchors, partners, weights: as in :func:`mix_images`, indexing rows of ``targets``.

    Returns:
        (B, C) in ``out_dtype`` (float32 by default).

    Runs the same kernel as the images, viewing targets as (N, 1, 1, C) NHWC "images".
    """
    targets = as_tensor(targets, "targets")
    if targets.ndim != 2:
        raise ValueError(f"targets: expected shape (N, C), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"targets: dtype must be float32, float16 or bfloat16, got {targets.dtype}")
    if out_dtype == torch.uint8:
        raise TypeError("out_dtype: soft targets are probabilities; use a floating dtype")
    num_rows, classes = targets.shape
    out_view = None
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.ndim != 2:
            raise ValueError(f"out: expected a (B, C) tensor, got shape {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out: must be contiguous")
        out_view = out.view(out.shape[0], 1, 1, out.shape[1])
    mixed = mix_images(targets.reshape(num_rows, 1, 1, classes), anchors, partners, weights,
                       in_layout="NHWC", out_layout="NHWC", out_dtype=out_dtype, out=out_view,
                       normalize_weights=normalize_weights, weight_tolerance=weight_tolerance,
                       num_threads=num_threads)
    # Callers pass the whole (N, C) table every batch; scanning it for NaN/inf would cost
    # N·C per call.  A non-finite value in any row this batch reads reaches its output row
    # (0·NaN and 0·inf are NaN too), so checking the (B, C) result catches exactly those.
    if not bool(torch.isfinite(mixed).all()):
        raise ValueError("targets: rows used by this batch contain NaN or infinity")
    return mixed.view(mixed.shape[0], classes)


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
