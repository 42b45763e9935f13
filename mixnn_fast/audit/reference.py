"""The reference audit the engine is measured against: cleanlab's ``find_label_issues`` on
out-of-sample probabilities from K-fold cross-validation of a cheap model on the same data
(scikit-learn's logistic regression on the pixels, by default).

cleanlab is an optional dependency (``pip install mixnn_fast[test]`` or ``[all]``); it is
imported only when the reference is computed, with an error that says how to install it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from mixnn_fast.audit._validation import labels_array, probability_matrix
from mixnn_fast.audit.issues import LabelIssues, issues_from_scores


def import_cleanlab():
    """The ``cleanlab`` module, or an ImportError saying how to install it."""
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError as exc:
        raise ImportError("the reference audit needs cleanlab, an optional dependency: "
                          "pip install 'cleanlab>=2.6' (or mixnn_fast[test])") from exc
    return cleanlab


def pixel_features(images) -> np.ndarray:
    """(N, H*W*C) float32 in [0, 1] from (N, H, W, C) uint8 images (the issue's cheap model:
    logistic regression on the raw pixels)."""
    a = np.asarray(images)
    if a.ndim != 4 or a.dtype != np.uint8:
        raise ValueError(f"images: expected (N, H, W, C) uint8, got {a.dtype} {a.shape}")
    return a.reshape(len(a), -1).astype(np.float32) / 255.0


#: the logistic regression's inverse regularisation strength on pixels in [0, 1].  Chosen on
#: development data (Fashion-MNIST, 2,000 images, sym-60, noise seed 1 — not a reported run) as
#: the value of {0.001, 0.003, 0.01, 0.03, 1} with the lowest cross-validated log-loss of the
#: *given* labels (no true labels used; docs/results.md, "Label audit").  It is also among the
#: strongest references there: scikit-learn's default C = 1 over-fits the noisy labels (cleanlab
#: F1 0.77, AUROC 0.83 against 0.88, 0.97).
LOGISTIC_C = 0.01


def out_of_sample_probabilities(features, labels, *, folds: int = 5, seed: int = 0, max_iter: int = 300,
                                c: float = LOGISTIC_C, num_classes: int | None = None) -> np.ndarray:
    """(N, C) float64: each sample's class probabilities from a multinomial logistic regression
    trained on the other folds of a stratified ``folds``-fold split (so no sample is scored by a
    model that saw its label).  features: (N, D) float; labels: (N,) int (the given labels).
    ``c``: the inverse L2 regularisation strength (see LOGISTIC_C).  Classes absent from a training fold get
    probability 0 there; C is ``num_classes`` or ``labels.max() + 1``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(features)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ValueError(f"features: expected (N, D) numbers, got {x.dtype} {x.shape}")
    y = labels_array(labels, "labels", n=len(x), num_classes=num_classes)
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds: expected an integer >= 2, got {folds!r}")
    width = num_classes or int(y.max()) + 1
    rarest = int(np.bincount(y)[np.unique(y)].min())
    # stratified folds need every class in each fold; a class rarer than ``folds`` limits them
    # (a class with one sample cannot be stratified: plain folds, where it is scored 0)
    k = min(folds, len(y))
    if rarest >= 2:
        k = min(k, rarest)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    out = np.zeros((len(x), width))
    for train, held in splitter.split(x, y):
        model = LogisticRegression(max_iter=max_iter, C=c)
        with warnings.catch_warnings():  # lbfgs stopping at max_iter is fine for a ranking
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[train], y[train])
        out[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    return out


def cleanlab_label_issues(given_labels, probabilities) -> LabelIssues:
    """cleanlab's audit in our format: ``is_label_issue`` from ``cleanlab.filter.find_label_issues``
    (its default, ``prune_by_noise_rate``), score = 1 - ``cleanlab.rank.get_label_quality_scores``
    (its default, self-confidence: the probability of the given label), suggested label = the
    most likely class.  probabilities: (N, C) out-of-sample."""
    cleanlab = import_cleanlab()
    given = labels_array(given_labels, "given_labels")
    probs = probability_matrix(probabilities, "probabilities", len(given), None)
    flags = cleanlab.filter.find_label_issues(given, probs, n_jobs=1)
    quality = cleanlab.rank.get_label_quality_scores(given, probs)
    top = probs.argmax(1)
    return issues_from_scores(given, np.clip(1.0 - quality, 0, 1), np.asarray(flags, dtype=bool), top,
                              probs[np.arange(len(given)), top], rule="cleanlab prune_by_noise_rate")


@dataclass
class ReferenceAudit:
    """cleanlab's audit of one data set and what it cost: the issues, the out-of-sample
    probabilities (N, C), and the seconds of the cross-validation plus cleanlab."""

    issues: LabelIssues
    probabilities: np.ndarray
    seconds: float
    model: str


def reference_audit(images, given_labels, *, folds: int = 5, seed: int = 0,
                    num_classes: int | None = None) -> ReferenceAudit:
    """cleanlab on ``folds``-fold cross-validated logistic regression on the pixels of ``images``
    (N, H, W, C) uint8, timed."""
    import_cleanlab()  # fail before the cross-validation, not after it
    start = time.perf_counter()
    probs = out_of_sample_probabilities(pixel_features(images), given_labels, folds=folds, seed=seed,
                                        num_classes=num_classes)
    issues = cleanlab_label_issues(given_labels, probs)
    return ReferenceAudit(issues=issues, probabilities=probs, seconds=time.perf_counter() - start,
                          model=f"logistic regression on pixels, {folds}-fold cross-validation")
