"""Epoch plans and the loaders.

``plan_epoch`` (pure NumPy) decides which images each batch decodes, where anchors and
partners sit and, from a :class:`~mixnn_fast.refresh.partners.PartnerTable`, which weights
each anchor mixes with; the loaders feed those plans through DALI (image files; in-memory
arrays on a GPU with DALI installed) or through the host path (in-memory arrays on the CPU,
or wherever DALI is missing: ``LoaderOptions.backend``, see ``host_batches``) and yield
batches that :meth:`LoaderBatch.mix` turns into the model's input.  DALI is imported only
when a loader first runs a DALI pipeline: importing this package, building a loader, or
iterating one on the host path never imports it.

Modules, one job each: ``plan`` (what a plan is, ``plan_epoch``), ``plan_inputs`` (its
argument checks), ``plan_layout`` (its arithmetic), ``forest`` (the 1-NN forest),
``augment_params`` (augmentations drawn on the host), ``dali_pipelines`` (the DALI graphs),
``host_batches`` (the same augmentations applied with NumPy, for in-memory arrays),
``options`` (:class:`LoaderOptions`), ``feeder`` (serving plans to DALI or the host path,
the error policy), ``host_resize`` (resizing crops with torch on the CPU), ``buffers``
(:class:`BufferPool`), ``batch`` (:class:`LoaderBatch`), ``loader_base`` (the loaders'
shared machinery), ``mixnn_loader`` (:class:`MixNNLoader`), ``eval_loader`` (:class:`EvalLoader`).
"""
from __future__ import annotations

import importlib
from typing import Any

from mixnn_fast.pipeline.forest import functional_graph_components
from mixnn_fast.pipeline.plan import MODES, EpochPlan, PlanBatch, PlanStats, plan_epoch

_LAZY = {
    "MixNNLoader": "mixnn_fast.pipeline.mixnn_loader",
    "EvalLoader": "mixnn_fast.pipeline.eval_loader",
    "LoaderBatch": "mixnn_fast.pipeline.batch",
    "ImageDecodeError": "mixnn_fast.pipeline.feeder",
    "LoaderOptions": "mixnn_fast.pipeline.options",
    "BufferPool": "mixnn_fast.pipeline.buffers",
}

__all__ = ["MODES", "EpochPlan", "PlanBatch", "PlanStats", "functional_graph_components", "plan_epoch", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixnn_fast.pipeline' has no attribute {name!r}")
