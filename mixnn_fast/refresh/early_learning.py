"""Early-learning targets: each sample's running average of the model's predictions, for the
early-learning regularisation (ELR, Liu et al., NeurIPS 2020) that MixNN+ can add to its loss
(``--plus-elr``, :func:`mixnn_fast.train.losses.early_learning_penalty`).

ELR keeps ``t_i <- beta * t_i + (1 - beta) * p_i`` per sample, with ``p_i`` the prediction
clamped to [1e-4, 1 - 1e-4] and renormalised, and starts from ``t_i = 0`` (no pull at all
before the first prediction).  The authors update ``t_i`` at every visit of sample ``i`` with
the training-mode prediction of its (augmented) image; here an image is trained mixed with its
neighbours, so the update uses the refresh's prediction of the unmixed image, once per epoch:
the same cadence (each sample is visited once an epoch) from the prediction ELR+ also takes,
that of an unmixed image.

Why a store of its own rather than the soft-target store: that one starts from the given
labels (one-hot) and, under MixNN+'s selective correction, only the samples called noisy move,
whereas ELR averages every sample's predictions from zero.  It is dense float32 (N x C): the
option is meant for the data sets of the results table, not for WebVision's 2.4M x 1000, and a
store of more than ``MAX_ELEMENTS`` entries (1 GiB) is refused before anything is allocated.
The limit is a number, not the machine's free memory, so that a run valid on one machine is
valid on every other (as the soft-target store's "auto" rule, refresh/targets.py).
"""
from __future__ import annotations

import torch

#: ELR's clamp of the predictions before they enter the average (the authors' code)
CLAMP = 1e-4
#: the largest store (N·C entries, float32: 1 GiB) the option accepts
MAX_ELEMENTS = 1 << 28


class EarlyLearningTargets:
    """(N, C) float32 running averages of predictions, all zero until :meth:`update`.

    Args:
        num_samples: N; num_classes: C.
        beta: the weight the old average keeps at each update, in [0, 1).
    """

    def __init__(self, num_samples: int, num_classes: int, *, beta: float = 0.7) -> None:
        if num_samples < 0 or num_classes < 1:
            raise ValueError(f"need num_samples >= 0 and num_classes >= 1, got {num_samples}, {num_classes}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if num_samples * num_classes > MAX_ELEMENTS:
            raise ValueError(f"--plus-elr keeps a dense float32 average per sample and class: {num_samples:,} x "
                             f"{num_classes:,} = {num_samples * num_classes:,} entries "
                             f"({num_samples * num_classes * 4 / 2**30:.1f} GiB), over its limit of {MAX_ELEMENTS:,} "
                             "(1 GiB; meant for data sets the size of the results table's); run without --plus-elr, "
                             "or on a subset (--train-subset)")
        self.beta = float(beta)
        self.values = torch.zeros(num_samples, num_classes)

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def num_classes(self) -> int:
        return self.values.shape[1]

    def _check_ids(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"{name}: expected an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        ids = ids.cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"{name}: sample ids must lie in [0, {len(self)}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    def update(self, ids: torch.Tensor, probabilities: torch.Tensor) -> None:
        """``t[ids] <- beta t[ids] + (1 - beta) normalise(clamp(probabilities))``.

        Args:
            ids: (B,) int64 distinct sample ids in [0, N).
            probabilities: (B, C) floating, finite rows of a softmax.
        """
        ids = self._check_ids(ids, "ids")
        if ids.ndim != 1 or torch.unique(ids).numel() != ids.numel():
            raise ValueError("ids: expected distinct sample ids (B,)")
        if probabilities.shape != (ids.numel(), self.num_classes) or not probabilities.is_floating_point():
            raise ValueError(f"probabilities: expected floating ({ids.numel()}, {self.num_classes}), got "
                             f"{probabilities.dtype} {tuple(probabilities.shape)}")
        if not bool(torch.isfinite(probabilities).all()):
            raise ValueError("probabilities: contain NaN or inf")
        p = probabilities.detach().float().cpu().clamp(CLAMP, 1.0 - CLAMP)
        p = p / p.sum(dim=1, keepdim=True)
        self.values[ids] = self.beta * self.values[ids] + (1.0 - self.beta) * p

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 copies of rows ``ids`` ((B,) int64)."""
        return self.values[self._check_ids(ids, "ids")].clone()

    def set_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite rows ``ids`` ((B,) int64) with ``values`` ((B, C) floating): how processes share them."""
        ids = self._check_ids(ids, "ids")
        if values.shape != (ids.numel(), self.num_classes):
            raise ValueError(f"values: expected ({ids.numel()}, {self.num_classes}), got {tuple(values.shape)}")
        self.values[ids] = values.float().cpu()

    def mix(self, anchor_ids: torch.Tensor, partner_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``out[b] = weights[b, 0] t[anchor_ids[b]] + sum_k weights[b, k+1] t[partner_ids[b, k]]``: the
        averages mixed as the batch's images and labels are.

        Args:
            anchor_ids: (B,) int64; partner_ids: (B, K) int64, K >= 0; weights: (B, K+1) floating.
        Returns:
            (B, C) float32 on the CPU.
        """
        anchor_ids = self._check_ids(anchor_ids, "anchor_ids")
        partner_ids = self._check_ids(partner_ids, "partner_ids")
        b = anchor_ids.numel()
        if anchor_ids.ndim != 1 or partner_ids.ndim != 2 or partner_ids.shape[0] != b or \
                weights.shape != (b, partner_ids.shape[1] + 1):
            raise ValueError(f"expected anchor_ids (B,), partner_ids (B, K), weights (B, K+1); got "
                             f"{tuple(anchor_ids.shape)}, {tuple(partner_ids.shape)}, {tuple(weights.shape)}")
        ids = torch.cat([anchor_ids.unsqueeze(1), partner_ids], dim=1)  # (B, K+1)
        return (weights.float().cpu().unsqueeze(2) * self.values[ids]).sum(dim=1)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "values": self.values.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a store of the same N, C and beta (ValueError otherwise)."""
        values = state["values"]
        if not isinstance(values, torch.Tensor) or values.shape != self.values.shape or values.dtype != torch.float32:
            raise ValueError(f"early-learning targets: expected float32 {tuple(self.values.shape)}, got "
                             f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
        if state["beta"] != self.beta:
            raise ValueError(f"early-learning targets: saved with beta {state['beta']!r}, this run has {self.beta!r}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("early-learning targets: the saved values contain NaN or inf")
        self.values = values.clone()
