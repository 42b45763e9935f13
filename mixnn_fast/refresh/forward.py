"""The refresh's forward pass: the model in eval mode over the pool, without augmentation,
gathering each sample's logits and penultimate features."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardPass:
    """Per-sample outputs of the model: logits (P, C) float32 and features (P, D) float32, on the
    CPU, for the samples ``ids`` (P,) int64 sorted (the pool asked for, minus samples that could
    not be read when that is allowed)."""

    logits: torch.Tensor
    features: torch.Tensor
    ids: torch.Tensor | None = None  # None: every sample, in order


def model_outputs(model: torch.nn.Module, loader, device: torch.device, *,
                  autocast_dtype: torch.dtype | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format, progress=None):
    """Run ``model`` in eval mode over every batch of ``loader`` (an EvalLoader); yield each
    batch's ``(sample ids (B,) int64, logits (B, C) float32, features (B, D))`` on the CPU.

    ``model`` may be :func:`mixnn_fast.train.models.inference_copy` of the training model, with
    ``memory_format`` the format its weights are in."""
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            x, _ = batch.mix()
            with torch.inference_mode(), \
                    torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, features = model(x.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                                         return_features=True)
            ids = batch.anchor_ids.cpu()
            batch.release()  # its buffers serve the next batches
            if progress is not None:
                progress.update(len(ids))
            yield ids, logits.float().cpu(), features.cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def forward_pass(model: torch.nn.Module, loader, ids: torch.Tensor, device: torch.device, *,
                 autocast_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                 progress=None, allow_missing: bool = False) -> ForwardPass:
    """Logits and penultimate features of the samples ``ids`` ((P,) int64 sorted) that ``loader``
    serves, gathered in the order of ``ids`` (see :func:`model_outputs`).  Samples the loader
    skipped (unreadable images with ``on_error="skip"``) are left out of the result when
    ``allow_missing`` (a loader that served nothing gives (0, 0) logits and features), else they
    are a RuntimeError.  (The refresh streams instead:
    :class:`~mixnn_fast.refresh.pool_scores.PoolScores`.)"""
    logits_all: torch.Tensor | None = None
    features_all: torch.Tensor | None = None
    seen = torch.zeros(len(ids), dtype=torch.bool)
    for sample_ids, logits, features in model_outputs(model, loader, device, autocast_dtype=autocast_dtype,
                                                      memory_format=memory_format, progress=progress):
        rows = torch.searchsorted(ids, sample_ids)
        if logits_all is None:
            logits_all = torch.zeros(len(ids), logits.shape[1])
            features_all = torch.zeros(len(ids), features.shape[1])
        logits_all[rows] = logits
        features_all[rows] = features.float()
        seen[rows] = True
    if logits_all is None and allow_missing:  # nothing served: e.g. a process whose shard is empty
        return ForwardPass(logits=torch.zeros(0, 0), features=torch.zeros(0, 0), ids=ids[:0])
    if logits_all is None or (not allow_missing and not bool(seen.all())):
        missing = int((~seen).sum())
        raise RuntimeError(f"forward pass: the loader did not cover {missing} of {len(ids)} samples "
                           "(skipped images?)")
    if bool(seen.all()):
        return ForwardPass(logits=logits_all, features=features_all, ids=ids)
    return ForwardPass(logits=logits_all[seen], features=features_all[seen], ids=ids[seen])
