"""The mixer as torch operators (``torch.library``), so that ``torch.compile``, ``torch.export``,
``make_fx`` and dispatcher-level tools see one opaque op instead of Python code.

Importing this module (which :mod:`mixnn_fast.mix.mixer`, hence ``mixnn_fast.mix_images``, does)
registers::

    mixnn_fast::mix_images(Tensor images, Tensor anchors, Tensor partners, Tensor weights,
        Tensor? mean=None, Tensor? std=None, *, str in_layout="NHWC", str out_layout="NCHW",
        ScalarType out_dtype=float32, bool normalize_weights=False, float weight_tolerance=0.001,
        bool check_finite=False, SymInt? num_threads=None) -> Tensor
    mixnn_fast::mix_images_out(<the same tensors>, Tensor(a!) out, Tensor? mean=None,
        Tensor? std=None, *, <the same options>) -> ()
    mixnn_fast::mix_targets(Tensor targets, Tensor anchors, Tensor partners, Tensor weights, *,
        ScalarType out_dtype=float32, bool normalize_weights=False, float weight_tolerance=0.001,
        SymInt? num_threads=None) -> Tensor
    mixnn_fast::mix_targets_out(Tensor targets, Tensor anchors, Tensor partners, Tensor weights,
        Tensor(a!) out, *, <the same options>) -> ()

``mean`` and ``std`` are per-channel tensors of C values (or one), in the input's units, read
on the host.  The arguments are those of :func:`mixnn_fast.mix_images` /
:func:`mixnn_fast.mix_targets`, which are the user-facing entry points: they also accept NumPy
arrays, DLPack producers and lists, and call these operators.  Other pipelines may call
``torch.ops.mixnn_fast.mix_images(...)`` directly with tensors.

Implementations:
    CPU and CUDA: one Python body each (``core.mix_images_eager`` / ``core.mix_targets_eager``)
        that validates everything (values included) and runs the native kernel for the
        images' device — the OpenMP kernel, or the CUDA kernel on the current stream.  The
        value checks read the tensors (on CUDA: a device synchronisation, so a call cannot be
        captured in a CUDA graph); they run whenever the kernel runs, in eager calls and in
        compiled graphs alike.  Large CPU outputs come from ``outputs.empty_output``.
    Fake (meta, FakeTensor): the structural checks only (dtypes, shapes, devices, options,
        no element read) and the output's shape, dtype and device; this is what a
        ``torch.compile(fullgraph=True)`` trace runs.
    Autograd: none.  The mixer is not differentiable (its inputs are decoded images and fixed
        weights); the functional ops raise a RuntimeError naming themselves if a gradient ever
        flows back through them, and :func:`mixnn_fast.mix_images` refuses inputs that require
        grad up front.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mixnn_fast.mix import core

__all__ = ["mix_images_op", "mix_images_out", "mix_targets_op", "mix_targets_out"]

_DEVICES = ("cpu", "cuda")
_TOL = core.WEIGHT_SUM_TOLERANCE


@torch.library.custom_op("mixnn_fast::mix_images", mutates_args=(), device_types=_DEVICES)
def mix_images_op(images: Tensor, anchors: Tensor, partners: Tensor, weights: Tensor,
                  mean: Optional[Tensor] = None, std: Optional[Tensor] = None, *, in_layout: str = "NHWC",
                  out_layout: str = "NCHW", out_dtype: torch.dtype = torch.float32,
                  normalize_weights: bool = False, weight_tolerance: float = _TOL, check_finite: bool = False,
                  num_threads: Optional[int] = None) -> Tensor:
    """``Σ_j w_bj · normalise(images[idx_bj])`` into a new (B, C, H, W) / (B, H, W, C) tensor."""
    return core.mix_images_eager(images, anchors, partners, weights, mean, std, in_layout=in_layout,
                                 out_layout=out_layout, out_dtype=out_dtype, normalize_weights=normalize_weights,
                                 weight_tolerance=weight_tolerance, check_finite=check_finite,
                                 num_threads=num_threads)


@mix_images_op.register_fake
def _mix_images_fake(images, anchors, partners, weights, mean=None, std=None, *, in_layout="NHWC",
                     out_layout="NCHW", out_dtype=torch.float32, normalize_weights=False, weight_tolerance=_TOL,
                     check_finite=False, num_threads=None):
    core.check_options(in_layout, out_layout, out_dtype, weight_tolerance)
    shape = core.check_structure(images, anchors, partners, weights, in_layout, out_layout, allow_meta=True)
    return images.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("mixnn_fast::mix_images_out", mutates_args=("out",), device_types=_DEVICES)
def mix_images_out(images: Tensor, anchors: Tensor, partners: Tensor, weights: Tensor, out: Tensor,
                   mean: Optional[Tensor] = None, std: Optional[Tensor] = None, *, in_layout: str = "NHWC",
                   out_layout: str = "NCHW", out_dtype: torch.dtype = torch.float32,
                   normalize_weights: bool = False, weight_tolerance: float = _TOL, check_finite: bool = False,
                   num_threads: Optional[int] = None) -> None:
    """:func:`mix_images_op` written into ``out`` (contiguous, of the output's shape and dtype)."""
    core.mix_images_eager(images, anchors, partners, weights, mean, std, out=out, in_layout=in_layout,
                          out_layout=out_layout, out_dtype=out_dtype, normalize_weights=normalize_weights,
                          weight_tolerance=weight_tolerance, check_finite=check_finite, num_threads=num_threads)


@mix_images_out.register_fake
def _mix_images_out_fake(images, anchors, partners, weights, out, mean=None, std=None, *, in_layout="NHWC",
                         out_layout="NCHW", out_dtype=torch.float32, normalize_weights=False,
                         weight_tolerance=_TOL, check_finite=False, num_threads=None):
    core.check_options(in_layout, out_layout, out_dtype, weight_tolerance)
    shape = core.check_structure(images, anchors, partners, weights, in_layout, out_layout, allow_meta=True)
    core.check_out(out, shape, out_dtype, images.device)


@torch.library.custom_op("mixnn_fast::mix_targets", mutates_args=(), device_types=_DEVICES)
def mix_targets_op(targets: Tensor, anchors: Tensor, partners: Tensor, weights: Tensor, *,
                   out_dtype: torch.dtype = torch.float32, normalize_weights: bool = False,
                   weight_tolerance: float = _TOL, num_threads: Optional[int] = None) -> Tensor:
    """``Σ_j w_bj · targets[idx_bj]``: (N, C) soft targets -> a new (B, C) tensor."""
    return core.mix_targets_eager(targets, anchors, partners, weights, out_dtype=out_dtype,
                                  normalize_weights=normalize_weights, weight_tolerance=weight_tolerance,
                                  num_threads=num_threads)


def _targets_shape(targets, anchors, partners, weights, out_dtype, weight_tolerance) -> tuple:
    core.check_options("NHWC", "NHWC", out_dtype, weight_tolerance)
    core.check_targets(targets, out_dtype)
    rows, classes = targets.shape
    batch, _, _, _ = core.check_structure(targets.reshape(rows, 1, 1, classes), anchors, partners, weights,
                                          "NHWC", "NHWC", allow_meta=True)
    return batch, classes


@mix_targets_op.register_fake
def _mix_targets_fake(targets, anchors, partners, weights, *, out_dtype=torch.float32, normalize_weights=False,
                      weight_tolerance=_TOL, num_threads=None):
    shape = _targets_shape(targets, anchors, partners, weights, out_dtype, weight_tolerance)
    return targets.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("mixnn_fast::mix_targets_out", mutates_args=("out",), device_types=_DEVICES)
def mix_targets_out(targets: Tensor, anchors: Tensor, partners: Tensor, weights: Tensor, out: Tensor, *,
                    out_dtype: torch.dtype = torch.float32, normalize_weights: bool = False,
                    weight_tolerance: float = _TOL, num_threads: Optional[int] = None) -> None:
    """:func:`mix_targets_op` written into ``out`` ((B, C), contiguous)."""
    core.mix_targets_eager(targets, anchors, partners, weights, out=out, out_dtype=out_dtype,
                           normalize_weights=normalize_weights, weight_tolerance=weight_tolerance,
                           num_threads=num_threads)


@mix_targets_out.register_fake
def _mix_targets_out_fake(targets, anchors, partners, weights, out, *, out_dtype=torch.float32,
                          normalize_weights=False, weight_tolerance=_TOL, num_threads=None):
    shape = _targets_shape(targets, anchors, partners, weights, out_dtype, weight_tolerance)
    core.check_out(out, shape, out_dtype, targets.device)


def _not_differentiable(name: str):
    def backward(ctx, grad):
        raise RuntimeError(
            f"{name} is not differentiable: it mixes decoded images (or soft targets) with fixed weights, "
            "and has no backward.  Detach its inputs (or run it under torch.no_grad()) so that no "
            "gradient flows through it."
        )

    return backward


mix_images_op.register_autograd(_not_differentiable("mixnn_fast::mix_images"))
mix_targets_op.register_autograd(_not_differentiable("mixnn_fast::mix_targets"))
