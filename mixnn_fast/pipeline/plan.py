"""Epoch plans: which images each batch decodes, and where its anchors and partners sit.

Pure NumPy (no DALI), vectorised: a million anchors plan in well under a second.

A plan is a list of batches.  Batch ``b`` holds

- ``ids`` (M_b,) int64: the sample ids to decode, each at most once per batch;
- ``anchor_slots`` (B_b,) int64: for each anchor, its position in ``ids``;
- ``partner_slots`` (B_b, K) int64: for each anchor's k-th partner, its position in ``ids``.

So ``ids[anchor_slots]`` are the anchors' sample ids and ``ids[partner_slots]`` their
partners' ids; the decoded batch ``images`` (M_b, H, W, C) feeds the mixer directly as
``mix_images(images, anchor_slots, partner_slots, weights)``.

Partners come from a :class:`~mixnn_fast.refresh.partners.PartnerTable` (partner ids and mixing
weights per anchor, validated once when it was built) or from a plain (N, K) id array.  With a
table, every batch also carries ``weights`` (B_b, K+1) float32, the table's rows of its anchors:
the weights travel with their anchors through the shuffling, the sharding and the skipping of
unreadable images, so the mixer can use them without checking them again.  Producers that pick
partners inside each batch (``mixup_table``, ``in_batch_table``) need the batches first: plan
without partners, then attach the table with :meth:`EpochPlan.with_partners`.

Modes
-----
``"coherent"`` (MixNN, the default)
    Anchors are grouped by the components of the **1-NN forest**: the graph with one
    edge ``i -> partners[i, 0]`` per anchor.  A component is a tree hanging off a
    cycle (a mutual pair when distances are distinct), or off a partner that is not an
    anchor this epoch.  Components are shuffled and laid end to end, and the sequence
    is cut every ``batch_size`` anchors, so most anchors find their partner already in
    the batch and every image is decoded once.  Partners that are not in the batch --
    a component cut by a batch boundary, a partner outside the anchor set, columns
    1..K-1 when K > 1 -- are appended to the batch's decode list, deduplicated.
    Why the 1-NN forest and not the K-NN graph's weakly connected components for K > 1:
    with two or more edges per node those components merge into a few giant ones, so
    grouping by them is no better than random order; the first neighbour's forest keeps
    components small and still co-locates the strongest partner.
``"naive"``
    The baseline: anchors in random order and every partner decoded again, no
    deduplication (M_b = B_b * (1 + K)).
``"plain"``
    No partners (K = 0): cross-entropy and mixup baselines.
``"in_batch"``
    The authors' code: plain shuffled batches of anchors (K = 0 partner slots).  The
    trainer searches each anchor's partner among the batch's own samples on the fly;
    the plan supplies only the batches (a partner array is ignored; an in-batch
    partner table is attached afterwards with :meth:`EpochPlan.with_partners`).

Batch policy
------------
``batch_size`` counts anchors.  Every batch has exactly ``batch_size`` anchors except
the last, which has the remainder; ``drop_last=True`` drops that partial batch (its
anchors, a different random set each epoch, are not visited).  Without ``drop_last``
every anchor appears exactly once per epoch.  The number of *decoded* images per batch
varies (``batch_size <= M_b <= batch_size * (1 + K)``).

Randomness
----------
Every random choice is drawn from ``np.random.default_rng([seed, epoch])``: the same
``(seed, epoch)`` reproduces a plan exactly, different epochs differ.  ``shuffle=False``
keeps the given anchor order (coherent mode: components in order of first appearance,
anchors in their given order within a component).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

import numpy as np

from mixnn_fast.pipeline.plan_inputs import MODES, NEEDS_PARTNERS, check_batch_size, rows_of, table_arrays, validate
from mixnn_fast.pipeline.plan_layout import (coherent_order, dedup_layout, in_batch_slots, offsets, ranges,
                                             stacked_layout)

if TYPE_CHECKING:  # the table lives in refresh/, which imports torch: only for annotations here
    from mixnn_fast.refresh.partners import PartnerTable

__all__ = ["MODES", "EpochPlan", "PlanBatch", "PlanStats", "plan_epoch"]


@dataclass(frozen=True)
class PlanBatch:
    """One batch of a plan (see the module docstring).

    Attributes:
        index: position of the batch in its epoch plan (before sharding).
        ids: (M_b,) int64 sample ids to decode.
        anchor_slots: (B_b,) int64 positions in ``ids`` of the anchors.
        partner_slots: (B_b, K) int64 positions in ``ids`` of each anchor's partners.
        weights: (B_b, K+1) float32 mixing weights of each anchor (λ, then one β per
            partner), the partner table's rows; None when the plan was made without a table.
    """

    index: int
    ids: np.ndarray
    anchor_slots: np.ndarray
    partner_slots: np.ndarray
    weights: np.ndarray | None = None

    @property
    def anchor_ids(self) -> np.ndarray:
        """(B_b,) int64 sample ids of the anchors."""
        return self.ids[self.anchor_slots]

    @property
    def partner_ids(self) -> np.ndarray:
        """(B_b, K) int64 sample ids of the partners."""
        return self.ids[self.partner_slots]

    def __len__(self) -> int:
        """Number of anchors."""
        return len(self.anchor_slots)


@dataclass(frozen=True)
class PlanStats:
    """What a plan costs.

    ``extra_decode_fraction`` = (decoded - anchors) / anchors: 0 for a plain plan, K for
    the naive plan, small for a coherent one.  ``partners_in_batch_fraction`` is the
    share of (anchor, partner) pairs whose partner is itself an anchor of the same batch
    (mixed in-batch at no decoding cost).  ``components``/``largest_component`` count
    anchors per 1-NN component (coherent mode only, else 0).
    """

    anchors: int
    decoded: int
    batches: int
    extra_decode_fraction: float
    partners_in_batch_fraction: float
    components: int = 0
    largest_component: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EpochPlan:
    """All batches of one epoch, stored flat (no per-batch Python objects until asked).

    Batch ``b`` is ``ids[id_offsets[b]:id_offsets[b+1]]`` with anchors
    ``anchor_offsets[b]:anchor_offsets[b+1]`` of ``anchor_slots`` (slots relative to the
    batch's own ``ids``) and the same rows of ``partner_slots`` (A, K) and ``weights`` (A, K+1).
    """

    mode: str
    batch_size: int
    num_partners: int
    seed: int
    epoch: int
    ids: np.ndarray  # (sum M_b,) int64
    id_offsets: np.ndarray  # (num_batches + 1,) int64
    anchor_slots: np.ndarray  # (A,) int64
    anchor_offsets: np.ndarray  # (num_batches + 1,) int64
    partner_slots: np.ndarray  # (A, K) int64
    batch_indices: np.ndarray  # (num_batches,) int64: index of each batch in the unsharded plan
    stats: PlanStats
    weights: np.ndarray | None = None  # (A, K+1) float32 from a PartnerTable, else None

    def __len__(self) -> int:
        return len(self.id_offsets) - 1

    def __getitem__(self, b: int) -> PlanBatch:
        if not -len(self) <= b < len(self):
            raise IndexError(f"batch {b} out of range for a plan of {len(self)} batches")
        b %= len(self)
        i0, i1 = self.id_offsets[b], self.id_offsets[b + 1]
        a0, a1 = self.anchor_offsets[b], self.anchor_offsets[b + 1]
        return PlanBatch(int(self.batch_indices[b]), self.ids[i0:i1], self.anchor_slots[a0:a1],
                         self.partner_slots[a0:a1], None if self.weights is None else self.weights[a0:a1])

    def __iter__(self) -> Iterator[PlanBatch]:
        for b in range(len(self)):
            yield self[b]

    @property
    def max_decoded(self) -> int:
        """Largest M_b: the batch size the decoding pipeline must accept."""
        return int(np.diff(self.id_offsets).max()) if len(self) else 0

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_slots)

    def anchor_ids(self) -> np.ndarray:
        """(A,) int64 every anchor's sample id, batch by batch."""
        base = np.repeat(self.id_offsets[:-1], np.diff(self.anchor_offsets))
        return self.ids[base + self.anchor_slots]

    def shard(self, shard_id: int, num_shards: int, *, pad: bool = True) -> "EpochPlan":
        """The batches of one process out of ``num_shards`` (multi-process training).

        Shard ``s`` takes batches ``s, s + num_shards, s + 2 num_shards, ...``.  With
        ``pad=True`` (default) every shard gets ``ceil(num_batches / num_shards)`` batches,
        the short ones wrapping round to the start of the plan (as torch's
        DistributedSampler pads), so all processes step the same number of times; with
        ``pad=False`` shards may differ by one batch.
        """
        if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
            raise ValueError(f"num_shards: must be an integer >= 1, got {num_shards!r}")
        if not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id: must be an integer in [0, {num_shards}), got {shard_id!r}")
        nb = len(self)
        if num_shards == 1:
            return self
        if pad and nb:
            per_shard = -(-nb // num_shards)
            chosen = (shard_id + num_shards * np.arange(per_shard)) % nb
        else:
            chosen = np.arange(shard_id, nb, num_shards)
        return self._select(chosen)

    def _select(self, chosen: np.ndarray) -> "EpochPlan":
        id_len = np.diff(self.id_offsets)[chosen]
        a_len = np.diff(self.anchor_offsets)[chosen]
        id_take = ranges(self.id_offsets[chosen], id_len)
        a_take = ranges(self.anchor_offsets[chosen], a_len)
        id_offsets, anchor_offsets = offsets(id_len), offsets(a_len)
        anchor_slots = self.anchor_slots[a_take]
        partner_slots = self.partner_slots[a_take]
        return replace(self, ids=self.ids[id_take], id_offsets=id_offsets, anchor_slots=anchor_slots,
                       anchor_offsets=anchor_offsets, partner_slots=partner_slots,
                       batch_indices=self.batch_indices[chosen],
                       weights=None if self.weights is None else self.weights[a_take],
                       stats=_stats(anchor_slots, partner_slots, id_offsets, anchor_offsets, self.stats.components,
                                    self.stats.largest_component))

    def with_partners(self, table: "PartnerTable") -> "EpochPlan":
        """This plan with the partners and weights of ``table``, for partners chosen inside
        each batch (plain and in-batch plans, and producers such as
        :func:`~mixnn_fast.refresh.partners.mixup_table` that take this plan's batches).

        Every anchor of the plan must have a row in ``table``, and each of its partners must
        be decoded in the anchor's own batch: the partner slots point there, nothing is added
        to the batches.  Returns a new plan whose ``partner_slots`` (A, K) and ``weights``
        (A, K+1) are the table's, K being the table's; ``stats`` follow.

        Raises:
            ValueError: naming ``table`` and the anchor, for an anchor without a row or a
                partner outside its anchor's batch; TypeError for something else than a table.
        """
        anchors, partners, weights, n = table_arrays(table, "table")
        a_counts = np.diff(self.anchor_offsets)
        batch_of_anchor = np.repeat(np.arange(len(self), dtype=np.int64), a_counts)
        anchor_ids = self.anchor_ids()
        if anchor_ids.size and int(anchor_ids.max()) >= n:
            raise ValueError(f"table: it covers {n} samples, but the plan has anchor {int(anchor_ids.max())}")
        rows = rows_of(anchors, n)[anchor_ids] if anchor_ids.size else np.zeros(0, dtype=np.int64)
        if (rows < 0).any():
            bad = int(np.flatnonzero(rows < 0)[0])
            batch = int(self.batch_indices[batch_of_anchor[bad]])
            raise ValueError(f"table: anchor {int(anchor_ids[bad])} (batch {batch}) has no row in the partner table")
        k = partners.shape[1]
        wanted = partners[rows]  # (A, K) partner ids
        partner_slots, found = in_batch_slots(self.ids, self.id_offsets, batch_of_anchor, wanted, n)
        if not found.all():
            a, j = (int(x[0]) for x in np.nonzero(~found))
            raise ValueError(f"table: partner {int(wanted[a, j])} of anchor {int(anchor_ids[a])} is not in the "
                             f"anchor's batch {int(self.batch_indices[batch_of_anchor[a]])}; with_partners attaches "
                             "in-batch partners only (plan_epoch places other partners)")
        return replace(self, num_partners=k, partner_slots=partner_slots, weights=weights[rows],
                       stats=_stats(self.anchor_slots, partner_slots, self.id_offsets, self.anchor_offsets,
                                    self.stats.components, self.stats.largest_component))


# ---------------------------------------------------------------------------------------------
# the plan


def plan_epoch(anchor_order, partners, batch_size: int, *, mode: str = "coherent", seed: int = 0,
               epoch: int = 0, num_samples: int | None = None, shuffle: bool = True,
               drop_last: bool = False) -> EpochPlan:
    """Plan one epoch's batches.

    Args:
        anchor_order: (N_anchor,) int64 distinct sample ids to visit as anchors this epoch
            (all ids, or a subset such as Clothing1M's class-balanced draw).  With
            ``shuffle=True`` its order does not matter.
        partners: a :class:`~mixnn_fast.refresh.partners.PartnerTable` holding a row for every
            anchor (then each batch carries its anchors' ``weights``), or an (N, K) int64 array,
            row i = sample i's partners (ids in [0, N); no weights), or None.  Partners need not
            be anchors.  Required for "coherent" and "naive"; for "plain" and "in_batch" an
            array is ignored and a table must have K = 0 (attach in-batch partners with
            :meth:`EpochPlan.with_partners`).
        batch_size: anchors per batch (>= 1).
        mode: "coherent" | "naive" | "plain" | "in_batch" (see the module docstring).
        seed, epoch: the plan's randomness is ``default_rng([seed, epoch])``.
        num_samples: N, the dataset size, when ``partners`` does not give it (for range checks).
        shuffle: randomise order (components, anchors); False keeps the given order.
        drop_last: drop the final batch if it has fewer than ``batch_size`` anchors.

    Returns:
        An :class:`EpochPlan`; ``plan.stats.extra_decode_fraction`` reports its cost.  The same
        arguments give the same plan whether the partners come as a table or as its array.

    Raises:
        ValueError: naming the argument, for a batch size < 1, an unknown mode, missing
            partners, ids out of range, repeated anchors, non-integer arrays, anchors without a
            row in the table.
    """
    batch_size = check_batch_size(batch_size)
    anchors, nbrs, rows, n = validate(anchor_order, partners, mode, num_samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch: must be a non-negative integer, got {epoch!r}")
    rng = np.random.default_rng([int(seed), int(epoch)])

    components = largest = 0
    if mode == "coherent":
        seq, components, largest = coherent_order(anchors, nbrs[:, 0], rng, shuffle)
    elif shuffle:
        seq = rng.permutation(anchors)
    else:
        seq = anchors.copy()

    if drop_last:
        seq = seq[: len(seq) // batch_size * batch_size]
    num_anchors = len(seq)
    num_batches = -(-num_anchors // batch_size)
    batch_of = np.arange(num_anchors, dtype=np.int64) // batch_size
    if mode == "coherent" and shuffle and num_anchors:
        # Shuffle anchors inside each batch: the cut keeps components together, this keeps
        # the order the network sees random.
        full = num_anchors // batch_size * batch_size
        seq = np.concatenate([rng.permuted(seq[:full].reshape(-1, batch_size), axis=1).ravel(),
                              rng.permutation(seq[full:])])

    k = nbrs.shape[1] if mode in NEEDS_PARTNERS else 0
    anchor_partners = nbrs[seq] if k else np.empty((num_anchors, 0), dtype=np.int64)
    a_counts = np.bincount(batch_of, minlength=num_batches)
    if mode == "coherent":
        ids, id_offsets, anchor_slots, partner_slots = dedup_layout(seq, anchor_partners, batch_of, num_batches, n)
    else:
        ids, id_offsets, anchor_slots, partner_slots = stacked_layout(seq, anchor_partners, batch_of, a_counts,
                                                                       batch_size)
    anchor_offsets = offsets(a_counts)
    stats = _stats(anchor_slots, partner_slots, id_offsets, anchor_offsets, components, largest)
    # the table's rows in plan order: each anchor's weights sit beside its slots from here on
    weights = None if rows is None else partners.weights.numpy()[rows[seq]]
    return EpochPlan(mode=mode, batch_size=batch_size, num_partners=k, seed=int(seed), epoch=int(epoch), ids=ids,
                     id_offsets=id_offsets, anchor_slots=anchor_slots, anchor_offsets=anchor_offsets,
                     partner_slots=partner_slots, batch_indices=np.arange(num_batches, dtype=np.int64), stats=stats,
                     weights=weights)


def _stats(anchor_slots, partner_slots, id_offsets, anchor_offsets, components=0, largest=0) -> PlanStats:
    num_anchors, num_decoded, num_batches = len(anchor_slots), int(id_offsets[-1]), len(id_offsets) - 1
    if partner_slots.size:
        # a partner is "in batch" when its slot is also some anchor's slot in the same batch
        base = np.repeat(id_offsets[:-1], np.diff(anchor_offsets))
        is_anchor_slot = np.zeros(num_decoded, dtype=bool)
        is_anchor_slot[base + anchor_slots] = True
        in_batch = float(is_anchor_slot[base[:, None] + partner_slots].mean())
    else:
        in_batch = 0.0
    extra = (num_decoded - num_anchors) / num_anchors if num_anchors else 0.0
    return PlanStats(anchors=num_anchors, decoded=num_decoded, batches=num_batches, extra_decode_fraction=extra,
                     partners_in_batch_fraction=in_batch, components=components, largest_component=largest)
