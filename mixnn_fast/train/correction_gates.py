"""MixNN+'s correction gates between refreshes: what a refresh may correct, and what it leaves
for the next one.

A refresh's label correction is gated by what the refresh *before* it measured (the GMM's clean
probabilities, the model's agreement with the given labels, how its disagreements spread over
the class pairs, the neighbours' vote, the freeze and stability counters), all kept in the run's
:class:`~mixnn_fast.train.state.RunState` so that a resumed run gates exactly as an uninterrupted
one. :func:`plan_correction` reads that state before the refresh's forward pass;
:func:`record_refresh` writes this refresh's measurements into it afterwards. Both return the
metrics the trainer logs; the rules themselves are in train/methods.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.refresh import RefreshResult
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.distributed import Distributed
from mixnn_fast.train.methods import (correction_mask, correction_min_confidence, freezes_targets, gates_on_stability,
                                      spared_by_neighbours, stability_gate_applies, update_agreement,
                                      update_stability)
from mixnn_fast.train.state import RunState


@dataclass
class CorrectionPlan:
    """What one refresh may correct.

    only: (N,) bool, the samples whose targets it may correct (None: every sample).
    min_confidence: the probability a corrected sample's prediction needs (0: no condition).
    row: the metrics known before the refresh (the gates read from the last refresh).
    updates: whether the refresh's epoch moves targets at all (``TargetStore.is_update_epoch``):
        where it does not, nothing is held back and no share of held-back samples is logged.
    """

    only: torch.Tensor | None
    min_confidence: float
    row: dict
    updates: bool = True


def plan_correction(cfg: TrainConfig, run: RunState, pool: torch.Tensor, num_samples: int, *,
                    updates: bool = True) -> CorrectionPlan:
    """The correction a refresh over ``pool`` ((P,) int64 sample ids) may make, from the state the
    last refresh left in ``run``; ``updates``: whether its epoch moves targets at all (before
    ``correction_start`` it does not)."""
    # MixNN+: the samples seen as noisy, less the frozen and unstable ones
    only = correction_mask(cfg, run.clean_prob, num_samples, run.agreement, run.stable, run.given_agreement)
    row = {}
    spared = spared_by_neighbours(cfg, only, run.given_supported, run.given_agreement, run.disagreement_spread)
    if spared is not None:
        only &= ~spared
        if updates:
            row["held_back_by_neighbours"] = float(spared[pool].float().mean())  # of the pool, as the others
    if gates_on_stability(cfg) and cfg.plus_consistent_min_agreement:
        # whether this refresh's correction was held back by the gate (read from the last refresh)
        row["stability_gate_applied"] = float(stability_gate_applies(cfg, run.given_agreement))
    min_confidence = correction_min_confidence(cfg, run.given_agreement, run.disagreement_spread,
                                               guarded=spared is not None)
    return CorrectionPlan(only=only, min_confidence=min_confidence, row=row, updates=updates)


def final_correction(cfg: TrainConfig, run: RunState, ids: torch.Tensor, predicted: torch.Tensor,
                     confidence: torch.Tensor, num_samples: int,
                     looked_symmetric: float | None = None) -> torch.Tensor | None:
    """The samples whose reported label MixNN+'s last correction (``plus_final_correction``) sets
    to the final pass's prediction: (N,) bool, or None where it does not act (another method or
    correction, the option off, no refresh recorded, or with ``class_pair`` a run whose share of
    correction-phase refreshes that looked symmetric, ``looked_symmetric`` from
    :func:`~mixnn_fast.train.methods.symmetric_share`, is unknown or at least 1/2).  ``run``: the
    run's state after its last refresh (read, never changed); ``ids`` (P,) int64 the final pass's
    samples, ``predicted`` (P,) int64 its predictions and ``confidence`` (P,) float their
    probabilities.

    The final pass acts as the next refresh's correction, made hard: the samples
    :func:`plan_correction` lets that refresh correct, with the stability counters advanced by
    the final pass's predictions, whose prediction reaches the threshold it would require, and at
    least ``plus_min_confidence`` where it would require none.  ``class_pair_confident``: where
    ``class_pair`` acts, every sample of the pass whose prediction reaches ``plus_min_confidence``,
    whether or not that refresh could correct it.  ``plus_final_clean_confidence`` P (with
    ``always`` or ``class_pair``): also the samples the last refresh's GMM called clean whose
    prediction reaches P.

    Why: the last refresh that moves the soft targets is the one before the last epoch, and an
    EMA step (momentum 0.9) moves a target's argmax off the given label only after several
    corrections, so a wrong label the model has lately come to predict right is still reported as
    given (docs/mixnn_plus/final_correction.md).  A hard label needs the prediction to hold most of
    the probability, hence the floor where the gate sets no threshold (high noise).  Under
    symmetric noise its changes at sym-40 were as often wrong as right, under class-pair noise
    they gained in every run measured: hence ``class_pair``."""
    if (cfg.method != "mixnn_plus" or cfg.plus_correction != "selective" or cfg.plus_final_correction == "off"
            or run.clean_prob is None):
        return None
    if cfg.plus_final_correction.startswith("class_pair") and (looked_symmetric is None or looked_symmetric >= 0.5):
        return None
    if cfg.plus_final_correction == "class_pair_confident":
        # under class-pair noise the GMM on losses calls many wrong labels clean (a pair's hard
        # images lose as much as its flipped ones): the final model's confident prediction is
        # the better report there, whatever the mask says (docs/mixnn_plus/final_correction.md)
        relabel = torch.zeros(num_samples, dtype=torch.bool)
        relabel[ids] = confidence >= cfg.plus_min_confidence
        return relabel
    if gates_on_stability(cfg) and run.stable is not None:  # copies: the run's counters stay as saved
        run = replace(run, stable=run.stable.clone(), last_predicted=run.last_predicted.clone())
        update_stability(run.stable, run.last_predicted, ids, predicted)
    plan = plan_correction(cfg, run, ids, num_samples)
    threshold = max(plan.min_confidence, cfg.plus_min_confidence)
    relabel = torch.zeros(num_samples, dtype=torch.bool)
    relabel[ids] = plan.only[ids] & (confidence >= threshold)  # as a refresh compares (PoolScores)
    if cfg.plus_final_clean_confidence:
        # the labels the GMM called clean that the final model confidently predicts elsewhere:
        # under class-pair noise a pair's hard images lose as much as its flipped ones
        relabel[ids] |= (run.clean_prob[ids] >= 0.5) & (confidence >= cfg.plus_final_clean_confidence)
    return relabel


def corrects_symmetric_finally(cfg: TrainConfig, run: RunState, looked_symmetric: float | None) -> bool:
    """Whether :func:`final_symmetric_correction` acts in this run (see there)."""
    return (cfg.method == "mixnn_plus" and cfg.plus_correction == "selective" and cfg.plus_final_correction_symmetric
            and run.clean_prob is not None and looked_symmetric is not None and looked_symmetric >= 0.5)


def final_symmetric_correction(cfg: TrainConfig, run: RunState, ids: torch.Tensor, confidence: torch.Tensor,
                               num_samples: int, looked_symmetric: float | None) -> torch.Tensor | None:
    """The samples whose reported label MixNN+'s last correction where the noise looked symmetric
    (``plus_final_correction_symmetric``) sets to the tested model's prediction in the final pass:
    (N,) bool, or None where it does not act (another method or correction, the option off, no
    refresh recorded, or a run whose share of correction-phase refreshes that looked symmetric,
    ``looked_symmetric``, is unknown or under 1/2: there ``plus_final_correction`` decides).
    ``run``: the run's state after its last refresh (read only); ``ids`` (P,) int64 the pass's
    samples and ``confidence`` (P,) float the probabilities of the tested model's predictions.

    The samples the last refresh's GMM called noisy (clean probability < 1/2) whose prediction
    reaches ``plus_min_confidence``, with no stability condition and no symmetric threshold.
    Why: those two keep a correction made during training from feeding the model its own
    mistakes; a report after the last epoch feeds nothing back, and under symmetric noise a
    label the GMM calls noisy is usually wrong (docs/mixnn_plus/final_correction.md)."""
    if not corrects_symmetric_finally(cfg, run, looked_symmetric):
        return None
    relabel = torch.zeros(num_samples, dtype=torch.bool)
    relabel[ids] = (run.clean_prob[ids] < 0.5) & (confidence >= cfg.plus_min_confidence)  # NaN: not noisy
    return relabel


def record_refresh(cfg: TrainConfig, run: RunState, plan: CorrectionPlan, result: RefreshResult,
                   scores: PoolScores, dist: Distributed, num_samples: int, epoch: int) -> dict:
    """Keeps in ``run`` what the next refresh's gates read from this one (``result``, computed
    from ``scores``, every rank's rows); returns the plan's metrics with those of this refresh's
    correction. Collective where ``plan.min_confidence`` is set: every process calls it."""
    if run.clean_prob is None:
        run.clean_prob = torch.full((num_samples,), float("nan"))
    run.clean_prob[result.ids] = result.clean_prob.float()
    run.given_agreement = result.stats["given_label_agreement"]
    run.disagreement_spread = result.stats["disagreement_spread"]
    if result.given_label_supported is not None:  # the next refresh's guard reads this one's vote
        if run.given_supported is None:
            run.given_supported = torch.zeros(num_samples, dtype=torch.bool)
        run.given_supported[result.ids] = result.given_label_supported
    row = dict(plan.row)
    # a share held back only where targets moved (before correction_start every sample is "held");
    # the same on every process (the agreement is shared), so the collective is safe
    if plan.min_confidence and plan.updates:
        (held_back,) = dist.sum(scores.held_back)  # each process held back in its own shard
        row["held_back_by_confidence"] = held_back / len(scores.ids)
        row["correction_min_confidence"] = plan.min_confidence
    if freezes_targets(cfg):
        if run.agreement is None:
            run.agreement = torch.zeros(num_samples, dtype=torch.int16)
        update_agreement(cfg, run.agreement, scores.ids, scores.predicted, scores.current_labels, epoch)
        row["targets_frozen"] = float((run.agreement[scores.ids] >= cfg.plus_freeze).float().mean())
    if gates_on_stability(cfg):
        if run.stable is None:
            run.stable = torch.zeros(num_samples, dtype=torch.int16)
            run.last_predicted = torch.full((num_samples,), -1, dtype=torch.int16)
        update_stability(run.stable, run.last_predicted, scores.ids, scores.predicted)
        row["predictions_stable"] = float((run.stable[scores.ids] >= cfg.plus_consistent).float().mean())
    return row
