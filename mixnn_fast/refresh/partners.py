"""The partner table: each anchor's partners and mixing weights, in one object.

Every way of choosing whom an anchor mixes with, and how much, ends in a :class:`PartnerTable`:
the GMM weights over nearest neighbours (the paper), the AVG and RDM ablations, random
partners, plain mixup, and the authors' in-batch neighbours.  The table is validated once,
when it is built (shapes, sample ids in range, weights finite, non-negative, rows summing to
1), so that the plan can carry it into every batch and the mixer can trust it: no batch is
checked again, and on a GPU no batch waits for a device-to-host copy to be checked.

Weight column 0 is the anchor's own λ; column k+1 is the weight of ``partners[:, k]``.  Keeping
both in one object is what guarantees that the weights stay with the partners they were computed
for.

In-batch producers (:func:`mixup_table`, :func:`in_batch_table`) choose partners among the
anchors of the same batch, so they need the epoch's plan first; they draw from
``np.random.default_rng([seed, epoch, batch index])``, so a batch's partners and weights do
not depend on what ran before it (a resumed run redraws exactly the same ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from mixnn_fast.refresh.weights import mixing_weights

__all__ = ["PartnerTable", "mixup_table", "in_batch_table"]

#: rows may miss 1 by this much (float32 weights from float64 ratios are within ~1e-7)
SUM_TOLERANCE = 1e-5
# a stream of its own in np.random.default_rng([seed, epoch, batch, stream]), apart from the
# loader's augmentation stream
_PARTNER_STREAM = 0x9A47


@dataclass(frozen=True)
class PartnerTable:
    """Partners and mixing weights of a set of anchors (build it with :meth:`build`).

    Attributes:
        anchors: (P,) int64 sorted, distinct sample ids of the anchors, on the CPU.
        partners: (P, K) int64 sample ids of each anchor's partners (K >= 0), on the CPU.
        weights: (P, K+1) float32: column 0 the anchor's λ, column k+1 the weight of
            ``partners[:, k]``; every row finite, >= 0, summing to 1.
        num_samples: N, the size of the data set the ids index.
    """

    anchors: torch.Tensor
    partners: torch.Tensor
    weights: torch.Tensor
    num_samples: int

    @staticmethod
    def build(anchors, partners, weights, num_samples: int) -> "PartnerTable":
        """Check the three arrays once and freeze them into a table.

        Args:
            anchors: (P,) integer sample ids, distinct, in [0, num_samples) (any order; the
                table sorts its rows by anchor).
            partners: (P, K) integer sample ids in [0, num_samples).
            weights: (P, K+1) floating: λ then one β per partner; finite, >= 0, rows sum to 1
                within 1e-5.
            num_samples: N >= 1.

        Raises ValueError / TypeError naming the argument otherwise.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples: must be an integer >= 1, got {num_samples!r}")
        anchors = _as_ids(anchors, "anchors", 1)
        partners = _as_ids(partners, "partners", 2)
        weights = torch.as_tensor(weights).detach().cpu()
        if not weights.is_floating_point() or weights.ndim != 2:
            raise TypeError(f"weights: expected a (P, K+1) floating tensor, got {weights.dtype} of shape "
                            f"{tuple(weights.shape)}")
        p, k = partners.shape
        if len(anchors) != p or tuple(weights.shape) != (p, k + 1):
            raise ValueError(f"anchors/partners/weights: expected shapes (P,), (P, K), (P, K+1); got "
                             f"{tuple(anchors.shape)}, {tuple(partners.shape)}, {tuple(weights.shape)}")
        for name, ids in (("anchors", anchors), ("partners", partners)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
                raise ValueError(f"{name}: sample ids must lie in [0, {num_samples}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        order = torch.argsort(anchors, stable=True)
        anchors, partners, weights = anchors[order], partners[order], weights[order].to(torch.float32)
        if p > 1 and bool((anchors[1:] == anchors[:-1]).any()):
            raise ValueError("anchors: each sample may be an anchor once")
        if p:
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("weights: must be finite and >= 0")
            error = (weights.double().sum(1) - 1).abs()
            if float(error.max()) > SUM_TOLERANCE:
                row = int(error.argmax())
                raise ValueError(f"weights: each row must sum to 1; the row of anchor {int(anchors[row])} sums to "
                                 f"{float(weights[row].double().sum()):.6g}")
        return PartnerTable(anchors.contiguous(), partners.contiguous(), weights.contiguous(), int(num_samples))

    @staticmethod
    def alone(anchors, num_samples: int) -> "PartnerTable":
        """Anchors without partners (K = 0, λ = 1): plain training."""
        anchors = _as_ids(anchors, "anchors", 1)
        return PartnerTable.build(anchors, torch.empty(len(anchors), 0, dtype=torch.int64),
                                  torch.ones(len(anchors), 1), num_samples)

    @staticmethod
    def itself(anchors, num_samples: int, k: int) -> "PartnerTable":
        """Anchors mixed with nothing but themselves: K partner slots holding the anchor, λ = 1
        (the rows a plan needs for anchors the refresh did not score, e.g. unreadable images)."""
        anchors = _as_ids(anchors, "anchors", 1)
        weights = torch.zeros(len(anchors), k + 1)
        weights[:, 0] = 1.0
        return PartnerTable.build(anchors, anchors.unsqueeze(1).repeat(1, k), weights, num_samples)

    @property
    def num_partners(self) -> int:
        """K."""
        return self.partners.shape[1]

    def __len__(self) -> int:
        return len(self.anchors)

    def rows(self, anchor_ids) -> np.ndarray:
        """(B,) int64 rows of the table holding ``anchor_ids`` (each must be an anchor)."""
        anchor_ids = np.asarray(anchor_ids, dtype=np.int64)
        anchors = self.anchors.numpy()
        rows = np.searchsorted(anchors, anchor_ids)
        if len(anchor_ids) and (rows.max(initial=0) >= len(anchors) or not np.array_equal(anchors[rows], anchor_ids)):
            missing = anchor_ids[(rows >= len(anchors)) | (anchors[np.minimum(rows, len(anchors) - 1)] != anchor_ids)]
            raise ValueError(f"anchor_ids: {missing[:5].tolist()} are not anchors of this table")
        return rows

    def partner_array(self) -> np.ndarray:
        """(N, K) int64 partners of every sample, the sample itself where it is not an anchor
        (the form the epoch plans read)."""
        table = np.repeat(np.arange(self.num_samples, dtype=np.int64)[:, None], self.num_partners, axis=1)
        table[self.anchors.numpy()] = self.partners.numpy()
        return table

    def covering_all(self, previous: "PartnerTable | None") -> "PartnerTable":
        """A row for every sample of the data set: this table's, then ``previous``'s for the
        anchors it lacks (per-epoch pools: samples outside this epoch's pool keep their last
        partners), then the sample mixed with itself (never scored: e.g. unreadable)."""
        if previous is None or previous.num_partners != self.num_partners:
            previous = PartnerTable.itself(torch.arange(self.num_samples), self.num_samples, self.num_partners)
        else:
            previous = previous.merged_into(PartnerTable.itself(torch.arange(self.num_samples), self.num_samples,
                                                                self.num_partners))
        return self.merged_into(previous)

    def merged_into(self, previous: "PartnerTable | None") -> "PartnerTable":
        """This table plus the rows of ``previous`` whose anchors it does not cover (per-epoch
        pools: samples outside this epoch's pool keep their last partners).  Same K required;
        otherwise this table alone."""
        if previous is None or previous.num_partners != self.num_partners or previous.num_samples != self.num_samples:
            return self
        keep = ~torch.isin(previous.anchors, self.anchors)
        if not bool(keep.any()):
            return self
        return PartnerTable.build(torch.cat([self.anchors, previous.anchors[keep]]),
                                  torch.cat([self.partners, previous.partners[keep]]),
                                  torch.cat([self.weights, previous.weights[keep]]), self.num_samples)


def _as_ids(values, name: str, ndim: int) -> torch.Tensor:
    ids = torch.as_tensor(values).detach().cpu()
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) or ids.ndim != ndim:
        shape = "(P,)" if ndim == 1 else "(P, K)"
        raise TypeError(f"{name}: expected a {shape} integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


def _batch_rng(seed: int, epoch: int, batch_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, batch_index, _PARTNER_STREAM])


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**63)))


def mixup_table(batches: Iterable, num_samples: int, *, alpha: float = 1.0, seed: int = 0,
                epoch: int = 0) -> PartnerTable:
    """Plain mixup inside each batch: every anchor gets one partner among the *other* anchors of
    its batch (a random derangement, so no sample is paired with itself), and each batch one
    ``λ ~ Beta(alpha, alpha)`` from :func:`mixing_weights`'s "mixup" mode.

    Args:
        batches: the epoch plan's batches (each with ``anchor_ids`` (B,) and ``index``).
        num_samples: N.
        alpha: the Beta concentration (1: λ uniform).
        seed, epoch: with each batch's index, seed that batch's draws.

    A batch of one anchor mixes it with itself (λ + β = 1 on the same image)."""
    anchors, partners, weights = [], [], []
    for batch in batches:
        ids = torch.as_tensor(np.asarray(batch.anchor_ids, dtype=np.int64))
        b = len(ids)
        if b == 0:
            continue
        rng = _batch_rng(seed, epoch, int(batch.index))
        local = torch.as_tensor(_derangement(b, rng)).unsqueeze(1)  # (B, 1) positions in the batch
        anchors.append(ids)
        partners.append(ids[local])
        # "mixup" mode reads only the shape of its clean probabilities: one λ for the whole batch
        weights.append(mixing_weights(torch.full((b,), 0.5), local, mode="mixup", alpha=alpha,
                                      generator=_torch_generator(rng)))
    return _concatenate(anchors, partners, weights, num_samples, k=1)


def in_batch_table(batches: Iterable, refreshed, num_samples: int, *, k: int = 1, mode: str = "gmm",
                   alpha: float = 1.0, seed: int = 0, epoch: int = 0) -> PartnerTable:
    """The authors' code's partners: each anchor's k nearest other anchors of the same batch, by
    exact Euclidean distance on the refresh's features, weighted by ``mode`` (eq. 10-11 for
    "gmm").

    Args:
        batches: the epoch plan's batches (``anchor_ids``, ``index``).
        refreshed: the refresh's scores of the pool (a
            :class:`~mixnn_fast.refresh.refresh.RefreshResult`): ``ids`` (P,) int64 sorted sample
            ids (every anchor among them), ``features`` (P, D) and ``clean_prob`` (P,) in that order.
        num_samples: N.
        k, mode, alpha: partners per anchor, weight mode ("gmm", "avg", "rdm"), RDM's alpha.
        seed, epoch: seed the "rdm" draws per batch.
    """
    anchors, partners, weights = [], [], []
    for batch in batches:
        ids = torch.as_tensor(np.asarray(batch.anchor_ids, dtype=np.int64))
        if len(ids) == 0:
            continue
        rows = torch.searchsorted(refreshed.ids, ids)
        local = in_batch_partners(refreshed.features[rows], k)  # (B, k) positions in the batch
        rng = _batch_rng(seed, epoch, int(batch.index))
        anchors.append(ids)
        partners.append(ids[local])
        weights.append(mixing_weights(refreshed.clean_prob[rows].float(), local, mode=mode, alpha=alpha,
                                      generator=_torch_generator(rng)))
    return _concatenate(anchors, partners, weights, num_samples, k=k)


def in_batch_partners(batch_features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The authors' code's partners: each anchor's k nearest other anchors of the same batch, by
    exact Euclidean search on their refresh features (B, D).  Returns (B, k) int64 positions in
    the batch; a batch of one anchor pairs it with itself."""
    b = len(batch_features)
    if b == 1:
        return torch.zeros(1, k, dtype=torch.int64)
    f = batch_features.double()
    # differences, not |a|² + |b|² − 2ab: the expanded form cancels, and which of two nearly tied
    # partners wins would then depend on the BLAS kernel and thread count
    distances = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    k_eff = min(k, b - 1)
    nearest = distances.topk(k_eff, largest=False).indices
    if k_eff < k:  # fewer other anchors than k: repeat the nearest ones
        nearest = nearest[:, torch.arange(k) % k_eff]
    return nearest


def _derangement(b: int, rng: np.random.Generator) -> np.ndarray:
    """(b,) a random permutation with no fixed point (b >= 2; b = 1 gives [0]): a random cyclic
    shift of a random order, i.e. a random single cycle — every anchor partners another."""
    if b == 1:
        return np.zeros(1, dtype=np.int64)
    order = rng.permutation(b)
    mate = np.empty(b, dtype=np.int64)
    mate[order] = order[np.roll(np.arange(b), -1)]
    return mate


def _concatenate(anchors, partners, weights, num_samples: int, *, k: int) -> PartnerTable:
    if not anchors:
        return PartnerTable.build(torch.empty(0, dtype=torch.int64), torch.empty(0, k, dtype=torch.int64),
                                  torch.empty(0, k + 1), num_samples)
    return PartnerTable.build(torch.cat(anchors), torch.cat(partners), torch.cat(weights), num_samples)
