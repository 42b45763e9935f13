"""Label correction by exponential moving average (MixNN eq. 12): the soft-target store.

Every sample's target starts as the one-hot of its given (possibly noisy) label.
From ``start_epoch`` on (60 in the paper), each update moves the targets of the
samples just seen towards the network's prediction for them:
``t_i <- momentum * t_i + (1 - momentum) * p_i`` (momentum 0.9). The authors'
code updates only on every 10th epoch (``update_every=10`` reproduces that:
epochs 60, 70, ...).

The store is N x C; float16 (or bfloat16) halves it for large N x C (WebVision:
2.4M x 1000 is 9.6 GB in float32). Each update computes in float32 (float64
for float64 storage) and rounds once on the way back to the store.
"""
from __future__ import annotations

import math

import torch

from mixnn_fast._checks import check_device, check_in_range, check_sample_ids

__all__ = ["SoftTargets"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SoftTargets:
    """N x C soft targets, initialised one-hot from the given labels and corrected by EMA.

    Args:
        labels: Tensor[N] int64, the given (noisy) labels, values in [0, num_classes).
        num_classes: C >= 1.
        momentum: alpha in [0, 1]; the weight kept by the old target at each update.
        start_epoch: first epoch (>= 0) at which ``update`` changes anything.
        update_every: update only on epochs ``start_epoch + j * update_every`` (>= 1).
        dtype: storage dtype: torch.float32 (default), float16, bfloat16 or float64.
        device: where the store lives (default: the labels' device).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, *, momentum: float = 0.9, start_epoch: int = 60,
                 update_every: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be a 1-D int64 tensor (N,), got {labels.dtype} of shape {tuple(labels.shape)}")
        check_in_range(labels, "labels", num_classes, "num_classes")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        for name, value, least in (("start_epoch", start_epoch, 0), ("update_every", update_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        device = check_device(device)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.start_epoch = start_epoch
        self.update_every = update_every
        device = labels.device if device is None else device
        self.labels = labels.to(device).clone()
        self._targets = torch.zeros((labels.numel(), num_classes), dtype=dtype, device=device)
        self._targets[torch.arange(labels.numel(), device=device), self.labels] = 1.0

    # ---------------------------------------------------------------- reading

    @property
    def targets(self) -> torch.Tensor:
        """The store itself, Tensor[N, C] in the storage dtype (read it; write through ``update``)."""
        return self._targets

    @property
    def dtype(self) -> torch.dtype:
        return self._targets.dtype

    @property
    def device(self) -> torch.device:
        return self._targets.device

    def __len__(self) -> int:
        return self._targets.shape[0]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (Tensor[B] int64 in [0, N)) as Tensor[B, C] float32 (for the loss)."""
        indices = self._check_indices(indices, "indices")
        return self._targets[indices].to(torch.float32)

    def corrected_labels(self) -> torch.Tensor:
        """Each sample's arg-max target class, Tensor[N] int64 (ties: the lowest class)."""
        return self._targets.argmax(dim=1)

    def correction_accuracy(self, clean_labels: torch.Tensor) -> float:
        """Fraction of samples whose corrected label equals ``clean_labels`` (Tensor[N] int64)."""
        if not isinstance(clean_labels, torch.Tensor):
            raise TypeError(f"clean_labels must be a torch.Tensor, got {type(clean_labels).__name__}")
        if clean_labels.dtype != torch.int64 or tuple(clean_labels.shape) != (len(self),):
            raise ValueError(f"clean_labels must be an int64 tensor of shape ({len(self)},), got "
                             f"{clean_labels.dtype} of shape {tuple(clean_labels.shape)}")
        check_in_range(clean_labels, "clean_labels", self.num_classes, "num_classes")
        if len(self) == 0:
            raise ValueError("correction_accuracy of an empty store is undefined")
        hits = (self.corrected_labels() == clean_labels.to(self.device)).sum()
        return float(hits) / len(self)

    # ---------------------------------------------------------------- updating

    def is_update_epoch(self, epoch: int) -> bool:
        """Whether ``update`` changes targets at ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.update_every == 0

    def update(self, indices: torch.Tensor, probabilities: torch.Tensor, epoch: int) -> bool:
        """EMA step for samples ``indices`` towards ``probabilities``; returns whether it applied.

        Args:
            indices: Tensor[B] int64, distinct, in [0, N), on the store's device.
            probabilities: Tensor[B, C] floating on the store's device: finite, >= 0,
                each row summing to 1 (within 1e-3; 1e-2 for float16/bfloat16 input),
                e.g. softmax of the network's (unmixed) logits.
            epoch: the current epoch; before ``start_epoch`` (and off the ``update_every``
                grid) nothing changes. The inputs are validated either way.
        """
        indices = self._check_indices(indices, "indices")
        if indices.numel() > 1 and torch.unique(indices).numel() != indices.numel():
            raise ValueError("indices must be distinct (one prediction per sample per update)")
        probabilities = self._check_probabilities(probabilities, indices.numel())
        if not self.is_update_epoch(epoch):
            return False
        work = torch.promote_types(self._targets.dtype, torch.float32)  # half storage: float32 arithmetic
        current = self._targets[indices].to(work)
        current.mul_(self.momentum).add_(probabilities.to(work), alpha=1.0 - self.momentum)
        self._targets[indices] = current.to(self._targets.dtype)
        return True

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Targets, labels and settings, for torch.save."""
        return {"targets": self._targets.clone(), "labels": self.labels.clone(), "num_classes": self.num_classes,
                "momentum": self.momentum, "start_epoch": self.start_epoch, "update_every": self.update_every}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the store keeps its own dtype and device.

        Everything is checked before anything changes: a corrupted state raises a ValueError or
        TypeError naming it and leaves the store as it was (an ``update_every`` of 0 would
        otherwise surface later as a ZeroDivisionError, NaN targets as a silently wrong training)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from SoftTargets.state_dict(), got {type(state).__name__}")
        missing = {"targets", "labels", "num_classes", "momentum", "start_epoch", "update_every"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        targets, labels = state["targets"], state["labels"]
        for key, value in (("targets", targets), ("labels", labels)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if state["num_classes"] != self.num_classes or tuple(targets.shape) != tuple(self._targets.shape):
            raise ValueError(f"state holds targets of shape {tuple(targets.shape)} for "
                             f"{state['num_classes']!r} classes; this store is {tuple(self._targets.shape)}")
        if tuple(labels.shape) != tuple(self.labels.shape):
            raise ValueError(f"state['labels'] has shape {tuple(labels.shape)}, expected {tuple(self.labels.shape)}")
        if not targets.is_floating_point():
            raise TypeError(f"state['targets'] must be floating, got {targets.dtype}")
        if targets.numel() and not (bool(torch.isfinite(targets).all()) and float(targets.min()) >= 0):
            raise ValueError("state['targets'] must be finite and >= 0 (soft targets are probabilities)")
        if labels.dtype != torch.int64:
            raise TypeError(f"state['labels'] must be int64, got {labels.dtype}")
        check_in_range(labels, "state['labels']", self.num_classes, "num_classes")
        momentum = state["momentum"]
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"state['momentum'] must be a number in [0, 1], got {momentum!r}")
        for key, least in (("start_epoch", 0), ("update_every", 1)):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"state[{key!r}] must be an int >= {least}, got {value!r}")
        self._targets.copy_(targets)
        self.labels.copy_(labels)
        self.momentum = float(momentum)
        self.start_epoch = int(state["start_epoch"])
        self.update_every = int(state["update_every"])

    # ---------------------------------------------------------------- checks

    def _check_indices(self, indices: object, name: str) -> torch.Tensor:
        return check_sample_ids(indices, name, len(self), self.device, "the targets")

    def _check_probabilities(self, probabilities: object, rows: int) -> torch.Tensor:
        """``probabilities`` detached, once checked: a softmax straight from the network requires
        grad, and the store must not keep every update's graph alive (nor hand a graph-carrying
        state_dict to torch.save)."""
        if not isinstance(probabilities, torch.Tensor):
            raise TypeError(f"probabilities must be a torch.Tensor, got {type(probabilities).__name__}")
        probabilities = probabilities.detach()
        if tuple(probabilities.shape) != (rows, self.num_classes) or not probabilities.is_floating_point():
            raise ValueError(f"probabilities must be a floating tensor of shape ({rows}, {self.num_classes}), "
                             f"got {probabilities.dtype} of shape {tuple(probabilities.shape)}")
        if probabilities.device != self.device:
            raise ValueError(f"probabilities is on {probabilities.device}, the targets on {self.device}")
        if rows == 0:
            return probabilities
        lo, hi = (float(v) for v in torch.aminmax(probabilities))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0):
            bad = (~(torch.isfinite(probabilities) & (probabilities >= 0))).nonzero()[0].tolist()
            raise ValueError(f"probabilities must be finite and >= 0; probabilities[{bad[0]}, {bad[1]}] = "
                             f"{probabilities[bad[0], bad[1]].item()}")
        tolerance = 1e-2 if probabilities.dtype in (torch.float16, torch.bfloat16) else 1e-3
        error = (probabilities.to(torch.float32).sum(dim=1) - 1.0).abs()
        worst = int(error.argmax())
        if float(error[worst]) > tolerance:
            raise ValueError(f"each row of probabilities must sum to 1 (within {tolerance}); row {worst} sums to "
                             f"{float(probabilities[worst].double().sum()):.6g}")
        return probabilities
