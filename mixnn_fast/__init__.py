"""mixnn_fast: learning from noisy labels with MixNN, fast.

The public names are imported lazily, so ``import mixnn_fast`` stays cheap and a
user who only wants the mixer does not pay for DALI or hnswlib.

Entry points:
    mix_images, mix_targets          the fused neighbour mixer (CPU: C++/OpenMP, CUDA kernel)
    clean_probability, GMM1D         per-sample clean probability by a 1-D two-component GMM
    nearest_neighbours, NeighbourIndex, recall_at_k
                                     K nearest other samples in feature space (hnswlib, exact, faiss)
    mixing_weights                   MixNN's λ/β weights (eq. 10-11) and the ablations
    SoftTargets                      label correction by exponential moving average (eq. 12)
    mixnn_fast.data, mixnn_fast.data.noise, mixnn_fast.pipeline
                                     dataset sources, label-noise simulation, epoch plans + DALI loader
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that spin-wait after each parallel region (libgomp's default) starve DALI's
# worker threads and torch's own threads when they share a few cores: a small training run
# took 26 s instead of 1.5 s on 2 cores.  Passive waiting fixes it; it takes effect only if
# set before the OpenMP runtime loads (i.e. before `import torch`), and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "mix_images": "mixnn_fast.mix.mixer",
    "mix_targets": "mixnn_fast.mix.mixer",
    "mix_images_reference": "mixnn_fast.mix.reference",
    "mix_targets_reference": "mixnn_fast.mix.reference",
    "clean_probability": "mixnn_fast.refresh.gmm",
    "GMM1D": "mixnn_fast.refresh.gmm",
    "nearest_neighbours": "mixnn_fast.refresh.neighbours",
    "NeighbourIndex": "mixnn_fast.refresh.neighbours",
    "recall_at_k": "mixnn_fast.refresh.neighbours",
    "mixing_weights": "mixnn_fast.refresh.weights",
    "SoftTargets": "mixnn_fast.refresh.targets",
}
_SUBMODULES = {"data", "refresh", "pipeline", "mix", "train", "app"}

__all__ = sorted(_LAZY) + ["build_info", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mixnn_fast.{name}")
    raise AttributeError(f"module 'mixnn_fast' has no attribute {name!r}")


def build_info() -> dict:
    """What the native extension was built with: ``{'native': bool, 'cuda_compiled': bool, 'openmp': int, ...}``."""
    from mixnn_fast._native import build_info as _build_info

    return _build_info()
