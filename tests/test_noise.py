"""Label-noise simulation: the matrices each kind defines, realised frequencies checked
statistically against the returned matrix, exact-count guarantees, and input validation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

from mixnn_fast.data.noise import KINDS, NoisyLabels, corrupt, transition_matrix
from mixnn_fast.data.noise import _systematic_counts

CLASSES_OF = {"asymmetric_cifar10": 10, "asymmetric_fashion_mnist": 10, "asymmetric_cifar100": 100}
BUILT_IN = [k for k in KINDS if k != "custom"]


def _chi_square_p(result: NoisyLabels, matrix: np.ndarray) -> float:
    """p-value of Pearson's chi-square test that each clean class's noisy labels follow ``matrix``'s
    row (rows pooled: statistic and degrees of freedom summed). A draw in a cell of probability
    0 is impossible under the matrix, so it gives p = 0."""
    counts = result.counts()
    n = counts.sum(axis=1, keepdims=True)
    expected = matrix * n
    if np.any(counts[expected == 0] > 0):
        return 0.0
    used = expected > 0
    statistic = float((((counts - expected) ** 2)[used] / expected[used]).sum())
    dof = int((used.sum(axis=1) - 1)[n[:, 0] > 0].sum())
    return float(stats.chi2.sf(statistic, dof)) if dof else 1.0


def _balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


# ----------------------------------------------------------------------------- the matrices

E64 = np.finfo(np.float64).eps
# An entry (1 - r) [i == j] + r R_ij with R_ij = 1 / c or a normalised row: a division, a product,
# a subtraction and a sum of float64 numbers <= 1, each rounded to eps / 2, on either side.
ENTRY = dict(rtol=0, atol=4 * E64)


def close(value: float):
    return pytest.approx(value, rel=0, abs=ENTRY["atol"])


def test_matrices_of_each_kind():
    r = 0.4
    t = transition_matrix("symmetric_uniform", r, 4)
    np.testing.assert_allclose(t, np.full((4, 4), 0.1) + 0.6 * np.eye(4), **ENTRY)
    t = transition_matrix("symmetric_flip", r, 5)
    np.testing.assert_allclose(np.diag(t), 0.6, **ENTRY)
    np.testing.assert_allclose(t[~np.eye(5, dtype=bool)], 0.1, **ENTRY)
    t = transition_matrix("pairflip", r, 3)
    np.testing.assert_allclose(t, [[0.6, 0.4, 0], [0, 0.6, 0.4], [0.4, 0, 0.6]], **ENTRY)

    t = transition_matrix("asymmetric_cifar10", r, 10)
    # airplane 0, automobile 1, bird 2, cat 3, deer 4, dog 5, frog 6, horse 7, ship 8, truck 9
    flips = {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    for i in range(10):
        for j in range(10):
            want = 0.6 if (i == j and any(i == a for a, _ in flips)) else 1.0 if i == j else 0.4 if (i, j) in flips else 0.0
            assert t[i, j] == close(want), (i, j)

    t = transition_matrix("asymmetric_fashion_mnist", r, 10)
    # T-shirt/top 0 <-> Shirt 6, Pullover 2 <-> Coat 4, Sandal 5 -> Sneaker 7 -> Ankle boot 9
    for i, j in [(0, 6), (6, 0), (2, 4), (4, 2), (5, 7), (7, 9)]:
        assert t[i, j] == close(0.4) and t[i, i] == close(0.6)
    for untouched in (1, 3, 8, 9):
        assert t[untouched, untouched] == 1.0
    assert (t - np.diag(np.diag(t))).sum(axis=0).max() == close(0.4)  # each class gains at most r

    t = transition_matrix("asymmetric_cifar100", r, 100)
    for i in range(100):
        successor = i // 5 * 5 + (i + 1) % 5
        assert t[i, i] == close(0.6) and t[i, successor] == close(0.4)
    assert t[4, 0] == close(0.4) and t[9, 5] == close(0.4) and t[4, 5] == 0

    for kind in BUILT_IN:
        m = transition_matrix(kind, 0.37, CLASSES_OF.get(kind, 10))
        # C entries' roundings and C additions
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=m.shape[1] * 4 * E64)
        assert m.min() >= 0


def test_symmetric_conventions_differ_by_the_factor_c_minus_1_over_c(rng):
    labels = _balanced_labels(10, 2000, rng)
    uniform = corrupt(labels, "symmetric_uniform", 0.5, 10, seed=1)
    flip = corrupt(labels, "symmetric_flip", 0.5, 10, seed=1)
    assert uniform.rate == pytest.approx(0.45, abs=1e-4)  # "50 % noise" in DivideMix's code
    assert flip.rate == pytest.approx(0.5, abs=1e-4)


# ------------------------------------------------------------------- statistics of the draws

@pytest.mark.parametrize("kind", BUILT_IN)
@pytest.mark.parametrize("rate", [0.2, 0.8])
def test_independent_sampling_follows_the_returned_matrix(kind, rate, rng):
    num_classes = CLASSES_OF.get(kind, 10)
    labels = rng.integers(0, num_classes, size=200_000)
    result = corrupt(labels, kind, rate, num_classes, seed=int(rng.integers(2**31)), sampling="independent")
    assert _chi_square_p(result, result.transition) > 1e-4
    # realised rate against its binomial spread around the matrix's expected flip probability
    p_flip = float((1 - np.diag(result.transition))[labels].mean())
    sigma = np.sqrt(p_flip * (1 - p_flip) / len(labels))
    assert abs(result.rate - p_flip) < 5 * sigma + 1e-12


def test_chi_square_check_has_power(rng):
    """The statistical test above would notice the wrong convention: draws from
    symmetric_uniform are rejected against symmetric_flip's matrix at the same rate."""
    labels = rng.integers(0, 10, size=200_000)
    result = corrupt(labels, "symmetric_uniform", 0.4, 10, seed=3, sampling="independent")
    assert _chi_square_p(result, transition_matrix("symmetric_flip", 0.4, 10)) < 1e-6
    assert _chi_square_p(result, result.transition) > 1e-4


@given(
    kind=st.sampled_from(BUILT_IN), rate=st.floats(0.0, 1.0), per_class=st.integers(0, 60),
    sampling=st.sampled_from(["exact", "independent"]), seed=st.integers(0, 2**32 - 1),
)
def test_result_is_consistent(kind, rate, per_class, sampling, seed):
    num_classes = CLASSES_OF.get(kind, 7)
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))
    result = corrupt(labels, kind, rate, num_classes, seed, sampling=sampling)
    assert result.labels.dtype == np.int64 and result.labels.shape == labels.shape
    np.testing.assert_array_equal(result.clean_labels, labels)
    np.testing.assert_array_equal(result.mask, result.labels != labels)
    assert result.rate == (result.mask.mean() if len(labels) else 0.0)
    assert np.all(result.transition[labels, result.labels] > 0)  # only transitions the matrix allows
    if sampling == "exact":
        expected = result.transition * per_class
        assert np.all(np.abs(result.counts() - expected) < 1 + 1e-9)


@given(matrix=st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4), min_size=4, max_size=4),
       zeros=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=6),
       rate=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_custom_matrices_are_honoured_exactly(matrix, zeros, rate, seed):
    raw = np.asarray(matrix) + 1e-3
    for i, j in zeros:
        raw[i, j] = 0.0
    assume(np.all(raw.sum(axis=1) > 0))
    replacement = raw / raw.sum(axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 25)
    result = corrupt(labels, "custom", rate, 4, seed, transition=replacement)
    # corrupt() normalises the rows once more (a 4-term sum and a division) before mixing
    np.testing.assert_allclose(result.transition, (1 - rate) * np.eye(4) + rate * replacement, rtol=0, atol=8 * E64)
    assert np.all(np.abs(result.counts() - result.transition * 25) < 1 + 1e-9)
    assert np.all(result.transition[labels, result.labels] > 0)


def test_exact_sampling_is_unbiased():
    """Systematic rounding: counts are floor or ceil of T·n and their mean over draws is T·n."""
    rng = np.random.default_rng(11)
    probabilities = np.array([0.05, 0.0, 0.33, 0.12, 0.5])
    n = 7
    draws = np.stack([_systematic_counts(probabilities, n, rng) for _ in range(20_000)])
    assert np.all(draws.sum(axis=1) == n)
    assert np.all(np.abs(draws - probabilities * n) < 1)
    assert np.all(draws[:, 1] == 0)
    standard_error = draws.std(axis=0) / np.sqrt(len(draws)) + 1e-12
    assert np.all(np.abs(draws.mean(axis=0) - probabilities * n) < 5 * standard_error)


def test_exact_counts_on_a_large_set(rng):
    labels = rng.integers(0, 100, size=100_000)
    result = corrupt(labels, "asymmetric_cifar100", 0.4, 100, seed=5)
    n = np.bincount(labels, minlength=100)[:, None]
    assert np.abs(result.counts() - result.transition * n).max() < 1
    assert result.rate == pytest.approx(0.4, abs=100 / len(labels))


def test_extreme_rates():
    labels = np.tile(np.arange(6), 50)
    assert not corrupt(labels, "symmetric_flip", 0.0, 6, seed=0).mask.any()
    assert corrupt(labels, "symmetric_flip", 1.0, 6, seed=0).mask.all()
    np.testing.assert_array_equal(corrupt(labels, "pairflip", 1, 6, seed=0).labels, (labels + 1) % 6)


def test_seeding(rng):
    labels = rng.integers(0, 10, size=5000)
    for sampling in ("exact", "independent"):
        a = corrupt(labels, "symmetric_uniform", 0.6, 10, seed=7, sampling=sampling)
        b = corrupt(labels, "symmetric_uniform", 0.6, 10, seed=7, sampling=sampling)
        c = corrupt(labels, "symmetric_uniform", 0.6, 10, seed=8, sampling=sampling)
        d = corrupt(labels, "symmetric_uniform", 0.6, 10, seed=np.random.default_rng(7), sampling=sampling)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.labels, d.labels)
        assert not np.array_equal(a.labels, c.labels)


# ---------------------------------------------------------------------------- validation

@given(matrix=st.lists(st.lists(st.floats(-1, 2) | st.sampled_from([np.nan, np.inf, 1 / 3, 0.0]), min_size=3, max_size=3),
                       min_size=3, max_size=3))
def test_invalid_custom_matrices_are_rejected(matrix):
    array = np.asarray(matrix)
    valid = np.all(np.isfinite(array)) and np.all(array >= 0) and np.allclose(array.sum(axis=1), 1, rtol=0, atol=1e-6)
    assume(not valid)
    with pytest.raises(ValueError, match="transition"):
        corrupt(np.array([0, 1, 2]), "custom", 0.5, 3, seed=0, transition=matrix)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(rate=1.5), "rate must be a number in"),
        (dict(rate=-0.1), "rate must be a number in"),
        (dict(rate=float("nan")), "rate must be a number in"),
        (dict(rate="0.2"), "rate must be a number in"),
        (dict(num_classes=1), "num_classes must be an integer >= 2"),
        (dict(num_classes=3.0), "num_classes must be an integer >= 2"),
        (dict(labels=[0, 1, 4]), r"labels\[2\] = 4 is out of range \[0, 4\)"),
        (dict(labels=[0, -1]), r"labels\[1\] = -1 is out of range"),
        (dict(labels=[[0, 1]]), "1-D integer array"),
        (dict(labels=[0.0, 1.0]), "1-D integer array"),
        (dict(kind="symmetric"), "unknown kind 'symmetric'"),
        (dict(kind="asymmetric_cifar10"), "defined for 10 classes"),
        (dict(kind="asymmetric_cifar100"), "defined for 100 classes"),
        (dict(kind="custom"), "needs transition="),
        (dict(transition=np.eye(4)), "only used with kind 'custom'"),
        (dict(kind="custom", transition=np.eye(3)), r"shape \(4, 4\)"),
        (dict(sampling="binomial"), "sampling must be one of"),
        (dict(seed="7"), "seed must be an int"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    call = dict(labels=[0, 1, 2, 3], kind="symmetric_flip", rate=0.3, num_classes=4, seed=0) | arguments
    with pytest.raises(ValueError, match=message):
        corrupt(call.pop("labels"), call.pop("kind"), call.pop("rate"), call.pop("num_classes"), call.pop("seed"), **call)
