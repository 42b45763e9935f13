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

import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mixnn_fast.refresh.gmm import clean_probability
from mixnn_fast.refresh.loss_history import LossHistory
from mixnn_fast.refresh.partners import PartnerTable, in_batch_table, mixup_table
from mixnn_fast.refresh.refresh import RefreshOptions, RefreshResult, refresh
from mixnn_fast.refresh.targets import SoftTargets
from mixnn_fast.train.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError, save_checkpoint
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import RunData, prepare_data
from mixnn_fast.train.losses import generalized_cross_entropy, one_hot, soft_cross_entropy, symmetric_cross_entropy
from mixnn_fast.train.loaders import build_loaders
from mixnn_fast.train.metrics import MetricsLog
from mixnn_fast.train.inference import Inference
from mixnn_fast.train.models import build_model
from mixnn_fast.train.outcome import LabelRecord
from mixnn_fast.train.progress import epoch_line, progress_bar, progress_on_terminal
from mixnn_fast.train.state import RunState, checkpoint_state, read_resume_checkpoint, restore_checkpoint

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingDiverged", "CHECKPOINT", "PREVIOUS", "CheckpointError", "resolve_device"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but torch sees no CUDA device")
    return device


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
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if (cfg.amp and self.device.type == "cuda") else None

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
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=cfg.restart_period, eta_min=cfg.lr_min)
        self.targets = SoftTargets(self.given_labels, self.num_classes, momentum=cfg.correction_momentum,
                                   start_epoch=cfg.correction_start, update_every=cfg.correction_every)
        self.loss_history = LossHistory(self.num_samples, window=cfg.gmm_history) if cfg.gmm_history > 1 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.loaders = build_loaders(cfg, self.data, threads=self.threads, on_gpu=self.device.type == "cuda")
        self.inference = Inference(self.model, self.device, autocast_dtype=self.autocast_dtype,
                                   memory_format=self.memory_format, progress=cfg.progress,
                                   allow_missing=cfg.on_error == "skip")
        self.refresh_options = RefreshOptions(
            num_neighbours=cfg.num_neighbours, partners=cfg.partners, weights_mode=cfg.weights,
            label_correction=cfg.label_correction, gmm_loss=cfg.gmm_loss,
            gmm=dict(max_iter=cfg.gmm_max_iter, tol=cfg.gmm_tol, reg_covar=cfg.gmm_reg_covar, seed=cfg.seed),
            neighbour_backend=cfg.neighbour_backend, rdm_alpha=cfg.rdm_alpha, num_threads=self.threads)

        self.metrics: MetricsLog | None = None  # opened by fit(): construction writes nothing
        self.last_refresh: RefreshResult | None = None
        self.run = RunState()
        if state is not None:
            self.run = restore_checkpoint(state, self._modules(), self.generator, self.out_dir / CHECKPOINT)
            log.info("resuming %s at epoch %d, batch %d", self.out_dir, self.run.epoch, self.run.batch)

    @property
    def start_epoch(self) -> int:
        """The epoch the next step belongs to (the number of epochs finished, between epochs)."""
        return self.run.epoch

    # ---- the run folder --------------------------------------------------------------------

    def _modules(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "targets": self.targets, "loss_history": self.loss_history}

    def _holds_run(self) -> bool:
        return any((self.out_dir / name).exists() for name in (CHECKPOINT, PREVIOUS, "metrics.jsonl"))

    def _open_outputs(self) -> None:
        """Create the run folder, write ``config.yaml`` and open the metrics (first call of fit)."""
        if self.metrics is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save_yaml(self.out_dir / "config.yaml")
        self.metrics = MetricsLog(self.out_dir, tensorboard=self.cfg.tensorboard, resume=self.resume)
        self.metrics.truncate(self.run.epoch)

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly (train/state.py), written atomically; the
        checkpoint it replaces is kept as ``checkpoint.prev.pt``."""
        self.run.skipped = self.skipped()
        return save_checkpoint(self.out_dir, checkpoint_state(self.cfg.to_dict(), self.run, self._modules(),
                                                              self.generator))

    # ---- the schedule ----------------------------------------------------------------------

    def phase(self, epoch: int) -> str:
        """What epoch ``epoch`` trains with: "plain" (one-hot given labels), "mixup" (in-batch
        random partners, one λ per batch) or "mixnn"."""
        cfg = self.cfg
        if cfg.method == "mixup":
            return "mixup"
        if cfg.method != "mixnn" or epoch < cfg.warmup_epochs:
            return "plain"
        if cfg.authors_schedule and epoch < cfg.correction_start:
            return "mixup"  # the authors' code: plain mixup between warm-up and label correction
        return "mixnn"

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.method == "gce":
            return generalized_cross_entropy(logits, targets, q=cfg.gce_q)
        if cfg.method == "sce":
            return symmetric_cross_entropy(logits, targets, alpha=cfg.sce_alpha, beta=cfg.sce_beta)
        return soft_cross_entropy(logits, targets)

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
        outputs = self.inference.pass_over(loader, pool, f"refresh {epoch}")
        self.run.skipped.update(loader.skipped)
        forward_seconds = time.perf_counter() - start
        result = refresh(outputs, self.targets, self.given_labels, epoch, self.refresh_options,
                         loss_history=self.loss_history, generator=self.generator, true_labels=self.true_labels)
        self.last_refresh = result
        if result.table is not None:
            # samples outside this epoch's pool keep their last partners (per-epoch pools); those
            # never scored (unreadable) mix with themselves
            previous = self.run.table
            if previous is None or previous.num_partners != result.table.num_partners:
                previous = PartnerTable.itself(torch.arange(self.num_samples), self.num_samples,
                                               result.table.num_partners)
            self.run.table = result.table.merged_into(previous)
        else:  # in-batch partners: nearest anchors of the same batch, on this refresh's features
            self.loaders.mix.set_partners(None)  # the epoch's plain plan, before partners are attached
            self.run.table = in_batch_table(self.loaders.mix.make_plan(epoch), result, self.num_samples,
                                            k=cfg.num_neighbours, mode=cfg.weights, alpha=cfg.rdm_alpha,
                                            seed=cfg.seed, epoch=epoch)
        row = {"refresh_seconds": time.perf_counter() - start, "refresh_forward_seconds": forward_seconds,
               "refresh_gmm_seconds": result.seconds.get("gmm"),
               "refresh_neighbour_seconds": result.seconds.get("neighbours"), **result.stats}
        if self.true_labels is not None:
            row["correction_accuracy"] = self.targets.correction_accuracy(self.true_labels)
        return row

    def _start_epoch(self, epoch: int, phase: str):
        """The loader of ``epoch`` with its partners set, and the epoch's partial state (a fresh one,
        or the checkpoint's when resuming inside the epoch)."""
        loader = self.loaders.mix if phase == "mixnn" else self.loaders.plain
        if self.run.partial is not None and self.run.partial["row"]["epoch"] == epoch:
            partial, start_batch = self.run.partial, self.run.batch  # refresh and table come from the checkpoint
        else:
            row = {"epoch": epoch, "phase": phase}
            if phase == "mixnn":
                row.update(self.run_refresh(epoch))
            elif phase == "mixup":
                loader.set_partners(None)  # the epoch's plain plan, before partners are attached
                self.run.table = mixup_table(loader.make_plan(epoch), self.num_samples, alpha=self.cfg.mixup_alpha,
                                             seed=self.cfg.seed, epoch=epoch)
            else:
                self.run.table = None
            partial = {"row": row, "loss_sum": 0.0, "seen": 0,
                       "seconds": {"train": 0.0, "loader_wait": 0.0, "mix": 0.0, "step": 0.0}}
            start_batch = 0
        table = self.run.table if phase != "plain" else None
        if table is not None and loader.mode in ("plain", "in_batch"):
            # partners chosen inside this epoch's batches: handed over as the plan's producer
            loader.set_partners(lambda plan, chosen=table: chosen)
        else:
            loader.set_partners(table)
        loader.set_epoch(epoch, start_batch=start_batch)
        self.run.partial, self.run.batch = None, 0
        return loader, partial

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
            y = weights[:, :1] * self.targets.targets[batch.anchor_ids].float() + \
                (weights[:, 1:, None] * partner_labels).sum(1)
            return x, y
        # mixup before label correction mixes one-hot given labels: the soft targets are still those
        return batch.mix(self.targets.targets, num_threads=self.threads)

    def train_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (from the checkpoint's batch when resuming inside it); returns its
        metrics row.  Saves a checkpoint every ``cfg.checkpoint_every_steps`` steps."""
        cfg = self.cfg
        phase = self.phase(epoch)
        loader, partial = self._start_epoch(epoch, phase)
        row = dict(partial["row"])
        iterations = len(loader)
        self.model.train()
        loss_sum, seen, seconds = partial["loss_sum"], partial["seen"], dict(partial["seconds"])
        with progress_bar(int(loader.make_plan(epoch).stats.anchors), f"epoch {epoch} {phase}", cfg.progress,
                          initial=seen) as bar:
            start = wait_from = time.perf_counter()
            for batch in loader:
                i = batch.position  # this batch's place in the plan (batches can be skipped whole)
                got = time.perf_counter()
                seconds["loader_wait"] += got - wait_from
                x, y = self._inputs(batch, phase)
                mixed = time.perf_counter()
                seconds["mix"] += mixed - got
                loss = self._step(x, y, epoch, i, iterations)
                batch.release()  # its buffers go back to the loader's pool
                loss_sum += loss * len(batch)
                seen += len(batch)
                wait_from = time.perf_counter()
                seconds["step"] += wait_from - mixed
                bar.update(len(batch), loss=loss_sum / seen, wait=seconds["loader_wait"] / (wait_from - start
                                                                                            + seconds["train"]))
                if cfg.checkpoint_every_steps and (i + 1) % cfg.checkpoint_every_steps == 0 and i + 1 < iterations:
                    seconds["train"] += wait_from - start
                    self.run.epoch, self.run.batch = epoch, i + 1
                    self.run.partial = {"row": partial["row"], "loss_sum": loss_sum, "seen": seen,
                                        "seconds": dict(seconds)}
                    self.save_checkpoint()
                    self.run.partial, self.run.batch = None, 0
                    start = wait_from = time.perf_counter()  # the save is not training time
            seconds["train"] += time.perf_counter() - start
        row.update(train_loss=loss_sum / max(seen, 1), train_seconds=seconds["train"],
                   images_per_second=seen / max(seconds["train"], 1e-9),
                   loader_wait_seconds=seconds["loader_wait"], mix_seconds=seconds["mix"],
                   step_seconds=seconds["step"],
                   loader_wait_fraction=seconds["loader_wait"] / max(seconds["train"], 1e-9),
                   lr=self.optimizer.param_groups[0]["lr"])
        if loader.plan is not None:
            row["extra_decode_fraction"] = loader.plan.stats.extra_decode_fraction
        if cfg.on_error == "skip":
            row["skipped_images"] = len(self.skipped())
        return row

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int, iterations: int) -> float:
        """One optimiser step on the mixed batch; returns its loss."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format))
        loss = self._loss(logits, y.to(self.device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"epoch {epoch}, batch {i}: the loss is {value}; lower lr "
                                   f"(now {self.optimizer.param_groups[0]['lr']:.3g}) or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step(epoch + (i + 1) / iterations)
        return value

    # ---- evaluation ------------------------------------------------------------------------

    def test_accuracy(self) -> float:
        """Accuracy on the test set (NaN without one); unreadable test images count as wrong."""
        if self.loaders.test is None:
            return float("nan")
        logits = self.inference.logits(self.loaders.test, len(self.data.test))
        return float((logits.argmax(1) == torch.from_numpy(self.data.test.labels)).float().mean())

    def label_record(self) -> LabelRecord:
        """What the run concluded about each training label, for the report: the corrected
        label and the clean probability per sample.  MixNN's come from its soft targets and its
        last refresh, when that covered every readable sample (no extra pass); otherwise (the
        baselines, per-epoch pools) a final forward pass gives the predictions, and the same GMM
        as the refresh's (``cfg.gmm_*``) is fitted on the losses against the given labels."""
        refreshed = self.last_refresh
        readable = self.num_samples - len(self.skipped())
        clean_prob = np.full(self.num_samples, np.nan)  # NaN: not scored
        if self.cfg.method == "mixnn" and refreshed is not None and len(refreshed.ids) == readable:
            clean_prob[refreshed.ids.numpy()] = refreshed.clean_prob.numpy()
            corrected = self.targets.corrected_labels().cpu().numpy()
        else:
            logits = self.inference.logits(self.loaders.pool, self.num_samples)
            scored = torch.isfinite(logits).all(1)
            losses = torch.nn.functional.cross_entropy(logits[scored], self.given_labels[scored], reduction="none")
            clean_prob[scored.numpy()] = clean_probability(losses, **self.refresh_options.gmm).numpy()
            corrected = logits.argmax(1).numpy()
        return LabelRecord(method=self.cfg.method, train=self.data.train, rows=list(self.metrics.rows),
                           corrected=corrected, clean_prob=clean_prob)

    # ---- the whole run ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from where the run stands to ``cfg.epochs``; returns :meth:`summary`."""
        cfg = self.cfg
        self._open_outputs()
        for epoch in range(self.run.epoch, cfg.epochs):
            row = self.train_epoch(epoch)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                row["test_accuracy"] = self.test_accuracy()
                if not math.isnan(row["test_accuracy"]):
                    best = self.run.best_test_accuracy
                    self.run.best_test_accuracy = row["test_accuracy"] if math.isnan(best) else \
                        max(best, row["test_accuracy"])
            self.metrics.log(row)
            log.info("epoch %d %s: loss %.4f, test accuracy %s", epoch, row["phase"], row["train_loss"],
                     f"{row.get('test_accuracy', float('nan')):.4f}")
            if cfg.progress and not progress_on_terminal():
                print(epoch_line(row, cfg.epochs), file=sys.stderr, flush=True)
            self.run.epoch = epoch + 1
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                self.save_checkpoint()
        self.metrics.close()
        return self.summary()

    def summary(self) -> dict:
        """Final numbers: test accuracy (last, best), label-correction accuracy and clean-detection
        AUROC where true labels are known, realised noise rate, unreadable images skipped."""
        rows = self.metrics.rows if self.metrics is not None else []
        tested = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
        wait = sum(r.get("loader_wait_seconds", 0) for r in rows)
        train_seconds = float(sum(r.get("train_seconds", 0) for r in rows))
        summary = {
            "method": self.cfg.method,
            "epochs": self.run.epoch,
            "final_test_accuracy": tested[-1] if tested else float("nan"),
            "best_test_accuracy": max(tested) if tested else float("nan"),
            "noise_rate_realised": None if self.data.noise is None else float(self.data.noise.rate),
            "train_seconds": train_seconds + float(sum(r.get("refresh_seconds") or 0 for r in rows)),
            "loader_wait_fraction": wait / train_seconds if train_seconds else float("nan"),
        }
        if self.cfg.method == "mixnn" and self.true_labels is not None:
            summary["correction_accuracy"] = self.targets.correction_accuracy(self.true_labels)
        for key in ("clean_auroc", "clean_auroc_current_labels"):  # the last refresh's
            values = [r[key] for r in rows if key in r]
            if values:
                summary[key] = values[-1]
        skipped = self.skipped()
        if self.cfg.on_error == "skip" or skipped:
            paths = self.data.train.paths
            summary["skipped_images"] = len(skipped)
            summary["skipped_files"] = {(paths[i] if paths is not None else str(i)): reason
                                        for i, reason in sorted(skipped.items())}
        return summary

