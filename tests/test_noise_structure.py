"""The label-free sign of the noise's structure (mixnn_fast.refresh.noise_structure): checked
against scipy's entropy on fresh random labels of odd sizes, on noise of known structure from
mixnn_fast.data.noise, and for its input validation."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import entropy

from mixnn_fast.data.noise import corrupt
from mixnn_fast.refresh.noise_structure import disagreement_spread


def reference_spread(given_labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """The same measure by another route: a Python dict of pair counts and scipy's entropy."""
    counts: dict[tuple[int, int], int] = {}
    for g, p in zip(given_labels.tolist(), predicted.tolist()):
        if g != p:
            counts[(g, p)] = counts.get((g, p), 0) + 1
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return min(1.0, math.exp(entropy(list(counts.values()))) / min(total, num_classes * (num_classes - 1)))


@pytest.mark.parametrize("n, c, concentration", [(1, 2, 1.0), (7, 3, 0.3), (101, 10, 1.0), (999, 10, 0.05),
                                                  (4097, 14, 0.5), (333, 100, 1.0)])
def test_matches_scipy_on_random_labels(n, c, concentration):
    rng = np.random.default_rng(n * 31 + c)
    given_labels = rng.integers(0, c, n)
    # predictions: the label, or another class drawn from a Dirichlet (low concentration: few pairs)
    other = rng.choice(c, size=n, p=rng.dirichlet(np.full(c, concentration)))
    predicted = np.where(rng.random(n) < 0.6, given_labels, other)
    ours = disagreement_spread(torch.from_numpy(given_labels), torch.from_numpy(predicted), c)
    assert ours == pytest.approx(reference_spread(given_labels, predicted, c), rel=1e-12, abs=1e-15)


def test_extremes():
    given_labels = torch.arange(10).repeat(20)
    assert disagreement_spread(given_labels, given_labels.clone(), 10) == 0.0  # nothing differs
    one_pair = given_labels.clone()
    one_pair[given_labels == 3] = 5
    assert disagreement_spread(given_labels, one_pair, 10) == pytest.approx(1 / 20)  # 20 disagreements, one pair
    # every ordered pair exactly twice: the most it can be
    g = torch.tensor([i for i in range(10) for j in range(10) if i != j] * 2)
    p = torch.tensor([j for i in range(10) for j in range(10) if i != j] * 2)
    assert disagreement_spread(g, p, 10) == pytest.approx(1.0)


def test_tells_symmetric_from_class_pair_noise():
    """Predictions that are the true labels, against labels corrupted symmetrically or by
    Fashion-MNIST's class-pair map at 40%: what the measure is for."""
    clean = np.random.default_rng(0).integers(0, 10, 2000)
    symmetric = corrupt(clean, "symmetric_uniform", 0.4, 10, seed=1).labels
    pairs = corrupt(clean, "asymmetric_fashion_mnist", 0.4, 10, seed=1).labels
    truth = torch.from_numpy(clean)
    assert disagreement_spread(torch.from_numpy(symmetric), truth, 10) > 0.9
    assert disagreement_spread(torch.from_numpy(pairs), truth, 10) < 6.5 / 90 * 1.1  # six pairs at most


def test_refresh_logs_it():
    from mixnn_fast.refresh.refresh import refresh
    from mixnn_fast.refresh.targets import soft_targets
    from pool_streaming import stream

    rng = np.random.default_rng(5)
    n, c = 203, 7
    given_labels = torch.from_numpy(rng.integers(0, c, n))
    logits = torch.from_numpy(rng.normal(size=(n, c))).float()
    scores = stream(torch.arange(n), soft_targets(given_labels, c), given_labels, logits=logits,
                    features=torch.from_numpy(rng.normal(size=(n, 5))).float(), correct=False)
    stats = refresh(scores.covered(allow_missing=False)).stats
    expected = reference_spread(given_labels.numpy(), logits.argmax(1).numpy(), c)
    assert stats["disagreement_spread"] == pytest.approx(expected, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), shift=st.sampled_from(["shape", "dtype", "low", "high", "classes"]))
def test_refuses_bad_input_by_name(n, shift):
    given_labels = torch.zeros(n, dtype=torch.int64)
    predicted = torch.zeros(n, dtype=torch.int64)
    c = 4
    if shift == "shape":
        predicted = torch.zeros(n + 1, dtype=torch.int64)
        match = "one shape"
    elif shift == "dtype":
        predicted = predicted.float()
        match = "int64"
    elif shift == "low":
        given_labels = torch.full((n + 1,), -1, dtype=torch.int64)
        predicted = torch.zeros(n + 1, dtype=torch.int64)
        match = "given: labels must lie"
    elif shift == "high":
        given_labels = torch.zeros(n + 1, dtype=torch.int64)
        predicted = torch.full((n + 1,), c, dtype=torch.int64)
        match = "predicted: labels must lie"
    else:
        c = 1
        match = "num_classes"
    with pytest.raises(ValueError, match=match):
        disagreement_spread(given_labels, predicted, c)
