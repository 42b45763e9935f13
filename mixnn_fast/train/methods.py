"""What each training method does: its phase per epoch (which inputs it mixes), its loss, its
optimiser and schedule, and the settings of its refresh."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from mixnn_fast.refresh.refresh import SEPARATED, RefreshOptions
from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.losses import generalized_cross_entropy, soft_cross_entropy, symmetric_cross_entropy


def phase_of(cfg: TrainConfig, epoch: int, warmup_end: int | None = None) -> str:
    """What epoch ``epoch`` trains with: "plain" (one-hot given labels), "mixup" (in-batch random
    partners, one λ per batch) or "mixnn" (the refresh's partner table and soft targets).

    MixNN warms up with plain epochs; with ``authors_schedule`` it trains plain mixup between the
    warm-up and the start of label correction, as the authors' code does.  With MixNN+'s warm-up
    chosen from the GMM (:func:`chooses_warmup`) it lasts until ``warmup_end``, the epoch whose
    refresh ended it (None: not ended yet)."""
    if cfg.method == "mixup":
        return "mixup"
    if chooses_warmup(cfg):
        if warmup_end is None or epoch < warmup_end:
            return "plain"
    elif not cfg.refreshes or epoch < cfg.warmup_epochs:
        return "plain"
    if cfg.authors_schedule and epoch < cfg.correction_start:
        return "mixup"
    return "mixnn"


def loss_function(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits (B, C), targets (B, C) soft) -> 0-d`` of the method: GCE or SCE (also MixNN+
    with ``plus_loss="gce"`` or ``"sce"``, on its mixed targets), or the soft cross-entropy (CE,
    mixup, MixNN, MixNN+'s default)."""
    if cfg.method == "gce" or (cfg.method == "mixnn_plus" and cfg.plus_loss == "gce"):
        return functools.partial(generalized_cross_entropy, q=cfg.gce_q)
    if cfg.method == "sce" or (cfg.method == "mixnn_plus" and cfg.plus_loss == "sce"):
        return functools.partial(symmetric_cross_entropy, alpha=cfg.sce_alpha, beta=cfg.sce_beta)
    return soft_cross_entropy


def optimisation(cfg: TrainConfig, parameters):
    """The paper's optimiser and schedule: SGD with momentum and weight decay, cosine annealing
    with warm restarts every ``restart_period`` epochs from ``lr`` to ``lr_min``.  Returns
    (optimizer, scheduler)."""
    optimizer = torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period,
                                                                     eta_min=cfg.lr_min)
    return optimizer, scheduler


def trusts_symmetric_anchors(cfg: TrainConfig) -> bool:
    """Whether MixNN+ keeps anchors whole (trust weights) where the noise looks symmetric
    (``plus_symmetric_trust``, with the GMM's weights and neighbour partners).

    Why: MixNN mixes an anchor the GMM calls clean half-and-half with its neighbour, so at low
    noise the model never sees most right-labelled images whole; kept whole they are fitted
    (held out noisy labels, fresh seeds at sym-20/40: +0.0041 +- 0.0004; docs/mixnn_plus/trusted_anchors.md,
    "Trusted anchors where the noise looks symmetric").  Under class-pair noise a flipped image's
    neighbours carry the same wrong label and its loss looks clean, so trust there trains on the
    flips (-6.6 points at asym-40): hence the two label-free gates, the model's agreement with the
    given labels (:data:`TRUST_MIN_AGREEMENT`) and the spread of its disagreements
    (:data:`SYMMETRIC_SPREAD`)."""
    return (cfg.method == "mixnn_plus" and cfg.plus_symmetric_trust and cfg.weights == "gmm"
            and cfg.partners == "neighbours")


def refresh_options(cfg: TrainConfig, threads: int, device: torch.device | None = None) -> RefreshOptions:
    """The refresh's settings from a run's configuration; ``device``: the training device."""
    symmetric_trust = trusts_symmetric_anchors(cfg)
    return RefreshOptions(
        num_neighbours=cfg.num_neighbours, partners=cfg.partners,
        weights_mode="trust" if symmetric_trust else cfg.weights,
        label_correction=cfg.label_correction, gmm_loss=cfg.gmm_loss,
        gmm=dict(max_iter=cfg.gmm_max_iter, tol=cfg.gmm_tol, reg_covar=cfg.gmm_reg_covar, seed=cfg.seed),
        neighbour_backend=cfg.neighbour_backend, rdm_alpha=cfg.rdm_alpha, num_threads=threads,
        label_vote=cfg.plus_vote if cfg.method == "mixnn_plus" else 0,
        split_check=cfg.plus_split_check and cfg.method == "mixnn_plus",
        split_check_min_agreement=cfg.plus_split_check_min_agreement,
        gmm_per_class=cfg.plus_gmm_per_class and cfg.method == "mixnn_plus",
        trust_min_agreement=TRUST_MIN_AGREEMENT if symmetric_trust else cfg.trust_min_agreement,
        trust_min_spread=SYMMETRIC_SPREAD if symmetric_trust else cfg.trust_min_spread,
        given_vote=cfg.plus_neighbour_guard if cfg.method == "mixnn_plus" else 0,
        device=None if device is None else str(device))


def chooses_warmup(cfg: TrainConfig) -> bool:
    """Whether the warm-up's length is chosen from the GMM's separation (MixNN+ with
    ``plus_warmup_max`` > 0) rather than fixed at ``warmup_epochs``."""
    return cfg.method == "mixnn_plus" and cfg.plus_warmup_max > 0


def probes_warmup(cfg: TrainConfig, epoch: int, warmup_end: int | None) -> bool:
    """Whether the refresh before ``epoch`` decides if the warm-up ends there: the warm-up is
    chosen, has not ended, and has lasted at least ``warmup_epochs``."""
    return chooses_warmup(cfg) and warmup_end is None and epoch >= cfg.warmup_epochs


def warmup_ends(cfg: TrainConfig, epoch: int, separation: float) -> bool:
    """Whether the warm-up ends at ``epoch``, given its refresh's GMM separation (Ashman's D of
    the two components on the per-sample losses): once they are separated (D >= 2), or at
    ``plus_warmup_max`` at the latest.

    Why: MixNN's weights and correction read the GMM, which is only informative once the losses
    split in two; a fixed warm-up starts MixNN at D 1.4-1.9 on sym-20 to sym-80 (docs/mixnn_plus/warmup.md),
    while a warm-up past the point where the plain model memorises the wrong labels closes the
    split again, hence the bound."""
    return separation >= SEPARATED or epoch >= cfg.plus_warmup_max


def averages_weights(cfg: TrainConfig) -> bool:
    """Whether the run tests an average of its weights (MixNN+ with ``plus_average_last`` > 0)."""
    return cfg.method == "mixnn_plus" and cfg.plus_average_last > 0


def joins_average(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the weights at the end of ``epoch`` join the tested average: it ends a warm-restart
    cycle (the learning rate's lowest point) within the last ``plus_average_last`` share of the
    ``cfg.epochs`` epochs, as stochastic weight averaging takes its cyclic snapshots (Izmailov et
    al. 2018, over the last quarter of training there).  Why: MixNN+'s test accuracy moves by up
    to 7 points between consecutive cycle ends at asym-40 (docs/mixnn_plus/weight_average.md) while its labels
    move little; the average of those snapshots is a model at the centre of what they explore."""
    done = epoch + 1
    start = cfg.epochs - round(cfg.plus_average_last * cfg.epochs)
    return averages_weights(cfg) and done > start and done % cfg.restart_period == 0


def uses_early_learning(cfg: TrainConfig) -> bool:
    """Whether the run adds ELR's penalty to its loss (MixNN+ with ``plus_elr`` > 0)."""
    return cfg.method == "mixnn_plus" and cfg.plus_elr > 0


def uses_class_balance(cfg: TrainConfig) -> bool:
    """Whether the run adds the class-balance penalty to its loss (MixNN+ with ``plus_prior`` > 0)."""
    return cfg.method == "mixnn_plus" and cfg.plus_prior > 0


def corrects_labels(cfg: TrainConfig) -> bool:
    """Whether the refresh corrects labels (MixNN+: unless ``plus_correction="none"``)."""
    if cfg.method == "mixnn_plus":
        return cfg.label_correction and cfg.plus_correction != "none"
    return cfg.label_correction


def correction_mask(cfg: TrainConfig, clean_prob: torch.Tensor | None, num_samples: int,
                    agreement: torch.Tensor | None = None, stable: torch.Tensor | None = None,
                    given_agreement: float | None = None) -> torch.Tensor | None:
    """Which samples MixNN+'s correction moves, and how far.

    Selective: (N,) bool, the samples the last refresh's GMM called noisy (``clean_prob`` (N,),
    NaN where not scored, below 1/2) and whose targets are not frozen (``agreement`` (N,) int16
    below ``cfg.plus_freeze``, see :func:`update_agreement`) and, with ``cfg.plus_consistent``,
    whose prediction has stayed the same at that many refreshes (``stable`` (N,) int16, see
    :func:`update_stability`; None: no refresh counted yet, nothing is) - that gate only where
    :func:`stability_gate_applies` to ``given_agreement``, the share of the last refresh's
    predictions that agreed with the given labels (:func:`spared_by_neighbours` may spare more).
    Graded: (N,) float32, the share of
    the EMA step each sample takes, 1 - its clean probability (0 where not scored).  None: correct
    every sample of the pool.  Before any GMM (``clean_prob`` None) nothing is known to be noisy.

    Why graded: the switch at 1/2 moves a clean image the GMM puts just under it as far as a
    certainly wrong one (docs/mixnn_plus/seven_candidates.md: on clean labels the selective correction costs 4
    points); DivideMix refines a label by ``w y + (1 - w) p`` for the same reason."""
    if cfg.method != "mixnn_plus" or cfg.plus_correction not in ("selective", "graded"):
        return None
    if clean_prob is None:
        return torch.zeros(num_samples, dtype=torch.bool)
    if cfg.plus_correction == "graded":
        return torch.nan_to_num(1.0 - clean_prob.float(), nan=0.0).clamp_(0.0, 1.0)
    mask = clean_prob < 0.5  # NaN compares False: never scored, never corrected
    if agreement is not None and cfg.plus_freeze > 0:
        mask &= agreement < cfg.plus_freeze
    if stability_gate_applies(cfg, given_agreement):
        mask &= torch.zeros_like(mask) if stable is None else stable >= cfg.plus_consistent
    return mask


def spared_by_neighbours(cfg: TrainConfig, mask: torch.Tensor | None, supported: torch.Tensor | None,
                         given_agreement: float | None, disagreement_spread: float | None) -> torch.Tensor | None:
    """The samples of a selective correction ``mask`` (N,) bool that MixNN+'s neighbour guard
    spares this refresh: those whose given label the last refresh's neighbours supported
    (``supported`` (N,) bool, ``RefreshResult.given_label_supported``), where
    :func:`neighbour_guard_applies`.  (N,) bool, or None where the guard does not act (no mask,
    no vote yet, or the gates shut): the mask and the confidence condition stay as they are."""
    if mask is None or mask.dtype != torch.bool or supported is None or not neighbour_guard_applies(
            cfg, given_agreement, disagreement_spread):
        return None
    return mask & supported


def neighbour_guard_applies(cfg: TrainConfig, given_agreement: float | None,
                            disagreement_spread: float | None) -> bool:
    """Whether MixNN+'s neighbour guard (``plus_neighbour_guard`` > 0) acts after a refresh with
    ``given_agreement`` and ``disagreement_spread``: where :func:`stability_gate_applies` and the
    spread reached :data:`SYMMETRIC_SPREAD`, the refreshes where the symmetric confidence acts.
    There the samples whose given label their neighbours' given labels support are not corrected
    (:func:`spared_by_neighbours`), and the others need only ``plus_min_confidence``
    (:func:`correction_min_confidence`).

    Why: under symmetric noise a right label is usually its neighbourhood's commonest and a wrong
    one rarely is (the k-NN vote of Bahri et al. 2020), a second opinion the model's own
    confidence lacks: at sym-20 today's default keeps 130-136 of about 360 wrong labels, half of
    them predicted right with a probability under the symmetric threshold, and moves 25-40 right
    ones (docs/mixnn_plus/neighbour_guard.md).  Under class-pair noise a flipped label is common among its
    neighbours too (40% of a class at asym-40), so the vote would keep flips: hence the same
    label-free gates as the trusted anchors."""
    return (cfg.method == "mixnn_plus" and cfg.plus_neighbour_guard > 0
            and stability_gate_applies(cfg, given_agreement) and looks_symmetric(disagreement_spread))


def stability_gate_applies(cfg: TrainConfig, given_agreement: float | None) -> bool:
    """Whether the stability gate (``plus_consistent``) holds back the correction after a refresh
    whose predictions agreed with the given labels on a share ``given_agreement``: always with
    ``plus_consistent_min_agreement`` 0, else once that share reaches it (None, no refresh
    recorded yet: not; before a refresh there is no GMM and nothing is corrected anyway).

    Why: the gate gains where most labels are right (sym-20/40, asym-40, clean labels) and loses
    at sym-80, where a model that has learnt few classes well rarely predicts one class twice and
    the gate then leaves most wrong labels as they are (docs/mixnn_plus/stability_gate.md).  The share of
    predictions that agree with the given labels tells the two apart without any true label
    (sym-20: 57-71%, sym-80: 14-34% in those runs)."""
    if not gates_on_stability(cfg):
        return False
    if not cfg.plus_consistent_min_agreement:
        return True
    return given_agreement is not None and given_agreement >= cfg.plus_consistent_min_agreement


def correction_min_confidence(cfg: TrainConfig, given_agreement: float | None,
                              disagreement_spread: float | None = None, guarded: bool = False) -> float:
    """The probability MixNN+'s model must give its prediction for a sample's target to be
    corrected in this refresh (``PoolScores(min_confidence=...)``): 0 unless
    :func:`stability_gate_applies` after a refresh with ``given_agreement``; there
    ``cfg.plus_symmetric_confidence`` when it is set and that refresh's ``disagreement_spread``
    (mixnn_fast.refresh.noise_structure) reached :data:`SYMMETRIC_SPREAD`, else
    ``cfg.plus_min_confidence``; ``cfg.plus_min_confidence`` as well where MixNN+'s neighbour guard
    spared this refresh's supported samples (``guarded``, :func:`spared_by_neighbours`).

    Why: where most labels are right, the corrections that turn a right label wrong are the hard
    images, on which the model is unsure (sym-20, the final model: median probability of the
    prediction 0.58 on those, 0.86 on the wrong labels it corrects; docs/mixnn_plus/confidence.md); at high
    noise every prediction is unsure and a threshold would stop the correction, hence only with
    the gate.  A stricter threshold (0.8) gains at symmetric noise and loses under class-pair
    noise, where the model is rarely that sure against a label a similar class gave; the spread
    of the model's disagreements tells the two apart without true labels.  Where the neighbours'
    vote has spared the right labels it supports, the stricter threshold would only keep wrong
    labels the model predicts right but unsurely (at sym-20 they are most of the labels MixNN+
    keeps wrong, median probability 0.57-0.75): the guard takes over its job."""
    if not stability_gate_applies(cfg, given_agreement):
        return 0.0
    if guarded:
        return cfg.plus_min_confidence
    if cfg.plus_symmetric_confidence and looks_symmetric(disagreement_spread):
        return cfg.plus_symmetric_confidence
    return cfg.plus_min_confidence


#: The disagreement spread from which MixNN+ takes the noise to be symmetric.  Fixed from one
#: development run per setting with the default (seed 140; docs/mixnn_plus/symmetric_confidence.md, "A confidence by
#: the noise's structure"), over every refresh: asym-40 0.16-0.28, clean labels 0.16-0.31,
#: sym-20 0.34-0.77 (most above 0.45), sym-40 0.51-0.90.  A refresh of symmetric noise under it
#: (the model mid-restart) keeps plus_min_confidence: the safe side.
SYMMETRIC_SPREAD = 0.35


def looks_symmetric(disagreement_spread: float | None) -> bool:
    """Whether a refresh's ``disagreement_spread`` (None: no refresh yet) reached
    :data:`SYMMETRIC_SPREAD`: the label-free sign of symmetric noise that the symmetric confidence
    and the neighbour guard act on."""
    return disagreement_spread is not None and disagreement_spread >= SYMMETRIC_SPREAD

#: The share of the pool's predictions that must equal the given labels for MixNN+'s trusted
#: anchors (``plus_symmetric_trust``): "most", the one value tried since 2026-12-01
#: (docs/mixnn_plus/seven_candidates.md, "Seven more candidates").
TRUST_MIN_AGREEMENT = 0.5


def gates_on_stability(cfg: TrainConfig) -> bool:
    """Whether MixNN+ corrects only samples with a stable prediction (``plus_consistent`` > 0)."""
    return cfg.method == "mixnn_plus" and cfg.plus_correction == "selective" and cfg.plus_consistent > 0


def update_stability(stable: torch.Tensor, last_predicted: torch.Tensor, ids: torch.Tensor,
                     predicted: torch.Tensor) -> None:
    """Count, in place, at how many consecutive refreshes the model has predicted the same class
    for each sample, this one included: ``stable`` (N,) int16 (saturating at 32767),
    ``last_predicted`` (N,) int16 each sample's prediction at its last refresh (-1: none yet);
    ``ids`` (P,) the refresh's pool, ``predicted`` (P,) int64 its predictions.

    Why (SELFIE, Song et al. 2019, corrects only samples whose recent predictions agree): the
    GMM calls the hardest images noisy even when their labels are right, and the correction then
    moves them towards a prediction that is wrong for exactly those images (docs/mixnn_plus/stability_gate.md,
    clean labels); the model's prediction on an image it cannot place changes from refresh to
    refresh, while on a wrong label it has learnt around it stays."""
    same = last_predicted[ids] == predicted.to(torch.int16)
    stable[ids] = torch.where(same, (stable[ids].int() + 1).clamp(max=32767).to(torch.int16),
                              torch.ones_like(stable[ids]))
    last_predicted[ids] = predicted.to(torch.int16)


def symmetric_share(rows: list[dict], correction_start: int) -> float | None:
    """The share of a run's refreshes from epoch ``correction_start`` on (metrics ``rows`` that
    logged ``disagreement_spread``) whose spread reached :data:`SYMMETRIC_SPREAD`: how often the
    model's disagreements with the given labels looked like symmetric noise while labels were
    corrected.  None before any such refresh.  In the table's runs: 0.00 at asym-40, 0.85-1.00 at
    sym-20/40/60/80 (docs/mixnn_plus/final_correction.md), where one refresh's spread alone falls under the
    threshold in a quarter of the sym-20/40 runs."""
    spreads = [r["disagreement_spread"] for r in rows
               if r.get("epoch", -1) >= correction_start and r.get("disagreement_spread") is not None]
    if not spreads:
        return None
    return sum(s >= SYMMETRIC_SPREAD for s in spreads) / len(spreads)


def recomputes_average_statistics(cfg: TrainConfig, looked_symmetric: float | None) -> bool:
    """Whether the weight average's BatchNorm statistics are recomputed after a snapshot joins
    it (``cfg.plus_average_bn``): always with "recomputed", never with "averaged", and with
    "symmetric" where the share of the correction-phase refreshes so far that looked symmetric,
    ``looked_symmetric`` (:func:`symmetric_share`; None: none yet), is at least 1/2 (the gate of
    the symmetric last correction).  A run whose share crosses 1/2 between snapshots gets, after
    a snapshot that is not recomputed, the running mean of the statistics it held and the new
    snapshot's (the weight average's own update); no run measured crossed it (asym-40 0.00 at
    every snapshot, symmetric noise 0.83 or more).

    Why "symmetric" (the default since 2026-12-08): the recomputed statistics raise the held-out
    accuracy under symmetric noise and lower it under class-pair noise (asym-40: -0.25 to -0.28
    points of held-out true accuracy over 48 fresh runs), which agreement with the noisy held-out
    labels cannot see there; the forward-corrected held-out likelihood of the noisy labels
    (:func:`mixnn_fast.audit.noise_transition.noise_corrected_log_likelihood`) saw it, and decided
    (docs/mixnn_plus/weight_average.md)."""
    if cfg.plus_average_bn == "symmetric":
        return looked_symmetric is not None and looked_symmetric >= 0.5
    return cfg.plus_average_bn == "recomputed"


def freezes_targets(cfg: TrainConfig) -> bool:
    """Whether MixNN+ freezes targets (``plus_freeze`` > 0 with selective correction)."""
    return cfg.method == "mixnn_plus" and cfg.plus_correction == "selective" and cfg.plus_freeze > 0


def update_agreement(cfg: TrainConfig, agreement: torch.Tensor, ids: torch.Tensor, predicted: torch.Tensor,
                     current_labels: torch.Tensor, epoch: int) -> None:
    """Count, in place, how many consecutive refreshes the model has predicted each sample's
    current label (``agreement`` (N,) int16; ``ids`` (P,) the refresh's pool, ``predicted`` and
    ``current_labels`` (P,) int64 its prediction and the argmax of its target before this
    refresh's correction).  Counting starts with the correction (``cfg.correction_start``); a
    sample that reaches ``cfg.plus_freeze`` stays there: its target is frozen for good.

    Why: late in a run the GMM on the current labels separates poorly, calls samples with right
    labels noisy and the EMA pulls them towards the model's mistakes (docs/mixnn_plus/seven_candidates.md); a label
    the model has agreed with for several refreshes is one it has learned, and is kept."""
    if epoch < cfg.correction_start:
        return
    k = cfg.plus_freeze
    count = agreement[ids]
    frozen = count >= k
    agrees = predicted == current_labels
    agreement[ids] = torch.where(frozen, count, torch.where(agrees, count + 1, torch.zeros_like(count)))
