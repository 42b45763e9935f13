"""The MixNN trainer, and the baselines (CE, mixup, GCE, SCE) in the same loop and pipeline.

One epoch of MixNN after warm-up::

    refresh   forward pass over the pool → losses, features, predictions
              → clean probability (GMM) → partners (neighbours) → λ/β → soft targets (EMA)
    plan      neighbour-coherent batches: partners decoded in their anchor's batch
    load      DALI decodes and augments each image once
    mix       fused kernel: x̃ = λ x_i + Σ β x_n (normalised, NCHW), ỹ = λ t_i + Σ β t_n
    step      soft cross-entropy, SGD, cosine annealing with warm restarts

Every epoch appends a row to ``metrics.jsonl``/``metrics.csv`` and saves ``checkpoint.pt``
(atomically); ``Trainer(cfg, resume=True)`` continues from it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from mixnn_fast.data.clothing1m import balanced_subset
from mixnn_fast.gmm import LossHistory
from mixnn_fast.mixer import mix_images
from mixnn_fast.pipeline import EvalLoader, MixNNLoader
from mixnn_fast.targets import SoftTargets
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.datasets import RunData, prepare_data
from mixnn_fast.train.losses import (generalized_cross_entropy, one_hot, soft_cross_entropy,
                                     symmetric_cross_entropy)
from mixnn_fast.train.metrics import MetricsLog
from mixnn_fast.train.models import build_model, inference_copy
from mixnn_fast.train.refresh import RefreshResult, forward_pass, in_batch_partners, refresh
from mixnn_fast.weights import mixing_weights

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


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
    """Trains one configuration; ``fit()`` runs the remaining epochs and returns the summary."""

    def __init__(self, cfg: TrainConfig, data: RunData | None = None, *, resume: bool = False) -> None:
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.threads = cfg.num_threads or torch.get_num_threads()
        self._seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if (cfg.amp and self.device.type == "cuda") else None
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(self.out_dir / "config.yaml")

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
                              device="gpu" if self.device.type == "cuda" else "cpu")
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
                            device=loader_options["device"])
        if not train.in_memory:
            eval_options.update(crop=geometry.size, resize=geometry.eval_resize)
        self.eval_options = eval_options
        # 256: oneDNN's channels-last convolutions were ~20% slower per image at 512 here
        self.pool_loader = EvalLoader(train, EVAL_BATCH, **eval_options)
        self.test_loader = EvalLoader(self.data.test, EVAL_BATCH, **eval_options) if self.data.test is not None else None

        self.metrics = MetricsLog(self.out_dir, tensorboard=cfg.tensorboard, resume=resume)
        self.last_refresh: RefreshResult | None = None
        self.weight_table: torch.Tensor | None = None   # (N, K+1) λ/β per anchor
        self.partner_table: torch.Tensor | None = None  # (N, K) partners per anchor
        self.start_epoch = 0
        self.best_test_accuracy = float("nan")
        if resume:
            self.load_checkpoint()

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

    def _pool_ids(self, epoch: int) -> torch.Tensor:
        """(P,) sorted sample ids the refresh covers: the epoch's anchors (Clothing1M's balanced
        draw) or every sample."""
        if self.anchor_ids is None:
            return torch.arange(self.num_samples)
        return torch.from_numpy(np.sort(np.asarray(self.anchor_ids(epoch), dtype=np.int64)))

    def run_refresh(self, epoch: int) -> dict:
        """The refresh before a MixNN epoch; returns its metrics."""
        cfg = self.cfg
        start = time.perf_counter()
        pool = self._pool_ids(epoch)
        loader = self.pool_loader if self.anchor_ids is None else \
            EvalLoader(self.data.train, EVAL_BATCH, ids=pool.numpy(), **self.eval_options)
        with _progress(len(pool), f"refresh {epoch}", cfg.progress) as bar:
            outputs = forward_pass(self.inference_model(), loader, pool, self.device,
                                   autocast_dtype=self.autocast_dtype, memory_format=self.memory_format, progress=bar)
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
        cfg = self.cfg
        row: dict = {"epoch": epoch}
        phase = self.phase(epoch)
        row["phase"] = phase
        if phase == "mixnn":
            row.update(self.run_refresh(epoch))
            loader = self.mix_loader
        else:
            loader = self.plain_loader
        loader.set_epoch(epoch)
        iterations = len(loader)
        self.model.train()
        start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        with _progress(int(loader.make_plan(epoch).stats.anchors), f"epoch {epoch} {phase}", cfg.progress) as bar:
            for i, batch in enumerate(loader):
                x, y = self._inputs(batch, phase)
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
        seconds = time.perf_counter() - start
        row.update(train_loss=loss_sum / max(seen, 1), train_seconds=seconds, images_per_second=seen / seconds,
                   lr=self.optimizer.param_groups[0]["lr"])
        if loader.plan is not None:
            row["extra_decode_fraction"] = loader.plan.stats.extra_decode_fraction
        return row

    # ---- evaluation ------------------------------------------------------------------------

    def inference_model(self) -> torch.nn.Module:
        """The current model for forward passes without gradients: an eval-mode copy with
        BatchNorm folded into the convolutions (models.inference_copy)."""
        return inference_copy(self.model, channels_last=self.cfg.channels_last)

    @torch.no_grad()
    def predict(self, loader, num_samples: int) -> torch.Tensor:
        """(N, C) logits of every sample of ``loader``'s data set, in data-set order."""
        with _progress(num_samples, "evaluate", self.cfg.progress) as bar:
            return forward_pass(self.inference_model(), loader, torch.arange(num_samples), self.device,
                                autocast_dtype=self.autocast_dtype, memory_format=self.memory_format,
                                progress=bar).logits

    def test_accuracy(self) -> float:
        if self.test_loader is None:
            return float("nan")
        logits = self.predict(self.test_loader, len(self.data.test))
        return float((logits.argmax(1) == torch.from_numpy(self.data.test.labels)).float().mean())

    # ---- the whole run ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from ``start_epoch`` to ``cfg.epochs``; returns :meth:`summary`."""
        cfg = self.cfg
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
        AUROC where true labels are known, realised noise rate."""
        rows = self.metrics.rows
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
        return summary

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Everything needed to continue: model, optimiser, schedule, soft targets, loss history,
        the last partners and weights, random states.  Written to a temporary file, then renamed."""
        state = {
            "config": self.cfg.to_dict(),
            "epoch": self.start_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "targets": self.targets.state_dict(),
            "loss_history": None if self.loss_history is None else self.loss_history.state_dict(),
            "weight_table": self.weight_table,
            "partner_table": self.partner_table,
            "last_refresh": None if self.last_refresh is None else {
                "ids": self.last_refresh.ids, "clean_prob": self.last_refresh.clean_prob,
                "features": self.last_refresh.features},
            "best_test_accuracy": self.best_test_accuracy,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "generator": self.generator.get_state()},
        }
        path = self.out_dir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            log.info("no checkpoint in %s: starting from epoch 0", self.out_dir)
            self.metrics.truncate(0)
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in state["config"].items() if k not in ("epochs", "out_dir", "progress")}
        current = {k: v for k, v in self.cfg.to_dict().items() if k in saved}
        changed = sorted(k for k in saved if saved[k] != current[k])
        if changed:
            raise ValueError(f"resume: {path} was written with different settings ({', '.join(changed)}); "
                             "use another out_dir or the same settings")
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
        self.best_test_accuracy = state["best_test_accuracy"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.generator.set_state(state["rng"]["generator"])
        self.start_epoch = int(state["epoch"])
        self.metrics.truncate(self.start_epoch)
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
