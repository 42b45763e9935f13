"""Epoch plans and the DALI loader.

``plan_epoch`` (pure NumPy) decides which images each batch decodes and where anchors
and partners sit; the loader feeds those plans through DALI and yields batches ready
for :func:`mixnn_fast.mix_images`.  DALI is imported only when a loader is built.
"""
from __future__ import annotations

import importlib
from typing import Any

from mixnn_fast.pipeline.forest import functional_graph_components
from mixnn_fast.pipeline.plan import MODES, EpochPlan, PlanBatch, PlanStats, plan_epoch

_LAZY = {
    "MixNNLoader": "mixnn_fast.pipeline.loader",
    "EvalLoader": "mixnn_fast.pipeline.loader",
    "LoaderBatch": "mixnn_fast.pipeline.loader",
    "ImageDecodeError": "mixnn_fast.pipeline.loader",
}

__all__ = ["MODES", "EpochPlan", "PlanBatch", "PlanStats", "functional_graph_components", "plan_epoch", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixnn_fast.pipeline' has no attribute {name!r}")
