"""The loaders one training run uses, built from its settings.

- ``plain``: the epoch's anchors in shuffled batches, for cross-entropy epochs and for in-batch
  mixup (its partner table is made from the plan: partners among the batch's own anchors);
- ``mix``: MixNN epochs, with the refresh's partner table (neighbour-coherent or naive plan),
  or with in-batch partners (the authors' code: ``partners="in_batch"``);
- ``pool``: the refresh's evaluation pass over the training set (no augmentation);
- ``test``: the test set.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mixnn_fast.data.clothing1m import balanced_subset
from mixnn_fast.pipeline import EvalLoader, LoaderOptions, MixNNLoader
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import RunData

EVAL_BATCH = 256  # forward passes without gradients: oneDNN's channels-last convolutions were ~20% slower per image at 512


@dataclass
class TrainingLoaders:
    plain: MixNNLoader
    mix: MixNNLoader | None
    pool: EvalLoader
    test: EvalLoader | None
    validation: EvalLoader | None
    eval_options: LoaderOptions
    eval_view: dict
    anchor_ids: Callable[[int], np.ndarray] | None  # the epoch's anchors (Clothing1M's draw), None: all

    def pool_loader(self, data: RunData, ids: np.ndarray | None) -> EvalLoader:
        """The refresh's pass over ``ids`` (None or every sample: the whole-set loader)."""
        if ids is None or len(ids) == len(data.train):
            return self.pool
        return EvalLoader(data.train, EVAL_BATCH, self.eval_options, ids=ids, **self.eval_view)

    def all(self) -> list:
        return [loader for loader in (self.plain, self.mix, self.pool, self.test, self.validation) if loader is not None]


def build_loaders(cfg: TrainConfig, data: RunData, *, threads: int, on_gpu: bool,
                  shard: tuple[int, int] = (0, 1)) -> TrainingLoaders:
    """Every loader of a run (nothing is decoded until one is iterated).  ``shard``: (this
    process's rank, the number of processes): each loader serves that share of every epoch's
    batches (training batches kept whole: a neighbour-coherent batch never straddles two)."""
    train, geometry = data.train, data.geometry
    common = dict(mean=geometry.mean, std=geometry.std, num_threads=threads, device="gpu" if on_gpu else "cpu",
                  on_error=cfg.on_error, shard_id=shard[0], num_shards=shard[1])
    if train.in_memory:
        augment = dict(size=geometry.size, pad=geometry.pad if cfg.augment else 0, flip=cfg.augment)
    else:  # files: always a random-resized crop (TrainConfig refuses augment=False)
        augment = dict(size=geometry.size)
    train_options = LoaderOptions(**common, **augment, seed=cfg.seed)
    anchor_ids = None
    if cfg.dataset == "clothing1m" and cfg.num_batches:
        @functools.lru_cache(maxsize=2)  # the loader and the refresh both ask for each epoch's draw
        def balanced_draw(epoch: int) -> np.ndarray:
            ids = balanced_subset(train, cfg.num_batches, cfg.batch_size, cfg.seed + epoch)
            ids.setflags(write=False)  # shared by its callers
            return ids
        anchor_ids = balanced_draw
    plain = MixNNLoader(train, cfg.batch_size, train_options, mode="plain", anchor_ids=anchor_ids)
    mix = None
    if cfg.refreshes:
        mode = "in_batch" if cfg.partners == "in_batch" else cfg.plan
        mix = MixNNLoader(train, cfg.batch_size, train_options, mode=mode, anchor_ids=anchor_ids)
    eval_options = LoaderOptions(**common)
    eval_view = {} if train.in_memory else dict(crop=geometry.size, resize=geometry.eval_resize)
    pool = EvalLoader(train, EVAL_BATCH, eval_options, **eval_view)
    test = EvalLoader(data.test, EVAL_BATCH, eval_options, **eval_view) if data.test is not None else None
    validation = EvalLoader(data.validation, EVAL_BATCH, eval_options, **eval_view) \
        if data.validation is not None else None
    return TrainingLoaders(plain=plain, mix=mix, pool=pool, test=test, validation=validation,
                           eval_options=eval_options,
                           eval_view=eval_view, anchor_ids=anchor_ids)


__all__ = ["TrainingLoaders", "build_loaders", "EVAL_BATCH"]
