"""The evaluation loader: every sample once, in data-set order, without augmentation (the
refresh's forward pass, the test set).

Its batches are plain (K = 0, no weights): ``batch.mix()`` normalises them and changes their
layout in one pass.  In-memory arrays skip DALI altogether on the host path
(``LoaderOptions.backend``; "auto": on the CPU, and on a GPU without DALI): the evaluation
view is then a slice of the array (its central window with ``crop``), the batch a view of the
array when its ids are consecutive and nothing is to be cut or formatted.  Why: on 28×28
images the pipeline round trip cost as much as the model's forward pass (bench/epoch.py).
"""
from __future__ import annotations

import numpy as np
import torch

from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.pipeline.host_batches import center_window
from mixnn_fast.pipeline.loader_base import DaliLoader
from mixnn_fast.pipeline.options import LoaderOptions, check_int
from mixnn_fast.pipeline.plan import EpochPlan, PlanBatch, plan_epoch

__all__ = ["EvalLoader"]


class EvalLoader(DaliLoader):
    """Evaluation batches in data-set order, no augmentation (the refresh pass).

    Args:
        description: the data set.
        batch_size: samples per batch.
        options: a :class:`~mixnn_fast.pipeline.options.LoaderOptions` (None: the defaults);
            its augmentation fields, ``seed`` and ``drop_last`` are not used.
        ids: restricts the pass to these samples (in the given order); None: all.
        crop, resize: the view.  Encoded images: shorter side resized to ``resize`` (default
            ``round(crop / 0.875)``), central ``crop`` window (default 224).  In-memory
            images: the central ``crop`` window, or unchanged when ``crop`` is None.

    Batches are plain (``partner_slots`` (B, 0), ``weights`` None); ``ids`` says which samples
    they hold (every sample once, minus skipped ones).  With several shards each process gets
    every ``num_shards``-th batch, unpadded.

    ``options.resize_backend`` (encoded images): "dali" resizes in the pipeline; "torch" has
    DALI decode only the central window the view shows (ROI decoding) and resizes it to
    (crop, crop) on the host, as :class:`~mixnn_fast.pipeline.MixNNLoader` does its random
    windows (within about a source pixel of alignment and rounding of the DALI view; CPU
    only, needs crop <= resize); "auto" (default) is "torch" on the CPU, "dali" on a GPU (and
    "dali" when crop > resize).
    """

    def __init__(self, description: DatasetDescription, batch_size: int, options: LoaderOptions | None = None, *,
                 ids=None, crop: int | None = None, resize: int | None = None):
        super().__init__(description, batch_size, options)
        if not description.in_memory and crop is None:
            crop = 224
        self.crop = None if crop is None else check_int(crop, "crop")
        if description.in_memory and self.crop is not None and self.crop > min(description.images.shape[1:3]):
            raise ValueError(f"crop: {crop} is larger than the images {description.images.shape[1:3]}")
        if resize is None and not description.in_memory:
            resize = int(round(self.crop / 0.875))
        self.resize = None if resize is None else check_int(resize, "resize")
        self.ids = None if ids is None else np.asarray(ids)
        if self._resize_outside() and self.crop > self.resize:
            if self.options.resize_backend == "torch":
                raise ValueError(f"resize_backend: 'torch' resizes the central window, which needs crop <= resize; "
                                 f"got crop={self.crop}, resize={self.resize}")
            self.resize_backend = "dali"
        self._view_size = self.crop  # the side of the host-resized views

    def make_plan(self) -> EpochPlan:
        """This shard's plan of the pass: plain batches, in the given order."""
        order = np.arange(len(self.description), dtype=np.int64) if self.ids is None else self.ids
        plan = plan_epoch(order, None, self.batch_size, mode="plain", shuffle=False,
                          num_samples=len(self.description))
        return plan.shard(self.options.shard_id, self.options.num_shards, pad=False)

    def _epoch_plan(self) -> tuple[EpochPlan, int]:
        return self.make_plan(), 0

    def __len__(self) -> int:
        return len(self.make_plan())

    def _max_batch(self, plan: EpochPlan) -> int:
        return self.batch_size

    def _pipeline(self):
        from mixnn_fast.pipeline.dali_pipelines import EvalView, eval_pipeline

        return eval_pipeline, EvalView(resize=self.resize, crop=self.crop, resize_outside=self._resize_outside())

    def _host_images(self, batch: PlanBatch, params: tuple[np.ndarray, ...]):
        """The batch's view of the in-memory array: ``images[batch.ids]``, its central ``crop``
        window (where DALI's ``fn.crop`` puts it), on the loader's device, formatted."""
        images = self.description.images
        ids = batch.ids
        if ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(np.diff(ids) == 1)):
            block = images[ids[0]:ids[-1] + 1]  # consecutive ids (the usual in-order pass): a view
        else:
            block = images[ids]
        if self.crop is not None:
            top, left = (center_window(size, self.crop) for size in images.shape[1:3])
            block = block[:, top:top + self.crop, left:left + self.crop]
        if self.device == "cpu" and not self._formats() and block.flags.c_contiguous and block.flags.writeable:
            return torch.from_numpy(block), None  # the batch is the array's own memory (or a fresh gather)
        buffer, owned = self._host_buffer(block.shape)
        buffer.numpy()[...] = block
        return self._deliver(buffer, owned)
