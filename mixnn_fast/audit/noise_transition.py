"""Held-out accuracy that the label noise does not bias, from noisy labels alone.

Agreement with noisy held-out labels ranks models by clean accuracy only where the noise is
symmetric.  Under class-pair noise (a T-shirt labelled "shirt" 40% of the time) a model that
leans towards the flipped class agrees *more* with the noisy labels while it gets *fewer* images
right (MixNN+'s recomputed BatchNorm statistics at asym-40: held-out agreement +0.0003, test
accuracy -0.65; docs/mixnn_plus/weight_average.md).

Two steps fix it:

1. :func:`anchor_transition` estimates the noise's transition matrix ``T[y, s] = P(given label s |
   true class y)`` from the given labels and a model's out-of-sample probabilities:
   the given labels of each class's most confidently predicted samples (its anchors).
   :func:`confident_joint_transition` is confident learning's estimate (Northcutt et al. 2021,
   ``cleanlab.count``), kept for comparison: it counts the model's mistakes as noise.
2. :func:`noise_corrected_accuracy` estimates the clean accuracy of predictions from the noisy
   labels with ``T``'s inverse (backward correction, Patrini et al. 2017): sample ``i`` scores
   ``inv(T)[s_i, f_i]``, whose expectation over the noise is ``1[f_i == y_i]`` exactly, since
   ``sum_s T[y, s] inv(T)[s, f] = 1[y == f]``.  The mean is an unbiased estimate of the clean
   accuracy wherever the noise depends on the class only and ``T`` is right; single samples
   score outside [0, 1].  Inverting an *estimated* ``T`` multiplies its errors, though:
   :func:`noise_corrected_log_likelihood` multiplies by ``T`` instead (forward correction), the
   held-out log-likelihood of the noisy labels under the model's probabilities passed through
   the noise: far less spread, but it scores calibration as well as accuracy.

Why our own confident joint rather than cleanlab's: cleanlab is an optional dependency of the
engine, and the joint is a dozen lines; tests/test_noise_transition.py checks it equal to
``cleanlab.count.compute_confident_joint``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixnn_fast.audit._validation import check_num_classes, labels_array, probability_matrix, transition_matrix

#: cleanlab's lower bound on a class's confident threshold (cleanlab.internal.constants).
THRESHOLD_LOWER_BOUND = 2e-6
#: Above this condition number the transition matrix is taken as not invertible: its inverse
#: would multiply the sampling error of the held-out labels past any use.
MAX_CONDITION_NUMBER = 1e6


def confident_counts(given_labels, probabilities, *, num_classes: int | None = None) -> np.ndarray:
    """(C, C) float64 ``K[s, y]``: how many samples with given label ``s`` count confidently
    towards class ``y`` (cleanlab's ``compute_confident_joint(calibrate=False)``).

    given_labels: (N,) int in [0, C); probabilities: (N, C) float, out-of-sample class
    probabilities (a model that never trained on these samples).  A sample counts towards class
    ``y`` if its probability of ``y`` reaches the mean probability of ``y`` among the samples
    labelled ``y`` (the most probable such class if several; not counted if none).  Every class
    keeps at least one count on the diagonal."""
    probs, given = _inputs(given_labels, probabilities, num_classes)
    c = probs.shape[1]
    labelled = np.bincount(given, minlength=c)
    thresholds = np.full(c, 2.0)  # a class nobody is labelled with: nobody counts towards it
    for k in np.flatnonzero(labelled):
        thresholds[k] = probs[given == k, k].mean()
    thresholds = np.maximum(thresholds, THRESHOLD_LOWER_BOUND)
    confident = probs >= thresholds - 1e-6  # cleanlab's tolerance
    how_many = confident.sum(1)
    true_guess = np.where(how_many > 1, probs.argmax(1), confident.argmax(1))
    counted = how_many > 0
    counts = np.zeros((c, c))
    np.add.at(counts, (given[counted], true_guess[counted]), 1.0)
    np.fill_diagonal(counts, np.maximum(counts.diagonal(), 1.0))
    return counts


def confident_joint(given_labels, probabilities, *, num_classes: int | None = None) -> np.ndarray:
    """(C, C) float64 ``J[s, y]``: how many samples have given label ``s`` and true class ``y``:
    the :func:`confident_counts` with each row scaled to the number of samples given that label
    (cleanlab's ``compute_confident_joint(calibrate=True)`` before its rounding to integers, which
    would add up to half a count of error to every entry).  Inputs as there."""
    counts = confident_counts(given_labels, probabilities, num_classes=num_classes)
    labelled = np.bincount(labels_array(given_labels, "given_labels"), minlength=len(counts))
    joint = counts / counts.sum(1, keepdims=True) * labelled[:, None]
    return joint / joint.sum() * labelled.sum()


def confident_joint_transition(given_labels, probabilities, *, num_classes: int | None = None) -> np.ndarray:
    """(C, C) float64 ``T[y, s] = P(given label s | true class y)``, each row summing to 1: the
    :func:`confident_joint` normalised over the given labels of each true class (cleanlab's
    ``noise_matrix``, transposed, before its clipping).  Inputs as there.

    It takes every confident disagreement for noise, the model's own mistakes included: from
    MixNN+'s models (72-83% accurate on held-out Fashion-MNIST) it overestimated the noise by
    0.10-0.30 in some entry and the clean accuracy of :func:`noise_corrected_accuracy` by
    0.10-0.40 (docs/mixnn_plus/weight_average.md).  :func:`anchor_transition` is the one to use
    with such models."""
    joint = confident_joint(given_labels, probabilities, num_classes=num_classes)
    return (joint / joint.sum(0, keepdims=True)).T


#: The share of the samples predicted as each class that :func:`anchor_transition` takes as that
#: class's anchors.  Chosen from 0.05, 0.1, 0.2 and 0.5 on twenty development runs (seeds 219-222,
#: sym-20 to sym-80 and asym-40) as the one whose matrices came closest to the held-out
#: samples' true transition (largest entry error 0.06-0.17; docs/mixnn_plus/weight_average.md).
ANCHOR_SHARE = 0.2


def anchor_transition(given_labels, probabilities, *, share: float = ANCHOR_SHARE,
                      num_classes: int | None = None) -> np.ndarray:
    """(C, C) float64 ``T[y, s] = P(given label s | true class y)`` estimated from anchors: for
    each class ``y``, the ``share`` of the samples predicted as ``y`` with the highest probability
    of ``y`` (at least one) are taken to be of class ``y``, and row ``y`` is the distribution of
    their given labels.

    given_labels: (N,) int in [0, C); probabilities: (N, C) float, out-of-sample class
    probabilities of a model trained to predict the *true* class (one trained on corrected or
    robustly weighted labels, as MixNN+'s; a model that fits the noisy labels would put the
    noise in its probabilities instead).  ValueError where no sample is predicted as some class:
    its row cannot be estimated.

    Why anchors (Patrini et al. 2017 estimate ``T`` at each class's most confident sample): a
    model's most confident predictions of a class are nearly all right, so their given labels
    show the noise without the model's mistakes on hard images, which the confident joint
    counts as noise (:func:`confident_joint_transition`)."""
    if not isinstance(share, (float, int)) or isinstance(share, bool) or not 0 < share <= 1:
        raise ValueError(f"share: expected a number in (0, 1], got {share!r}")
    probs, given = _inputs(given_labels, probabilities, num_classes)
    c = probs.shape[1]
    predicted = probs.argmax(1)
    transition = np.zeros((c, c))
    for y in range(c):
        members = np.flatnonzero(predicted == y)
        if len(members) == 0:
            raise ValueError(f"probabilities: no sample is predicted as class {y}, so its row of the "
                             "transition cannot be estimated (too few samples, or a collapsed model)")
        take = max(1, int(round(share * len(members))))
        anchors = members[np.argsort(-probs[members, y], kind="stable")[:take]]
        transition[y] = np.bincount(given[anchors], minlength=c) / take
    return transition


@dataclass(frozen=True)
class CorrectedEstimate:
    """A held-out estimate corrected for the noise: the mean of per-sample values (see the module).

    estimate: the mean of ``per_sample``; standard_error: its standard error over the samples (NaN
    for one sample); per_sample: (N,) float64 (pair two models' values on the same samples to
    compare them with a smaller error)."""

    estimate: float
    standard_error: float
    per_sample: np.ndarray


def noise_corrected_accuracy(given_labels, predicted, transition) -> CorrectedEstimate:
    """Estimate the share of ``predicted`` that equal the samples' unknown true classes.

    given_labels: (N,) int, the noisy labels; predicted: (N,) int, a model's predictions on the
    same samples (which it did not train on); transition: (C, C) float ``T[y, s] = P(given s |
    true y)``, rows summing to 1 (e.g. :func:`anchor_transition` of another model's, or the same
    model's, out-of-sample probabilities).  ValueError for a transition matrix that is not
    invertible (condition number over :data:`MAX_CONDITION_NUMBER`: noise that leaves two classes
    indistinguishable)."""
    t = transition_matrix(transition, "transition")
    c = t.shape[0]
    given = labels_array(given_labels, "given_labels", num_classes=c)
    pred = labels_array(predicted, "predicted", n=len(given), num_classes=c)
    if len(given) == 0:
        raise ValueError("given_labels: expected at least one sample, got none")
    condition = np.linalg.cond(t)
    if not np.isfinite(condition) or condition > MAX_CONDITION_NUMBER:
        raise ValueError(f"transition: not invertible (condition number {condition:.3g}): the noise "
                         "leaves some classes indistinguishable, so no estimate of the clean accuracy exists")
    per_sample = np.linalg.inv(t)[given, pred]
    return _mean_of(per_sample)


#: The least entry of the transition :func:`noise_corrected_log_likelihood` uses (each row is then
#: renormalised): an estimated row with no sample of some given label would give that label
#: probability 0 and one such held-out image a log-likelihood of minus infinity.
TRANSITION_FLOOR = 1e-3


def noise_corrected_log_likelihood(given_labels, probabilities, transition, *,
                                   floor: float = TRANSITION_FLOOR) -> CorrectedEstimate:
    """The held-out log-likelihood of the noisy labels under the forward-corrected model: sample
    ``i`` scores ``log sum_y p_i(y) T~[y, s_i]``, ``T~`` the transition with every entry raised to
    at least ``floor`` and its rows renormalised (forward correction, Patrini et al. 2017).

    given_labels: (N,) int, the noisy labels; probabilities: (N, C) float, a model's class
    probabilities on the same samples (which it did not train on); transition: (C, C) float
    ``T[y, s] = P(given s | true y)``, rows summing to 1; floor: in [0, 1/C).  Returns the mean
    with its standard error and the (N,) per-sample values; -inf for a sample whose given label
    gets probability 0 (possible only with ``floor`` 0).

    A proper scoring rule for the noisy labels: where ``T`` is the noise's transition, the model
    whose probabilities are the true class posterior scores highest in expectation, and a model
    that moves probability to a pair's flipped class is not rewarded for it as agreement with the
    noisy labels rewards it.  It multiplies by ``T`` rather than inverting it, so an estimated
    ``T`` (:func:`anchor_transition`) spoils it far less than :func:`noise_corrected_accuracy`
    (docs/mixnn_plus/weight_average.md); it scores calibration as well as accuracy."""
    t = transition_matrix(transition, "transition")
    c = t.shape[0]
    if not isinstance(floor, (float, int)) or isinstance(floor, bool) or not 0 <= floor < 1 / c:
        raise ValueError(f"floor: expected a number in [0, 1/{c}), got {floor!r}")
    probs, given = _inputs(given_labels, probabilities, c)
    floored = np.maximum(t, floor)
    floored /= floored.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        per_sample = np.log((probs @ floored)[np.arange(len(given)), given])
    return _mean_of(per_sample)


def _mean_of(per_sample: np.ndarray) -> CorrectedEstimate:
    with np.errstate(invalid="ignore"):  # -inf values: the mean is -inf, the error NaN
        error = float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1 else float("nan")
    return CorrectedEstimate(float(per_sample.mean()), error, per_sample)


def _inputs(given_labels, probabilities, num_classes):
    """(N, C) float64 probabilities and (N,) int64 given labels, checked against each other."""
    check_num_classes(num_classes)
    given = labels_array(given_labels, "given_labels", num_classes=num_classes)
    if len(given) == 0:
        raise ValueError("given_labels: expected at least one sample, got none")
    probs = probability_matrix(probabilities, "probabilities", len(given), num_classes)
    if given.max() >= probs.shape[1]:
        raise ValueError(f"given_labels: class indices must be < {probs.shape[1]} (the columns of probabilities), "
                         f"got {int(given.max())}")
    return probs, given
