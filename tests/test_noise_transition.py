"""Noise-corrected held-out accuracy (mixnn_fast.audit.noise_transition): the confident joint
against cleanlab's, the anchor estimate against a plain loop and against the known transition of
simulated noise, and the corrected accuracy against the clean accuracy it estimates, on fresh
random inputs of odd sizes; bad inputs refused with errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixnn_fast.audit.noise_transition import (ANCHOR_SHARE, anchor_transition, confident_counts, confident_joint,
                                               confident_joint_transition, noise_corrected_accuracy,
                                               noise_corrected_log_likelihood)

count = pytest.importorskip("cleanlab.count")


def _random_inputs(rng, n, c, concentration):
    probabilities = rng.dirichlet(np.full(c, concentration), size=n)
    given = rng.integers(0, c, n)
    return given, probabilities


def _noisy(rng, true, transition):
    """Given labels drawn from ``transition``'s row of each true class (float64 inverse CDF)."""
    cumulative = transition.cumsum(1)[true]
    return (rng.random(len(true))[:, None] > cumulative).sum(1).clip(max=transition.shape[1] - 1)


def _transition(rng, c, noise):
    """A random (C, C) transition with ``1 - noise`` on the diagonal."""
    off = rng.dirichlet(np.ones(c - 1), size=c) * noise
    t = np.zeros((c, c))
    for y in range(c):
        t[y, np.arange(c) != y] = off[y]
        t[y, y] = 1 - noise
    return t


@pytest.mark.parametrize("n, c, concentration", [(1, 2, 1.0), (37, 3, 0.3), (1000, 10, 0.5), (501, 7, 30.0),
                                                 (2003, 5, 2.0)])
def test_confident_counts_equal_cleanlabs(n, c, concentration):
    """Flat probabilities (concentration 30) leave samples confident of no class; sharp ones of several."""
    rng = np.random.default_rng()
    given, probabilities = _random_inputs(rng, n, c, concentration)
    given[: min(n, c)] = np.arange(min(n, c))  # most classes labelled at least once; an unlabelled one where n < c
    ours = confident_counts(given, probabilities, num_classes=c)
    theirs = count.compute_confident_joint(given, probabilities, calibrate=False)
    np.testing.assert_array_equal(ours, theirs)
    # every sample of a label alike: each sits at its class's threshold (the 1e-6 tolerance decides)
    given = np.sort(given)
    probabilities = probabilities[given]
    ours = confident_counts(given, probabilities, num_classes=c)
    theirs = count.compute_confident_joint(given, probabilities, calibrate=False)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("n, c, concentration", [(37, 3, 0.3), (1000, 10, 0.5), (501, 7, 30.0)])
def test_confident_joint_is_cleanlabs_calibration_before_rounding(n, c, concentration):
    rng = np.random.default_rng()
    given, probabilities = _random_inputs(rng, n, c, concentration)
    ours = confident_joint(given, probabilities)
    theirs = count.compute_confident_joint(given, probabilities, calibrate=True)  # rounded to integers
    assert np.abs(ours - theirs).max() <= 1.0
    np.testing.assert_allclose(ours.sum(1), np.bincount(given, minlength=c), rtol=1e-12)
    t = confident_joint_transition(given, probabilities)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(t, (ours / ours.sum(0)).T, rtol=1e-12)


def _anchor_loop(given, probabilities, share):
    """The anchor estimate written as plainly as possible."""
    c = probabilities.shape[1]
    rows = []
    for y in range(c):
        members = [i for i in range(len(given)) if max(range(c), key=lambda k: (probabilities[i, k], -k)) == y]
        members = sorted(members, key=lambda i: -probabilities[i, y])  # stable: ties keep index order
        take = max(1, int(round(share * len(members))))
        labels = [int(given[i]) for i in members[:take]]
        rows.append([labels.count(k) / take for k in range(c)])
    return np.array(rows)


@pytest.mark.parametrize("n, c, share", [(53, 3, 0.2), (400, 5, ANCHOR_SHARE), (301, 4, 1.0), (97, 2, 0.01)])
def test_anchor_transition_equals_a_plain_loop(n, c, share):
    rng = np.random.default_rng()
    given, probabilities = _random_inputs(rng, n, c, 0.7)
    probabilities[:c] = np.eye(c)  # every class predicted at least once
    probabilities[c] = probabilities[c + 1]  # a tie in confidence between two samples
    np.testing.assert_array_equal(anchor_transition(given, probabilities, share=share),
                                  _anchor_loop(given, probabilities, share))


def test_anchor_transition_recovers_simulated_noise():
    """A model whose prediction is the true class: the anchors' given labels follow T's rows
    within five binomial standard errors."""
    rng = np.random.default_rng()
    c, n = 7, 30011
    truth = _transition(rng, c, noise=0.45)
    true = rng.integers(0, c, n)
    given = _noisy(rng, true, truth)
    confidence = rng.uniform(0.5, 1.0, n)
    probabilities = np.full((n, c), 0.0)
    probabilities[np.arange(n), true] = confidence
    probabilities += ((1 - confidence) / (c - 1))[:, None] * (np.arange(c)[None, :] != true[:, None])
    estimate = anchor_transition(given, probabilities)
    anchors = np.round(ANCHOR_SHARE * np.bincount(true, minlength=c))[:, None]
    bound = 5 * np.sqrt(truth * (1 - truth) / anchors) + 1e-12
    assert (np.abs(estimate - truth) <= bound).all()


@pytest.mark.parametrize("c, noise, n", [(2, 0.3, 4001), (10, 0.6, 20011), (10, 0.4, 999)])
def test_noise_corrected_accuracy_estimates_the_clean_accuracy(c, noise, n):
    """Fixed predictions of known clean accuracy, noisy labels drawn afresh from a known T: the
    estimate is within five of its own standard errors of the clean accuracy, and its exact
    expectation over the noise (sum_s T[y, s] inv(T)[s, f]) is the clean indicator."""
    rng = np.random.default_rng()
    t = _transition(rng, c, noise)
    true = rng.integers(0, c, n)
    predicted = np.where(rng.random(n) < 0.7, true, rng.integers(0, c, n))
    given = _noisy(rng, true, t)
    result = noise_corrected_accuracy(given, predicted, t)
    clean = float((predicted == true).mean())
    assert abs(result.estimate - clean) <= 5 * result.standard_error
    inverse = np.linalg.inv(t)
    expectation = (t[true] * inverse[:, predicted].T).sum(1)
    np.testing.assert_allclose(expectation, predicted == true, atol=64 * np.finfo(float).eps * np.linalg.cond(t))
    np.testing.assert_array_equal(result.per_sample, inverse[given, predicted])


def test_noise_corrected_accuracy_with_no_noise_is_the_accuracy():
    rng = np.random.default_rng()
    given = rng.integers(0, 6, 313)
    predicted = rng.integers(0, 6, 313)
    result = noise_corrected_accuracy(given, predicted, np.eye(6))
    assert result.estimate == pytest.approx((given == predicted).mean(), abs=1e-15)


def test_agreement_with_noisy_labels_is_biased_under_class_pair_noise_and_the_correction_is_not():
    """The reason for the module.  Classes 0 and 1 swap labels 40% of the time, class 2 keeps
    its own.  One model gets 80% of classes 0 and 1 right and puts its mistakes in class 2; the
    other gets 70% right and puts its mistakes in the partner class, where the noise puts 40% of
    the labels.  Agreement with the noisy labels prefers the worse model; the corrected accuracy
    finds the true gap.  (Both models' predictions are drawn independently of the noise, as a
    model's are on held-out images.)"""
    rng = np.random.default_rng()
    n = 60000
    t = np.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    true = rng.integers(0, 3, n)
    given = _noisy(rng, true, t)
    paired = true < 2
    better = np.where(paired & (rng.random(n) < 0.2), 2, true)
    worse = np.where(paired & (rng.random(n) < 0.3), 1 - true, true)
    gap = (better == true).mean() - (worse == true).mean()
    assert (worse == given).mean() > (better == given).mean() + 0.02  # what noisy agreement concludes
    difference = (noise_corrected_accuracy(given, better, t).per_sample
                  - noise_corrected_accuracy(given, worse, t).per_sample)
    error = difference.std(ddof=1) / np.sqrt(n)
    assert abs(difference.mean() - gap) <= 5 * error
    assert difference.mean() > 5 * error


@pytest.mark.parametrize("transition, match", [
    (np.ones((3, 2)) / 2, "square"),
    (np.full((3, 3), 0.5), "sum to 1"),
    (np.array([[0.5, 0.5], [0.5, 0.5]]), "not invertible"),
    (np.array([[1.2, -0.2], [0.0, 1.0]]), ">= 0"),
    (np.array([[np.nan, 1.0], [0.0, 1.0]]), "finite"),
])
def test_bad_transitions_are_refused(transition, match):
    with pytest.raises(ValueError, match=match):
        noise_corrected_accuracy(np.array([0, 1]), np.array([1, 1]), transition)


def test_bad_labels_and_anchor_inputs_are_refused():
    t = np.eye(3)
    with pytest.raises(ValueError, match="predicted: class indices must be < 3"):
        noise_corrected_accuracy(np.array([0, 1]), np.array([0, 3]), t)
    with pytest.raises(ValueError, match="predicted: expected 2 entries"):
        noise_corrected_accuracy(np.array([0, 1]), np.array([0]), t)
    with pytest.raises(TypeError, match="given_labels: expected integer"):
        noise_corrected_accuracy(np.array([0.0, 1.0]), np.array([0, 1]), t)
    with pytest.raises(ValueError, match="no sample is predicted as class 2"):
        anchor_transition(np.array([0, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]))
    with pytest.raises(ValueError, match="each row must sum to 1"):
        anchor_transition(np.array([0, 1]), np.full((2, 2), 0.9))


@settings(max_examples=60, deadline=None)
@given(share=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.booleans(), st.just("0.2")))
def test_anchor_share_outside_zero_one_is_refused(share):
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    valid = isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share <= 1
    if valid:
        assert anchor_transition(np.array([0, 1]), probabilities, share=share).shape == (2, 2)
    else:
        with pytest.raises(ValueError, match="share"):
            anchor_transition(np.array([0, 1]), probabilities, share=share)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(2, 6), shift=st.integers(-2, 2), seed=st.integers(0, 2**32 - 1))
def test_labels_out_of_range_are_refused_or_the_estimate_is_finite(n, c, shift, seed):
    rng = np.random.default_rng(seed)
    given = rng.integers(0, c, n) + shift
    predicted = rng.integers(0, c, n)
    t = _transition(rng, c, 0.3)
    if given.min() < 0 or given.max() >= c:
        with pytest.raises(ValueError, match="given_labels"):
            noise_corrected_accuracy(given, predicted, t)
    else:
        assert np.isfinite(noise_corrected_accuracy(given, predicted, t).estimate)


@pytest.mark.parametrize("n, c, floor", [(1, 2, 0.0), (57, 3, 1e-3), (1001, 10, 0.05)])
def test_noise_corrected_log_likelihood_equals_a_plain_float64_sum(n, c, floor):
    rng = np.random.default_rng()
    t = _transition(rng, c, 0.5)
    t[0] = 0.0
    t[0, 0] = 1.0  # a row with zeros: the floor lifts them
    probabilities = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    given = rng.integers(0, c, n)
    result = noise_corrected_log_likelihood(given, probabilities, t, floor=floor)
    expected = []
    for i in range(n):
        p = probabilities[i].astype(np.float64) / probabilities[i].astype(np.float64).sum()
        total = 0.0
        for y in range(c):
            row = [max(float(v), floor) for v in t[y]]
            total += p[y] * row[given[i]] / sum(row)
        expected.append(np.log(total))
    np.testing.assert_allclose(result.per_sample, expected, rtol=64 * c * np.finfo(float).eps)
    assert result.estimate == pytest.approx(np.mean(expected), rel=1e-12)


def test_noise_corrected_log_likelihood_with_no_noise_is_the_given_labels_log_likelihood():
    rng = np.random.default_rng()
    probabilities = rng.dirichlet(np.ones(4), size=211)
    given = rng.integers(0, 4, 211)
    result = noise_corrected_log_likelihood(given, probabilities, np.eye(4), floor=0.0)
    np.testing.assert_allclose(result.per_sample, np.log(probabilities[np.arange(211), given]), rtol=1e-12)


def test_noise_corrected_log_likelihood_prefers_the_true_posterior_to_one_leaning_to_the_flipped_class():
    """Classes 0 and 1 swap 40% of their labels.  The model that knows each image's class beats
    one that moves a fifth of its belief to the partner class, as much as noisy agreement would
    reward that; with T's correction the gap is the expected one, and positive."""
    rng = np.random.default_rng()
    n = 50000
    t = np.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    true = rng.integers(0, 3, n)
    given = _noisy(rng, true, t)
    sure = np.eye(3)[true]
    leaning = sure.copy()
    paired = true < 2
    leaning[paired] = 0.8 * sure[paired] + 0.2 * np.eye(3)[1 - true[paired]]
    difference = (noise_corrected_log_likelihood(given, sure, t, floor=0.0).per_sample
                  - noise_corrected_log_likelihood(given, leaning, t, floor=0.0).per_sample)
    error = difference.std(ddof=1) / np.sqrt(n)
    # expectation per paired image: sum_s T[y, s] log((sure T)[s] / (leaning T)[s]), a KL divergence
    expected = (2 / 3) * (0.6 * np.log(0.6 / 0.56) + 0.4 * np.log(0.4 / 0.44))
    assert abs(difference.mean() - expected) <= 5 * error
    assert difference.mean() > 5 * error


@pytest.mark.parametrize("floor", [-0.1, 0.5, 1.0, True, "0.001", float("nan")])
def test_noise_corrected_log_likelihood_refuses_a_bad_floor(floor):
    with pytest.raises(ValueError, match="floor"):
        noise_corrected_log_likelihood(np.array([0, 1]), np.eye(2), np.eye(2), floor=floor)


def test_noise_corrected_log_likelihood_refuses_bad_probabilities_and_transitions():
    with pytest.raises(ValueError, match="probabilities: expected 3 columns"):
        noise_corrected_log_likelihood(np.array([0, 1]), np.full((2, 2), 0.5), np.eye(3))
    with pytest.raises(ValueError, match="probabilities: must be finite"):
        noise_corrected_log_likelihood(np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), np.eye(2))
    with pytest.raises(ValueError, match="sum to 1"):
        noise_corrected_log_likelihood(np.array([0, 1]), np.eye(2), np.full((2, 2), 0.7))
