"""Forward passes without gradients over a whole loader: the refresh's pass over the pool, the
test set, the final predictions for the report."""
from __future__ import annotations

import torch

from mixnn_fast.refresh.forward import ForwardPass, forward_pass, model_outputs
from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.train.models import inference_copy
from mixnn_fast.train.progress import progress_bar


class Inference:
    """Runs the training model's current weights over loaders, on its device.

    Each pass uses :func:`~mixnn_fast.train.models.inference_copy` of the model: an eval-mode
    copy with BatchNorm folded into the convolutions, its weights in ``memory_format`` (on the
    CPU, about twice as fast as the training model in eval mode).  ``allow_missing``: samples
    a loader skipped (unreadable images with ``on_error="skip"``) are left out instead of being
    an error.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, autocast_dtype: torch.dtype | None,
                 memory_format: torch.memory_format, progress: bool, allow_missing: bool) -> None:
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.memory_format = memory_format
        self.progress = progress
        self.allow_missing = allow_missing

    def pass_over(self, loader, ids: torch.Tensor, desc: str) -> ForwardPass:
        """Logits and features of the samples ``ids`` ((P,) int64 sorted) that ``loader`` serves."""
        model = inference_copy(self.model, channels_last=self.memory_format == torch.channels_last)
        with progress_bar(len(ids), desc, self.progress) as bar:
            return forward_pass(model, loader, ids, self.device, autocast_dtype=self.autocast_dtype,
                                memory_format=self.memory_format, progress=bar, allow_missing=self.allow_missing)

    @torch.no_grad()
    def score_pool(self, loader, scores: PoolScores, desc: str) -> None:
        """Stream the model's outputs over ``loader`` (the refresh's pass over ``scores.ids``)
        into ``scores``: no (P, C) array is ever held."""
        model = inference_copy(self.model, channels_last=self.memory_format == torch.channels_last)
        with progress_bar(len(scores.ids), desc, self.progress) as bar:
            for ids, logits, features in model_outputs(model, loader, self.device, autocast_dtype=self.autocast_dtype,
                                                       memory_format=self.memory_format, progress=bar):
                scores.add(ids, logits, features)

    @torch.no_grad()
    def logits(self, loader, num_samples: int) -> torch.Tensor:
        """(N, C) float32 logits of every sample of ``loader``'s data set, in data-set order
        (NaN rows for samples that could not be read)."""
        outputs = self.pass_over(loader, torch.arange(num_samples), "evaluate")
        if len(outputs.ids) == num_samples:
            return outputs.logits
        # at least one column: a process that was served nothing still returns (N, 1) of NaN
        logits = torch.full((num_samples, max(outputs.logits.shape[1], 1)), float("nan"))
        if len(outputs.ids):
            logits[outputs.ids] = outputs.logits
        return logits
