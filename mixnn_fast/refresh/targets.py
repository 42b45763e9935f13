"""Label correction by exponential moving average (MixNN eq. 12): the soft-target stores.

Every sample's target starts as the one-hot of its given (possibly noisy) label.
From ``start_epoch`` on (60 in the paper), each update moves the targets of the
samples just seen towards the network's prediction for them:
``t_i <- momentum * t_i + (1 - momentum) * p_i`` (momentum 0.9). The authors'
code updates only on every 10th epoch (``update_every=10`` reproduces that:
epochs 60, 70, ...).

Two stores with one interface (:class:`TargetStore`):

- :class:`SoftTargets`: the dense N x C table, float32, float16, bfloat16 or float64.
  Each update computes in float32 (float64 for float64 storage) and rounds once on the
  way back to the store.
- :class:`~mixnn_fast.refresh.sparse_targets.TopKSoftTargets`: the k largest classes
  of each sample (class ids and values), for N x C too large even in float16.

:func:`soft_targets` builds either from a storage name; ``storage="auto"`` decides from
N x C alone (:func:`choose_storage`), never from the machine's free memory, so that a run
resumed on another machine makes the same choice and can load its checkpoint:

- float32 while N·C <= 2**28 (the table is at most 1 GiB): CIFAR (50k x 100: 20 MB) and
  Clothing1M (1M x 14: 56 MB) keep full precision, which costs nothing there;
- float16 while N·C <= 2**32 (at most 8 GiB): full WebVision, 2.4M x 1000, is 4.8 GB
  instead of 9.6 GB. float16 rather than bfloat16: targets lie in [0, 1], where float16's
  10-bit mantissa is 8x finer than bfloat16's 7 bits and its range (down to 6e-8) is ample;
  the EMA's rounding error stays below (eps16 / 2) / (1 - momentum) = 0.5% per entry;
- above that, top-k with k = 32 (int32 class ids, float16 values, a float32 rest: 196 bytes
  per sample whatever C is), provided that is smaller than float16's 2 C bytes (C > 3 k + 2).

Every operation over many rows works a chunk of rows at a time (target_store.py), so that no
(N, C) float32 temporary ever exists: the memory of the store is the store.
"""
from __future__ import annotations

import torch

from mixnn_fast.refresh.target_store import TargetStore, check_finite_non_negative

__all__ = ["TargetStore", "SoftTargets", "soft_targets", "choose_storage", "STORAGES"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
#: storage names :func:`soft_targets` accepts
STORAGES = ("auto", "float32", "float16", "bfloat16", "topk")
#: the "auto" rule's cut-offs, in table elements N·C, and its k (see the module docstring)
AUTO_FLOAT32_ELEMENTS = 1 << 28
AUTO_FLOAT16_ELEMENTS = 1 << 32
AUTO_TOP_K = 32


class SoftTargets(TargetStore):
    """Dense N x C soft targets, initialised one-hot from the given labels and corrected by EMA.

    Args: as :class:`TargetStore`, plus
        dtype: storage dtype: torch.float32 (default), float16, bfloat16 or float64.

    ``targets`` is the dense table itself (dense stores only; a top-k store has none).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, *, momentum: float = 0.9, start_epoch: int = 60,
                 update_every: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(labels, num_classes, momentum=momentum, start_epoch=start_epoch,
                         update_every=update_every, device=device)
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        self.storage = _DTYPE_NAMES[dtype]
        n = self.labels.numel()
        self._targets = torch.zeros((n, num_classes), dtype=dtype, device=self.device)
        self._targets[torch.arange(n, device=self.device), self.labels] = 1.0

    @property
    def targets(self) -> torch.Tensor:
        """The store itself, Tensor[N, C] in the storage dtype (read it; write through ``update``)."""
        return self._targets

    @property
    def dtype(self) -> torch.dtype:
        return self._targets.dtype

    def _kind(self) -> str:
        return "dense"

    def _tensor_keys(self) -> tuple[str, ...]:
        return ("targets",)

    def _tensors_state(self) -> dict:
        return {"targets": self._targets}

    def _check_tensors_state(self, state: dict) -> None:
        targets = state["targets"]
        if tuple(targets.shape) != tuple(self._targets.shape):
            raise ValueError(f"state holds targets of shape {tuple(targets.shape)}; this store is "
                             f"{tuple(self._targets.shape)}")
        if not targets.is_floating_point():
            raise TypeError(f"state['targets'] must be floating, got {targets.dtype}")
        check_finite_non_negative(targets, "state['targets']")

    def _load_tensors_state(self, state: dict) -> None:
        self._targets.copy_(state["targets"])

    def _targets_nbytes(self) -> int:
        return self._targets.numel() * self._targets.element_size()

    def _dense_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._targets[ids].to(torch.float32)

    def _argmax_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._targets[ids].argmax(dim=1)

    def _update_rows(self, ids: torch.Tensor, probabilities: torch.Tensor) -> None:
        work = torch.promote_types(self._targets.dtype, torch.float32)  # half storage: float32 arithmetic
        current = self._targets[ids].to(work)
        current.mul_(self.momentum).add_(probabilities.to(work), alpha=1.0 - self.momentum)
        self._targets[ids] = current.to(self._targets.dtype)

    def _set_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        self._targets[ids] = values.to(self._targets.dtype)

    def _mix(self, anchor_ids: torch.Tensor, partner_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self._targets.dtype == torch.float64:  # the kernel reads float32/16/bf16 tables only
            ids = torch.cat([anchor_ids.unsqueeze(1), partner_ids], dim=1)
            return torch.einsum("bj,bjc->bc", weights.to(torch.float64), self._targets[ids]).to(torch.float32)
        from mixnn_fast.mix.trusted import mix_batch_targets  # here: importing the store needs no native code

        return mix_batch_targets(self._targets, anchor_ids, partner_ids, weights)


def choose_storage(num_samples: int, num_classes: int, top_k: int = AUTO_TOP_K) -> str:
    """The storage ``"auto"`` picks for N = ``num_samples`` x C = ``num_classes`` (module docstring):
    "float32" while N·C <= 2**28, "float16" while N·C <= 2**32 (or while top-k's 6 top_k + 4 bytes
    per sample would not be smaller than float16's 2 C: C <= 3 top_k + 2), else "topk"."""
    elements = num_samples * num_classes
    if elements <= AUTO_FLOAT32_ELEMENTS:
        return "float32"
    if elements <= AUTO_FLOAT16_ELEMENTS or num_classes <= 3 * top_k + 2:
        return "float16"
    return "topk"


def soft_targets(labels: torch.Tensor, num_classes: int, *, storage: str = "auto", top_k: int | None = None,
                 momentum: float = 0.9, start_epoch: int = 60, update_every: int = 1,
                 device: torch.device | str | None = None) -> TargetStore:
    """A soft-target store for ``labels`` (Tensor[N] int64) in ``storage``.

    Args:
        storage: "auto" (:func:`choose_storage`: from N·C alone, the same on every machine),
            "float32", "float16", "bfloat16" (dense :class:`SoftTargets`) or "topk"
            (:class:`~mixnn_fast.refresh.sparse_targets.TopKSoftTargets`).
        top_k: k of a top-k store (default 32); with "auto", the k used if top-k is picked.
            Refused with a dense storage, where it would mean nothing.
        momentum, start_epoch, update_every, device: as :class:`TargetStore`.
    Returns:
        The store; its ``storage`` attribute says which one was chosen.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        if storage not in ("auto", "topk"):
            raise ValueError(f"top_k applies to storage 'topk' (or 'auto'), not to storage {storage!r}")
    k = top_k
    if k is None:  # the default k, never more than the classes there are
        k = min(AUTO_TOP_K, num_classes) if isinstance(num_classes, int) and num_classes >= 1 else AUTO_TOP_K
    if storage == "auto":
        decidable = isinstance(labels, torch.Tensor) and labels.ndim == 1 and isinstance(num_classes, int) \
            and not isinstance(num_classes, bool)
        # undecidable: bad arguments, which the store's own checks then name
        storage = choose_storage(labels.numel(), num_classes, k) if decidable else "float32"
    options = dict(momentum=momentum, start_epoch=start_epoch, update_every=update_every, device=device)
    if storage == "topk":
        from mixnn_fast.refresh.sparse_targets import TopKSoftTargets  # imported when wanted

        return TopKSoftTargets(labels, num_classes, k=k, **options)
    return SoftTargets(labels, num_classes, dtype=getattr(torch, storage), **options)
