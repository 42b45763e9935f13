"""A test helper: the refresh's forward pass over the pool, replayed from given logits.

Stable helper (several test modules import it: ``from pool_streaming import stream``)."""
from __future__ import annotations

import torch

from mixnn_fast.refresh.pool_scores import PoolScores


def stream(ids, targets, given, *, epoch=0, logits, features=None, batch=7, **options) -> PoolScores:
    """``logits`` ((P, C) float32) and ``features`` ((P, D) float32; default (P, 1) zeros) of the
    samples ``ids`` fed to :class:`PoolScores` in shuffled batches of ``batch``, as the refresh's
    forward pass streams them; ``options`` go to PoolScores."""
    if features is None:
        features = torch.zeros(len(ids), 1)
    scores = PoolScores(ids, targets, given, epoch, **options)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(len(ids) + batch))
    for start in range(0, len(ids), batch):
        rows = order[start:start + batch]
        scores.add(ids[rows], logits[rows], features[rows])
    return scores
