"""The training loader: each epoch's plan decoded and augmented by DALI (image files), or
augmented on the host (in-memory arrays), every batch carrying its anchors' partners and
mixing weights from one :class:`~mixnn_fast.refresh.partners.PartnerTable`.

Which path: ``LoaderOptions.backend`` ("auto": in-memory arrays on the host on the CPU, and on
a GPU when DALI is not installed; see :mod:`mixnn_fast.pipeline.host_batches`).  Both paths
apply the same host-drawn shifts and flips and give the same batches, bit for bit.

Where the table's weights go: the plan reads the table once per epoch and puts each anchor's
row beside its slots (:func:`~mixnn_fast.pipeline.plan.plan_epoch`); the rows follow their
anchors through the shuffling, the sharding and the skipping of unreadable images, and
:meth:`LoaderBatch.mix <mixnn_fast.pipeline.batch.LoaderBatch.mix>` hands them to the trusted
mixer.  Producers that choose partners inside each batch (``mixup_table``, ``in_batch_table``)
are given as a callable ``plan -> PartnerTable``: called once per epoch plan on the whole
(unsharded) plan, so every shard sees the same draws, and cached with it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline.augment_params import CropFlip, ShiftFlip
from mixnn_fast.pipeline.host_batches import ShiftFlipKernel
from mixnn_fast.pipeline.loader_base import DaliLoader
from mixnn_fast.pipeline.options import LoaderOptions, check_int
from mixnn_fast.pipeline.plan import MODES, EpochPlan, PlanBatch, plan_epoch

__all__ = ["MixNNLoader"]

_NEEDS_PARTNERS = ("coherent", "naive")


class MixNNLoader(DaliLoader):
    """Training batches of an epoch plan, decoded and augmented by DALI or (in-memory
    arrays) augmented on the host.

    Args:
        description: the data set (``paths`` of JPEG/PNG files, or ``images`` in memory).
        batch_size: anchors per batch.
        options: a :class:`~mixnn_fast.pipeline.options.LoaderOptions` (None: the defaults):
            augmentation, normalisation, output, device, sharding, error policy, seed.
        mode: the plan, "coherent" | "naive" | "plain" | "in_batch" (see
            :mod:`mixnn_fast.pipeline.plan`).
        partners: what :meth:`set_partners` takes: a PartnerTable, a callable ``plan ->
            PartnerTable`` (in-batch producers), or None.
        anchor_ids: the anchors of each epoch: None (all samples), an int array, or a
            callable ``epoch -> int array`` (e.g. Clothing1M's balanced draw).

    Iterating yields :class:`~mixnn_fast.pipeline.batch.LoaderBatch` es; each ``iter()`` runs the
    next epoch (or the one given to :meth:`set_epoch`, from the batch given there).
    ``len(loader)`` is the number of batches of that epoch's plan on this shard, whatever
    batch it starts from.
    """

    def __init__(self, description: DatasetDescription, batch_size: int, options: LoaderOptions | None = None, *,
                 mode: str = "coherent", partners=None, anchor_ids=None):
        super().__init__(description, batch_size, options)
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        self.mode = mode
        o = self.options
        self._feeder.augment = (ShiftFlip(o.pad, o.flip) if description.in_memory
                                else CropFlip(o.area, o.aspect_ratio, o.flip))
        self._feeder.seed = o.seed
        self._kernel = ShiftFlipKernel(o.pad) if self.backend == "host" else None
        self._anchor_ids = anchor_ids
        self._partners = None
        self._cached: tuple[int, EpochPlan] | None = None
        self.set_partners(partners)
        self.epoch = 0
        self.start_batch = 0  # where the next iteration starts in its plan
        self.plan: EpochPlan | None = None  # the current epoch's plan (this shard's batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next iteration runs, and the position in this shard's plan it
        starts from.

        The iteration then yields batches ``start_batch, ..., len(loader) - 1`` of
        ``epoch``'s plan, identical (images and augmentations, pixel for pixel) to those
        of an uninterrupted pass: resume with ``start_batch = batch.position + 1`` of the
        last batch consumed.  The batches before ``start_batch`` are neither read nor decoded.
        ``start_batch = len(loader)`` yields nothing (the epoch is complete).  The
        iteration after that starts at the beginning of ``epoch + 1``.

        Args:
            epoch: int >= 0 (plans are seeded by ``[seed, epoch]``).
            start_batch: int, 0 <= start_batch <= len(plan); the upper bound is checked
                when the iteration starts (the plan may still change: partners, anchors),
                with a ValueError naming ``start_batch``.
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
            raise ValueError(f"start_batch: must be an integer >= 0, got {start_batch!r}")
        self.epoch, self.start_batch = epoch, int(start_batch)

    def set_partners(self, partners) -> None:
        """Partners and weights for the next epochs (after each refresh).

        Args:
            partners: a :class:`~mixnn_fast.refresh.partners.PartnerTable` over this data set
                holding a row for every anchor the epochs will visit ("coherent"/"naive": K >= 1;
                "plain"/"in_batch": K = 0); or a callable ``plan -> PartnerTable`` choosing
                partners inside the plan's batches ("plain"/"in_batch" only, e.g.
                ``lambda plan: mixup_table(plan, n, seed=s, epoch=plan.epoch)``); or None
                (plain batches: no partners, no weights).

        Raises:
            TypeError: anything else (an (N, K) array: build a PartnerTable with its weights).
            ValueError: naming ``partners``, for a table of another data set or a K that does
                not suit the mode.
        """
        from mixnn_fast.refresh.partners import PartnerTable

        n = len(self.description)
        if isinstance(partners, PartnerTable):
            if partners.num_samples != n:
                raise ValueError(f"partners: the table covers {partners.num_samples} samples, the data set has {n}")
            k = partners.num_partners
            if self.mode in _NEEDS_PARTNERS and k < 1:
                raise ValueError(f"partners: mode {self.mode!r} needs a table with partners (K >= 1), got K = 0")
            if self.mode not in _NEEDS_PARTNERS and k:
                raise ValueError(f"partners: mode {self.mode!r} decodes no partners, got a table with K = {k}; "
                                 "give in-batch partners as a producer (a callable plan -> PartnerTable)")
        elif callable(partners):
            if self.mode in _NEEDS_PARTNERS:
                raise ValueError(f"partners: a producer (plan -> PartnerTable) picks partners inside the plan's "
                                 f"batches; use mode 'plain' or 'in_batch', not {self.mode!r}")
        elif partners is not None:
            raise TypeError(f"partners: expected a PartnerTable, a callable plan -> PartnerTable, or None, got "
                            f"{type(partners).__name__}")
        self._partners = partners
        self._cached = None

    def set_anchor_ids(self, anchor_ids) -> None:
        """Anchors of the next epochs: None (all), an int array, or ``epoch -> int array``."""
        self._anchor_ids = anchor_ids
        self._cached = None

    def _anchors(self, epoch: int) -> np.ndarray:
        ids = self._anchor_ids(epoch) if callable(self._anchor_ids) else self._anchor_ids
        return np.arange(len(self.description), dtype=np.int64) if ids is None else np.asarray(ids)

    def make_plan(self, epoch: int) -> EpochPlan:
        """This shard's plan for ``epoch`` (what iterating that epoch will load), with the
        partners' weights in it; the last one is cached until the partners or anchors change."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        producer = self._partners if callable(self._partners) else None
        o, n = self.options, len(self.description)
        plan = plan_epoch(self._anchors(epoch), None if producer else self._partners, self.batch_size, mode=self.mode,
                          seed=o.seed, epoch=epoch, num_samples=n, drop_last=o.drop_last)
        if producer is not None:
            plan = plan.with_partners(self._produce(producer, plan))
        # sharded after the table is attached: a batch's weights travel with it to its shard
        plan = plan.shard(o.shard_id, o.num_shards)
        self._cached = (epoch, plan)
        return plan

    def _produce(self, producer: Callable, plan: EpochPlan):
        from mixnn_fast.refresh.partners import PartnerTable

        table = producer(plan)
        if not isinstance(table, PartnerTable):
            raise TypeError(f"partners: the producer returned a {type(table).__name__}, expected a PartnerTable")
        if table.num_samples != len(self.description):
            raise ValueError(f"partners: the producer's table covers {table.num_samples} samples, the data set has "
                             f"{len(self.description)}")
        return table

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        plan = self.make_plan(self.epoch)
        start = self.start_batch
        if start > len(plan):
            raise ValueError(f"start_batch: {start} is past the end of epoch {self.epoch}, whose plan has "
                             f"{len(plan)} batches on this shard (0 <= start_batch <= {len(plan)})")
        self.plan = plan
        self.epoch += 1
        self.start_batch = 0
        return plan, start

    def __len__(self) -> int:
        """Batches in the next epoch's plan on this shard (computes the plan); counts the
        batches before ``start_batch`` too (the iteration yields ``len - start_batch``,
        fewer when ``on_error="skip"`` empties a batch)."""
        return len(self.make_plan(self.epoch))

    def _max_batch(self, plan: EpochPlan) -> int:
        k = plan.num_partners if self.mode in _NEEDS_PARTNERS else 0  # in-batch partners add no images
        return max(self.batch_size * (1 + k), plan.max_decoded)

    def _pipeline(self):
        from mixnn_fast.pipeline.dali_pipelines import TrainView, train_pipeline  # DALI is imported here

        o = self.options
        shape = tuple(self.description.images.shape[1:]) if self.description.in_memory else None
        return train_pipeline, TrainView(size=o.size, image_shape=shape, pad=o.pad, flip=o.flip,
                                         resize_outside=self._resize_outside())

    def _host_images(self, batch: PlanBatch, params: tuple[np.ndarray, ...]):
        """``images[batch.ids]`` shifted and flipped as DALI's graph would (``params``: the
        feeder's ShiftFlip draw: shifts (M, 2) if pad, flips (M,) if flip), into a host buffer,
        then on the loader's device, formatted."""
        o = self.options
        params = list(params)
        shifts = params.pop(0) if o.pad else None
        flips = params.pop(0) if o.flip else None
        images = self.description.images
        buffer, owned = self._host_buffer((len(batch.ids),) + images.shape[1:])
        self._kernel(images, batch.ids, shifts, flips, buffer.numpy())
        return self._deliver(buffer, owned)
