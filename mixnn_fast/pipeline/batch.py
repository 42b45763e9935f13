"""The batch a loader yields: decoded images, where the anchors and partners are, and their
mixing weights; :meth:`LoaderBatch.mix` turns it into the model's input.

Two ways to mix.  The batch's own weights (``batch.weights``, the plan's rows of a
:class:`~mixnn_fast.refresh.partners.PartnerTable`) were validated once, when the table was
built, and its slots come from the plan: :meth:`LoaderBatch.mix` without ``weights=`` hands
them to the trusted mixer (:mod:`mixnn_fast.mix.trusted`) with no per-batch validation and no
device synchronisation for it.  Weights passed explicitly (``mix(weights=...)``) come from the
caller and go through the validated public mixer (:func:`mixnn_fast.mix_images`).  Both run
the same kernel on the same inputs: the results are bit-identical.

Buffers: the images a loader copied or resized into its pool, and the outputs ``mix`` takes
from it, belong to the batch until :meth:`LoaderBatch.release`, which gives them back for the
next batches (see :mod:`mixnn_fast.pipeline.buffers`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from mixnn_fast.mix.trusted import Normalisation, mix_batch_images, mix_batch_targets
from mixnn_fast.pipeline.buffers import BufferPool

__all__ = ["LoaderBatch", "BatchContext"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
_TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BatchContext:
    """What every batch of one loader shares, made once per loader.

    Attributes:
        layout: "NHWC" or "NCHW", the layout of the batches' images.
        mean, std: the normalisation :meth:`LoaderBatch.mix` applies (None when the pipeline
            already normalised, or when no statistics were given).
        normalisation: ``mean``/``std`` as the kernel reads them (None: made from them on first use).
        pool: the loader's buffer pool (CPU loaders), where :meth:`LoaderBatch.mix` takes its
            outputs and :meth:`LoaderBatch.release` returns the batch's buffers; None: no pool.
    """

    layout: str = "NHWC"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalisation: Normalisation | None = field(default=None, compare=False)
    pool: BufferPool | None = field(default=None, compare=False)


_PLAIN = BatchContext()


@dataclass(eq=False)
class LoaderBatch:
    """One decoded batch.

    Attributes:
        images: (M, H, W, C) uint8 tensor (or float32, normalised, when the pipeline
            normalises; (M, C, H, W) with ``layout="NCHW"``), on the pipeline's device;
            every image augmented independently.  None once the batch is released.
        ids: (M,) int64 sample ids of ``images`` (CPU).
        anchor_slots: (B,) int64 positions of the anchors in ``images`` (CPU).
        partner_slots: (B, K) int64 positions of each anchor's partners (CPU; K = 0 for plain
            and evaluation batches).
        labels: (B,) int64 the anchors' given (possibly noisy) labels (CPU).
        index: the batch's index in its epoch plan (before sharding: the same batch has the
            same index on every shard).
        position: the batch's position in this shard's plan for the epoch (``len(loader)``
            batches, ``0..len(loader)-1``); ``set_epoch(epoch, start_batch=position + 1)``
            resumes right after it.
        weights: (B, K+1) float32 (CPU) each anchor's λ and partners' β, the rows of the
            loader's PartnerTable; None when the loader has no table.
        context: the loader's :class:`BatchContext` (layout, normalisation, pool); its
            ``layout``, ``mean`` and ``std`` are also the batch's attributes.
    """

    images: torch.Tensor | None
    ids: torch.Tensor
    anchor_slots: torch.Tensor
    partner_slots: torch.Tensor
    labels: torch.Tensor
    index: int
    position: int = 0
    weights: torch.Tensor | None = None
    context: BatchContext = field(default=_PLAIN, repr=False)
    # pool buffers this batch holds; not an init field, so a dataclasses.replace copy owns none
    _owned: list = field(default_factory=list, init=False, repr=False)
    _released: bool = field(default=False, init=False, repr=False)
    _normalisation: Normalisation | None = field(default=None, init=False, repr=False)

    @property
    def layout(self) -> str:
        """"NHWC" or "NCHW", the layout of ``images``."""
        return self.context.layout

    @property
    def mean(self) -> Sequence[float] | None:
        """The per-channel mean :meth:`mix` subtracts (None: none)."""
        return self.context.mean

    @property
    def std(self) -> Sequence[float] | None:
        """The per-channel std :meth:`mix` divides by (None: none)."""
        return self.context.std

    @property
    def pool(self) -> BufferPool | None:
        return self.context.pool

    @property
    def anchor_ids(self) -> torch.Tensor:
        """(B,) int64 sample ids of the anchors."""
        return self.ids[self.anchor_slots]

    @property
    def partner_ids(self) -> torch.Tensor:
        """(B, K) int64 sample ids of the partners."""
        return self.ids[self.partner_slots]

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    def __len__(self) -> int:
        return len(self.anchor_slots)

    def _adopt(self, buffer: torch.Tensor) -> None:
        """Make a buffer lent by ``pool`` this batch's: it goes back with :meth:`release`."""
        if self.pool is None:
            raise ValueError("buffer: this batch has no pool to give it back to")
        self._owned.append(buffer)

    def release(self) -> None:
        """Give the batch's buffers back to the loader's pool for the next batches.

        Call it when the batch is finished (after the optimiser step).  Afterwards ``images``
        is None, the outputs :meth:`mix` returned are emptied (zero elements), and :meth:`mix`
        raises; ``ids``, the slots, ``labels`` and ``weights`` stay readable.  Calling it again
        does nothing.  A batch never released keeps its buffers (they are freed with it).
        """
        if self._released:
            return
        self._released = True
        owned, self._owned = self._owned, []
        self.images = None
        for buffer in owned:
            self.pool.give_back(buffer)

    def mix(self, targets=None, *, weights=None, out_layout: str = "NCHW", out_dtype: torch.dtype = torch.float32,
            out: torch.Tensor | None = None, num_threads: int | None = None):
        """MixNN's synthetic batch from this batch's decoded images.

        Args:
            targets: optional (N, C) float32/float16/bfloat16 soft-target table of the whole
                data set, indexed by sample id.
            weights: None (default): the batch's own ``weights``, mixed through the trusted
                path (see the module docstring); a batch without weights must have K = 0 and
                is mixed with weight 1 (plain and evaluation batches: normalisation and layout
                only).  Or (B, K+1) float weights of your own, e.g.
                ``weight_table[batch.anchor_ids]``, validated by :func:`mixnn_fast.mix_images`.
            out_layout: "NCHW" (default) or "NHWC"; out_dtype: float32 (default), float16,
                bfloat16 or uint8.
            out: optional preallocated contiguous (B, C, H, W) output (for "NCHW").  Without
                it, CPU batches take one from the loader's pool (no page faults of a fresh
                ~38 MB tensor per 64×224×224 batch), returned by :meth:`release`.
            num_threads: the image mixer's OpenMP threads (default: torch's).

        Returns:
            (images (B, C, H, W) for "NCHW" in ``out_dtype``, mixed targets (B, C) float32 or
            None).

        Raises:
            RuntimeError: the batch was released.  ValueError / TypeError naming the argument
            for a wrong layout, dtype, ``out`` or ``targets`` table, or K > 0 without weights.
        """
        if self._released:
            raise RuntimeError(f"LoaderBatch.mix: batch {self.index} (position {self.position}) was released; "
                               "its buffers now serve other batches")
        if not isinstance(out_layout, str) or out_layout not in ("NCHW", "NHWC"):
            raise ValueError(f"out_layout: must be 'NHWC' or 'NCHW', got {out_layout!r}")
        if out_dtype not in _OUT_DTYPES:
            raise TypeError(f"out_dtype: must be torch.float32, float16, bfloat16 or uint8, got {out_dtype}")
        if weights is not None:
            out = self._output(out_layout, out_dtype) if out is None else out
            return self._mix_checked(targets, weights, out_layout, out_dtype, out, num_threads)
        plan_weights = self.weights
        if plan_weights is None:
            if self.partner_slots.shape[1]:
                raise ValueError(f"weights: this batch has {self.partner_slots.shape[1]} partners per anchor and no "
                                 "weights of its own (give the loader a PartnerTable, or pass weights=)")
            plan_weights = torch.ones(len(self), 1)
        if targets is not None:
            targets = self._check_targets(targets)
        device = self.images.device
        if out is None:
            out = self._output(out_layout, out_dtype)
        else:
            self._check_out(out, out_layout, out_dtype, device)
        normalisation = self._kernel_normalisation()
        images = mix_batch_images(self.images, self.anchor_slots.to(device), self.partner_slots.to(device),
                                  plan_weights.to(device, torch.float32), normalisation, in_layout=self.layout,
                                  out_layout=out_layout, out_dtype=out_dtype, out=out, num_threads=num_threads)
        if targets is None:
            return images, None
        t_dev = targets.device
        mixed = mix_batch_targets(targets, self.anchor_ids.to(t_dev), self.partner_ids.to(t_dev),
                                  plan_weights.to(t_dev, torch.float32))
        return images, mixed

    # --- helpers ----------------------------------------------------------------------------

    def _mix_checked(self, targets, weights, out_layout, out_dtype, out, num_threads):
        """Caller-given weights: the validated public mixer, as before the trusted path."""
        from mixnn_fast.mix.mixer import mix_images, mix_targets

        device = self.images.device
        weights = torch.as_tensor(weights, dtype=torch.float32)
        images = mix_images(self.images, self.anchor_slots.to(device), self.partner_slots.to(device),
                            weights.to(device), in_layout=self.layout, mean=self.mean, std=self.std,
                            out_layout=out_layout, out_dtype=out_dtype, out=out, num_threads=num_threads)
        if targets is None:
            return images, None
        targets = torch.as_tensor(targets)
        t_dev = targets.device
        # (B, C) is tiny: one thread.  Waking a second OpenMP thread on a busy CPU (DALI's
        # workers hold the cores) costs milliseconds, more than the whole computation.
        mixed = mix_targets(targets, self.anchor_ids.to(t_dev), self.partner_ids.to(t_dev), weights.to(t_dev),
                            num_threads=1)
        return images, mixed

    def _shape(self, out_layout: str) -> tuple[int, int, int, int]:
        if self.layout == "NHWC":
            h, w, c = self.images.shape[1:]
        else:
            c, h, w = self.images.shape[1:]
        return (len(self), c, h, w) if out_layout == "NCHW" else (len(self), h, w, c)

    def _output(self, out_layout: str, out_dtype: torch.dtype) -> torch.Tensor | None:
        """A pool buffer for the mixer's output (CPU batches of a loader), owned by the batch."""
        if self.pool is None or self.images.device.type != "cpu":
            return None
        out = self.pool.take(self._shape(out_layout), out_dtype)
        self._owned.append(out)
        return out

    def _check_out(self, out, out_layout: str, out_dtype: torch.dtype, device: torch.device) -> None:
        # metadata only (no data is read): the trusted kernel writes exactly this shape
        shape = self._shape(out_layout)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != device or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous {out_dtype} tensor of shape {shape} on {device}, got "
                             f"{out.dtype} of shape {tuple(out.shape)} on {out.device}")

    def _check_targets(self, targets) -> torch.Tensor:
        targets = torch.as_tensor(targets)
        if targets.ndim != 2:
            raise ValueError(f"targets: expected the (N, C) soft-target table of the data set, got shape "
                             f"{tuple(targets.shape)}")
        if targets.dtype not in _TARGET_DTYPES:
            raise TypeError(f"targets: dtype must be float32, float16 or bfloat16, got {targets.dtype}")
        largest = int(self.ids.max()) if len(self.ids) else -1  # host ids: no device is waited for
        if targets.shape[0] <= largest:
            raise ValueError(f"targets: the table has {targets.shape[0]} rows but this batch reads sample "
                             f"{largest}; pass the (N, C) table of the whole data set (weights are given as "
                             "mix(targets, weights=...))")
        return targets

    def _kernel_normalisation(self) -> Normalisation:
        if self.context.normalisation is not None:
            return self.context.normalisation
        if self._normalisation is None:  # a context without one (a batch built by hand): made once
            channels = self.images.shape[3] if self.layout == "NHWC" else self.images.shape[1]
            self._normalisation = Normalisation(channels, self.mean, self.std)
        return self._normalisation
