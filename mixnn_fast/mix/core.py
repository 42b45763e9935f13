"""The mixer's checks and its kernel call, shared by the public functions (``mixer.py``), the
registered torch operators (``op.py``) and the trusted loader path (``trusted.py``).

Checks come in two kinds.  Structural ones (:func:`check_options`, :func:`check_structure`)
read only metadata — dtypes, shapes, devices — and run everywhere, also on the fake tensors of
a ``torch.compile`` trace.  Value checks (index ranges, weights finite, non-negative and summing
to 1, mean/std finite and std > 0, NaN scans) read the tensors, which synchronises with a CUDA
device; they run in :func:`_prepare`, i.e. inside the operators' real (eager) implementation,
whether the operator was called eagerly or from a compiled graph.  Every failure is a
``ValueError`` or ``TypeError`` naming the argument.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from mixnn_fast._native import native
from mixnn_fast.mix.inputs import as_tensor
from mixnn_fast.mix.outputs import empty_output

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


def _check_index_structure(index: torch.Tensor, name: str, shape: tuple, device) -> None:
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {index.dtype}")
    if tuple(index.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name}: is on {index.device} but images are on {device}; move it with .to({str(device)!r})")


def _check_index_values(index: torch.Tensor, name: str, num_images: int) -> torch.Tensor:
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_images:
            raise ValueError(
                f"{name}: indices must lie in [0, {num_images}) (the number of images), got [{low}, {high}]"
            )
    return index.to(torch.int64).contiguous()


def _check_weights_structure(weights: torch.Tensor, shape: tuple, device) -> None:
    if weights.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weights: expected a floating tensor, got dtype {weights.dtype}")
    if tuple(weights.shape) != shape:
        raise ValueError(f"weights: expected shape {shape} (batch, 1 + num_partners), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights: is on {weights.device} but images are on {device}")


def _check_weights_values(weights: torch.Tensor, normalize: bool, tol: float) -> torch.Tensor:
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


def check_options(in_layout, out_layout, out_dtype, weight_tolerance=WEIGHT_SUM_TOLERANCE) -> None:
    """TypeError/ValueError naming the option unless the layouts, out_dtype and weight_tolerance are valid."""
    # isinstance first: an unhashable value would make the dict lookup raise a TypeError naming nothing
    if not isinstance(in_layout, str) or in_layout not in _LAYOUT_CODES:
        raise ValueError(f"in_layout: must be 'NHWC' or 'NCHW', got {in_layout!r}")
    if not isinstance(out_layout, str) or out_layout not in _LAYOUT_CODES:
        raise ValueError(f"out_layout: must be 'NHWC' or 'NCHW', got {out_layout!r}")
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _DTYPE_CODES:
        raise TypeError(f"out_dtype: must be torch.float32, float16, bfloat16 or uint8, got {out_dtype}")
    if isinstance(weight_tolerance, bool) or not isinstance(weight_tolerance, numbers.Real) \
            or not 0 <= weight_tolerance < math.inf:
        raise ValueError(f"weight_tolerance: must be a finite number >= 0, got {weight_tolerance!r}")


def check_structure(images: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor, weights: torch.Tensor,
                    in_layout: str, out_layout: str, *, allow_meta: bool = False) -> tuple[int, int, int, int]:
    """The checks that read no element (dtypes, shapes, devices), shared with the operators' fake
    implementation, so that a traced call fails where the eager one would.  Returns the output
    shape.  ``allow_meta``: the fake implementation also answers for meta tensors (shape inference)."""
    if images.dtype not in _DTYPE_CODES:
        raise TypeError(f"images: dtype must be uint8, float32, float16 or bfloat16, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images: expected a 4-D batch ({in_layout}), got shape {tuple(images.shape)}")
    device = images.device
    if device.type not in ("cpu", "cuda") and not (allow_meta and device.type == "meta"):
        raise ValueError(f"images: device {device} is not supported (cpu or cuda)")
    if in_layout == "NHWC":
        _, height, width, channels = images.shape
    else:
        _, channels, height, width = images.shape
    if anchors.ndim != 1:
        raise ValueError(f"anchors: expected shape (B,), got {tuple(anchors.shape)}")
    batch = anchors.shape[0]
    if partners.ndim != 2:
        raise ValueError(f"partners: expected shape (B, K), got {tuple(partners.shape)}")
    num_partners = partners.shape[1]
    _check_index_structure(anchors, "anchors", (batch,), device)
    _check_index_structure(partners, "partners", (batch, num_partners), device)
    _check_weights_structure(weights, (batch, num_partners + 1), device)
    return (batch, channels, height, width) if out_layout == "NCHW" else (batch, height, width, channels)


def check_out(out, out_shape: tuple, out_dtype: torch.dtype, device: torch.device) -> None:
    """TypeError/ValueError naming ``out`` unless it is a contiguous tensor of the output's shape,
    dtype and device (metadata only)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(out_shape) or out.dtype != out_dtype or out.device != device:
        raise ValueError(
            f"out: expected {out_dtype} of shape {tuple(out_shape)} on {device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")


def _prepare(images, anchors, partners, weights, *, in_layout="NHWC", mean=None, std=None, out_layout="NCHW",
             out_dtype=torch.float32, out=None, normalize_weights=False, weight_tolerance=WEIGHT_SUM_TOLERANCE,
             check_finite=False) -> _MixCall:
    images = as_tensor(images, "images")
    check_options(in_layout, out_layout, out_dtype, weight_tolerance)
    anchors = as_tensor(anchors, "anchors")
    partners = as_tensor(partners, "partners")
    weights = as_tensor(weights, "weights")
    out_shape = check_structure(images, anchors, partners, weights, in_layout, out_layout)
    device = images.device
    num_images = images.shape[0]
    if in_layout == "NHWC":
        _, height, width, channels = images.shape
    else:
        _, channels, height, width = images.shape
    anchors = _check_index_values(anchors, "anchors", num_images)
    partners = _check_index_values(partners, "partners", num_images)
    weights = _check_weights_values(weights, normalize_weights, weight_tolerance)

    mean_vec = _channel_vector(mean, channels, "mean", 0.0)
    std_vec = _channel_vector(std, channels, "std", 1.0, is_std=True)
    inv_std = (1.0 / std_vec.double()).float()

    if check_finite and images.dtype != torch.uint8 and not bool(torch.isfinite(images).all()):
        raise ValueError("images: contain NaN or infinity")

    if out is None:
        out = empty_output(out_shape, out_dtype, device)  # pooled huge-page buffers on the CPU (outputs.py)
    else:
        check_out(out, out_shape, out_dtype, device)
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


def mix_images_eager(images, anchors, partners, weights, mean=None, std=None, *, out=None, in_layout="NHWC",
                     out_layout="NCHW", out_dtype=torch.float32, normalize_weights=False,
                     weight_tolerance=WEIGHT_SUM_TOLERANCE, check_finite=False, num_threads=None) -> torch.Tensor:
    """Every check, then the kernel: the body of the ``mixnn_fast::mix_images`` operators (see
    :func:`mixnn_fast.mix_images` for the arguments).  Returns ``out``, or a new output."""
    call = _prepare(images, anchors, partners, weights, in_layout=in_layout, mean=mean, std=std,
                    out_layout=out_layout, out_dtype=out_dtype, out=out, normalize_weights=normalize_weights,
                    weight_tolerance=weight_tolerance, check_finite=check_finite)
    return _run(call, num_threads)


def check_targets(targets: torch.Tensor, out_dtype) -> None:
    """The structural checks of a soft-target table (metadata only, as :func:`check_structure`)."""
    if targets.ndim != 2:
        raise ValueError(f"targets: expected shape (N, C), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"targets: dtype must be float32, float16 or bfloat16, got {targets.dtype}")
    if out_dtype == torch.uint8:
        raise TypeError("out_dtype: soft targets are probabilities; use a floating dtype")


def mix_targets_eager(targets, anchors, partners, weights, *, out=None, out_dtype=torch.float32,
                      normalize_weights=False, weight_tolerance=WEIGHT_SUM_TOLERANCE,
                      num_threads=None) -> torch.Tensor:
    """The body of the ``mixnn_fast::mix_targets`` operators (see :func:`mixnn_fast.mix_targets`):
    the image kernel on the table viewed as (N, 1, 1, C) NHWC images.  Returns ``out`` or a new (B, C)."""
    targets = as_tensor(targets, "targets")
    check_targets(targets, out_dtype)
    num_rows, classes = targets.shape
    if out is None:
        check_options("NHWC", "NHWC", out_dtype, weight_tolerance)
        anchors = as_tensor(anchors, "anchors")
        if anchors.ndim != 1:
            raise ValueError(f"anchors: expected shape (B,), got {tuple(anchors.shape)}")
        # (B, C) itself, so that the result is no view of a hidden 4-D tensor
        out = empty_output((anchors.shape[0], classes), out_dtype, targets.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if out.ndim != 2:
        raise ValueError(f"out: expected a (B, C) tensor, got shape {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")
    mix_images_eager(targets.reshape(num_rows, 1, 1, classes), anchors, partners, weights,
                     out=out.view(out.shape[0], 1, 1, out.shape[1]), in_layout="NHWC", out_layout="NHWC",
                     out_dtype=out_dtype, normalize_weights=normalize_weights, weight_tolerance=weight_tolerance,
                     num_threads=num_threads)
    # Callers pass the whole (N, C) table every batch; scanning it for NaN/inf would cost
    # N·C per call.  A non-finite value in any row this batch reads reaches its output row
    # (0·NaN and 0·inf are NaN too), so checking the (B, C) result catches exactly those.
    if not bool(torch.isfinite(out).all()):
        raise ValueError("targets: rows used by this batch contain NaN or infinity")
    return out
