"""The label audit's Python API (``mixnn_fast.audit``), without a trainer.

- against an independent reference, cleanlab, on fresh random inputs of odd sizes (one sample,
  two classes, classes nobody carries, more classes than samples): the per-class thresholds are
  cleanlab's confident thresholds, the ``argmax`` rule is cleanlab's ``predicted_neq_given``,
  the ranking inside a class is cleanlab's self-confidence ranking, and on simulated noisy
  labels our ranking's AUROC is cleanlab's;
- properties of the result (a permutation, flags imply a different suggestion, ...);
- every malformed input to ``find_label_issues`` is a ValueError or TypeError whose message
  starts with the argument's name (Hypothesis draws the malformations);
- the CSV round trip, and ``evaluate_issues`` / ``auroc`` against scikit-learn.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixnn_fast.audit import LabelIssues, find_label_issues
from mixnn_fast.audit.issues import read_issues_csv
from mixnn_fast.audit.scores import auroc, evaluate_issues


def _random_problem(rng: np.random.Generator, n: int, c: int, *, noise: float = 0.4, sharpness: float = 2.5):
    """Given labels (N,), probabilities (N, C) from an informative but imperfect model of the true
    labels, and the true noise mask (N,): a fresh noisy-label problem."""
    true = rng.integers(0, c, n)
    logits = rng.normal(0.0, 1.0, (n, c))
    logits[np.arange(n), true] += sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    flip = rng.random(n) < noise
    given = np.where(flip, rng.integers(0, c, n), true)
    return given, probs, given != true


# odd sizes: one sample, two classes, more classes than samples, a prime N
SIZES = st.tuples(st.integers(1, 301), st.integers(2, 13))
SEEDS = st.integers(0, 2**32 - 1)


# ---- against cleanlab ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(size=SIZES, seed=SEEDS)
def test_class_thresholds_are_cleanlabs_confident_thresholds(size, seed):
    from cleanlab.count import get_confident_thresholds

    n, c = size
    labels, probs, _ = _random_problem(np.random.default_rng(seed), n, c)
    issues = find_label_issues(labels, probs)
    reference = get_confident_thresholds(labels, probs)
    # cleanlab clips thresholds from below (2e-6-ish) and gives absent classes a large value;
    # every present class's threshold is compared
    present = np.unique(labels)
    ours = np.array([issues.components["class_threshold"][labels == k][0] for k in present])
    np.testing.assert_allclose(ours, np.maximum(reference[present], ours.min()), rtol=1e-12, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(size=SIZES, seed=SEEDS)
def test_argmax_rule_is_cleanlabs_predicted_neq_given(size, seed):
    import cleanlab.filter

    n, c = size
    labels, probs, _ = _random_problem(np.random.default_rng(seed), n, c)
    ours = find_label_issues(labels, probs, rule="argmax").is_label_issue
    if len(np.unique(labels)) > 1:
        reference = cleanlab.filter.find_label_issues(labels, probs, filter_by="predicted_neq_given")
    else:  # cleanlab refuses labels of a single class; ours audits them, by the same definition
        reference = probs.argmax(1) != labels
    np.testing.assert_array_equal(ours, reference)
    # the default rule flags a subset of those: it also asks the given label to be unusually unlikely
    default = find_label_issues(labels, probs).is_label_issue
    assert not np.any(default & ~reference)


@settings(max_examples=40, deadline=None)
@given(size=SIZES, seed=SEEDS)
def test_ranking_inside_a_class_is_cleanlabs_self_confidence(size, seed):
    from cleanlab.rank import get_label_quality_scores

    n, c = size
    labels, probs, _ = _random_problem(np.random.default_rng(seed), n, c)
    issues = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        # most likely wrong first == lowest self-confidence first (continuous inputs: no ties)
        np.testing.assert_array_equal(members[np.argsort(-issues.score[members], kind="stable")],
                                      members[np.argsort(quality[members], kind="stable")])


@pytest.mark.parametrize("noise", [0.2, 0.5, 0.8])
def test_on_simulated_noise_our_ranking_finds_wrong_labels_as_well_as_cleanlabs(rng, noise):
    from mixnn_fast.audit.reference import cleanlab_label_issues

    n, c = int(rng.integers(500, 2500)), int(rng.integers(3, 14))
    labels, probs, wrong = _random_problem(rng, n, c, noise=noise)
    ours = evaluate_issues(*_flags_and_scores(find_label_issues(labels, probs)), wrong)
    reference = cleanlab_label_issues(labels, probs)
    theirs = evaluate_issues(reference.is_label_issue, reference.score, wrong)
    # dividing by the class's threshold reorders samples across classes only: on a model as sure
    # of every class, the ranking is as good as cleanlab's self-confidence
    assert abs(ours["auroc"] - theirs["auroc"]) < 0.01, (ours, theirs)
    assert ours["auroc"] > 0.8
    assert ours["precision"] > 0.5 and ours["recall"] > 0.3, ours


def _flags_and_scores(issues: LabelIssues):
    return issues.is_label_issue, issues.score


# ---- properties ------------------------------------------------------------------------------

@given(size=SIZES, seed=SEEDS, rule=st.sampled_from(["class_threshold", "argmax"]))
def test_result_is_consistent(size, seed, rule):
    n, c = size
    labels, probs, _ = _random_problem(np.random.default_rng(seed), n, c)
    issues = find_label_issues(labels, probs, rule=rule)
    assert len(issues) == n and issues.rule == rule
    assert sorted(issues.order.tolist()) == list(range(n))  # a permutation
    assert np.all(np.diff(issues.score[issues.order]) <= 0)  # most likely wrong first
    assert np.all((issues.score >= 0) & (issues.score <= 1))
    assert issues.score.dtype == np.float64 and issues.suggested_label.dtype == np.int64
    assert issues.is_label_issue.dtype == np.bool_
    np.testing.assert_array_equal(issues.suggested_label, probs.argmax(1))
    np.testing.assert_allclose(issues.suggested_confidence, probs.max(1))
    # a flagged label always comes with a different suggestion
    assert np.all(issues.suggested_label[issues.is_label_issue] != labels[issues.is_label_issue])
    assert issues.issue_indices.tolist() == [i for i in issues.order if issues.is_label_issue[i]]


def test_the_per_sample_pieces_give_the_same_audit_as_the_matrix(rng):
    labels, probs, _ = _random_problem(rng, 257, 7)
    n = len(labels)
    whole = find_label_issues(labels, probs)
    pieces = find_label_issues(labels, prob_given=probs[np.arange(n), labels], suggested=probs.argmax(1),
                               confidence=probs.max(1), num_classes=7)
    np.testing.assert_allclose(whole.score, pieces.score, rtol=1e-12)  # the matrix's rows are renormalised
    for key in ("is_label_issue", "suggested_label", "order"):
        np.testing.assert_array_equal(getattr(whole, key), getattr(pieces, key), err_msg=key)


def test_soft_targets_are_averaged_into_the_score(rng):
    labels, probs, _ = _random_problem(rng, 100, 4)
    targets = rng.random(100)
    issues = find_label_issues(labels, probs, soft_target_given=targets)
    np.testing.assert_allclose(issues.components["p_given"], (probs[np.arange(100), labels] + targets) / 2)
    assert "target_prob_given" in issues.components


def test_a_tie_with_the_given_label_keeps_it():
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    issues = find_label_issues(np.array([1, 0, 0]), probs, rule="argmax")
    assert issues.suggested_label.tolist() == [1, 0, 0] and not issues.is_label_issue.any()


def test_torch_tensors_and_lists_are_accepted():
    import torch

    probs = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]
    a = find_label_issues([0, 0, 0], probs)
    b = find_label_issues(torch.tensor([0, 0, 0]), torch.tensor(probs, dtype=torch.float16))
    np.testing.assert_array_equal(a.order, b.order)
    assert a.is_label_issue.tolist() == [False, True, False]


# ---- validation ------------------------------------------------------------------------------

def _raises_naming(argument: str, call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert str(info.value).startswith(argument + ":"), str(info.value)


@st.composite
def _valid(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 8))
    seed = draw(SEEDS)
    labels, probs, _ = _random_problem(np.random.default_rng(seed), n, c)
    return labels, probs


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(problem=_valid(), data=st.data())
def test_malformed_probabilities_are_refused_by_name(problem, data):
    labels, probs = problem
    n, c = probs.shape
    bad = data.draw(st.sampled_from([
        "nan", "inf", "negative", "above_one", "row_sum", "logits", "one_dim", "three_dim", "rows", "one_class",
        "bool", "complex", "strings", "object", "ragged", "none", "dict"]))
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, c - 1))
    p = probs.copy()
    if bad == "nan":
        p[i, j] = np.nan
    elif bad == "inf":
        p[i, j] = data.draw(st.sampled_from([np.inf, -np.inf]))
    elif bad == "negative":
        p[i, j] = -data.draw(st.floats(1e-3, 10))
    elif bad == "above_one":
        p[i, j] = 1 + data.draw(st.floats(1e-3, 10))
    elif bad == "row_sum":
        p[i] *= data.draw(st.sampled_from([0.5, 0.9, 0.0]))
    elif bad == "logits":
        p = np.log(p)
    elif bad == "one_dim":
        p = p[:, 0]
    elif bad == "three_dim":
        p = p[:, :, None]
    elif bad == "rows":
        p = np.concatenate([p, p[:1]])
    elif bad == "one_class":
        p = np.ones((n, 1))
    elif bad == "bool":
        p = p > 0.5
    elif bad == "complex":
        p = p.astype(np.complex128)
    elif bad == "strings":
        p = p.astype(str)
    elif bad == "object":
        p = p.astype(object)
    elif bad == "ragged":
        p = [list(row) for row in p] + [[1.0]]
    elif bad == "none":
        p = None
        _raises_naming("prob_given", lambda: find_label_issues(labels, p))  # neither form given
        return
    elif bad == "dict":
        p = {"a": 1}
    _raises_naming("probabilities", lambda: find_label_issues(labels, p))


@given(problem=_valid(), data=st.data())
def test_malformed_labels_are_refused_by_name(problem, data):
    labels, probs = problem
    n, c = probs.shape
    bad = data.draw(st.sampled_from(["negative", "too_large", "float", "bool", "two_dim", "short", "empty",
                                     "strings", "none", "num_classes"]))
    kwargs = {}
    if bad == "negative":
        labels = labels.copy()
        labels[data.draw(st.integers(0, n - 1))] = -data.draw(st.integers(1, 5))
    elif bad == "too_large":
        labels = labels.copy()
        labels[data.draw(st.integers(0, n - 1))] = c + data.draw(st.integers(0, 5))
    elif bad == "float":
        labels = labels.astype(np.float64)
    elif bad == "bool":
        labels = labels.astype(bool)
    elif bad == "two_dim":
        labels = labels[:, None]
    elif bad == "short":
        labels = labels[:-1]
        if len(labels) == 0:
            labels = np.zeros(0, dtype=np.int64)
    elif bad == "empty":
        labels = np.zeros(0, dtype=np.int64)
    elif bad == "strings":
        labels = labels.astype(str)
    elif bad == "none":
        labels = None
    elif bad == "num_classes":
        kwargs["num_classes"] = data.draw(st.sampled_from([1, 0, -3, 2.5, "10", True]))
    expected = "num_classes" if bad == "num_classes" else "probabilities" if bad in ("short",) and n > 1 \
        else "given_labels"
    _raises_naming(expected, lambda: find_label_issues(labels, probs, **kwargs))


@given(problem=_valid(), data=st.data())
def test_malformed_pieces_are_refused_by_name(problem, data):
    labels, probs = problem
    n = len(labels)
    pieces = {"prob_given": probs[np.arange(n), labels], "suggested": probs.argmax(1), "confidence": probs.max(1),
              "soft_target_given": np.full(n, 0.5)}
    name = data.draw(st.sampled_from(sorted(pieces)))
    how = data.draw(st.sampled_from(["nan", "shape", "dtype", "range"]))
    value = pieces[name]
    if how == "nan":
        value = value.astype(np.float64)
        value[0] = np.nan  # for ``suggested``: a float array of labels, refused by its dtype
    elif how == "shape":
        value = np.concatenate([value, value[:1]])
    elif how == "dtype":
        value = value.astype(str)
    elif how == "range":
        value = value.copy()
        value[0] = -1
    pieces[name] = value
    _raises_naming(name, lambda: find_label_issues(labels, **pieces))


def test_both_forms_at_once_and_unknown_rules_are_refused():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    _raises_naming("prob_given", lambda: find_label_issues([0, 1], probs, prob_given=[0.9, 0.7]))
    _raises_naming("rule", lambda: find_label_issues([0, 1], probs, rule="loss"))
    _raises_naming("confidence", lambda: find_label_issues([0, 1], prob_given=[0.9, 0.7], suggested=[1, 1],
                                                             confidence=[0.1, 0.7]))


# ---- files and measures ----------------------------------------------------------------------

def test_csv_round_trip_is_most_likely_wrong_first(tmp_path, rng):
    labels, probs, wrong = _random_problem(rng, 123, 5)
    true = np.where(wrong, (labels + 1) % 5, labels)
    issues = find_label_issues(labels, probs)
    classes = ["a", "b", "c,d", "e\"f", "g"]  # names that need quoting
    issues.to_csv(tmp_path / "issues.csv", classes=classes, true_labels=true,
                  extra={"clean_prob_given_labels": rng.random(123)})
    back = read_issues_csv(tmp_path / "issues.csv")
    np.testing.assert_array_equal(back["sample_id"], issues.order)
    assert np.all(np.diff(back["score"]) <= 0)
    np.testing.assert_allclose(back["score"], issues.score[issues.order], atol=1e-6)
    np.testing.assert_array_equal(back["is_label_issue"], issues.is_label_issue[issues.order])
    np.testing.assert_array_equal(back["suggested_label"], issues.suggested_label[issues.order])
    assert list(back["given_name"]) == [classes[g] for g in labels[issues.order]]
    np.testing.assert_array_equal(back["given_label_wrong"], (true != labels)[issues.order])
    assert "clean_prob_given_labels" in back and "suggested_confidence" in back


@given(n=st.integers(2, 200), seed=SEEDS, ties=st.booleans())
def test_auroc_and_precision_recall_match_scikit_learn(n, seed, ties):
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.3
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.random(n)
    flags = rng.random(n) < 0.4
    result = evaluate_issues(flags, scores, wrong)
    if wrong.all() or not wrong.any():
        assert math.isnan(result["auroc"])
    else:
        assert result["auroc"] == pytest.approx(roc_auc_score(wrong, scores), abs=1e-12)
        assert auroc(scores, wrong) == result["auroc"]
    if flags.any() and wrong.any():
        p, r, f, _ = precision_recall_fscore_support(wrong, flags, average="binary", zero_division=0)
        assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    assert result["found"] == int((flags & wrong).sum()) and result["samples"] == n
