"""Which given labels are wrong: a score per sample, a flag, a suggested label — from any model.

The audit needs no trainer: give it the labels and what a model believes about them, either as
probabilities (N, C) — out-of-sample predictions (cross-validated), or a label-correction
method's soft targets — or as the per-sample pieces (the probability of the given label, the
predicted class and its probability, the soft target's probability of the given label).

    issues = find_label_issues(labels, probabilities)
    issues.order[:20]                 # the 20 samples most likely mislabelled
    issues.to_csv("label_issues.csv", classes=names)

**Score.**  ``p_given`` is the average of the available estimates that the given label is right
(the model's probability of it and, when given, the soft target's probability of it: a model
snapshot averaged with an exponential moving average of its predictions, an ensemble over
time).  Models are not equally sure of every class, so ``p_given`` is compared with its
class's threshold ``t[c]``, the mean ``p_given`` of the samples labelled ``c`` (confident
learning's per-class threshold, Northcutt et al. 2021):

    score = t[given] / (t[given] + p_given)      in [0, 1], higher = more likely wrong

0.5 where the given label gets its class's average probability, 1 where it gets none.  The
ranking is that of ``p_given / t[given]``.

**Flag** (``rule``):

- ``"class_threshold"`` (default): the suggested label (the most likely class) is not the given
  one *and* ``p_given < t[given]`` (score > 0.5): the model prefers another class and gives the
  given label less than labels of its class usually get.
- ``"argmax"``: the suggested label is not the given one (cleanlab's ``predicted_neq_given``).

The default was chosen during development, on data that is not among the reported results
(docs/results.md, "Label audit", "How the flagging rule was chosen", with the commands): a
MixNN run on Fashion-MNIST at sym-60 with seed 1 (the reported runs use seed 0), and 5-fold
cross-validated logistic regression on scikit-learn's digits at sym-20 to sym-80.  On the MixNN
run it had the higher F1 (0.90 against ``argmax``'s 0.88: there ``argmax`` flags many right
labels the model merely doubts); on digits the same F1 as ``argmax`` (within 0.01) up to sym-60
and a lower one at sym-80 (0.92-0.93 against 0.95-0.96).  cleanlab's count-based pruning had
a higher F1 at sym-20 on digits (0.91 against 0.88) and a lower one from sym-60 up.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mixnn_fast.audit._validation import (check_num_classes, labels_array, mask_array, probability_matrix,
                                          probability_vector)

RULES = ("class_threshold", "argmax")


@dataclass(frozen=True)
class LabelIssues:
    """The audit of N given labels.

    given_label: (N,) int64.  score: (N,) float64 in [0, 1], higher = more likely wrong (0.5:
    the given label gets the average probability of labels of its class; see the module).  is_label_issue: (N,) bool.
    suggested_label: (N,) int64, the most likely class (may equal the given label where the label
    looks right); suggested_confidence: (N,) float64, its probability.  order: (N,) int64, sample
    indices most likely wrong first (stable for ties).  components: named (N,) float64 arrays the
    score was built from (e.g. ``model_prob_given``).  rule: the flagging rule used.
    """

    given_label: np.ndarray
    score: np.ndarray
    is_label_issue: np.ndarray
    suggested_label: np.ndarray
    suggested_confidence: np.ndarray
    order: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)
    rule: str = "class_threshold"

    def __len__(self) -> int:
        return len(self.given_label)

    @property
    def num_issues(self) -> int:
        return int(self.is_label_issue.sum())

    @property
    def issue_indices(self) -> np.ndarray:
        """(K,) int64: the flagged samples, most likely wrong first."""
        return self.order[self.is_label_issue[self.order]]

    def to_csv(self, path: str | Path, *, classes: Sequence[str] | None = None, paths: Sequence[str] | None = None,
               true_labels=None, sample_ids=None, extra: dict[str, np.ndarray] | None = None) -> Path:
        """One row per sample, most likely wrong first: sample_id, path, given label (and name),
        suggested label (and name), its confidence, score, is_label_issue, the components, the
        ``extra`` columns, and the true label where known (``true_labels`` (N,) int)."""
        return write_issues_csv(path, self, classes=classes, paths=paths, true_labels=true_labels,
                                sample_ids=sample_ids, extra=extra)


def find_label_issues(given_labels, probabilities=None, *, prob_given=None, suggested=None, confidence=None,
                      soft_target_given=None, num_classes: int | None = None,
                      rule: str = "class_threshold") -> LabelIssues:
    """Rank the given labels by how likely each is wrong, and flag the likely wrong ones.

    given_labels: (N,) int, in [0, C).  Then either ``probabilities`` (N, C) float — each row a
    distribution over the classes, out-of-sample (from cross-validation, or a model that never
    trained on the sample) or a label-correction method's soft targets — or the per-sample
    pieces ``prob_given`` (N,) (a model's probability of the given label), ``suggested`` (N,) int
    (its most likely class) and ``confidence`` (N,) (that class's probability).
    soft_target_given: (N,) float, optional, a second estimate of the given label's probability
    (e.g. soft targets), averaged into the score.  num_classes: C, checked against the labels.
    rule: ``"class_threshold"`` or ``"argmax"`` (see the module's docstring).

    Returns a :class:`LabelIssues`.  Every failure of validation is a ValueError or TypeError
    naming the argument.  In-sample probabilities of a model that memorised its labels find
    nothing: use held-out predictions.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    check_num_classes(num_classes)
    given = labels_array(given_labels, "given_labels", num_classes=num_classes)
    n = len(given)
    if n == 0:
        raise ValueError("given_labels: expected at least one sample, got none")
    pieces = {"prob_given": prob_given, "suggested": suggested, "confidence": confidence}
    if probabilities is not None:
        passed = [k for k, v in pieces.items() if v is not None]
        if passed:
            raise ValueError(f"{passed[0]}: give either probabilities or the per-sample pieces "
                             "(prob_given, suggested, confidence), not both")
        probs = probability_matrix(probabilities, "probabilities", n, num_classes)
        c = probs.shape[1]
        if given.max() >= c:
            raise ValueError(f"given_labels: class indices must be < {c} (the columns of probabilities), "
                             f"got {int(given.max())}")
        model_given = probs[np.arange(n), given]
        top = probs.argmax(1).astype(np.int64)
        # ties with the given label keep the given label: a tie is no evidence against it
        top = np.where(probs[np.arange(n), top] > model_given, top, given)
        top_conf = probs[np.arange(n), top]
    else:
        missing = [k for k, v in pieces.items() if v is None]
        if missing:
            raise ValueError(f"{missing[0]}: needed when probabilities is not given "
                             "(pass probabilities (N, C), or prob_given, suggested and confidence)")
        model_given = probability_vector(prob_given, "prob_given", n)
        top = labels_array(suggested, "suggested", n=n, num_classes=num_classes)
        top_conf = probability_vector(confidence, "confidence", n)
        same = top == given
        if np.any(np.abs(top_conf[same] - model_given[same]) > 1e-3):
            i = int(np.flatnonzero(same & (np.abs(top_conf - model_given) > 1e-3))[0])
            raise ValueError(f"confidence: where suggested equals the given label it must equal prob_given; "
                             f"sample {i} has {top_conf[i]:.4g} against {model_given[i]:.4g}")
        if np.any(top_conf + 1e-3 < model_given):
            i = int(np.flatnonzero(top_conf + 1e-3 < model_given)[0])
            raise ValueError(f"confidence: the suggested class's probability must be >= prob_given (it is the "
                             f"most likely class); sample {i} has {top_conf[i]:.4g} < {model_given[i]:.4g}")
    components = {"model_prob_given": model_given}
    estimates = [model_given]
    if soft_target_given is not None:
        target_given = probability_vector(soft_target_given, "soft_target_given", n)
        components["target_prob_given"] = target_given
        estimates.append(target_given)
    p_given = np.mean(estimates, axis=0)
    components["p_given"] = p_given
    # per-class threshold: the mean p_given of the samples carrying that label
    width = max(int(given.max()) + 1, num_classes or 0)
    counts = np.bincount(given, minlength=width)
    threshold = np.bincount(given, weights=p_given, minlength=width) / np.maximum(counts, 1)
    t = threshold[given]
    components["class_threshold"] = t
    denominator = t + p_given
    # a class whose every sample gets probability 0: no evidence either way
    score = np.divide(t, denominator, out=np.full(n, 0.5), where=denominator > 0)
    order = np.argsort(-score, kind="stable")
    if rule == "class_threshold":
        flagged = (top != given) & (p_given < t)
    else:  # argmax
        flagged = top != given
    return LabelIssues(given_label=given, score=score, is_label_issue=flagged, suggested_label=top,
                       suggested_confidence=top_conf, order=order, components=components, rule=rule)


def issues_from_scores(given_labels, score, is_label_issue, suggested_label, suggested_confidence, *,
                       components: dict[str, np.ndarray] | None = None, rule: str = "external") -> LabelIssues:
    """A :class:`LabelIssues` from another tool's arrays (e.g. cleanlab's), validated and ordered
    like ours: score (N,) in [0, 1] (higher = more likely wrong), is_label_issue (N,) bool,
    suggested_label (N,) int, suggested_confidence (N,) in [0, 1]."""
    given = labels_array(given_labels, "given_labels")
    n = len(given)
    score = probability_vector(score, "score", n)
    return LabelIssues(given_label=given, score=score, is_label_issue=mask_array(is_label_issue, "is_label_issue", n),
                       suggested_label=labels_array(suggested_label, "suggested_label", n=n),
                       suggested_confidence=probability_vector(suggested_confidence, "suggested_confidence", n),
                       order=np.argsort(-score, kind="stable"), components=dict(components or {}), rule=rule)


def _fmt(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.6f}"


def write_issues_csv(path: str | Path, issues: LabelIssues, *, classes: Sequence[str] | None = None,
                     paths: Sequence[str] | None = None, true_labels=None, sample_ids=None,
                     extra: dict[str, np.ndarray] | None = None) -> Path:
    """``issues`` as CSV, most likely wrong first (see :meth:`LabelIssues.to_csv`).  ``sample_ids``
    (N,) int name the rows (default 0..N-1); ``extra`` columns are floats (NaN: empty cell) or ints."""
    path = Path(path)
    n = len(issues)
    ids = np.arange(n) if sample_ids is None else labels_array(sample_ids, "sample_ids", n=n)
    if paths is not None and len(paths) != n:
        raise ValueError(f"paths: expected {n} entries, got {len(paths)}")
    true = None if true_labels is None else labels_array(true_labels, "true_labels", n=n)
    extra = dict(extra or {})
    for key, values in extra.items():
        if np.shape(values) != (n,):
            raise ValueError(f"extra[{key!r}]: expected shape ({n},), got {np.shape(values)}")
    name = (lambda c: classes[c]) if classes is not None else str
    header = ["sample_id", "path", "given_label", "given_name", "suggested_label", "suggested_name",
              "suggested_confidence", "score", "is_label_issue", *issues.components, *extra]
    if true is not None:
        header += ["true_label", "true_name", "given_label_wrong"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in issues.order:
            g, s = int(issues.given_label[i]), int(issues.suggested_label[i])
            row = [int(ids[i]), paths[i] if paths is not None else "", g, name(g), s, name(s),
                   _fmt(issues.suggested_confidence[i]), _fmt(issues.score[i]), int(issues.is_label_issue[i])]
            row += [_fmt(v[i]) for v in issues.components.values()]
            row += [_fmt(v[i]) if np.asarray(v).dtype.kind == "f" else int(v[i]) for v in extra.values()]
            if true is not None:
                row += [int(true[i]), name(int(true[i])), int(true[i] != g)]
            writer.writerow(row)
    return path


def read_issues_csv(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a ``label_issues.csv`` as arrays, in the file's order (most likely wrong
    first): ints for labels and ids, floats (NaN for empty cells) for scores, str for names and paths."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: holds no samples")
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key in ("path",) or key.endswith("_name"):
            out[key] = np.asarray(values, dtype=object)
        elif key in ("sample_id", "is_label_issue", "given_label_wrong") or key.endswith("_label"):
            out[key] = np.asarray([int(v) if v != "" else -1 for v in values], dtype=np.int64)
        else:
            out[key] = np.asarray([float(v) if v != "" else np.nan for v in values], dtype=np.float64)
    return out
