"""Where a run stands, as a checkpoint sees it: the position in the schedule and everything a
resumed run needs to continue exactly (see docs/resume.md).

:class:`RunState` is the trainer's own bookkeeping (position, the partial epoch, the current
partner table, the best accuracy, unreadable images); :func:`checkpoint_state` and
:func:`restore_checkpoint` put it together with the modules' state dicts and the random states
into one dict of tensors and plain containers, and back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixnn_fast.refresh.partners import PartnerTable
from mixnn_fast.train.checkpoint import (CHECKPOINT, PREVIOUS, CheckpointError, capture_rng, load_checkpoint,
                                         restore_rng)
from mixnn_fast.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """The trainer's bookkeeping between steps.

    epoch, batch: the next step to run (batch > 0: inside epoch ``epoch``).
    partial: that epoch's metrics row so far and its sums (``row``, ``loss_sum``, ``seen``,
        ``seconds``), or None between epochs.
    table: the partners and weights the current epoch trains with (None: no partners).
    best_test_accuracy: the best test accuracy so far (NaN before the first test).
    skipped: sample id -> reason, the unreadable images found so far.
    """

    epoch: int = 0
    batch: int = 0
    partial: dict | None = None
    table: PartnerTable | None = None
    best_test_accuracy: float = float("nan")
    skipped: dict[int, str] = field(default_factory=dict)
    rank_rng: list = field(default_factory=list)  # every process's random states at the last epoch boundary
    clean_prob: torch.Tensor | None = None  # (N,) float32 the last refresh's clean probability (NaN: not in its pool)
    agreement: torch.Tensor | None = None  # (N,) int16 MixNN+'s consecutive agreements (methods.update_agreement)
    stable: torch.Tensor | None = None  # (N,) int16 MixNN+'s consecutive refreshes with one prediction
    last_predicted: torch.Tensor | None = None  # (N,) int16 each sample's prediction at its last refresh (-1: none)
    warmup_end: int | None = None  # MixNN+: the epoch whose refresh ended a warm-up chosen from the GMM (None: not yet)
    given_agreement: float | None = None  # the last refresh's share of predictions equal to the given labels
    disagreement_spread: float | None = None  # the last refresh's spread of those that differ (refresh.noise_structure)
    given_supported: torch.Tensor | None = None  # (N,) bool MixNN+'s neighbour guard: the last vote's support


def _table_state(table: PartnerTable | None) -> dict | None:
    if table is None:
        return None
    return {"anchors": table.anchors, "partners": table.partners, "weights": table.weights,
            "num_samples": table.num_samples}


def checkpoint_state(config: dict, run: RunState, modules: dict, generator: torch.Generator,
                     extra: dict | None = None) -> dict:
    """One checkpoint's content: ``config`` (the settings), ``run``, each of ``modules``' state
    dict (model, optimiser, scheduler, soft targets, loss history; None skipped), every random
    state, and ``extra`` (tensors and plain values)."""
    return {
        "config": config,
        "position": {"epoch": run.epoch, "batch": run.batch},
        "partial_epoch": run.partial,
        "partner_table": _table_state(run.table),
        "best_test_accuracy": run.best_test_accuracy,
        "skipped": {int(k): v for k, v in run.skipped.items()},
        "modules": {name: (None if module is None else module.state_dict()) for name, module in modules.items()},
        "rng": capture_rng(generator),
        "rank_rng": run.rank_rng,
        "clean_prob": run.clean_prob,
        "agreement": run.agreement,
        "warmup_end": run.warmup_end,
        "stable": run.stable,
        "last_predicted": run.last_predicted,
        "given_agreement": run.given_agreement,
        "disagreement_spread": run.disagreement_spread,
        "given_supported": run.given_supported,
        "extra": extra or {},
    }


def restore_checkpoint(state: dict, modules: dict, generator: torch.Generator, path: Path, *, rank: int = 0,
                       world_size: int = 1) -> RunState:
    """Load ``state`` into ``modules`` and ``generator``; returns the run's bookkeeping.  Process
    ``rank`` of ``world_size`` gets its own random states back when the checkpoint was written
    by as many processes (else rank 0's).  A state that does not fit (missing keys, other
    shapes) is a CheckpointError naming ``path``."""
    try:
        for name, module in modules.items():
            # a module the run does not use may be absent from checkpoints that predate it
            saved = state["modules"][name] if module is not None else state["modules"].get(name)
            if module is not None and saved is not None:
                module.load_state_dict(saved)
        table = state["partner_table"]
        if table is not None:
            table = PartnerTable.build(table["anchors"], table["partners"], table["weights"], table["num_samples"])
        run = RunState(epoch=int(state["position"]["epoch"]), batch=int(state["position"]["batch"]),
                       partial=state["partial_epoch"], table=table,
                       best_test_accuracy=float(state["best_test_accuracy"]),
                       skipped={int(k): str(v) for k, v in state["skipped"].items()},
                       rank_rng=list(state.get("rank_rng", [])), clean_prob=state.get("clean_prob"),
                       agreement=state.get("agreement"), warmup_end=state.get("warmup_end"),
                       stable=state.get("stable"), last_predicted=state.get("last_predicted"),
                       given_agreement=state.get("given_agreement"),
                       disagreement_spread=state.get("disagreement_spread"),
                       given_supported=state.get("given_supported"))
        restore_rng(state["rng"], generator)
        if rank and len(run.rank_rng) == world_size:
            restore_rng(run.rank_rng[rank])  # this process's global generators; the trainer's own is rank 0's
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"checkpoint: {path} does not fit this run ({type(exc).__name__}: {reason})") from None
    return run


def read_resume_checkpoint(cfg: TrainConfig, *, previous: bool) -> dict | None:
    """The checkpoint in ``cfg.out_dir`` to resume from, its settings checked against ``cfg``
    (None: nothing saved yet, the run starts at epoch 0).  Only the resumable fields may differ
    (ValueError naming the others); a truncated or corrupt file is a CheckpointError."""
    out_dir = Path(cfg.out_dir)
    try:
        state = load_checkpoint(out_dir, previous=previous)
    except FileNotFoundError:
        if previous or (out_dir / PREVIOUS).exists():
            raise
        log.info("no checkpoint in %s: starting from epoch 0", out_dir)
        return None
    try:
        saved = TrainConfig.from_saved(state["config"], source="the checkpoint's settings")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {out_dir / CHECKPOINT} holds unusable settings ({exc})") from None
    changed = cfg.experiment_differences(saved)
    if changed:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"resume: {out_dir} was trained with other settings ({detail}); only epochs, progress, "
                         "tensorboard, eval_every, checkpoint_every(_steps) and num_threads may change when resuming; "
                         "use another --out-dir to train these settings")
    done = int(state["position"]["epoch"])
    if cfg.epochs < done:
        raise ValueError(f"epochs: {out_dir} has already trained {done} epochs; ask for at least that many "
                         f"(got {cfg.epochs})")
    return state
