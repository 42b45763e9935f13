"""MixNN's per-epoch refresh (docs/design.md).  The forward pass over the training pool, without
augmentation, is streamed into :class:`~mixnn_fast.refresh.pool_scores.PoolScores` (each
sample's loss, feature and prediction; the soft targets corrected by EMA, eq. 12, on the way);
from those, :func:`refresh` computes the clean probability (GMM), the partners (nearest
neighbours or random) and the mixing weights (eq. 10-11), as a PartnerTable."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mixnn_fast.refresh.class_gmm import clean_probability_per_class
from mixnn_fast.refresh.gmm import GMM1D, clean_probability
from mixnn_fast.refresh.loss_history import LossHistory
from mixnn_fast.refresh.noise_structure import disagreement_spread, prediction_share_gap
from mixnn_fast.refresh.neighbours import nearest_neighbours
from mixnn_fast.refresh.neighbours.choice import choose_backend
from mixnn_fast.refresh.partners import PartnerTable
from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.weights import mixing_weights, random_partners
from mixnn_fast.separation import auroc


@dataclass(frozen=True)
class RefreshOptions:
    """How a refresh is computed (the MixNN settings of a :class:`~mixnn_fast.train.config.TrainConfig`).

    partners: "neighbours" (the K nearest in feature space), "random", or "in_batch" (chosen per
    batch later, from the features: no table here).  weights_mode: "gmm" (eq. 10-11), "avg" or
    "rdm" (mixnn_fast.refresh.weights).  gmm_loss: fit the GMM on the cross-entropy against the
    soft targets' argmax ("argmax_targets", as the authors' code does), the soft targets
    themselves ("soft_targets": a sample's loss is then at least its target's entropy, so once
    labels are corrected the GMM separates confident targets from uncertain ones rather than
    samples the model agrees with from those it does not), or the given labels ("given").
    gmm: keyword settings of :func:`~mixnn_fast.refresh.gmm.clean_probability`
    (max_iter, tol, reg_covar, seed).  neighbour_backend: "auto" (exact on the training ``device``
    when it is CUDA and the pool fits, else hnswlib; see ``neighbours.choice``), "hnsw", "exact"
    or "faiss".  label_vote (MixNN+'s neighbour vote, 0: off): with neighbour partners, each
    sample's clean probability is raised to at least the share of its ``label_vote`` nearest
    neighbours whose current label equals its own (see :func:`neighbour_agreement`).  split_check
    (MixNN+'s, off by default): when the GMM's two components are not separated (Ashman's D below
    2, :func:`gmm_separation`), no sample is called noisy: every clean probability is 1.
    split_check_min_agreement: the split check applies only at a refresh where at least this share
    of the pool's predictions equal their given labels (0: at every refresh).  D cannot tell "few
    labels wrong" (one bump of small losses) from "most labels wrong" (one broad bump); the share
    can, and the check is meant for the first.
    gmm_per_class: (MixNN+'s, off by default) the clean probabilities come from one GMM per class
    of the labels the losses were measured against (mixnn_fast.refresh.class_gmm); the global
    fit still gives ``gmm_separation``.  Logs ``gmm_class_fallback``, the share of samples whose
    class was too small to fit, or could not be split, and kept the global fit's probability.
    trust_min_agreement: with weights_mode "trust", anchors are kept whole only at a refresh where
    at least this share of the pool's predictions equal their given labels (a label-free sign that
    few labels are wrong); below it the weights are eq. 10-11's.
    trust_min_spread: with weights_mode "trust", anchors are kept whole only at a refresh whose
    ``disagreement_spread`` (mixnn_fast.refresh.noise_structure) reached this value as well: under
    class-pair noise a wrongly labelled image has neighbours with the same wrong label and a loss
    the GMM calls clean, so keeping such anchors whole trains on the flips; symmetric noise spreads
    the model's disagreements over many class pairs, class-pair noise over few.
    given_vote: (MixNN+'s neighbour guard, off by default) each sample's ``given_vote`` nearest
    neighbours vote with their given labels: ``RefreshResult.given_label_supported`` says where
    the sample's own given label is the most common among them (see :func:`given_label_supported`).
    """

    num_neighbours: int = 1
    partners: str = "neighbours"
    weights_mode: str = "gmm"
    label_correction: bool = True
    gmm_loss: str = "argmax_targets"
    gmm: dict = field(default_factory=dict)
    neighbour_backend: str = "auto"
    rdm_alpha: float = 1.0
    label_vote: int = 0
    split_check: bool = False
    split_check_min_agreement: float = 0.0
    gmm_per_class: bool = False
    trust_min_agreement: float = 0.0
    trust_min_spread: float = 0.0
    given_vote: int = 0
    num_threads: int | None = None
    device: str | None = None  # the training device: "auto" searches exactly on a CUDA device when the pool fits


@dataclass
class RefreshResult:
    losses: torch.Tensor                # (P,) float32, the losses the GMM was fitted on
    clean_prob: torch.Tensor            # (P,) float32 posterior of the low-loss component
    ids: torch.Tensor                   # (P,) int64 the pool's sample ids; rows below follow them
    table: PartnerTable | None          # partners (sample ids) and λ/β per anchor (None: in-batch partners)
    features: torch.Tensor              # (P, D) the pool's features (float32 or float16)
    gmm: GMM1D
    scores: PoolScores | None = None    # what the forward pass left per sample (for the audit)
    seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    given_label_supported: torch.Tensor | None = None  # (P,) bool, with ``given_vote``: the neighbours' vote


def refresh(scores: PoolScores, options: RefreshOptions = RefreshOptions(), *,
            loss_history: LossHistory | None = None, generator: torch.Generator | None = None,
            true_labels: torch.Tensor | None = None, num_samples: int | None = None) -> RefreshResult:
    """Everything MixNN recomputes after the forward pass over the pool.

    Args:
        scores: the pass's per-sample results (:class:`PoolScores`, losses measured and label
            correction applied while streaming), for the samples ``scores.ids``.  Everything is
            computed within the pool: neighbours are other pool samples, returned as sample ids.
        options: see :class:`RefreshOptions`.
        loss_history: when given, the GMM is fitted on each sample's losses averaged over its
            last refreshes.
        generator: draws random partners and RDM weights.
        true_labels: (N,) int64 true labels when known: adds the clean-detection AUROC, the mean
            clean probability of clean and noisy samples, and the fraction of samples whose
            first partner has the same true label, to ``stats``.
        num_samples: N (default: the number of given labels the scores were made with).
    """
    seconds: dict[str, float] = {}
    stats: dict[str, float] = {}
    start = time.perf_counter()
    ids, losses = scores.ids, scores.losses
    num_samples = len(scores.given_labels) if num_samples is None else num_samples
    if loss_history is not None:
        loss_history.update(ids, losses)
        losses_for_gmm = loss_history.mean(ids)
    else:
        losses_for_gmm = losses
    given = scores.given_labels[ids]  # the pool's given labels, in pool order
    # label-free: how often the model agrees with the given labels (low where many are wrong)
    stats["given_label_agreement"] = float((scores.predicted == given).float().mean())
    # label-free: whether those disagreements spread over many class pairs (symmetric noise) or few
    stats["disagreement_spread"] = disagreement_spread(given, scores.predicted, scores.targets.num_classes)
    # label-free: whether the model predicts each class about as often as the labels name it
    stats["prediction_share_gap"] = prediction_share_gap(given, scores.predicted, scores.targets.num_classes)
    clean_prob, gmm = clean_probability(losses_for_gmm, return_model=True, **options.gmm)
    stats["gmm_separation"] = gmm_separation(gmm)  # label-free: whether the losses split in two at all
    if options.gmm_per_class:
        clean_prob, stats["gmm_class_fallback"] = clean_probability_per_class(losses_for_gmm, scores.loss_labels,
                                                                              clean_prob, **options.gmm)
    if options.split_check:
        applies = stats["given_label_agreement"] >= options.split_check_min_agreement
        stats["split_check_applied"] = float(applies)
        if applies and stats["gmm_separation"] < SEPARATED:
            clean_prob = torch.ones_like(clean_prob)
    seconds["gmm"] = time.perf_counter() - start

    start = time.perf_counter()
    n = len(ids)
    neighbours = None  # positions within the pool
    supported = None
    if options.partners == "neighbours":
        features = scores.features
        backend, search_device = choose_backend(options.neighbour_backend, *features.shape, features.dtype,
                                                options.device)
        # a vote needs no more than the pool
        searched = max(options.num_neighbours, min(options.label_vote, n - 1), min(options.given_vote, n - 1))
        neighbours = nearest_neighbours(features.to(search_device), searched, backend=backend,
                                        num_threads=options.num_threads).cpu()
        stats["neighbours_exact_on_device"] = float(search_device.type != "cpu")
        if options.label_vote:
            agreement = neighbour_agreement(scores.current_labels, neighbours[:, :options.label_vote])
            stats["called_clean_by_vote"] = float(((clean_prob < 0.5) & (agreement >= 0.5)).float().mean())
            clean_prob = torch.maximum(clean_prob, agreement)
        if options.given_vote:
            supported = given_label_supported(given, neighbours[:, :options.given_vote])
            stats["given_label_supported"] = float(supported.float().mean())
        neighbours = neighbours[:, :options.num_neighbours]
    elif options.partners == "random":
        neighbours = random_partners(n, options.num_neighbours, generator)
    seconds["neighbours"] = time.perf_counter() - start

    mode = options.weights_mode
    if mode == "trust":
        if (stats["given_label_agreement"] < options.trust_min_agreement
                or stats["disagreement_spread"] < options.trust_min_spread):
            mode = "gmm"
        stats["anchors_trusted"] = float(mode == "trust")
    table = None
    if neighbours is not None:
        weights = mixing_weights(clean_prob, neighbours, mode=mode, generator=generator, alpha=options.rdm_alpha)
        table = PartnerTable.build(ids, ids[neighbours], weights, num_samples)
        stats.update(lambda_statistics(weights))
    if scores.correct:
        stats["targets_updated"] = float(scores.corrected)

    if true_labels is not None:
        true_labels = true_labels[ids]
        clean_mask = true_labels == given
        stats["clean_auroc"] = auroc(clean_prob, clean_mask)
        # once labels are corrected, "clean" means "the current label is right": the AUROC that
        # measures what the GMM is asked to detect from then on
        stats["clean_auroc_current_labels"] = auroc(clean_prob, scores.current_labels == true_labels)
        if clean_mask.any():
            stats["clean_prob_mean_clean"] = float(clean_prob[clean_mask].mean())
        if (~clean_mask).any():
            stats["clean_prob_mean_noisy"] = float(clean_prob[~clean_mask].mean())
        if neighbours is not None:
            stats["partner_same_true_label"] = float((true_labels[neighbours[:, 0]] == true_labels).float().mean())
    stats["gmm_iterations"] = float(gmm.n_iter_)
    stats["called_noisy"] = float((clean_prob < 0.5).float().mean())  # label-free: the share the GMM calls noisy
    return RefreshResult(losses=losses_for_gmm, clean_prob=clean_prob, ids=ids, table=table,
                         features=scores.features, gmm=gmm, scores=scores, seconds=seconds, stats=stats,
                         given_label_supported=supported)


# Ashman, Bird & Zucker (1994): a mixture of two Gaussians is cleanly bimodal when D > 2
SEPARATED = 2.0


def gmm_separation(gmm: GMM1D) -> float:
    """Ashman's D of a fitted two-component GMM, ``sqrt(2) |mu_1 - mu_2| / sqrt(var_1 + var_2)``
    (float; 0 for a degenerate fit).  Above 2 the two components are cleanly separated."""
    if gmm.degenerate_:
        return 0.0
    means, variances = gmm.means_.double(), gmm.variances_.double()
    return float(2 ** 0.5 * (means[0] - means[1]).abs() / variances.sum().sqrt())


def neighbour_agreement(labels: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Share of each sample's neighbours that carry its label: labels (P,) int64, neighbours (P, k)
    int64 positions in [0, P).  Returns (P,) float32 in [0, 1].

    MixNN+ takes a sample's clean probability as at least this share.  The GMM on per-sample losses
    calls a fixed share of the pool noisy whatever the real noise (a fifth to a third of it even on
    clean labels, docs/mixnn_plus/seven_candidates.md); those are then mixed away and corrected towards the model's
    predictions.  A hard image whose label its neighbours in feature space share is rarely
    mislabelled, while a wrong label under symmetric noise is rarely shared by its neighbours."""
    return (labels[neighbours] == labels.unsqueeze(1)).float().mean(dim=1)


#: Rows of the (rows, k, k) comparison :func:`given_label_supported` builds at once (k = 10:
#: 6.5 MB), so a WebVision-sized pool never holds a (P, C) count table (1M x 1000 int64: 8 GB).
_VOTE_CHUNK_ROWS = 1 << 16


def given_label_supported(labels: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Where each sample's label is the most common label among its neighbours' (a k-nearest-
    neighbour vote, ties counting for the sample's own label): labels (P,) int64 given labels,
    neighbours (P, k) int64 positions in [0, P), k >= 1.  Returns (P,) bool.

    MixNN+'s neighbour guard spares these from the correction (Bahri et al. 2020, "Deep k-NN for
    noisy labels", keep the samples whose label agrees with the k-NN vote): under symmetric noise a
    wrong label is rarely its neighbourhood's most common, while a hard image the model doubts
    still sits among images that carry its right label.  A label's count is compared with the
    count of the most common label of the row, computed within the row (no (P, C) table)."""
    if neighbours.ndim != 2 or neighbours.shape[0] != labels.shape[0] or neighbours.shape[1] < 1:
        raise ValueError(f"given_label_supported: neighbours must be (P, k >= 1) for P = {labels.shape[0]} labels, "
                         f"got {tuple(neighbours.shape)}")
    supported = torch.empty(labels.shape[0], dtype=torch.bool)
    for start in range(0, labels.shape[0], _VOTE_CHUNK_ROWS):
        rows = slice(start, start + _VOTE_CHUNK_ROWS)
        votes = labels[neighbours[rows]]  # (R, k) the neighbours' labels
        own = (votes == labels[rows].unsqueeze(1)).sum(dim=1)
        most = (votes.unsqueeze(2) == votes.unsqueeze(1)).sum(dim=2).max(dim=1).values  # the commonest label's count
        supported[rows] = own >= most
    return supported


def lambda_statistics(weights: torch.Tensor) -> dict[str, float]:
    """Mean and 10/50/90th percentiles of the anchors' own weight λ (column 0 of (P, K+1))."""
    lam = weights[:, 0].float()
    q10, q50, q90 = (float(q) for q in torch.quantile(lam, torch.tensor([0.1, 0.5, 0.9])))
    return {"lambda_mean": float(lam.mean()), "lambda_q10": q10, "lambda_q50": q50, "lambda_q90": q90}
