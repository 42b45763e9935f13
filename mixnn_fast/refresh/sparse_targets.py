"""Top-k sparse soft targets: the k largest classes of each sample, for N x C too large to hold densely.

Full WebVision is 2.4M x 1000: 9.6 GB of float32 targets, 4.8 GB in float16. A label-corrected
target is concentrated on a few classes, so the store keeps, per sample, the ids of its k
largest classes (int32, (N, k)), their values (float16 by default, (N, k)) and the rest of the
mass (float32, (N,)), taken to be spread evenly over the other C - k classes: 196 bytes per
sample at k = 32, whatever C is (0.47 GB at 2.4M samples).

The update is the dense EMA on a chunk of rows, followed by a truncation:

1. the chunk's rows are expanded to dense (rows, C) float32: the kept values, and
   ``rest / (C - k)`` in every other class;
2. ``t <- momentum * t + (1 - momentum) * p`` in float32, as the dense store computes it;
3. the k largest entries are kept (ties at the k-th value: torch.topk's choice) and rounded
   once to the value dtype; what the other C - k classes hold is summed (float64) into ``rest``.

**The approximation:** the distribution of the mass outside the k largest classes is
forgotten at every update (it becomes uniform over those classes); the kept entries are the
dense EMA's own values, and every row still sums to 1. tests/test_sparse_targets.py measures
it against the dense float64 EMA on softmax outputs shaped like a network's (1000 classes,
k = 32, 20 updates, mean top-1 probability 0.19-0.65): per update, 1-3% of the mass (at most
5%) moves out of the kept classes into the even rest, no entry ends more than 0.008 from the
dense EMA, and the arg-max (the corrected label) agrees for every sample but near-ties (2 of
1,500 in the flattest case, where the two classes' dense values lie within that error).

Why not drop that mass and renormalise the kept entries to sum 1 (the simpler rule): the
rescaling hands the dropped mass to the largest entries, which early on is the given label,
so a wrong label decays more slowly than under the dense EMA. Measured on the same synthetic
outputs (top-1 probability ~0.36, 40% noise): labels corrected 69% against the dense EMA's
88%, arg-max agreement 81%, entries off by up to 0.42. The uniform rest costs 4 bytes a sample.
With k = C nothing is truncated and the store is the dense EMA, rounded to the value dtype.
"""
from __future__ import annotations

import torch

from mixnn_fast._checks import check_in_range
from mixnn_fast.refresh.target_store import TargetStore, check_finite_non_negative, chunk_rows

__all__ = ["TopKSoftTargets"]

_VALUE_DTYPES = (torch.float16, torch.float32)
# Rows of a loaded state must sum to 1 within this (float16 values: k roundings of 2**-11 each
# at most, and far less in practice).
_STATE_SUM_TOLERANCE = 2e-2


class TopKSoftTargets(TargetStore):
    """The k largest classes of each sample's soft target, initialised one-hot and corrected by EMA.

    Args: as :class:`~mixnn_fast.refresh.target_store.TargetStore`, plus
        k: classes kept per sample, 1 <= k <= num_classes (32 by :func:`soft_targets`).
        value_dtype: torch.float16 (default) or torch.float32 for the values.

    Attributes: ``indices`` (Tensor[N, k] int32 class ids, distinct within a row; int64 if
    C >= 2**31), ``values`` (Tensor[N, k] value_dtype, >= 0, largest first after an update)
    and ``rest`` (Tensor[N] float32 >= 0, the mass of the other C - k classes, each holding
    ``rest / (C - k)``); ``values`` plus ``rest`` sum to 1 per row up to rounding. There is no
    dense ``targets`` table: read rows with :meth:`rows`, mix them with :meth:`mix`.
    """

    storage = "topk"

    def __init__(self, labels: torch.Tensor, num_classes: int, *, k: int = 32, momentum: float = 0.9,
                 start_epoch: int = 60, update_every: int = 1, value_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None) -> None:
        super().__init__(labels, num_classes, momentum=momentum, start_epoch=start_epoch,
                         update_every=update_every, device=device)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
            raise ValueError(f"k (top_k) must be an int in [1, num_classes] = [1, {num_classes}], got {k!r}")
        if value_dtype not in _VALUE_DTYPES:
            raise TypeError(f"value_dtype must be one of {_VALUE_DTYPES}, got {value_dtype}")
        self.k = k
        index_dtype = torch.int32 if num_classes < 2 ** 31 else torch.int64
        n = self.labels.numel()
        # one-hot: the label first with value 1, then k - 1 other distinct classes with value 0
        offsets = torch.arange(k, device=self.device)
        self.indices = ((self.labels.unsqueeze(1) + offsets) % num_classes).to(index_dtype)
        self.values = torch.zeros((n, k), dtype=value_dtype, device=self.device)
        self.values[:, 0] = 1.0
        self.rest = torch.zeros(n, dtype=torch.float32, device=self.device)

    @property
    def targets(self) -> torch.Tensor:
        raise AttributeError("a TopKSoftTargets store holds no dense (N, C) table: read rows with rows(ids), "
                             "mix them with mix(...), or use a dense storage")

    @property
    def dtype(self) -> torch.dtype:
        """The values' dtype."""
        return self.values.dtype

    # ---------------------------------------------------------------- rows

    def _others(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, 1) float32: what each class outside a row's k holds, ``rest / (C - k)``."""
        others = max(1, self.num_classes - self.k)  # k = C: rest is 0 and stays 0
        return (self.rest[ids] / others).unsqueeze(1)

    def _dense_rows(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._others(ids).expand(ids.numel(), self.num_classes).contiguous()
        # the ids of a row are distinct, so each entry is written once: no order to depend on
        return out.scatter_(1, self.indices[ids].long(), self.values[ids].to(torch.float32))

    def _argmax_rows(self, ids: torch.Tensor) -> torch.Tensor:
        values, classes = self.values[ids].to(torch.float32), self.indices[ids].long()
        top = values.amax(dim=1, keepdim=True)
        # the lowest class among the largest values, as the dense store's argmax picks (the
        # even rest never exceeds the smallest kept value, up to the values' rounding)
        return torch.where(values == top, classes, self.num_classes).amin(dim=1)

    def _mix(self, anchor_ids: torch.Tensor, partner_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([anchor_ids.unsqueeze(1), partner_ids], dim=1)  # (B, K+1)
        others = torch.stack([self._others(ids[:, j]).squeeze(1) for j in range(ids.shape[1])], dim=1)
        # every class first gets the weighted even rests, then each term's kept classes their
        # difference from it; one term at a time, anchor first: within a term a row's classes
        # are distinct, so no two writes race and every run gives the same sums
        out = (weights * others).sum(dim=1, keepdim=True).expand(-1, self.num_classes).contiguous()
        for j in range(ids.shape[1]):
            rows = ids[:, j]
            kept = self.values[rows].to(torch.float32) - others[:, j:j + 1]
            out.scatter_add_(1, self.indices[rows].long(), kept * weights[:, j:j + 1])
        return out

    def _targets_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values, self.rest))

    # ---------------------------------------------------------------- updates

    def _keep_top(self, ids: torch.Tensor, dense: torch.Tensor) -> None:
        values, classes = dense.topk(self.k, dim=1)
        stored = values.to(self.values.dtype)
        # the rest: the row's total less what is kept (as stored), so that the row keeps its sum
        rest = dense.to(torch.float64).sum(dim=1) - stored.to(torch.float64).sum(dim=1)
        self.values[ids] = stored
        self.indices[ids] = classes.to(self.indices.dtype)
        self.rest[ids] = rest.clamp_min(0.0).to(torch.float32) if self.k < self.num_classes else 0.0

    def _update_rows(self, ids: torch.Tensor, probabilities: torch.Tensor) -> None:
        dense = self._dense_rows(ids)
        dense.mul_(self.momentum).add_(probabilities.to(torch.float32), alpha=1.0 - self.momentum)
        self._keep_top(ids, dense)

    def _set_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        # e.g. another top-k store's rows(): its k classes come back, the rest as its rest
        self._keep_top(ids, values.to(torch.float32))

    # ---------------------------------------------------------------- checkpoints

    def _kind(self) -> str:
        return "topk"

    def _tensor_keys(self) -> tuple[str, ...]:
        return ("indices", "values", "rest")

    def _tensors_state(self) -> dict:
        return {"indices": self.indices, "values": self.values, "rest": self.rest, "k": self.k}

    def _check_tensors_state(self, state: dict) -> None:
        indices, values, rest = state["indices"], state["values"], state["rest"]
        if state.get("k") != self.k:
            raise ValueError(f"state['k'] is {state.get('k')!r}; this store keeps k = {self.k}")
        expected = tuple(self.indices.shape)
        for key, value, shape in (("indices", indices, expected), ("values", values, expected),
                                  ("rest", rest, expected[:1])):
            if tuple(value.shape) != shape:
                raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, expected {shape}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"state['indices'] must be an integer tensor, got {indices.dtype}")
        for key, value in (("values", values), ("rest", rest)):
            if not value.is_floating_point():
                raise TypeError(f"state[{key!r}] must be floating, got {value.dtype}")
            check_finite_non_negative(value, f"state[{key!r}]")
        check_in_range(indices, "state['indices']", self.num_classes, "num_classes")
        step = chunk_rows(self.k * 8)
        for s in range(0, indices.shape[0], step):
            block = indices[s:s + step].sort(dim=1).values
            if bool((block[:, 1:] == block[:, :-1]).any()):
                raise ValueError("state['indices'] repeats a class within a row (each row's classes must be distinct)")
            total = values[s:s + step].to(torch.float64).sum(dim=1) + rest[s:s + step].to(torch.float64)
            error = (total - 1.0).abs()
            if error.numel() and float(error.max()) > _STATE_SUM_TOLERANCE:
                raise ValueError(f"state['values'] and state['rest'] must sum to 1 per row; row "
                                 f"{s + int(error.argmax())} is off by {float(error.max()):.3g}")

    def _load_tensors_state(self, state: dict) -> None:
        self.indices.copy_(state["indices"])
        self.values.copy_(state["values"])
        self.rest.copy_(state["rest"])
