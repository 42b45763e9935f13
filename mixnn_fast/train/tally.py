"""One epoch's running totals: the loss summed over its images, and where the time went.

Time is split into **loader wait** (the training loop blocked on the next batch), **mix** (the
fused mixer) and **step** (forward, backward, optimiser).  On the CPU these are wall-clock
intervals.  On a GPU the mixer and the step only *enqueue* work, so their host intervals would
say nothing: each batch records CUDA events around them and the elapsed device times are read
once, at the end of the epoch.  The loader wait stays a host interval: it is the time the GPU's
queue was not being fed.

The loss is summed on the model's device in float64 (the same numbers as Python's float
arithmetic on the CPU), so a step does not wait for the device to report its loss; the sum is
read, and checked for NaN/inf, every step on the CPU and every ``SYNC_EVERY`` steps on a GPU
(a diverged run is stopped at most that many steps late).  With several processes the sums are
taken over all of them when read, so every process reports (and rank 0 checkpoints) the same.
"""
from __future__ import annotations

import time

import torch

#: steps between reads of the loss on a GPU (each read waits for the device)
SYNC_EVERY = 32


class EpochTally:
    """Loss and time totals of one epoch, resumable from a checkpoint's partial totals.

    Args:
        device: the model's device.
        dist: the run's :class:`~mixnn_fast.train.distributed.Distributed`.
        partial: the epoch's totals so far as :meth:`partial` returned them (from a checkpoint),
            or None for a fresh epoch.  They are the totals over all processes: rank 0 starts
            from them, the others from zero, so the sum over processes stays right.
    """

    def __init__(self, device: torch.device, dist, partial: dict | None = None) -> None:
        self.device = device
        self.dist = dist
        self.on_gpu = device.type == "cuda"
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        self._seen = 0
        self.seconds = {"train": 0.0, "loader_wait": 0.0, "mix": 0.0, "step": 0.0}
        if partial is not None and dist.is_main:
            self._loss += partial["loss_sum"]
            self._seen = int(partial["seen"])
        if partial is not None:
            self.seconds.update(partial["seconds"])
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] = []
        self._steps_since_read = 0

    # ---- timing ------------------------------------------------------------------------------

    def mark(self):
        """A point in time to measure the mixer and the step from: a host time, and on a GPU a
        recorded CUDA event."""
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add_batch(self, before_mix, after_mix, after_step, loss: torch.Tensor, size: int) -> None:
        """One step's marks (from :meth:`mark`) and its loss (a 0-d tensor) over ``size`` images."""
        if self.on_gpu:
            self._events.append((before_mix, after_mix, after_step))
        else:
            self.seconds["mix"] += after_mix - before_mix
            self.seconds["step"] += after_step - after_mix
        self._loss += loss.detach().double() * size
        self._seen += size
        self._steps_since_read += 1

    def _collect_events(self) -> None:
        if not self._events:
            return
        torch.cuda.synchronize(self.device)
        for before_mix, after_mix, after_step in self._events:
            self.seconds["mix"] += before_mix.elapsed_time(after_mix) / 1000.0
            self.seconds["step"] += after_mix.elapsed_time(after_step) / 1000.0
        self._events.clear()

    # ---- reading -----------------------------------------------------------------------------

    def due(self, last: bool = False) -> bool:
        """Whether the loss should be read now (every step on the CPU)."""
        return last or not self.on_gpu or self._steps_since_read >= SYNC_EVERY

    def local_loss(self) -> float:
        """This process's running mean loss (waits for the device); NaN/inf when it diverged."""
        self._steps_since_read = 0
        return float(self._loss) / max(self._seen, 1)

    def totals(self) -> tuple[float, int]:
        """(loss summed over the images, images) over all processes so far."""
        loss, seen = self.dist.sum(float(self._loss), float(self._seen))
        return loss, int(seen)

    def partial(self) -> dict:
        """The totals to checkpoint inside the epoch (identical on every process)."""
        self._collect_events()
        loss, seen = self.totals()
        return {"loss_sum": loss, "seen": seen, "seconds": dict(self.seconds)}

    def row(self) -> dict:
        """The epoch's metrics: train loss, images per second and the time split."""
        self._collect_events()
        loss, seen = self.totals()
        train = max(self.seconds["train"], 1e-9)
        return {"train_loss": loss / max(seen, 1), "train_seconds": self.seconds["train"],
                "images_per_second": seen / train, "loader_wait_seconds": self.seconds["loader_wait"],
                "mix_seconds": self.seconds["mix"], "step_seconds": self.seconds["step"],
                "loader_wait_fraction": self.seconds["loader_wait"] / train}
