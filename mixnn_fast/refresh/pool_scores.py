"""The refresh's forward pass, consumed batch by batch: what each sample's logits and features
leave behind, without ever holding the pool's (P, C) logits or probabilities.

At Clothing1M's or WebVision's size a pool's logits alone are gigabytes (1M × 1000 float32 is
4 GB; the old refresh held four such copies).  Everything the refresh needs per sample is
computed from one batch's logits while they are at hand:

- the loss the GMM is fitted on, against the soft target *before* this refresh's correction
  (the argmax, the soft target itself, or the given label: ``gmm_loss``);
- label correction: the batch's soft targets move towards its predictions (EMA; the update of
  one sample does not depend on any other, so batch by batch equals all at once);
- for the label audit: the model's probability of the given label, its prediction and that
  prediction's probability;
- the feature, stored in ``features_dtype`` (float16 for large pools: half the memory, and
  nearest-neighbour ranks barely change).

With several processes each fills the rows of its own shard; :meth:`PoolScores.synchronise`
(train/distributed.py) combines them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GMM_LOSSES = ("argmax_targets", "soft_targets", "given")
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: "auto" keeps float32 features up to this many elements (256 MB): small pools stay exactly as
#: they were; a Clothing1M pool (128k × 2048) is stored in float16 (512 MB instead of 1 GB)
AUTO_FLOAT32_ELEMENTS = 1 << 26


def features_dtype(name: str, pool_size: int, feature_dim: int | None = None) -> torch.dtype | str:
    """The storage of the pool's features for the setting ``name`` ("auto", "float32",
    "float16"); "auto" stays unresolved (the string) until the feature width is known."""
    if name == "auto":
        if feature_dim is None:
            return "auto"
        return torch.float32 if pool_size * feature_dim <= AUTO_FLOAT32_ELEMENTS else torch.float16
    if name not in FEATURE_DTYPES:
        raise ValueError(f"features_dtype: must be auto, float32 or float16, got {name!r}")
    return FEATURE_DTYPES[name]


class PoolScores:
    """Per-sample results of the refresh's forward pass over the pool ``ids``.

    Args:
        ids: (P,) int64 sorted sample ids of the pool.
        targets: the soft-target store (read for the losses, corrected in place when
            ``correct`` is true).
        given_labels: (N,) int64 given labels of the whole data set.
        epoch: the refresh's epoch (the store decides whether its schedule updates now).
        gmm_loss: what the GMM's losses are measured against (see module docstring).
        correct: apply label correction.
        correct_only: when given, (N,) bool: correct only the samples marked (e.g. those the last
            GMM called noisy), the others keep their targets; or (N,) float in [0, 1]: the share
            of the EMA step each sample takes (its target moves towards ``r p + (1 - r) t``, t its
            target before the step: the step ``(1 - m)(p - t)`` scaled by r).
        min_confidence: with a bool ``correct_only``, a marked sample is corrected only where the
            model gives its prediction at least this probability in this pass (0: every marked one).
        running: when given, a store with ``update(ids, probabilities)`` that every scored sample's
            prediction also enters (MixNN+'s early-learning targets, refresh/early_learning.py).
        features_dtype: storage of the (P, D) features: a dtype, "auto" (float32 up to
            ``AUTO_FLOAT32_ELEMENTS`` elements, else float16; decided at the first batch), or
            None (not kept: a pass for the predictions only).

    Attributes (rows follow ``ids``): ``losses`` (P,) float32; ``current_labels`` (P,) int64 the
    soft targets' argmax before correction; ``prob_given`` (P,) float32 the model's probability
    of the given label; ``predicted`` (P,) int64 and ``confidence`` (P,) float32 its prediction
    and that class's probability; ``features`` (P, D) (allocated at the first batch); ``seen``
    (P,) bool the rows filled; ``held_back`` how many samples ``correct_only`` marked were not
    corrected because their prediction's probability was under ``min_confidence``.
    """

    def __init__(self, ids: torch.Tensor, targets, given_labels: torch.Tensor, epoch: int, *,
                 gmm_loss: str = "argmax_targets", correct: bool = True,
                 features_dtype: torch.dtype | str | None = torch.float32,
                 correct_only: torch.Tensor | None = None, min_confidence: float = 0.0, running=None) -> None:
        if gmm_loss not in GMM_LOSSES:
            raise ValueError(f"gmm_loss: must be one of {GMM_LOSSES}, got {gmm_loss!r}")
        p = len(ids)
        self.ids = ids
        self.targets = targets
        self.given_labels = given_labels
        self.epoch = epoch
        self.gmm_loss = gmm_loss
        self.correct = correct
        self.correct_only = correct_only
        self.min_confidence = min_confidence
        self.held_back = 0  # marked samples left uncorrected for a prediction below min_confidence
        self.running = running
        self.features_dtype = features_dtype
        self.losses = torch.zeros(p)
        self.current_labels = torch.zeros(p, dtype=torch.int64)
        self.prob_given = torch.zeros(p)
        self.predicted = torch.zeros(p, dtype=torch.int64)
        self.confidence = torch.zeros(p)
        self.features: torch.Tensor | None = None
        self.seen = torch.zeros(p, dtype=torch.bool)
        self.corrected = False

    def add(self, sample_ids: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> None:
        """One batch: ``sample_ids`` (B,) int64 (all in the pool), ``logits`` (B, C) and
        ``features`` (B, D), any floating dtype, on the CPU."""
        rows = torch.searchsorted(self.ids, sample_ids)
        log_probs = F.log_softmax(logits.float(), dim=1)
        probabilities = log_probs.exp()
        given = self.given_labels[sample_ids]
        current = self.targets.rows(sample_ids)  # (B, C) float32, before this refresh's correction
        current_labels = current.argmax(1)
        if self.gmm_loss == "given":
            losses = F.nll_loss(log_probs, given, reduction="none")
        elif self.gmm_loss == "argmax_targets":
            losses = F.nll_loss(log_probs, current_labels, reduction="none")
        else:
            losses = -(current * log_probs).sum(dim=1)
        self.losses[rows] = losses
        self.current_labels[rows] = current_labels
        self.prob_given[rows] = probabilities.gather(1, given.unsqueeze(1)).squeeze(1)
        predicted = logits.argmax(1)  # of the logits: ties that softmax rounding creates do not move it
        self.predicted[rows] = predicted
        confidence = probabilities.gather(1, predicted.unsqueeze(1)).squeeze(1)
        self.confidence[rows] = confidence
        self.seen[rows] = True
        if self.correct:
            self._correct(sample_ids, probabilities, current, confidence)
        if self.running is not None:
            self.running.update(sample_ids, probabilities)
        if self.features_dtype is None:  # features not wanted (a pass for predictions only)
            return
        if self.features is None:
            if self.features_dtype == "auto":
                self.features_dtype = features_dtype("auto", len(self.ids), features.shape[1])
            self.features = torch.zeros(len(self.ids), features.shape[1], dtype=self.features_dtype)
        self.features[rows] = features.to(self.features_dtype)

    def _correct(self, sample_ids: torch.Tensor, probabilities: torch.Tensor, current: torch.Tensor,
                 confidence: torch.Tensor) -> None:
        """The EMA step of the batch's targets towards ``probabilities`` (B, C), for the samples
        ``correct_only`` marks (those whose ``confidence`` (B,), the probability of their
        prediction, reaches ``min_confidence``), scaled by its share where it is a float."""
        if self.correct_only is None:
            self.corrected |= bool(self.targets.update(sample_ids, probabilities, self.epoch))
            return
        share = self.correct_only[sample_ids]
        chosen = share if share.dtype == torch.bool else share > 0
        if share.dtype == torch.bool and self.min_confidence > 0:
            confident = confidence >= self.min_confidence
            self.held_back += int((chosen & ~confident).sum())
            chosen = chosen & confident
        if not bool(chosen.any()):
            return
        if share.dtype != torch.bool:
            r = share[chosen].to(probabilities.dtype).unsqueeze(1)
            probabilities = probabilities[chosen] * r + current[chosen] * (1 - r)
            probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)  # rounding only
        else:
            probabilities = probabilities[chosen]
        self.corrected |= bool(self.targets.update(sample_ids[chosen], probabilities, self.epoch))

    def ensure_features(self, dim: int) -> None:
        """Allocate the (P, dim) features if no batch has (a process whose shard was empty)."""
        if self.features is None and self.features_dtype is not None:
            dtype = features_dtype("auto", len(self.ids), dim) if self.features_dtype == "auto" else self.features_dtype
            self.features = torch.zeros(len(self.ids), dim, dtype=dtype)

    @property
    def loss_labels(self) -> torch.Tensor:
        """(P,) int64: the label each row's loss was measured against: the given label for
        ``gmm_loss="given"``, else the soft targets' argmax (for ``"soft_targets"``, the class
        the target weighs most)."""
        return self.given_labels[self.ids] if self.gmm_loss == "given" else self.current_labels

    def covered(self, *, allow_missing: bool) -> "PoolScores":
        """The scores restricted to the rows filled (all of them unless ``allow_missing``, else
        a RuntimeError naming how many are missing)."""
        if (self.features is None and self.features_dtype is not None) or not bool(self.seen.any()) or \
                (not allow_missing and not bool(self.seen.all())):
            missing = int((~self.seen).sum())
            raise RuntimeError(f"refresh: the evaluation pass did not cover {missing} of {len(self.ids)} samples "
                               "(skipped images?); the refresh needs every sample of the pool")
        if bool(self.seen.all()):
            return self
        keep = self.seen
        subset = PoolScores.__new__(PoolScores)
        subset.__dict__.update(self.__dict__)
        subset.ids = self.ids[keep]
        for name in ("losses", "current_labels", "prob_given", "predicted", "confidence", "features", "seen"):
            if getattr(self, name) is not None:
                setattr(subset, name, getattr(self, name)[keep])
        return subset
