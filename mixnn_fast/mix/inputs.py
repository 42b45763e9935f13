"""The mixer's inputs as torch tensors: torch tensors as they are, NumPy arrays and any DLPack
producer (CuPy, DALI's TensorCPU/TensorGPU and dense TensorLists, JAX, ...) viewed without a copy.

Copies happen only where torch cannot view the memory: NumPy arrays with negative strides or a
non-native byte order, and read-only arrays on a NumPy too old to export them through DLPack.
A view that is not contiguous in the layout the kernel reads is copied later, once, by the
mixer itself (``.contiguous()``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_tensor", "as_channel_values"]


def _from_numpy(value: np.ndarray, name: str) -> torch.Tensor:
    if value.dtype.kind == "f" and value.dtype.itemsize == 8 and name == "images":
        raise TypeError(f"{name}: float64 images are not supported; use uint8, float32, float16 or bfloat16")
    if not value.dtype.isnative or any(step < 0 for step in value.strides):
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
    elif not value.flags.writeable:
        # torch.from_numpy warns on read-only arrays (torch tensors have no read-only flag);
        # DLPack 1.0 carries one (NumPy >= 2.1 exports read-only arrays that way) and torch
        # views them silently.  The mixer never writes its inputs.
        try:
            return torch.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError):  # an older NumPy, or a dtype DLPack lacks
            value = value.copy()
    try:
        return torch.from_numpy(value)
    except TypeError as exc:  # a dtype torch has no equivalent of (object, str, datetime, ...)
        raise TypeError(f"{name}: NumPy dtype {value.dtype} is not supported ({exc})") from exc


def _dense_dali_batch(value: Any, name: str) -> Any:
    """A DALI TensorListCPU/GPU (no ``__dlpack__`` of its own) as the TensorCPU/GPU of its samples,
    which shares their memory when they form one dense block."""
    if not value.is_dense_tensor():
        raise ValueError(f"{name}: a DALI TensorList whose samples differ in shape (or are not one "
                         "contiguous block) is not a batch tensor; resize or pad the samples to one shape")
    return value.as_tensor()


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A torch view of ``value`` (Tensor, NumPy array, any ``__dlpack__`` producer or a dense DALI
    TensorList) without a copy; lists and tuples of numbers are accepted for index and weight
    arguments.  TypeError naming ``name`` for anything else."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = _from_numpy(value, name)
    elif hasattr(value, "__dlpack__") or (hasattr(value, "is_dense_tensor") and hasattr(value, "as_tensor")):
        if not hasattr(value, "__dlpack__"):
            value = _dense_dali_batch(value, name)
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


def as_channel_values(value: Any, name: str) -> torch.Tensor | None:
    """``mean`` or ``std`` as the operators take them: None, or a tensor (a number or a sequence
    becomes a float64 CPU tensor).  Their values are checked where they are used (see
    ``core._channel_vector``)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # str, None, complex, ragged lists
        raise TypeError(f"{name}: expected a number or one number per channel, got {value!r}") from exc
