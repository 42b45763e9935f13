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


@torch.no_grad()
def forward_pass(model: torch.nn.Module, loader, ids: torch.Tensor, device: torch.device, *,
                 autocast_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                 progress=None, allow_missing: bool = False) -> ForwardPass:
    """Run ``model`` in eval mode over every batch of ``loader`` (an EvalLoader over the samples
    ``ids``, (P,) int64 sorted) and gather logits and penultimate features in the order of ``ids``.
    ``model`` may be :func:`mixnn_fast.train.models.inference_copy` of the training model, with
    ``memory_format`` the format its weights are in.  Samples the loader skipped (unreadable
    images with ``on_error="skip"``) are left out of the result when ``allow_missing``, else
    they are a RuntimeError."""
    was_training = model.training
    model.eval()
    logits_all: torch.Tensor | None = None
    features_all: torch.Tensor | None = None
    seen = torch.zeros(len(ids), dtype=torch.bool)
    for batch in loader:
        x, _ = batch.mix()
        with torch.inference_mode(), \
                torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, features = model(x.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                                     return_features=True)
        rows = torch.searchsorted(ids, batch.anchor_ids.cpu())
        if logits_all is None:
            logits_all = torch.zeros(len(ids), logits.shape[1])
            features_all = torch.zeros(len(ids), features.shape[1])
        logits_all[rows] = logits.float().cpu()
        features_all[rows] = features.float().cpu()
        seen[rows] = True
        batch.release()  # its buffers serve the next batches
        if progress is not None:
            progress.update(len(rows))
    model.train(was_training)
    if logits_all is None or (not allow_missing and not bool(seen.all())):
        missing = int((~seen).sum())
        raise RuntimeError(f"refresh: the evaluation pass did not cover {missing} of {len(ids)} samples "
                           "(skipped images?); the refresh needs every sample of the pool")
    if bool(seen.all()):
        return ForwardPass(logits=logits_all, features=features_all, ids=ids)
    return ForwardPass(logits=logits_all[seen], features=features_all[seen], ids=ids[seen])
