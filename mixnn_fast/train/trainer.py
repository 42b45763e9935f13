"""The MixNN trainer, and the baselines (CE, mixup, GCE, SCE) in the same loop and pipeline.

One epoch of MixNN after warm-up::

    refresh   forward pass over the pool → losses, features, predictions
              → clean probability (GMM) → partners (neighbours) → λ/β → soft targets (EMA)
    plan      neighbour-coherent batches: partners decoded in their anchor's batch
    load      DALI decodes and augments each image once
    mix       fused kernel: x̃ = λ x_i + Σ β x_n (normalised, NCHW), ỹ = λ t_i + Σ β t_n
    step      soft cross-entropy, SGD, cosine annealing with warm restarts

Every epoch appends a row to ``metrics.jsonl``/``metrics.csv`` and saves ``checkpoint.pt``
(atomically; also every ``checkpoint_every_steps`` steps inside an epoch); ``Trainer(cfg,
resume=True)`` continues from it exactly: every piece of state is in the checkpoint (model,
optimiser, schedule, soft targets, loss history, the refresh's partners and weights, the
position in the epoch plan, the loss accumulated so far this epoch, and every random state),
and the loaders' augmentations are a pure function of (seed, epoch, batch), so a run killed
at any moment and resumed writes the same ``metrics.jsonl`` as an uninterrupted one, timings
aside (on the CPU with the same thread count; see docs/resume.md for GPUs).

Constructing a :class:`Trainer` validates everything (settings, data, checkpoint) and writes
nothing; :meth:`Trainer.fit` writes the run folder.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from mixnn_fast.data.clothing1m import balanced_subset
from mixnn_fast.refresh.loss_history import LossHistory
from mixnn_fast.mix.mixer import mix_images
from mixnn_fast.pipeline import EvalLoader, MixNNLoader
from mixnn_fast.refresh.targets import SoftTargets
from mixnn_fast.train.checkpoint import (CHECKPOINT, PREVIOUS, CheckpointError, capture_rng, load_checkpoint,
                                         restore_rng, save_checkpoint)
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import RunData, prepare_data
from mixnn_fast.train.losses import (generalized_cross_entropy, one_hot, soft_cross_entropy,
                                     symmetric_cross_entropy)
from mixnn_fast.train.metrics import MetricsLog
from mixnn_fast.train.models import build_model, inference_copy
from mixnn_fast.refresh.forward import forward_pass
from mixnn_fast.refresh.refresh import RefreshResult, in_batch_partners, refresh
from mixnn_fast.refresh.weights import mixing_weights

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingDiverged", "CHECKPOINT", "PREVIOUS", "CheckpointError", "resolve_device"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


EVAL_BATCH = 256  # forward passes without gradients (refresh, test set)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but torch sees no CUDA device")
    return device


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


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
        state = self._read_checkpoint(previous=resume_from_previous) if self.resume else None
        if not self.resume and not overwrite and self._holds_run():
            raise ValueError(f"out_dir: {self.out_dir} already holds a run; continue it with --resume (or "
                             "resume=True), or start again with --overwrite (overwrite=True), or choose another "
                             "--out-dir")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.threads = cfg.num_threads or torch.get_num_threads()
        self._seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if (cfg.amp and self.device.type == "cuda") else None

        self.data = data or prepare_data(cfg)
        train = self.data.train
        self.num_samples = len(train)
        self.num_classes = train.num_classes
        self.given_labels = torch.from_numpy(train.labels)
        self.true_labels = None if train.clean_labels is None else torch.from_numpy(train.clean_labels)

        geometry = self.data.geometry
        self.model = build_model(cfg.model, self.num_classes, geometry.in_channels, weights_path=cfg.weights_path,
                                 widths=cfg.model_widths).to(self.device)
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

        loader_options = dict(mean=geometry.mean, std=geometry.std, num_threads=self.threads, seed=cfg.seed,
                              device="gpu" if self.device.type == "cuda" else "cpu", on_error=cfg.on_error)
        if train.in_memory:
            loader_options.update(size=geometry.size, pad=geometry.pad if cfg.augment else 0, flip=cfg.augment)
        else:  # files: always a random-resized crop (TrainConfig refuses augment=False)
            loader_options.update(size=geometry.size)
        self.anchor_ids = None
        if cfg.dataset == "clothing1m" and cfg.num_batches:
            @functools.lru_cache(maxsize=2)  # the loader and the refresh both ask for each epoch's draw
            def balanced_draw(epoch: int) -> np.ndarray:
                ids = balanced_subset(train, cfg.num_batches, cfg.batch_size, cfg.seed + epoch)
                ids.setflags(write=False)  # shared by its callers
                return ids
            self.anchor_ids = balanced_draw
        self.plain_loader = MixNNLoader(train, cfg.batch_size, mode="plain", anchor_ids=self.anchor_ids,
                                        **loader_options)
        mix_mode = "in_batch" if cfg.partners == "in_batch" else cfg.plan
        self.mix_loader = MixNNLoader(train, cfg.batch_size, mode=mix_mode, anchor_ids=self.anchor_ids,
                                      **loader_options) if cfg.method == "mixnn" else None
        eval_options = dict(mean=geometry.mean, std=geometry.std, num_threads=self.threads,
                            device=loader_options["device"], on_error=cfg.on_error)
        if not train.in_memory:
            eval_options.update(crop=geometry.size, resize=geometry.eval_resize)
        self.eval_options = eval_options
        # 256: oneDNN's channels-last convolutions were ~20% slower per image at 512 here
        self.pool_loader = EvalLoader(train, EVAL_BATCH, **eval_options)
        self.test_loader = EvalLoader(self.data.test, EVAL_BATCH, **eval_options) if self.data.test is not None else None

        self.metrics: MetricsLog | None = None  # opened by fit(): construction writes nothing
        self.last_refresh: RefreshResult | None = None
        self.weight_table: torch.Tensor | None = None   # (N, K+1) λ/β per anchor
        self.partner_table: torch.Tensor | None = None  # (N, K) partners per anchor
        self.start_epoch = 0
        self.start_batch = 0      # > 0: the checkpoint was taken inside epoch start_epoch
        self._partial: dict | None = None  # that epoch's row and sums so far
        self._skipped_before: dict[int, str] = {}  # unreadable samples found before a resume
        self.best_test_accuracy = float("nan")
        if state is not None:
            self._restore(state)

    # ---- the run folder --------------------------------------------------------------------

    def _holds_run(self) -> bool:
        return any((self.out_dir / name).exists() for name in (CHECKPOINT, PREVIOUS, "metrics.jsonl"))

    def _read_checkpoint(self, *, previous: bool) -> dict | None:
        """The checkpoint to resume from, its settings checked against ``cfg`` (None: nothing saved
        yet, the run starts at epoch 0)."""
        try:
            state = load_checkpoint(self.out_dir, previous=previous)
        except FileNotFoundError:
            if previous or (self.out_dir / PREVIOUS).exists():
                raise
            log.info("no checkpoint in %s: starting from epoch 0", self.out_dir)
            return None
        try:
            saved = TrainConfig.from_dict(state["config"], source="the checkpoint's settings")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint: {self.out_dir / CHECKPOINT} holds unusable settings ({exc})") from None
        changed = self.cfg.experiment_differences(saved)
        if changed:
            detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise ValueError(f"resume: {self.out_dir} was trained with other settings ({detail}); only "
                             "epochs, progress, tensorboard, eval_every, checkpoint_every(_steps) and num_threads "
                             "may change when resuming; use another --out-dir to train these settings")
        done = int(state["position"]["epoch"])
        if self.cfg.epochs < done:
            raise ValueError(f"epochs: {self.out_dir} has already trained {done} epochs; ask for at least that many "
                             f"(got {self.cfg.epochs})")
        return state

    def _open_outputs(self) -> None:
        """Create the run folder, write ``config.yaml`` and open the metrics (first call of fit)."""
        if self.metrics is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save_yaml(self.out_dir / "config.yaml")
        self.metrics = MetricsLog(self.out_dir, tensorboard=self.cfg.tensorboard, resume=self.resume)
        self.metrics.truncate(self.start_epoch)

    # ---- the schedule ----------------------------------------------------------------------

    def phase(self, epoch: int) -> str:
        """What epoch ``epoch`` trains with: "plain" (one-hot given labels), "mixup" or "mixnn"."""
        if self.cfg.method == "mixup":
            return "mixup"
        if self.cfg.method == "mixnn" and epoch >= self.cfg.warmup_epochs:
            return "mixnn"
        return "plain"

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
        found = dict(self._skipped_before)
        for loader in (self.plain_loader, self.mix_loader, self.pool_loader):
            if loader is not None:
                found.update(loader.skipped)
        return found

    def _pool_ids(self, epoch: int) -> torch.Tensor:
        """(P,) sorted sample ids the refresh covers: the epoch's anchors (Clothing1M's balanced
        draw) or every sample, minus samples already found unreadable."""
        if self.anchor_ids is None:
            pool = torch.arange(self.num_samples)
        else:
            pool = torch.from_numpy(np.sort(np.asarray(self.anchor_ids(epoch), dtype=np.int64)))
        skipped = self.skipped()
        if skipped:
            pool = pool[~torch.isin(pool, torch.tensor(sorted(skipped), dtype=torch.int64))]
        return pool

    def run_refresh(self, epoch: int) -> dict:
        """The refresh before a MixNN epoch; returns its metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        pool = self._pool_ids(epoch)
        loader = self.pool_loader if len(pool) == self.num_samples else \
            EvalLoader(self.data.train, EVAL_BATCH, ids=pool.numpy(), **self.eval_options)
        with _progress(len(pool), f"refresh {epoch}", cfg.progress) as bar:
            outputs = forward_pass(self.inference_model(), loader, pool, self.device,
                                   autocast_dtype=self.autocast_dtype, memory_format=self.memory_format, progress=bar,
                                   allow_missing=cfg.on_error == "skip")
        if loader is not self.pool_loader:
            self._skipped_before.update(loader.skipped)
        pool = outputs.ids  # minus samples that could not be read just now
        forward_seconds = time.perf_counter() - start
        authors_mixup = cfg.authors_schedule and epoch < cfg.correction_start
        result = refresh(
            outputs, self.targets, self.given_labels, epoch, ids=pool,
            num_neighbours=cfg.num_neighbours,
            partners="random" if authors_mixup else cfg.partners,
            weights_mode="mixup" if authors_mixup else cfg.weights,
            label_correction=cfg.label_correction, gmm_loss=cfg.gmm_loss, loss_history=self.loss_history,
            gmm_settings=dict(max_iter=cfg.gmm_max_iter, tol=cfg.gmm_tol, reg_covar=cfg.gmm_reg_covar,
                              seed=cfg.seed),
            neighbour_backend=cfg.neighbour_backend, rdm_alpha=cfg.rdm_alpha, generator=self.generator,
            true_labels=self.true_labels, num_threads=self.threads)
        self.last_refresh = result
        if result.neighbours is not None:
            # Tables over all N samples; rows outside the pool are never anchors this epoch
            # (they keep their previous values, or point at themselves with λ = 1).
            if self.partner_table is None or self.partner_table.shape[1] != result.neighbours.shape[1]:
                k = result.neighbours.shape[1]
                self.partner_table = torch.arange(self.num_samples).unsqueeze(1).repeat(1, k)
                self.weight_table = torch.cat([torch.ones(self.num_samples, 1),
                                               torch.zeros(self.num_samples, k)], dim=1)
            self.partner_table[pool] = result.neighbours
            self.weight_table[pool] = result.weights
            self.mix_loader.set_neighbours(self.partner_table.numpy())
        row = {"refresh_seconds": time.perf_counter() - start, "refresh_forward_seconds": forward_seconds,
               "refresh_gmm_seconds": result.seconds.get("gmm"),
               "refresh_neighbour_seconds": result.seconds.get("neighbours"), **result.stats}
        if self.true_labels is not None:
            row["correction_accuracy"] = self.targets.correction_accuracy(self.true_labels)
        return row

    def _inputs(self, batch, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input (B, C, H, W) float32, targets (B, classes)) for one loaded batch."""
        cfg = self.cfg
        b = len(batch)
        if phase == "plain":
            x, _ = batch.mix(torch.ones(b, 1), num_threads=self.threads)
            return x, one_hot(batch.labels, self.num_classes)
        if phase == "mixup":
            order = torch.randperm(b, generator=self.generator)
            lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=self.generator))).beta(
                cfg.mixup_alpha, cfg.mixup_alpha))
            weights = torch.tensor([[lam, 1 - lam]]).expand(b, 2).contiguous()
            x = mix_images(batch.images, batch.anchor_slots, batch.anchor_slots[order].unsqueeze(1), weights,
                           in_layout=batch.layout, mean=batch.mean, std=batch.std, num_threads=self.threads)
            labels = one_hot(batch.labels, self.num_classes)
            return x, lam * labels + (1 - lam) * labels[order]
        # MixNN
        anchor_ids = batch.anchor_ids
        if cfg.partners == "in_batch":
            rows = torch.searchsorted(self.last_refresh.ids, anchor_ids)
            local = in_batch_partners(self.last_refresh.features[rows], cfg.num_neighbours)
            weights = mixing_weights(self.last_refresh.clean_prob[rows], local, mode=cfg.weights,
                                     generator=self.generator, alpha=cfg.rdm_alpha)
            batch = dataclasses.replace(batch, partner_slots=batch.anchor_slots[local])
        else:
            weights = self.weight_table[anchor_ids]
        x, y = batch.mix(weights, self.targets.targets, num_threads=self.threads)
        if cfg.mix_given_labels:  # eq. 5 literally: the partners bring their given labels
            partner_labels = one_hot(self.given_labels[batch.partner_ids], self.num_classes)  # (B, K, C)
            y = weights[:, :1] * self.targets.targets[anchor_ids].float() + \
                (weights[:, 1:, None] * partner_labels).sum(1)
        return x, y

    def train_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (from batch ``start_batch`` when resuming inside it); returns its
        metrics row.  Saves a checkpoint every ``cfg.checkpoint_every_steps`` steps."""
        cfg = self.cfg
        phase = self.phase(epoch)
        if self._partial is not None and self._partial["row"]["epoch"] == epoch:
            partial, start_batch = self._partial, self.start_batch  # the refresh of this epoch is done
        else:
            row = {"epoch": epoch, "phase": phase}
            if phase == "mixnn":
                row.update(self.run_refresh(epoch))
            partial = {"row": row, "loss_sum": 0.0, "seen": 0, "seconds": {"train": 0.0, "loader_wait": 0.0,
                                                                         "mix": 0.0, "step": 0.0}}
            start_batch = 0
        self._partial, self.start_batch = None, 0
        row = dict(partial["row"])
        loader = self.mix_loader if phase == "mixnn" else self.plain_loader
        loader.set_epoch(epoch, start_batch=start_batch)
        iterations = len(loader)
        self.model.train()
        loss_sum, seen, seconds = partial["loss_sum"], partial["seen"], dict(partial["seconds"])
        bar_total = int(loader.make_plan(epoch).stats.anchors)
        with _progress(bar_total, f"epoch {epoch} {phase}", cfg.progress) as bar:
            start = time.perf_counter()
            wait_from = start
            for batch in loader:
                i = batch.position  # this batch's place in the plan (batches can be skipped whole)
                got = time.perf_counter()
                seconds["loader_wait"] += got - wait_from
                x, y = self._inputs(batch, phase)
                mixed = time.perf_counter()
                seconds["mix"] += mixed - got
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    logits = self.model(x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format))
                loss = self._loss(logits, y.to(self.device))
                if not torch.isfinite(loss.detach()):
                    raise TrainingDiverged(f"epoch {epoch}, batch {i}: the loss is {float(loss.detach())}; lower lr "
                                           f"(now {self.optimizer.param_groups[0]['lr']:.3g}) or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step(epoch + (i + 1) / iterations)
                loss_sum += float(loss.detach()) * len(batch)
                seen += len(batch)
                bar.update(len(batch))
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
                wait_from = time.perf_counter()
                seconds["step"] += wait_from - mixed
                if cfg.checkpoint_every_steps and (i + 1) % cfg.checkpoint_every_steps == 0 and i + 1 < iterations:
                    seconds["train"] += wait_from - start
                    self.start_epoch, self.start_batch = epoch, i + 1
                    self._partial = {"row": partial["row"], "loss_sum": loss_sum, "seen": seen,
                                     "seconds": dict(seconds)}
                    self.save_checkpoint()
                    self._partial, self.start_batch = None, 0
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

    # ---- evaluation ------------------------------------------------------------------------

    def inference_model(self) -> torch.nn.Module:
        """The current model for forward passes without gradients: an eval-mode copy with
        BatchNorm folded into the convolutions (models.inference_copy)."""
        return inference_copy(self.model, channels_last=self.cfg.channels_last)

    @torch.no_grad()
    def predict(self, loader, num_samples: int) -> torch.Tensor:
        """(N, C) float32 logits of every sample of ``loader``'s data set, in data-set order
        (rows of samples that could not be read, with ``on_error="skip"``, are NaN)."""
        with _progress(num_samples, "evaluate", self.cfg.progress) as bar:
            outputs = forward_pass(self.inference_model(), loader, torch.arange(num_samples), self.device,
                                   autocast_dtype=self.autocast_dtype, memory_format=self.memory_format,
                                   progress=bar, allow_missing=self.cfg.on_error == "skip")
        if len(outputs.ids) == num_samples:
            return outputs.logits
        logits = torch.full((num_samples, outputs.logits.shape[1]), float("nan"))
        logits[outputs.ids] = outputs.logits
        return logits

    def test_accuracy(self) -> float:
        """Accuracy on the test set (NaN without one); unreadable test images count as wrong."""
        if self.test_loader is None:
            return float("nan")
        logits = self.predict(self.test_loader, len(self.data.test))
        return float((logits.argmax(1) == torch.from_numpy(self.data.test.labels)).float().mean())

    # ---- the whole run ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from where the run stands to ``cfg.epochs``; returns :meth:`summary`."""
        cfg = self.cfg
        self._open_outputs()
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self.train_epoch(epoch)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                row["test_accuracy"] = self.test_accuracy()
                if not math.isnan(row["test_accuracy"]):
                    self.best_test_accuracy = max(row["test_accuracy"], self.best_test_accuracy) \
                        if not math.isnan(self.best_test_accuracy) else row["test_accuracy"]
            self.metrics.log(row)
            log.info("epoch %d %s: loss %.4f, test accuracy %s", epoch, row["phase"], row["train_loss"],
                     f"{row.get('test_accuracy', float('nan')):.4f}")
            self.start_epoch = epoch + 1
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                self.save_checkpoint()
        self.metrics.close()
        return self.summary()

    def summary(self) -> dict:
        """Final numbers: test accuracy (last, best), label-correction accuracy and clean-detection
        AUROC where true labels are known, realised noise rate, unreadable images skipped."""
        rows = self.metrics.rows if self.metrics is not None else []
        tested = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
        summary = {
            "method": self.cfg.method,
            "epochs": self.start_epoch,
            "final_test_accuracy": tested[-1] if tested else float("nan"),
            "best_test_accuracy": max(tested) if tested else float("nan"),
            "noise_rate_realised": None if self.data.noise is None else float(self.data.noise.rate),
            "train_seconds": float(sum(r.get("train_seconds", 0) + (r.get("refresh_seconds") or 0) for r in rows)),
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

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly (see the module docstring), written atomically;
        the checkpoint it replaces is kept as ``checkpoint.prev.pt``."""
        refresh_state = None
        if self.last_refresh is not None and self.cfg.partners == "in_batch":
            # in-batch partners are searched per batch on the refresh's features: a resume inside
            # the epoch needs them (other modes keep everything in the partner/weight tables)
            refresh_state = {"ids": self.last_refresh.ids, "clean_prob": self.last_refresh.clean_prob,
                             "features": self.last_refresh.features}
        state = {
            "config": self.cfg.to_dict(),
            "position": {"epoch": self.start_epoch, "batch": self.start_batch},
            "partial_epoch": self._partial,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "targets": self.targets.state_dict(),
            "loss_history": None if self.loss_history is None else self.loss_history.state_dict(),
            "weight_table": self.weight_table,
            "partner_table": self.partner_table,
            "last_refresh": refresh_state,
            "best_test_accuracy": self.best_test_accuracy,
            "skipped": {int(k): v for k, v in self.skipped().items()},
            "rng": capture_rng(self.generator),
        }
        return save_checkpoint(self.out_dir, state)

    def _restore(self, state: dict) -> None:
        """Put a checkpoint's state into this trainer (its settings were checked on reading)."""
        path = self.out_dir / CHECKPOINT
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.targets.load_state_dict(state["targets"])
            if self.loss_history is not None and state["loss_history"] is not None:
                self.loss_history.load_state_dict(state["loss_history"])
            self.weight_table = state["weight_table"]
            self.partner_table = state["partner_table"]
            if self.partner_table is not None and self.mix_loader is not None:
                self.mix_loader.set_neighbours(self.partner_table.numpy())
            if state["last_refresh"] is not None:
                saved_refresh = state["last_refresh"]
                self.last_refresh = RefreshResult(
                    losses=torch.empty(0), probabilities=torch.empty(0), clean_prob=saved_refresh["clean_prob"],
                    ids=saved_refresh["ids"], neighbours=None, weights=None, features=saved_refresh["features"],
                    gmm=None)
            self.best_test_accuracy = float(state["best_test_accuracy"])
            self._skipped_before = {int(k): str(v) for k, v in state["skipped"].items()}
            restore_rng(state["rng"], self.generator)
            self.start_epoch = int(state["position"]["epoch"])
            self.start_batch = int(state["position"]["batch"])
            self._partial = state["partial_epoch"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint: {path} does not fit this run ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        log.info("resuming %s at epoch %d, batch %d", self.out_dir, self.start_epoch, self.start_batch)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
