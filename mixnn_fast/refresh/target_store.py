"""The soft-target stores' common interface (:class:`TargetStore`) and its checks.

Two stores implement it: the dense :class:`~mixnn_fast.refresh.targets.SoftTargets` and the
sparse :class:`~mixnn_fast.refresh.sparse_targets.TopKSoftTargets`; the trainer and the refresh
use nothing else, so either can hold a run's targets (:func:`~mixnn_fast.refresh.targets.soft_targets`
picks one). Every operation over many rows works a chunk of rows at a time, so that no (N, C)
float32 temporary ever exists: the memory of a store is the store.
"""
from __future__ import annotations

import math

import torch

from mixnn_fast._checks import check_device, check_in_range, check_sample_ids

__all__ = ["TargetStore", "chunk_rows", "check_finite_non_negative"]

# Rows per chunk: the (rows, C) float32 working block of an update, a mix or a check stays
# near 32 MiB whatever N is.
_CHUNK_ELEMENTS = 1 << 23
_STATE_KEYS = ("labels", "num_classes", "momentum", "start_epoch", "update_every")


def chunk_rows(num_classes: int) -> int:
    """Rows of C values per chunk (>= 1): about 2**23 elements, 32 MiB in float32."""
    return max(1, _CHUNK_ELEMENTS // max(1, num_classes))


class TargetStore:
    """What every soft-target store offers; the trainer and the refresh use only this.

    Args:
        labels: Tensor[N] int64, the given (noisy) labels, values in [0, num_classes).
        num_classes: C >= 1.
        momentum: alpha in [0, 1]; the weight kept by the old target at each update.
        start_epoch: first epoch (>= 0) at which ``update`` changes anything.
        update_every: update only on epochs ``start_epoch + j * update_every`` (>= 1).
        device: where the store lives (default: the labels' device).

    Attributes: ``labels`` (Tensor[N] int64, the given labels), ``num_classes``, ``momentum``,
    ``start_epoch``, ``update_every``, ``storage`` (the storage's name: "float32", "float16",
    "bfloat16", "float64" or "topk").
    """

    storage: str = ""

    def __init__(self, labels: torch.Tensor, num_classes: int, *, momentum: float = 0.9, start_epoch: int = 60,
                 update_every: int = 1, device: torch.device | str | None = None) -> None:
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
        device = check_device(device)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.start_epoch = start_epoch
        self.update_every = update_every
        device = labels.device if device is None else device
        self.labels = labels.to(device).clone()
        self._device = device

    # ---------------------------------------------------------------- reading

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`rows`."""
        return self.rows(indices)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (Tensor[B] int64 in [0, N), on the store's device) as dense
        Tensor[B, C] float32: the targets a loss is computed against."""
        indices = self._check_indices(indices, "indices")
        out = torch.empty((indices.numel(), self.num_classes), dtype=torch.float32, device=self.device)
        step = chunk_rows(self.num_classes)
        for s in range(0, indices.numel(), step):
            out[s:s + step] = self._dense_rows(indices[s:s + step])
        return out

    def corrected_labels(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's arg-max target class (ties: the lowest class), Tensor[N] int64, or
        Tensor[B] for the samples ``ids`` (Tensor[B] int64)."""
        if ids is not None:
            ids = self._check_indices(ids, "ids")
        count = len(self) if ids is None else ids.numel()
        out = torch.empty(count, dtype=torch.int64, device=self.device)
        step = chunk_rows(self.num_classes)
        for s in range(0, count, step):
            rows = torch.arange(s, min(s + step, count), device=self.device) if ids is None else ids[s:s + step]
            out[s:s + step] = self._argmax_rows(rows)
        return out

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

    def mix(self, anchor_ids: torch.Tensor, partner_ids: torch.Tensor, weights: torch.Tensor, *,
            check: bool = True) -> torch.Tensor:
        """``out[b] = weights[b, 0] t[anchor_ids[b]] + Σ_k weights[b, k+1] t[partner_ids[b, k]]``.

        Args:
            anchor_ids: Tensor[B] int64, partner_ids: Tensor[B, K] int64 (K >= 0) sample ids;
                weights: Tensor[B, K+1] float32 (λ, then one β per partner), e.g. a
                PartnerTable's rows. Moved to the store's device when elsewhere.
            check: verify that the ids lie in [0, N) (one small reduction; on CUDA a device
                synchronisation). ``False`` for batches whose ids a PartnerTable already checked.
        Returns:
            Tensor[B, C] float32 on the store's device.
        """
        anchor_ids, partner_ids, weights = self._check_mix(anchor_ids, partner_ids, weights, check)
        return self._mix(anchor_ids, partner_ids, weights)

    @property
    def nbytes(self) -> int:
        """Bytes the store holds: its targets plus the given labels (N int64)."""
        return self._targets_nbytes() + self.labels.numel() * self.labels.element_size()

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
                e.g. softmax of the network's (unmixed) logits. A chunk of the pool at a time
                is fine (a streaming refresh): rows are independent.
            epoch: the current epoch; before ``start_epoch`` (and off the ``update_every``
                grid) nothing changes. The inputs are validated either way.
        """
        indices = self._check_indices(indices, "indices")
        if indices.numel() > 1 and torch.unique(indices).numel() != indices.numel():
            raise ValueError("indices must be distinct (one prediction per sample per update)")
        probabilities = self._check_probabilities(probabilities, indices.numel())
        if not self.is_update_epoch(epoch):
            return False
        step = chunk_rows(self.num_classes)
        for s in range(0, indices.numel(), step):
            self._update_rows(indices[s:s + step], probabilities[s:s + step])
        return True

    def set_rows(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite rows ``indices`` (Tensor[B] int64) with ``values`` (Tensor[B, C] floating,
        e.g. another process's :meth:`rows`), rounded once to the storage: how processes share
        the rows each of them corrected."""
        indices = self._check_indices(indices, "indices")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if tuple(values.shape) != (indices.numel(), self.num_classes) or not values.is_floating_point():
            raise ValueError(f"values: expected a floating tensor of shape ({indices.numel()}, {self.num_classes}), "
                             f"got {values.dtype} of shape {tuple(values.shape)}")
        values = values.detach().to(self.device)
        step = chunk_rows(self.num_classes)
        for s in range(0, indices.numel(), step):
            self._set_rows(indices[s:s + step], values[s:s + step])

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The store's state for torch.save. Like ``nn.Module.state_dict``, its tensors are the
        store's own (no copy: a copy of a 5 GB table at every checkpoint would double the
        memory); clone them to keep a snapshot while the store goes on updating."""
        return {"kind": self._kind(), **self._tensors_state(), "labels": self.labels,
                "num_classes": self.num_classes, "momentum": self.momentum, "start_epoch": self.start_epoch,
                "update_every": self.update_every}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; the store keeps its own dtypes and device.

        Everything is checked before anything changes: a corrupted state raises a ValueError or
        TypeError naming it and leaves the store as it was (an ``update_every`` of 0 would
        otherwise surface later as a ZeroDivisionError, NaN targets as a silently wrong training)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from {type(self).__name__}.state_dict(), got {type(state).__name__}")
        kind = state.get("kind", "dense")  # checkpoints from before the top-k store have no "kind"
        if kind != self._kind():
            raise ValueError(f"state['kind'] is {kind!r} but this store is {self._kind()!r} (storage "
                             f"{self.storage}); build the store with the storage the checkpoint was saved with")
        missing = (set(_STATE_KEYS) | set(self._tensor_keys())) - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for key in ("labels", *self._tensor_keys()):
            if not isinstance(state[key], torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(state[key]).__name__}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"state holds targets for {state['num_classes']!r} classes; this store has "
                             f"{self.num_classes}")
        labels = state["labels"]
        if tuple(labels.shape) != tuple(self.labels.shape):
            raise ValueError(f"state['labels'] has shape {tuple(labels.shape)}, expected {tuple(self.labels.shape)}")
        self._check_tensors_state(state)
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
        self._load_tensors_state(state)
        self.labels.copy_(labels)
        self.momentum = float(momentum)
        self.start_epoch = int(state["start_epoch"])
        self.update_every = int(state["update_every"])

    # ---------------------------------------------------------------- for the stores

    def _kind(self) -> str:
        raise NotImplementedError

    def _tensor_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _tensors_state(self) -> dict:
        raise NotImplementedError

    def _check_tensors_state(self, state: dict) -> None:
        raise NotImplementedError

    def _load_tensors_state(self, state: dict) -> None:
        raise NotImplementedError

    def _targets_nbytes(self) -> int:
        raise NotImplementedError

    def _dense_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, C) float32 of a chunk of rows."""
        raise NotImplementedError

    def _argmax_rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update_rows(self, ids: torch.Tensor, probabilities: torch.Tensor) -> None:
        raise NotImplementedError

    def _set_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def _mix(self, anchor_ids: torch.Tensor, partner_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- checks

    def _check_indices(self, indices: object, name: str) -> torch.Tensor:
        return check_sample_ids(indices, name, len(self), self.device, "the targets")

    def _check_mix(self, anchor_ids, partner_ids, weights, check: bool):
        for name, value in (("anchor_ids", anchor_ids), ("partner_ids", partner_ids), ("weights", weights)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if anchor_ids.ndim != 1 or anchor_ids.dtype != torch.int64:
            raise ValueError(f"anchor_ids must be a 1-D int64 tensor (B,), got {anchor_ids.dtype} of shape "
                             f"{tuple(anchor_ids.shape)}")
        batch = anchor_ids.shape[0]
        if partner_ids.ndim != 2 or partner_ids.dtype != torch.int64 or partner_ids.shape[0] != batch:
            raise ValueError(f"partner_ids must be an int64 tensor of shape ({batch}, K), got {partner_ids.dtype} "
                             f"of shape {tuple(partner_ids.shape)}")
        if tuple(weights.shape) != (batch, partner_ids.shape[1] + 1) or weights.dtype != torch.float32:
            raise ValueError(f"weights must be a float32 tensor of shape ({batch}, {partner_ids.shape[1] + 1}), "
                             f"got {weights.dtype} of shape {tuple(weights.shape)}")
        anchor_ids, partner_ids = anchor_ids.to(self.device), partner_ids.to(self.device)
        weights = weights.detach().to(self.device)
        if check:
            check_in_range(anchor_ids, "anchor_ids", len(self))
            check_in_range(partner_ids, "partner_ids", len(self))
        return anchor_ids, partner_ids, weights

    def _check_probabilities(self, probabilities: object, rows: int) -> torch.Tensor:
        """``probabilities`` detached, once checked (a chunk of rows at a time: no float32 copy
        of the whole). A softmax straight from the network requires grad, and the store must not
        keep every update's graph alive (nor hand a graph-carrying state_dict to torch.save)."""
        if not isinstance(probabilities, torch.Tensor):
            raise TypeError(f"probabilities must be a torch.Tensor, got {type(probabilities).__name__}")
        probabilities = probabilities.detach()
        if tuple(probabilities.shape) != (rows, self.num_classes) or not probabilities.is_floating_point():
            raise ValueError(f"probabilities must be a floating tensor of shape ({rows}, {self.num_classes}), "
                             f"got {probabilities.dtype} of shape {tuple(probabilities.shape)}")
        if probabilities.device != self.device:
            raise ValueError(f"probabilities is on {probabilities.device}, the targets on {self.device}")
        tolerance = 1e-2 if probabilities.dtype in (torch.float16, torch.bfloat16) else 1e-3
        step = chunk_rows(self.num_classes)
        for s in range(0, rows, step):
            block = probabilities[s:s + step]
            lo, hi = (float(v) for v in torch.aminmax(block))
            if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0):
                bad = (~(torch.isfinite(block) & (block >= 0))).nonzero()[0].tolist()
                raise ValueError(f"probabilities must be finite and >= 0; probabilities[{s + bad[0]}, {bad[1]}] = "
                                 f"{block[bad[0], bad[1]].item()}")
            error = (block.to(torch.float32).sum(dim=1) - 1.0).abs()
            worst = int(error.argmax())
            if float(error[worst]) > tolerance:
                raise ValueError(f"each row of probabilities must sum to 1 (within {tolerance}); row {s + worst} "
                                 f"sums to {float(block[worst].double().sum()):.6g}")
        return probabilities


def check_finite_non_negative(table: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` unless every entry of ``table`` (floating, any shape with rows
    first) is finite and >= 0; checked a chunk of rows at a time (no table-sized bool mask)."""
    if table.numel() == 0:
        return
    step = chunk_rows(table[0].numel())
    for s in range(0, table.shape[0], step):
        lo, hi = (float(v) for v in torch.aminmax(table[s:s + step]))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0):
            raise ValueError(f"{name} must be finite and >= 0 (soft targets are probabilities)")
