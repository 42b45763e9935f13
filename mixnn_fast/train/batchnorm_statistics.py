"""The weight average's BatchNorm statistics recomputed on the training images (MixNN+'s
``plus_average_bn="recomputed"``, and its default "symmetric" where the noise looked symmetric).

Averaging BatchNorm's running statistics with the weights gives statistics that no model had:
each snapshot's were gathered on what it trained on (images mixed with their neighbours) and
belong to its own weights.  Stochastic weight averaging (Izmailov et al. 2018) recomputes them
for the averaged weights with one pass over the training images in training mode; torch's
``torch.optim.swa_utils.update_bn`` does that pass, and is used here rather than code of our own.
What this module adds is what update_bn cannot know: which images (the refresh's pass over the
pool: unmixed, unaugmented) and how the processes of a torchrun run, each with its own shard,
agree on one set of statistics."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.optim.swa_utils import update_bn

from mixnn_fast.train.distributed import Distributed


def pool_images(loader, device: torch.device, memory_format: torch.memory_format,
                counted: list[int]) -> Iterator[torch.Tensor]:
    """The images of ``loader`` (an EvalLoader over the pool), batch by batch, on ``device`` in
    ``memory_format``; appends each yielded batch's size to ``counted``.  A batch of one image is
    left out: BatchNorm cannot take training-mode statistics of one value per channel (a pool's
    last batch can be that small), and one image changes a mean over thousands by nothing."""
    for batch in loader:
        x, _ = batch.mix()
        if len(x) > 1:
            counted.append(len(x))
            yield x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        # only once the consumer asks for the next batch, which it does after its forward pass:
        # released, the batch's buffer (often the very tensor yielded) serves the next batches
        batch.release()


BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm_statistics(model: torch.nn.Module, loader, device: torch.device, *,
                                   memory_format: torch.memory_format = torch.contiguous_format,
                                   dist: Distributed | None = None) -> int:
    """Replace every BatchNorm layer's running mean and variance in ``model`` (in place) by
    ``update_bn``'s: the mean over ``loader``'s batches of each batch's mean and unbiased
    variance, in training mode, in float32 (no autocast: the statistics are sums over thousands of
    values).  Under torchrun (``dist`` enabled) each process passes its own shard and the
    statistics are then the mean over every process's batches (each process's mean weighted by
    its batch count), the same on every rank.  The model's mode and momenta are left as they were.

    Returns the number of images the statistics were taken over, over all processes.  A
    RuntimeError when no process had a batch of at least two images."""
    counted: list[int] = []
    update_bn(pool_images(loader, device, memory_format, counted), model)  # gives back the mode and momenta
    batches, images = float(len(counted)), float(sum(counted))
    if dist is not None and dist.enabled:
        layers = batchnorm_layers(model)
        # each rank's per-batch means, weighted by its batch count, summed over ranks; a rank that
        # had no batch contributes nothing (update_bn left it the reset statistics)
        for layer in layers:
            layer.running_mean.mul_(batches)
            layer.running_var.mul_(batches)
        dist.combine_rows(*(t for layer in layers for t in (layer.running_mean, layer.running_var,
                                                             layer.num_batches_tracked)))
        batches, images = dist.sum(batches, images)
        if batches:
            for layer in layers:
                layer.running_mean.div_(batches)
                layer.running_var.div_(batches)
    if not batches:
        raise RuntimeError("recomputing the weight average's BatchNorm statistics: the pool served no batch of "
                           "two or more images")
    return int(images)
