"""What the training and evaluation loaders share: an epoch plan through a DALI pipeline, or
through the host path, into a plain torch loop -- the pipeline's life cycle, the output
conversion, the buffers, the decoding failures.

Which path a loader runs (``loader.backend``, from ``LoaderOptions.backend``): image files
always go through DALI; in-memory arrays go through the host path on the CPU, and on a GPU
when DALI is not installed (:mod:`mixnn_fast.pipeline.host_batches`: NumPy, no DALI import,
the same batches bit for bit, several times faster on the CPU).

::

    options = LoaderOptions(mean=MEAN, std=STD)
    loader = MixNNLoader(description, 64, options, partners=table)   # a PartnerTable
    for epoch in range(first_epoch, epochs):             # (first_epoch, first_batch): from a checkpoint
        loader.set_epoch(epoch, start_batch=first_batch if epoch == first_epoch else 0)
        loader.set_partners(refreshed_table)             # after each refresh pass
        for batch in loader:                              # LoaderBatch
            x, y = batch.mix(targets)                     # (B, C, H, W), (B, classes): the table's weights
            loss = soft_cross_entropy(model(x), y)
            ...                                           # backward, optimiser step
            batch.release()                               # its buffers serve the next batches
            resume = (epoch, batch.position + 1)          # what a checkpoint records

Each batch decodes the plan's ids once (``batch.images`` (M, H, W, C)), gives every
decoded image its own augmentation, says where the anchors and partners are
(``anchor_slots`` (B,), ``partner_slots`` (B, K)) and carries their mixing weights
(``weights`` (B, K+1)); :meth:`LoaderBatch.mix <mixnn_fast.pipeline.batch.LoaderBatch.mix>`
hands them to the fused mixer.

Exact resume: an epoch's batches are a pure function of (seed, epoch, partners, anchors)
(the plan), and each decoded image's augmentation a pure function of (seed, epoch, the
batch's plan index, its slot in the batch): the windows, shifts and flips are drawn on the
host (:mod:`mixnn_fast.pipeline.augment_params`) and handed to DALI (or the host path) with
the images, never by DALI's own random operators, whose state would depend on the
pipeline's history.  So
``set_epoch(e, start_batch=s)`` on a new loader yields exactly batches ``s, s+1, ...`` of an
uninterrupted epoch ``e``, pixel for pixel, without reading or decoding the batches before
``s``; and rebuilding the pipeline (after a decoding failure or an abandoned epoch) changes
nothing.

How the batches stay aligned with their metadata (the feeder's FIFO) and what happens to
unreadable images: :mod:`mixnn_fast.pipeline.feeder`.  Who resizes the crops on the CPU:
:mod:`mixnn_fast.pipeline.host_resize`.  Where the copied batches live: the loader's
:class:`~mixnn_fast.pipeline.buffers.BufferPool` (``LoaderOptions.copy``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.mix.trusted import Normalisation, mix_batch_images
from mixnn_fast.pipeline import host_resize
from mixnn_fast.pipeline.batch import BatchContext, LoaderBatch
from mixnn_fast.pipeline.buffers import BufferPool
from mixnn_fast.pipeline.feeder import Feeder, ImageDecodeError, dali_reason, name_culprits
from mixnn_fast.pipeline.options import (LoaderOptions, check_channels, check_int, resolve_backend,
                                         resolve_device, resolve_resize_backend)
from mixnn_fast.pipeline.plan import EpochPlan, PlanBatch

__all__ = ["DaliLoader"]


class DaliLoader:
    """The machinery of :class:`~mixnn_fast.pipeline.MixNNLoader` and
    :class:`~mixnn_fast.pipeline.EvalLoader` (not used directly).

    Args:
        description: the data set (``paths`` of image files, or ``images`` in memory).
        batch_size: anchors per batch (>= 1).
        options: a :class:`~mixnn_fast.pipeline.options.LoaderOptions` (None: the defaults).
    """

    def __init__(self, description: DatasetDescription, batch_size: int, options: LoaderOptions | None = None):
        if not isinstance(description, DatasetDescription):
            raise TypeError(f"description: expected a DatasetDescription, got {type(description).__name__}")
        options = LoaderOptions() if options is None else options
        if not isinstance(options, LoaderOptions):
            raise TypeError(f"options: expected a LoaderOptions, got {type(options).__name__}")
        self.description = description
        self.batch_size = check_int(batch_size, "batch_size")
        self.options = options
        self.device, self.device_id = resolve_device(options)
        self.resize_backend = resolve_resize_backend(options.resize_backend, self.device)
        #: "host" or "dali": who augments and formats the batches (``LoaderOptions.backend``)
        self.backend = resolve_backend(options.backend, description.in_memory, self.device)
        channels = 3 if not description.in_memory else description.images.shape[3]
        check_channels(options, channels)
        in_pipe = options.normalize_in_pipeline
        self._pool = BufferPool(min_rows=self.batch_size) if self.device == "cpu" else None
        # made once per loader: what every batch shares (mix's normalisation, the pool), and
        # what the host path applies in the pipeline's stead
        mean, std = (None, None) if in_pipe else (options.mean, options.std)
        self._context = BatchContext(options.layout, mean, std, Normalisation(channels, mean, std), self._pool)
        self._pipe_norm = Normalisation(channels, options.mean, options.std) if in_pipe else None
        self._identity_norm = Normalisation(channels, None, None)  # the host paths' transposition alone
        self._feeder = Feeder(description, options.on_error)
        self._pipe = None
        self._pipe_batch = 0
        self._pipe_clean = False  # True when the pipeline ended its last epoch normally
        self._buffers: dict[str, torch.Tensor] = {}  # one reused buffer per use (copy=False, intermediates)
        self._view_size = options.size  # the side of host-resized views

    # --- public ---------------------------------------------------------------------------

    @property
    def on_error(self) -> str:
        return self._feeder.on_error

    @property
    def skipped(self) -> dict[int, str]:
        """Samples skipped so far (``on_error="skip"``): sample id -> reason."""
        return dict(self._feeder.skipped)

    @property
    def skipped_anchors(self) -> int:
        """Anchors dropped because their own image could not be decoded (an unreadable partner
        is replaced by the anchor itself, not counted here)."""
        return self._feeder.skipped_anchors

    def close(self) -> None:
        """Release the DALI pipeline (it is rebuilt on the next iteration) and the pool's free buffers."""
        self._pipe = None
        if self._pool is not None:
            self._pool.clear()

    # --- to be provided by subclasses ---------------------------------------------------------

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        """The plan the next iteration runs and the position in it to start from."""
        raise NotImplementedError

    def _pipeline(self) -> tuple[Callable, object]:
        """The ``@pipeline_def`` function and its view (``TrainView`` or ``EvalView``)."""
        raise NotImplementedError

    def _max_batch(self, plan: EpochPlan) -> int:
        raise NotImplementedError

    def _resize_outside(self) -> bool:
        """True when DALI stops before the resize and the loader resizes (see host_resize)."""
        return self.resize_backend == "torch" and not self.description.in_memory

    # --- machinery ------------------------------------------------------------------------

    def _build(self, max_batch: int):
        from mixnn_fast.pipeline.dali_pipelines import OutputFormat  # DALI is imported here, not before

        pipeline_fn, view = self._pipeline()
        o = self.options
        output = OutputFormat(o.mean if o.normalize_in_pipeline else None, o.std if o.normalize_in_pipeline else None,
                              o.layout[1:])
        pipe = pipeline_fn(self._feeder, view, output, encoded=not self.description.in_memory, device=self.device,
                           batch_size=max_batch, num_threads=o.num_threads, device_id=self.device_id,
                           # no operator of these pipelines draws from DALI's RNG (the training
                           # augmentations come from the feeder); a fixed seed all the same
                           seed=o.seed, prefetch_queue_depth=o.prefetch_queue_depth)
        pipe.build()
        self._pipe, self._pipe_batch = pipe, max_batch
        return pipe

    def _pipeline_for(self, plan: EpochPlan):
        max_batch = self._max_batch(plan)
        if self._pipe is not None and self._pipe_clean and max_batch <= self._pipe_batch:
            self._pipe.reset()  # the previous epoch ended with StopIteration: reusable
            self._pipe_clean = False
            return self._pipe
        self._pipe = None  # abandoned mid-epoch, or too small: start afresh
        return self._build(max_batch)

    def _to_torch(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A pipeline output as (a tensor, the pool buffer it is or None)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = output.as_tensor()
        if not self.options.copy:
            # A view of DALI's output buffer (DLPack, no copy): valid until the next batch.
            return torch.from_dlpack(dense), None
        if self.device == "gpu":  # torch's caching allocator recycles device memory already
            target = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=f"cuda:{self.device_id}")
            owned = None
        else:
            target = owned = self._pool.take(tuple(dense.shape()), to_torch_type[dense.dtype],
                                             capacity=self._pipe_batch)
        stream = torch.cuda.current_stream(target.device) if self.device == "gpu" else None
        feed_ndarray(dense, target, cuda_stream=stream)
        return target, owned

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                handed_out: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A host buffer for one batch, and the pool buffer it is (else None): with
        ``copy=True`` and when it is handed out, a pool buffer (batches can be kept); else one
        reused buffer (valid until the next batch, like DALI's own buffers)."""
        if self.options.copy and handed_out:
            buf = self._pool.take(shape, dtype, capacity=self._pipe_batch)
            return buf, buf
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < shape[0]:
            buf = self._buffers[name] = torch.empty((max(shape[0], self._pipe_batch),) + shape[1:], dtype=dtype)
        return buf[:shape[0]], None

    def _images(self, outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's outputs -> (the batch's images tensor, its pool buffer or None)."""
        if not self._resize_outside():
            return self._to_torch(outputs[0])
        windows = outputs[0]
        mirror = outputs[1].as_array() if len(outputs) > 1 else None
        m, size = len(windows), self._view_size
        resized, owned = self._buffer("resized", (m, size, size, 3), torch.uint8, handed_out=not self._formats())
        host_resize.resize_windows(windows, mirror, size, resized)
        return self._format(resized, owned)

    def _formats(self) -> bool:
        """True when uint8 NHWC images are not the batch yet: normalised in the "pipeline",
        or transposed to NCHW (what DALI's crop_mirror_normalize does on the DALI path)."""
        return self.options.normalize_in_pipeline or self.options.layout == "NCHW"

    def _format(self, images: torch.Tensor, owned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Host-made uint8 NHWC images -> the batch's images, as DALI's last step would give
        them: normalised and/or transposed by the fused mixer (K = 0, weight 1: one pass, exact
        for uint8), into a new buffer on the images' device; unchanged when nothing is to do."""
        if not self._formats():
            return images, owned
        o = self.options
        m, h, w, c = images.shape
        normalise = o.normalize_in_pipeline and (o.mean is not None or o.std is not None)
        dtype = torch.float32 if normalise else torch.uint8
        shape = (m, c, h, w) if o.layout == "NCHW" else (m, h, w, c)
        if images.is_cuda:
            out, owned = torch.empty(shape, dtype=dtype, device=images.device), None
        else:
            out, owned = self._buffer("final", shape, dtype)
        slots = torch.arange(m, device=images.device)
        mix_batch_images(images, slots, slots[:, None][:, :0], torch.ones(m, 1, device=images.device),
                         self._pipe_norm if normalise else self._identity_norm, in_layout="NHWC", out_layout=o.layout,
                         out_dtype=dtype, out=out, num_threads=host_resize.HOST_RESIZE_THREADS)
        return out, owned

    # --- the host path (in-memory images, no DALI: see mixnn_fast.pipeline.host_batches) ------

    def _host_images(self, batch: PlanBatch, params: tuple[np.ndarray, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's images made on the host: (the batch's images tensor, its pool buffer or None)."""
        raise NotImplementedError

    def _host_buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where the host path writes a batch's uint8 NHWC images: pinned memory on a GPU (the
        copy to the device then does not wait), else a pool buffer when it is the batch
        (``copy=True``) or one reused buffer (an intermediate, or ``copy=False``)."""
        if self.device == "gpu":
            # torch's pinned-memory allocator keeps the block until the non-blocking copy
            # that reads it has finished, so dropping it after the copy is safe
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True), None
        return self._buffer("host", shape, torch.uint8, handed_out=not self._formats())

    def _deliver(self, images: torch.Tensor, owned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Host-made uint8 NHWC images -> the batch's images on the loader's device, formatted."""
        if self.device == "gpu":
            images = images.to(f"cuda:{self.device_id}", non_blocking=True)  # once, uint8: 1/4 of float32
            owned = None
        return self._format(images, owned)

    def _host_iter(self, plan: EpochPlan, start: int) -> Iterator[LoaderBatch]:
        """The plan's batches from ``start``, made on the host.  The feeder serves them as it
        serves DALI (the same skipped samples, the same augmentation parameters), one at a
        time: no prefetching, so an abandoned epoch leaves nothing behind."""
        feeder = self._feeder
        feeder.start(plan, start)
        self._pipe_batch = self._max_batch(plan)  # the buffers' rows: every batch of the epoch fits
        while True:
            served = feeder.serve(gather=False)
            if served is None:
                return
            position, batch = feeder.served.popleft()
            images, owned = self._host_images(batch, served[1])
            yield self._make_batch(images, batch, position, owned)

    def _make_batch(self, images: torch.Tensor, batch: PlanBatch, position: int,
                    owned: torch.Tensor | None = None) -> LoaderBatch:
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids))
        anchors = torch.from_numpy(np.ascontiguousarray(batch.anchor_slots))
        partners = torch.from_numpy(np.ascontiguousarray(batch.partner_slots))
        weights = None if batch.weights is None else torch.from_numpy(np.ascontiguousarray(batch.weights))
        labels = torch.from_numpy(self.description.labels[batch.ids[batch.anchor_slots]])
        made = LoaderBatch(images=images, ids=ids, anchor_slots=anchors, partner_slots=partners, labels=labels,
                           index=batch.index, position=position, weights=weights, context=self._context)
        if owned is not None:
            made._adopt(owned)
        return made

    def _decode_failure(self, err: RuntimeError) -> None:
        """DALI failed a batch: name the files (raise) or mark them and rewind (skip)."""
        served = list(self._feeder.served)
        self._pipe = None  # a failed DALI pipeline is not reused
        if not served or self.description.in_memory:  # nothing to blame on a file
            raise err
        paths = self.description.paths
        culprits, reasons = name_culprits(served, paths, self.device, self.device_id)
        first_line = dali_reason(err)
        if not culprits:
            names = ", ".join(paths[s] for s in served[0][1].ids[:5].tolist())
            raise RuntimeError(f"DALI failed on batch {served[0][1].index} (files {names}, ...) and PIL decodes all "
                               f"of them; DALI said: {first_line}") from err
        if self.on_error == "raise":
            raise ImageDecodeError(f"cannot decode {'; '.join(reasons)} (DALI: {first_line}); pass "
                                   "on_error='skip' to skip undecodable samples and count them",
                                   [paths[s] for s in culprits]) from err
        self._feeder.skip(culprits, reasons)
        self._feeder.rewind(served[0][0])  # replay from the failed batch

    def __iter__(self) -> Iterator[LoaderBatch]:
        plan, start = self._epoch_plan()
        if start >= len(plan):
            return  # resumed at the end of the epoch (or an empty plan): nothing to decode
        if self.backend == "host":
            yield from self._host_iter(plan, start)
            return
        self._feeder.start(plan, start)
        pipe = self._pipeline_for(plan)
        finished = False
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    if self._feeder.error is not None:
                        error, self._feeder.error = self._feeder.error, None
                        self._pipe = None
                        raise error from None
                    finished = True
                    return
                except RuntimeError as err:
                    self._decode_failure(err)  # raises, or rewinds the feeder for a replay
                    pipe = self._build(self._pipe_batch or self._max_batch(plan))
                    continue
                position, batch = self._feeder.served.popleft()
                images, owned = self._images(outputs)
                yield self._make_batch(images, batch, position, owned)
        finally:
            # A pipeline left mid-epoch still holds prefetched batches: rebuild next time.
            self._pipe_clean = finished
            if not finished:
                self._pipe = None
