"""Each sample's recent losses, for averaging before the GMM fit (the paper's setting at very
high noise: losses averaged over the last 5 epochs)."""
from __future__ import annotations

import torch

from mixnn_fast._checks import check_device, check_sample_ids
from mixnn_fast.refresh.gmm_numerics import check_finite, check_losses


class LossHistory:
    """Each sample's last ``window`` recorded losses, for averaging before the GMM fit.

    The authors average each sample's (min-max normalised) loss over the last 5 epochs
    at very high noise. Storage is an (N, window) ring buffer per sample, so samples
    seen in different epochs (per-epoch subsets, e.g. Clothing1M) each keep their own
    last ``window`` values.

    Args:
        num_samples: N >= 1.
        window: m >= 1, how many of each sample's most recent losses to keep.
        device, dtype: where and how the (N, m) store lives (floating dtype).
    """

    def __init__(self, num_samples: int, window: int = 5, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = check_device(device)
        self.num_samples, self.window = num_samples, window
        self.values = torch.zeros((num_samples, window), dtype=dtype, device=device)
        self.counts = torch.zeros(num_samples, dtype=torch.int64, device=device)  # records so far, capped at m
        self._next = torch.zeros(num_samples, dtype=torch.int64, device=device)  # ring position per sample

    def update(self, indices: torch.Tensor | None, losses: torch.Tensor) -> None:
        """Record ``losses`` (Tensor[B], finite) for samples ``indices`` (Tensor[B] int64, distinct,
        in [0, N)); with ``indices=None``, losses must be Tensor[N], one per sample in order."""
        losses = check_losses(losses, "losses")
        if losses.device != self.values.device:
            raise ValueError(f"losses is on {losses.device}, the history on {self.values.device}")
        check_finite(losses, "losses")
        if indices is None:
            if losses.numel() != self.num_samples:
                raise ValueError(f"without indices, losses must have N={self.num_samples} values, got {losses.numel()}")
            indices = torch.arange(self.num_samples, device=losses.device)
        else:
            indices = self._check_indices(indices, "indices")
            if indices.numel() != losses.numel():
                raise ValueError(f"indices has {indices.numel()} entries but losses has {losses.numel()}")
            if indices.numel() and int(torch.bincount(indices, minlength=1).max()) > 1:
                raise ValueError("indices must be distinct (one loss per sample per update)")
        slot = self._next[indices]
        self.values[indices, slot] = losses.to(self.values.dtype)
        self._next[indices] = (slot + 1) % self.window
        self.counts[indices] = torch.clamp(self.counts[indices] + 1, max=self.window)

    def mean(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of each sample's recorded losses (up to the last m), Tensor[N] or Tensor[B] for ``indices``.

        Raises ValueError if a requested sample has no recorded loss yet."""
        if indices is None:
            values, counts = self.values, self.counts
        else:
            indices = self._check_indices(indices, "indices")
            values, counts = self.values[indices], self.counts[indices]
        if counts.numel() and int(counts.min()) == 0:
            missing = (counts == 0).nonzero()[0, 0].item()
            raise ValueError(f"no loss recorded yet for sample {missing if indices is None else int(indices[missing])}")
        # unused slots hold 0, so summing all m slots and dividing by the count is exact
        return values.sum(dim=1) / counts.to(values.dtype)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone(), "next": self._next.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``. Everything is checked before anything is copied, so a
        corrupted state raises a ValueError/TypeError naming it and leaves the history as it was
        (an out-of-range ring position would otherwise fail later, inside ``update``)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from LossHistory.state_dict(), got {type(state).__name__}")
        for key, current in (("values", self.values), ("counts", self.counts), ("next", self._next)):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            floating = key == "values"
            if value.is_floating_point() != floating or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"state[{key!r}] must be {'floating' if floating else 'an integer tensor'}, "
                                f"got {value.dtype}")
        values, counts, ring = state["values"], state["counts"], state["next"]
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError("state['values'] holds NaN or infinity; the history only records finite losses")
        for key, value, upper in (("counts", counts, self.window + 1), ("next", ring, self.window)):
            if value.numel() and not (int(value.min()) >= 0 and int(value.max()) < upper):
                raise ValueError(f"state[{key!r}] must lie in [0, {upper}), got values in "
                                 f"[{int(value.min())}, {int(value.max())}]")
        self.values.copy_(values)
        self.counts.copy_(counts)
        self._next.copy_(ring)

    def _check_indices(self, indices: object, name: str) -> torch.Tensor:
        return check_sample_ids(indices, name, self.num_samples, self.values.device, "the history")
