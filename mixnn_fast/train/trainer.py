"""The MixNN trainer, and the baselines (CE, mixup, GCE, SCE) in the same loop and pipeline.

One epoch of MixNN after warm-up::

    refresh   forward pass over the pool → losses, features, predictions
              → clean probability (GMM) → partners + λ/β (a PartnerTable) → soft targets (EMA)
    plan      neighbour-coherent batches: partners decoded in their anchor's batch
    load      DALI decodes and augments each image once
    mix       fused kernel: x̃ = λ x_i + Σ β x_n (normalised, NCHW), ỹ = λ t_i + Σ β t_n
    step      soft cross-entropy, SGD, cosine annealing with warm restarts

Every epoch appends a row to ``metrics.jsonl``/``metrics.csv`` and saves ``checkpoint.pt``
(atomically; also every ``checkpoint_every_steps`` steps inside an epoch); ``Trainer(cfg,
resume=True)`` continues from it exactly: every piece of state is in the checkpoint
(train/state.py), and the loaders' augmentations and in-batch partners are a pure function of
(seed, epoch, batch), so a run killed at any moment and resumed writes the same
``metrics.jsonl`` as an uninterrupted one, timings aside (docs/resume.md).

Constructing a :class:`Trainer` validates everything (settings, data, checkpoint) and writes
nothing; :meth:`Trainer.fit` writes the run folder.
"""
from __future__ import annotations

import gc
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn

from mixnn_fast.mix.trusted import check_index_errors
from mixnn_fast.refresh.early_learning import EarlyLearningTargets
from mixnn_fast.refresh.gmm import clean_probability
from mixnn_fast.refresh.loss_history import LossHistory
from mixnn_fast.refresh.partners import in_batch_table, mixup_table
from mixnn_fast.refresh.pool_scores import PoolScores, features_dtype
from mixnn_fast.refresh.refresh import RefreshResult, refresh
from mixnn_fast.refresh.targets import soft_targets
from mixnn_fast.train.batchnorm_statistics import recompute_batchnorm_statistics
from mixnn_fast.train.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError, capture_rng, save_checkpoint
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import RunData, prepare_data
from mixnn_fast.train.devices import autocast_dtype, resolve_device
from mixnn_fast.train.distributed import init_distributed, share_pool_scores, share_refresh
from mixnn_fast.train.losses import class_balance_penalty, early_learning_penalty, one_hot
from mixnn_fast.train.correction_gates import (corrects_symmetric_finally, final_correction,
                                               final_symmetric_correction, plan_correction, record_refresh)
from mixnn_fast.train.methods import (averages_weights, corrects_labels, joins_average,
                                      loss_function, optimisation, phase_of, probes_warmup, refresh_options,
                                      recomputes_average_statistics, symmetric_share, uses_class_balance,
                                      uses_early_learning, warmup_ends)
from mixnn_fast.train.loaders import build_loaders
from mixnn_fast.train.metrics import MetricsLog, read_metrics
from mixnn_fast.train.inference import Inference
from mixnn_fast.train.models import build_model
from mixnn_fast.train.outcome import LabelRecord, probability_of_labels, summarise
from mixnn_fast.train.run_lock import lock_run_folder
from mixnn_fast.train.progress import epoch_line, progress_bar, progress_on_terminal
from mixnn_fast.train.tally import EpochTally
from mixnn_fast.train.state import RunState, checkpoint_state, read_resume_checkpoint, restore_checkpoint

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingDiverged", "CHECKPOINT", "PREVIOUS", "CheckpointError", "resolve_device"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Trainer:
    """Trains one configuration; ``fit()`` runs the remaining epochs and returns the summary.

    Args:
        cfg: the run's settings.
        data: the data sets (default: ``prepare_data(cfg)``).
        resume: continue from ``cfg.out_dir``'s checkpoint (a folder without one starts at
            epoch 0).  Only :data:`~mixnn_fast.train.config.RESUMABLE_FIELDS` may differ from the
            checkpoint's settings; any other difference is a ValueError naming the fields.
        resume_from_previous: resume from the checkpoint kept before the last one (when the last
            one is truncated or corrupt).
        overwrite: start afresh in a folder that already holds a run (without it, that is a
            ValueError: a forgotten ``--resume`` must not wipe a run).

    Construction validates everything and writes nothing; :meth:`fit` writes the run folder.
    """

    def __init__(self, cfg: TrainConfig, data: RunData | None = None, *, resume: bool = False,
                 resume_from_previous: bool = False, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.resume = bool(resume or resume_from_previous)
        state = read_resume_checkpoint(cfg, previous=resume_from_previous) if self.resume else None
        if not self.resume and not overwrite and self._holds_run():
            raise ValueError(f"out_dir: {self.out_dir} already holds a run; continue it with --resume (or "
                             "resume=True), or start again with --overwrite (overwrite=True), or choose another "
                             "--out-dir")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.threads = cfg.num_threads or torch.get_num_threads()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.dist = init_distributed(resolve_device(cfg.device))
        self.device = self.dist.device(resolve_device(cfg.device))
        self.autocast_dtype = autocast_dtype(cfg, self.device)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

        self.data = data or prepare_data(cfg)
        train = self.data.train
        self.num_samples = len(train)
        self.num_classes = train.num_classes
        self.given_labels = torch.from_numpy(train.labels)
        self.true_labels = None if train.clean_labels is None else torch.from_numpy(train.clean_labels)

        self.model = build_model(cfg.model, self.num_classes, self.data.geometry.in_channels,
                                 weights_path=cfg.weights_path, widths=cfg.model_widths).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer, self.scheduler = optimisation(cfg, self.model.parameters())
        self.targets = soft_targets(self.given_labels, self.num_classes, storage=cfg.targets_storage,
                                    momentum=cfg.correction_momentum, start_epoch=cfg.correction_start,
                                    update_every=cfg.correction_every)
        self.loss_history = LossHistory(self.num_samples, window=cfg.gmm_history) if cfg.gmm_history > 1 else None
        self.early_targets = EarlyLearningTargets(self.num_samples, self.num_classes, beta=cfg.elr_beta) \
            if uses_early_learning(cfg) else None
        # MixNN+ with plus_prior: the given labels' class shares (C,), which the penalty keeps the
        # batch's mean prediction near (label-free: a user has the given labels)
        self.class_prior = (torch.bincount(self.given_labels, minlength=self.num_classes).float()
                            / self.num_samples).to(self.device) if uses_class_balance(cfg) else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.loss_function = loss_function(cfg)
        self.loaders = build_loaders(cfg, self.data, threads=self.threads, on_gpu=self.device.type == "cuda",
                                     shard=(self.dist.rank, self.dist.world_size))
        # gradients averaged over the processes; forward passes without gradients use the module
        self.trained = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None) \
            if self.dist.enabled else self.model
        self.inference = self._inference_of(self.model)
        self.refresh_options = refresh_options(cfg, self.threads, self.device)
        # MixNN+ with plus_average_last: the average of the cycle-end weights and BatchNorm statistics
        # (torch's SWA container) is what is tested once it holds a snapshot; training, the refresh
        # and the label audit use the model itself
        # avg_fn given explicitly: without it, on CUDA torch averages each dtype group with foreach
        # kernels, and the integer group (BatchNorm's num_batches_tracked) fails there ("Integer
        # division with addcdiv is no longer supported", torch 2.11 on an H200).  The same SWA
        # mean, applied tensor by tensor, is what the CPU path does on every torch version.
        self.averaged = AveragedModel(self.model, use_buffers=True, avg_fn=get_swa_avg_fn()) \
            if averages_weights(cfg) else None
        self.averaged_inference = None if self.averaged is None else self._inference_of(self.averaged.module)

        self.metrics: MetricsLog | None = None  # opened by fit(): construction writes nothing
        self._lock = None  # the run folder's writer lock, held by fit()
        self.last_refresh: RefreshResult | None = None
        self.run = RunState()
        if state is not None:
            self.run = restore_checkpoint(state, self._modules(), self.generator, self.out_dir / CHECKPOINT,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
            log.info("resuming %s at epoch %d, batch %d", self.out_dir, self.run.epoch, self.run.batch)

    def _inference_of(self, model: torch.nn.Module) -> Inference:
        """Forward passes without gradients of ``model`` (the trained one or the weight average)."""
        return Inference(model, self.device, autocast_dtype=self.autocast_dtype, memory_format=self.memory_format,
                         progress=self.cfg.progress and self.dist.is_main,
                         allow_missing=self.cfg.on_error == "skip" or self.dist.enabled)

    @property
    def start_epoch(self) -> int:
        """The epoch the next step belongs to (the number of epochs finished, between epochs)."""
        return self.run.epoch

    # ---- the run folder --------------------------------------------------------------------

    def _modules(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "targets": self.targets, "loss_history": self.loss_history, "early_targets": self.early_targets,
                "averaged_model": self.averaged}

    def _holds_run(self) -> bool:
        return any((self.out_dir / name).exists() for name in (CHECKPOINT, PREVIOUS, "metrics.jsonl"))

    def _open_outputs(self) -> None:
        """Create the run folder, write ``config.yaml`` and open the metrics (first call of fit)."""
        if self.metrics is not None or not self.dist.is_main:  # rank 0 alone writes
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_run_folder(self.out_dir)  # before the first write: one writer per folder
        self.cfg.save_yaml(self.out_dir / "config.yaml")
        self.metrics = MetricsLog(self.out_dir, tensorboard=self.cfg.tensorboard, resume=self.resume)
        self.metrics.truncate(self.run.epoch)

    def save_checkpoint(self) -> Path | None:
        """Everything needed to continue exactly (train/state.py), written atomically by rank 0;
        the checkpoint it replaces is kept as ``checkpoint.prev.pt``."""
        if not self.dist.is_main:
            return None
        self.run.skipped = self.skipped()
        return save_checkpoint(self.out_dir, checkpoint_state(self.cfg.to_dict(), self.run, self._modules(),
                                                              self.generator))

    def _align_ranks(self) -> None:
        """At a point every process reaches together (an epoch's start or end): share the
        unreadable images found, and keep every rank's random states for the checkpoints."""
        if not self.dist.enabled:
            return
        for found in self.dist.gather_objects(self.skipped()):
            self.run.skipped.update(found)
        self.run.rank_rng = self.dist.gather_objects(capture_rng(self.generator))

    # ---- the schedule ----------------------------------------------------------------------

    def phase(self, epoch: int) -> str:
        """What epoch ``epoch`` trains with (:func:`~mixnn_fast.train.methods.phase_of`)."""
        return phase_of(self.cfg, epoch, self.run.warmup_end)

    # ---- one epoch -------------------------------------------------------------------------

    def skipped(self) -> dict[int, str]:
        """Every sample found unreadable so far (``on_error="skip"``): sample id -> reason."""
        found = dict(self.run.skipped)
        for loader in self.loaders.all():
            found.update(loader.skipped)
        return found

    def _pool_ids(self, epoch: int) -> torch.Tensor:
        """(P,) sorted sample ids the refresh covers: the epoch's anchors (Clothing1M's balanced
        draw) or every sample, minus samples already found unreadable."""
        if self.loaders.anchor_ids is None:
            pool = torch.arange(self.num_samples)
        else:
            pool = torch.from_numpy(np.sort(np.asarray(self.loaders.anchor_ids(epoch), dtype=np.int64)))
        skipped = self.skipped()
        if skipped:
            pool = pool[~torch.isin(pool, torch.tensor(sorted(skipped), dtype=torch.int64))]
        return pool

    def run_refresh(self, epoch: int) -> dict:
        """The refresh before a MixNN epoch: sets the epoch's partner table; returns its metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        pool = self._pool_ids(epoch)
        loader = self.loaders.pool_loader(self.data, pool.numpy())
        plan = plan_correction(cfg, self.run, pool, self.num_samples, updates=self.targets.is_update_epoch(epoch))
        scores = PoolScores(pool, self.targets, self.given_labels, epoch, gmm_loss=cfg.gmm_loss,
                            correct=corrects_labels(cfg), correct_only=plan.only, min_confidence=plan.min_confidence,
                            running=self.early_targets,
                            features_dtype=features_dtype(cfg.features_dtype, len(pool)))
        self.inference.score_pool(loader, scores, f"refresh {epoch}")
        forward_seconds = time.perf_counter() - start
        shared = time.perf_counter()
        share_pool_scores(self.dist, scores, self.targets, self.model.feature_dim)  # every rank: every row
        share_seconds = time.perf_counter() - shared
        self.run.skipped.update(loader.skipped)
        scores = scores.covered(allow_missing=cfg.on_error == "skip")
        result = None
        if self.dist.is_main:  # rank 0 computes, the others receive (train/distributed.py says why)
            result = refresh(scores, self.refresh_options, loss_history=self.loss_history, generator=self.generator,
                             true_labels=self.true_labels)
        shared = time.perf_counter()
        result = share_refresh(self.dist, result, scores)
        share_seconds += time.perf_counter() - shared  # on rank 0: sending, not waiting
        self.last_refresh = result
        gate_row = record_refresh(cfg, self.run, plan, result, scores, self.dist, self.num_samples, epoch)
        if result.table is not None:
            self.run.table = result.table.covering_all(self.run.table)
        else:  # in-batch partners: nearest anchors of the same batch, on this refresh's features
            self.loaders.mix.set_partners(None)  # the epoch's plain plan, before partners are attached
            self.run.table = in_batch_table(self.loaders.mix.make_plan(epoch), result, self.num_samples,
                                            k=cfg.num_neighbours, mode=cfg.weights, alpha=cfg.rdm_alpha,
                                            seed=cfg.seed, epoch=epoch)
        row = {"refresh_seconds": time.perf_counter() - start, "refresh_forward_seconds": forward_seconds,
               "refresh_gmm_seconds": result.seconds.get("gmm"),
               "refresh_neighbour_seconds": result.seconds.get("neighbours"), **result.stats, **gate_row}
        if self.dist.enabled:
            row["refresh_share_seconds"] = share_seconds
        if self.true_labels is not None:
            row["correction_accuracy"] = self.targets.correction_accuracy(self.true_labels)
        return row

    def _start_epoch(self, epoch: int):
        """The loader of ``epoch`` with its partners set, the epoch's partial state (a fresh one,
        or the checkpoint's when resuming inside the epoch; its row names the epoch's phase) and
        the batch it starts from."""
        if self.run.partial is not None and self.run.partial["row"]["epoch"] == epoch:
            partial, start_batch = self.run.partial, self.run.batch  # refresh and table come from the checkpoint
            phase = partial["row"]["phase"]
        else:
            phase = self.phase(epoch)
            row = {"epoch": epoch, "phase": phase}
            if probes_warmup(self.cfg, epoch, self.run.warmup_end):
                row.update(self.run_refresh(epoch))  # its separation is logged whether it ends the warm-up or not
                if warmup_ends(self.cfg, epoch, row["gmm_separation"]):
                    self.run.warmup_end = epoch
                    phase = row["phase"] = "mixnn"
                else:
                    self.run.table = None
            elif phase == "mixnn":
                row.update(self.run_refresh(epoch))
            elif phase == "mixup":
                self.loaders.plain.set_partners(None)  # the epoch's plain plan, before partners are attached
                self.run.table = mixup_table(self.loaders.plain.make_plan(epoch), self.num_samples,
                                             alpha=self.cfg.mixup_alpha, seed=self.cfg.seed, epoch=epoch)
            else:
                self.run.table = None
            partial = {"row": row}
            start_batch = 0
        loader = self.loaders.mix if phase == "mixnn" else self.loaders.plain
        table = self.run.table if phase != "plain" else None
        if table is not None and loader.mode in ("plain", "in_batch"):
            # partners chosen inside this epoch's batches: handed over as the plan's producer
            loader.set_partners(lambda plan, chosen=table: chosen)
        else:
            loader.set_partners(table)
        loader.set_epoch(epoch, start_batch=start_batch)
        self.run.partial, self.run.batch = None, 0
        return loader, partial, start_batch

    def _inputs(self, batch, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input (B, C, H, W) float32, targets (B, classes)) for one loaded batch, mixed
        with the batch's own partners and weights (from the epoch's partner table)."""
        if phase == "plain":
            x, _ = batch.mix(num_threads=self.threads)
            return x, one_hot(batch.labels, self.num_classes)
        if phase == "mixnn" and self.cfg.mix_given_labels:
            # eq. 5 literally: the anchor brings its soft target, the partners their given labels
            x, _ = batch.mix(num_threads=self.threads)
            weights = batch.weights
            partner_labels = one_hot(self.given_labels[batch.partner_ids], self.num_classes)  # (B, K, C)
            y = weights[:, :1] * self.targets.rows(batch.anchor_ids) + (weights[:, 1:, None] * partner_labels).sum(1)
            return x, y
        # mixup before label correction mixes one-hot given labels: the soft targets are still those
        x, _ = batch.mix(num_threads=self.threads)
        return x, self.targets.mix(batch.anchor_ids, batch.partner_ids, batch.weights)

    def _early_learning_targets(self, batch, phase: str) -> torch.Tensor | None:
        """ELR's running averages (B, C) float32 for one batch, mixed as its images are; None
        where the run adds no ELR penalty or the epoch trains without the refresh's partners."""
        if self.early_targets is None or phase != "mixnn":
            return None
        return self.early_targets.mix(batch.anchor_ids, batch.partner_ids, batch.weights)

    def train_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (from the checkpoint's batch when resuming inside it); returns its
        metrics row.  Saves a checkpoint every ``cfg.checkpoint_every_steps`` steps."""
        cfg = self.cfg
        loader, partial, next_position = self._start_epoch(epoch)
        phase = partial["row"]["phase"]
        # Under DDP every process must make the same optimiser steps (each one all-reduces the
        # gradients); with on_error="skip" a process can lose a whole batch (every image
        # unreadable), so it steps without data in that batch's place.
        keeps_step_count = self.dist.enabled and cfg.on_error == "skip"
        row = dict(partial["row"])
        iterations = len(loader)
        self.model.train()
        tally = EpochTally(self.device, self.dist, partial if partial.get("seen") else None)
        with progress_bar(int(loader.make_plan(epoch).stats.anchors), f"epoch {epoch} {phase}",
                          cfg.progress and self.dist.is_main, initial=int(partial.get("seen", 0))) as bar:
            start = wait_from = time.perf_counter()
            for batch in loader:
                i = batch.position  # this batch's place in the plan (batches can be skipped whole)
                tally.seconds["loader_wait"] += time.perf_counter() - wait_from
                if keeps_step_count:
                    for skipped in range(next_position, i):
                        self._step_without_data(epoch, skipped, iterations)
                    next_position = i + 1
                before_mix = tally.mark()
                x, y = self._inputs(batch, phase)
                running = self._early_learning_targets(batch, phase)
                after_mix = tally.mark()
                loss = self._step(x, y, epoch, i, iterations, running=running, balance=phase == "mixnn")
                tally.add_batch(before_mix, after_mix, tally.mark(), loss, len(batch))
                batch.release()  # its buffers go back to the loader's pool
                if tally.due(last=i + 1 == iterations):
                    running = tally.local_loss()
                    if not math.isfinite(running):
                        raise TrainingDiverged(f"epoch {epoch}, by batch {i}: the loss is {running}; lower lr (now "
                                               f"{self.optimizer.param_groups[0]['lr']:.3g}) or check the data")
                    bar.update(0, loss=running, wait=tally.seconds["loader_wait"] /
                               max(time.perf_counter() - start + tally.seconds["train"], 1e-9))
                bar.update(len(batch))
                wait_from = time.perf_counter()
                if cfg.checkpoint_every_steps and (i + 1) % cfg.checkpoint_every_steps == 0 and i + 1 < iterations:
                    tally.seconds["train"] += wait_from - start
                    self.run.epoch, self.run.batch = epoch, i + 1
                    self.run.partial = {"row": partial["row"], **tally.partial()}
                    self.save_checkpoint()
                    self.run.partial, self.run.batch = None, 0
                    start = wait_from = time.perf_counter()  # the save is not training time
            if keeps_step_count:
                for skipped in range(next_position, iterations):  # the epoch's last batches
                    self._step_without_data(epoch, skipped, iterations)
            tally.seconds["train"] += time.perf_counter() - start
        row.update(tally.row(), lr=self.optimizer.param_groups[0]["lr"])
        check_index_errors(self.device)  # the CUDA mixer's deferred index report (the tally just synchronised)
        if loader.plan is not None:
            row["extra_decode_fraction"] = loader.plan.stats.extra_decode_fraction
        self._align_ranks()
        if cfg.on_error == "skip":
            row["skipped_images"] = len(self.skipped())
        return row

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int, iterations: int, *,
              weight: float = 1.0, running: torch.Tensor | None = None, balance: bool = False) -> torch.Tensor:
        """One optimiser step on the mixed batch; returns its loss (0-d, on the device: reading it
        would wait for the device).  ``weight`` 0: a step whose gradient is zero.  ``running``
        (B, C): ELR's running averages for the batch; the loss then adds ``plus_elr`` times its
        penalty.  ``balance``: the loss adds ``plus_prior`` times the class-balance penalty (where
        the run has one: MixNN+ with ``plus_prior`` > 0)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.trained(x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format))
        loss = self.loss_function(logits.float(), y.to(self.device))
        if running is not None:
            loss = loss + self.cfg.plus_elr * early_learning_penalty(logits.float(), running.to(self.device))
        if balance and self.class_prior is not None:
            loss = loss + self.cfg.plus_prior * class_balance_penalty(logits.float(), self.class_prior)
        if weight != 1.0:
            loss = loss * weight
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # a plain optimizer.step() when the scaler is disabled
        self.scaler.update()
        self.scheduler.step(epoch + (i + 1) / iterations)
        return loss.detach()

    def _step_without_data(self, epoch: int, i: int, iterations: int) -> None:
        """Batch ``i`` of this process was skipped whole: step with a zero gradient from this
        process, so that the gradient all-reduce of every other process has its partner; the
        step's gradient is the others' sum over the world size.  The schedule advances as for a
        real batch.  The input is one black image, in eval mode: batch norm's statistics are not
        moved by it, so what the image shows does not matter (and no real batch is kept for it)."""
        g = self.data.geometry
        x = torch.zeros(1, g.in_channels, g.size, g.size)
        self.trained.eval()
        try:
            self._step(x, one_hot(torch.zeros(1, dtype=torch.int64), self.num_classes), epoch, i, iterations,
                       weight=0.0)
        finally:
            self.trained.train()

    # ---- evaluation ------------------------------------------------------------------------

    def test_accuracy(self) -> float:
        """Accuracy on the test set (NaN without one) of the tested model (the weight average
        once it holds a snapshot, else the model); unreadable test images count as wrong."""
        return self._accuracy(self.loaders.test, self.data.test)

    def averaging(self) -> bool:
        """Whether the tested model is the weight average (it holds at least one snapshot)."""
        return self.averaged is not None and int(self.averaged.n_averaged) > 0

    def _accuracy(self, loader, data, *, live: bool = False) -> float:
        """Accuracy on ``data``'s labels over all processes' shards, of the tested model or, with
        ``live``, of the model being trained."""
        if loader is None:
            return float("nan")
        n = len(data)
        inference = self.averaged_inference if self.averaging() and not live else self.inference
        logits = inference.logits(loader, n)  # this process's shard; NaN rows elsewhere
        scored = torch.isfinite(logits).all(1)
        correct = int((logits[scored].argmax(1) == torch.from_numpy(data.labels)[scored]).sum())
        (correct,) = self.dist.sum(correct)
        return correct / n

    def label_record(self) -> LabelRecord:
        """What the run concluded about each training label, for the report and the label audit.

        A final pass (no augmentation) scores every readable sample: the model's probability of
        its given label, its prediction and that prediction's probability, and the clean
        probability of a GMM (the run's ``cfg.gmm_*``) fitted on the losses against the given
        labels.  The corrected label is the soft targets' argmax for MixNN, the model's
        prediction for the baselines (which correct nothing); MixNN's ``clean_prob`` is its last
        refresh's.  Every process calls it (the pass is shared); rank 0 writes the report."""
        n = self.num_samples
        scores = self._final_pass(self.inference)
        ids = scores.ids.numpy()

        def per_sample(values, fill=np.nan, dtype=np.float64) -> np.ndarray:
            full = np.full(n, fill, dtype=dtype)  # unreadable samples: not scored
            full[ids] = values.numpy()
            return full

        clean_prob_given = per_sample(clean_probability(scores.losses, **self.refresh_options.gmm))
        predicted = per_sample(scores.predicted, -1, np.int64)
        rows = self._logged_rows()
        final_corrections = None
        refreshed = self.last_refresh
        # a run resumed after its last epoch has made no refresh in this process: its last
        # refresh's clean probabilities are the ones the checkpoint kept (float32)
        kept = self.run.clean_prob if refreshed is None and self.cfg.refreshes else None
        if self.cfg.refreshes and ((refreshed is not None and len(refreshed.ids) == len(ids)) or
                                   (kept is not None and int(torch.isfinite(kept).sum()) == len(ids))):
            clean_prob = np.full(n, np.nan)
            if refreshed is not None:
                clean_prob[refreshed.ids.numpy()] = refreshed.clean_prob.numpy()
            else:
                clean_prob[:] = kept.double().numpy()
            corrected = self.targets.corrected_labels().cpu().numpy()
            # every rank must take the same branch below, whose pass of the weight average is collective
            looked_symmetric = self._looked_symmetric(rows)
            relabel = final_correction(self.cfg, self.run, scores.ids, scores.predicted, scores.confidence, n,
                                       looked_symmetric)
            relabelled_to = predicted
            if relabel is None and corrects_symmetric_finally(self.cfg, self.run, looked_symmetric):
                # where the noise looked symmetric: the tested model's predictions (the weight average)
                tested = self._final_pass(self.averaged_inference) if self.averaging() else scores
                relabel = final_symmetric_correction(self.cfg, self.run, tested.ids, tested.confidence, n,
                                                     looked_symmetric)
                relabelled_to = np.full(n, -1, dtype=np.int64)
                relabelled_to[tested.ids.numpy()] = tested.predicted.numpy()
            if relabel is not None:  # MixNN+'s last correction: the reported labels only, never the targets
                relabel = relabel.numpy()
                final_corrections = int((relabel & (corrected != relabelled_to)).sum())
                corrected[relabel] = relabelled_to[relabel]
                log.info("last correction from the final pass: %d reported labels changed", final_corrections)
        else:
            clean_prob = clean_prob_given
            corrected = self.given_labels.numpy().copy()  # unreadable samples keep their given label
            corrected[ids] = scores.predicted.numpy()
        return LabelRecord(method=self.cfg.method, train=self.data.train,
                           rows=rows,
                           corrected=corrected, clean_prob=clean_prob, clean_prob_given=clean_prob_given,
                           prob_given=per_sample(scores.prob_given), predicted=predicted,
                           confidence=per_sample(scores.confidence),
                           target_given=probability_of_labels(self.targets, self.given_labels),
                           final_corrections=final_corrections)

    def _final_pass(self, inference) -> PoolScores:
        """The final pass of ``inference`` (the model's or the weight average's) over every readable
        training sample, no augmentation, every process's shard: its scores, covered samples only."""
        scores = PoolScores(torch.arange(self.num_samples), self.targets, self.given_labels, self.run.epoch,
                            gmm_loss="given", correct=False, features_dtype=None)
        inference.score_pool(self.loaders.pool, scores, "evaluate")
        share_pool_scores(self.dist, scores, None, self.model.feature_dim)
        return scores.covered(allow_missing=True)

    def _looked_symmetric(self, rows: list[dict]) -> float | None:
        """:func:`symmetric_share` of ``rows`` as rank 0 computes it, on every rank: only rank 0
        holds the metrics rows, and the decisions taken from it start collective passes.
        Collective: every process calls it."""
        return self.dist.broadcast_object(symmetric_share(rows, self.cfg.correction_start))

    def _logged_rows(self) -> list[dict]:
        """The metrics rows of the epochs trained so far: the open log's, or, in a run rebuilt from
        its checkpoint that has not trained in this process, its folder's (rank 0 writes them)."""
        if self.metrics is not None:
            return list(self.metrics.rows)
        if self.resume:
            return [r for r in read_metrics(self.out_dir) if r.get("epoch", -1) < self.run.epoch]
        return []

    # ---- the whole run ---------------------------------------------------------------------

    def fit(self, *, keep_lock: bool = False) -> dict:
        """Train from where the run stands to ``cfg.epochs``; returns :meth:`summary`.  The run
        folder's writer lock is released at the end, or, with ``keep_lock``, kept after a
        successful fit until :meth:`release_run_folder` or :meth:`close` (the CLI writes the
        report in between, so nothing else can start in the folder before it is complete).
        A failed fit always releases it, for a resume."""
        cfg = self.cfg
        self._open_outputs()
        try:
            for epoch in range(self.run.epoch, cfg.epochs):
                epoch_start = time.perf_counter()
                row = self.train_epoch(epoch)
                if joins_average(cfg, epoch):
                    self.averaged.update_parameters(self.model)
                    looked_symmetric = None
                    if cfg.plus_average_bn == "symmetric":  # this epoch's refresh counts (its row is not logged yet)
                        looked_symmetric = self._looked_symmetric(self._logged_rows() + [row])
                    if recomputes_average_statistics(cfg, looked_symmetric):  # SWA's statistics for the average
                        recompute_batchnorm_statistics(self.averaged.module, self.loaders.pool, self.device,
                                                       memory_format=self.memory_format, dist=self.dist)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    row["test_accuracy"] = self.test_accuracy()
                    if self.loaders.validation is not None:  # against the held-out *noisy* labels
                        row["val_noisy_accuracy"] = self._accuracy(self.loaders.validation, self.data.validation)
                    if self.averaging():  # the model itself too, for comparison
                        row["weights_averaged"] = int(self.averaged.n_averaged)
                        row["live_test_accuracy"] = self._accuracy(self.loaders.test, self.data.test, live=True)
                        if self.loaders.validation is not None:
                            row["live_val_noisy_accuracy"] = self._accuracy(self.loaders.validation,
                                                                            self.data.validation, live=True)
                    if not math.isnan(row["test_accuracy"]):
                        best = self.run.best_test_accuracy
                        self.run.best_test_accuracy = row["test_accuracy"] if math.isnan(best) else \
                            max(best, row["test_accuracy"])
                # the epoch's wall time: refresh, training and evaluation (the checkpoint after it is
                # not counted); summed over the rows, it is what the run cost across resumes
                row["epoch_seconds"] = time.perf_counter() - epoch_start
                if self.dist.is_main:  # every process holds the same row; rank 0 writes it
                    self.metrics.log(row)
                    log.info("epoch %d %s: loss %.4f, test accuracy %s", epoch, row["phase"], row["train_loss"],
                             f"{row.get('test_accuracy', float('nan')):.4f}")
                    if cfg.progress and not progress_on_terminal():
                        print(epoch_line(row, cfg.epochs), file=sys.stderr, flush=True)
                self.run.epoch = epoch + 1
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    self.save_checkpoint()
            if self.metrics is not None:
                self.metrics.close()
        except BaseException:
            self.release_run_folder()
            raise
        if not keep_lock:
            self.release_run_folder()
        return self.summary()

    def release_run_folder(self) -> None:
        """Let another process write the run folder (the lock :meth:`fit` took); idempotent."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def close(self) -> None:
        """Leave the process group, every process together (a no-op without torchrun).
        DistributedDataParallel's reducer holds the group and its gloo work threads: it is
        dropped and collected first, so that nothing of gloo is left to the interpreter's
        shutdown, where destroying it can abort the process ("terminate called without an
        active exception").  Releases the run folder first."""
        self.release_run_folder()
        self.trained = self.model
        gc.collect()
        self.dist.close()

    def summary(self) -> dict:
        """Final numbers: test accuracy (last, best), label-correction accuracy and clean-detection
        AUROC where true labels are known, realised noise rate, loader-wait share, unreadable
        images skipped (see :func:`~mixnn_fast.train.outcome.summarise`)."""
        paths = self.data.train.paths
        skipped = self.skipped()
        return summarise(self.cfg.method, self.metrics.rows if self.metrics is not None else [], self.run.epoch,
                         noise_rate=None if self.data.noise is None else float(self.data.noise.rate),
                         correction_accuracy=self.targets.correction_accuracy(self.true_labels)
                         if self.cfg.refreshes and self.true_labels is not None else None,
                         skipped_files=None if self.cfg.on_error != "skip" and not skipped else
                         {(paths[i] if paths is not None else str(i)): reason for i, reason in sorted(skipped.items())})
