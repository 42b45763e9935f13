"""mixing_weights and random_partners against plain float64 references and distribution tests."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy import stats

from mixnn_fast.refresh.weights import MODES, mixing_weights, random_partners

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
E32, E64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
# mixing_weights computes the ratios in float64 (K additions and a division: (K + 1) eps64) and
# rounds each once to float32 (eps32 / 2, relative: tiny probabilities like 1e-30 stay exact ratios)
RATIO_RTOL = E32


def reference_gmm_weights(w: np.ndarray, neighbours: np.ndarray, anchors: np.ndarray, on_zero: str) -> np.ndarray:
    """Eq. 10-11 row by row in float64."""
    k = neighbours.shape[1]
    out = np.empty((len(anchors), k + 1))
    for row, (i, partners) in enumerate(zip(anchors, neighbours)):
        values = [w[i]] + [w[j] for j in partners]
        total = sum(values)
        if total == 0:
            out[row] = [1.0 / (k + 1)] * (k + 1) if on_zero == "uniform" else [1.0] + [0.0] * k
        else:
            out[row] = [v / total for v in values]
    return out


def random_clean_prob(rng: np.random.Generator, n: int) -> np.ndarray:
    w = rng.random(n)
    w[rng.random(n) < 0.3] = 0.0  # surely noisy samples
    w[rng.random(n) < 0.05] = 1.0
    w[rng.random(n) < 0.05] = 1e-30  # tiny but not zero: the ratio must still be exact
    return w


def check_rows(weights: torch.Tensor, rows: int, k: int) -> None:
    assert weights.shape == (rows, k + 1) and weights.dtype == torch.float32
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    # float64 rows summing to 1 within (K + 1) eps64, each weight then rounded to float32: within
    # eps32 / 2 of its value, so the row within eps32 / 2 of 1, plus the float64 sums' rounding
    ones = torch.ones(rows, dtype=torch.float64, device=weights.device)
    torch.testing.assert_close(weights.double().sum(dim=1), ones, rtol=0, atol=E32 / 2 + 2 * (k + 2) * E64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(1, 0), (2, 1), (7, 1), (101, 3), (4099, 1), (513, 5)])
@pytest.mark.parametrize("on_zero", ["uniform", "anchor"])
@pytest.mark.parametrize("mode", ["gmm", "trust"])
def test_gmm_weights_match_reference(rng, device, n, k, on_zero, mode):
    w = random_clean_prob(rng, n)
    neighbours = rng.integers(0, n, (n, k)) if n > 1 else np.zeros((n, k), dtype=np.int64)
    ours = mixing_weights(torch.from_numpy(w).float().to(device), torch.from_numpy(neighbours).to(device),
                          mode=mode, on_zero=on_zero)
    assert ours.device.type == device
    w64 = w.astype(np.float32).astype(np.float64)
    expected = reference_gmm_weights(w64, neighbours, np.arange(n), on_zero)
    atol = 0.0
    if mode == "trust":  # row by row: the anchor alone with probability w_i, eq. 10-11 otherwise
        expected = (1 - w64)[:, None] * expected
        expected[:, 0] += w64
        # each weight a float64 sum of two products rounded once to float32; the anchor's weight
        # w + (1 - w) r can cancel no sign, so relative eps32 holds, plus float64 rounding near 0
        atol = 4 * E64
        assert (ours[torch.from_numpy(w64 == 1.0).to(device), 0] == 1).all()  # a surely clean anchor: not mixed
    np.testing.assert_allclose(ours.cpu().numpy(), expected, rtol=RATIO_RTOL, atol=atol)
    check_rows(ours, n, k)


def test_gmm_weights_for_a_subset_of_anchors(rng):
    n, k = 300, 2
    w = random_clean_prob(rng, n)
    anchors = rng.choice(n, 41, replace=False)
    neighbours = rng.integers(0, n, (41, k))
    ours = mixing_weights(torch.from_numpy(w), torch.from_numpy(neighbours), anchors=torch.from_numpy(anchors))
    np.testing.assert_allclose(ours.numpy(), reference_gmm_weights(w, neighbours, anchors, "uniform"),
                               rtol=RATIO_RTOL, atol=0)


def test_paper_example_k1():
    # lambda_i = w_i / (w_i + w_n): a clean anchor with a noisy neighbour keeps most of itself
    w = torch.tensor([0.9, 0.1, 0.0, 0.0])
    neighbours = torch.tensor([[1], [0], [3], [2]])
    ours = mixing_weights(w, neighbours)
    torch.testing.assert_close(ours, torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]]))
    anchor_only = mixing_weights(w, neighbours, on_zero="anchor")
    torch.testing.assert_close(anchor_only[2:], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_all_zero_clean_probabilities_fall_back_everywhere():
    w = torch.zeros(50)
    neighbours = random_partners(50, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixing_weights(w, neighbours), torch.full((50, 4), 0.25))
    expected = torch.zeros(50, 4)
    expected[:, 0] = 1
    torch.testing.assert_close(mixing_weights(w, neighbours, on_zero="anchor"), expected)


def test_avg(rng):
    w = torch.from_numpy(rng.random(20))
    torch.testing.assert_close(mixing_weights(w, torch.zeros(20, 4, dtype=torch.int64), "avg"),
                               torch.full((20, 5), 0.2))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_rdm_k1_is_beta(alpha):
    n = 4000
    g = torch.Generator().manual_seed(11)
    weights = mixing_weights(torch.rand(n, generator=g), random_partners(n, 1, g), "rdm", generator=g, alpha=alpha)
    check_rows(weights, n, 1)
    assert stats.kstest(weights[:, 0].double().numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # and not some other distribution: the test can fail
    assert stats.kstest(weights[:, 0].double().numpy(), stats.beta(alpha * 3, alpha).cdf).pvalue < 1e-3


def test_rdm_k3_is_dirichlet():
    n, k, alpha = 4000, 3, 0.7
    g = torch.Generator().manual_seed(5)
    weights = mixing_weights(torch.rand(n, generator=g), random_partners(n, k, g), "rdm", generator=g, alpha=alpha)
    check_rows(weights, n, k)
    for column in range(k + 1):  # Dirichlet(a, ..., a) marginals are Beta(a, k a)
        assert stats.kstest(weights[:, column].double().numpy(), stats.beta(alpha, k * alpha).cdf).pvalue > 1e-3


def test_rdm_with_tiny_alpha_has_no_empty_rows():
    g = torch.Generator().manual_seed(2)
    weights = mixing_weights(torch.rand(1000, generator=g), random_partners(1000, 2, g), "rdm",
                             generator=g, alpha=1e-3)
    check_rows(weights, 1000, 2)


def test_mixup_shares_one_uniform_lambda_per_call():
    g = torch.Generator().manual_seed(3)
    lambdas = []
    for _ in range(400):
        weights = mixing_weights(torch.rand(64, generator=g), random_partners(64, 1, g), "mixup", generator=g)
        check_rows(weights, 64, 1)
        assert (weights == weights[0]).all()
        lambdas.append(float(weights[0, 0]))
    assert stats.kstest(lambdas, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="K=1"):
        mixing_weights(torch.rand(8), torch.zeros(8, 2, dtype=torch.int64), "mixup")


@pytest.mark.parametrize("mode", ["rdm", "mixup"])
def test_random_modes_are_reproducible_with_a_generator(mode):
    w, nb = torch.rand(33), random_partners(33, 1, torch.Generator().manual_seed(0))
    a = mixing_weights(w, nb, mode, generator=torch.Generator().manual_seed(9))
    b = mixing_weights(w, nb, mode, generator=torch.Generator().manual_seed(9))
    c = mixing_weights(w, nb, mode, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@given(data=st.data(), n=st.integers(1, 40), k=st.integers(0, 4), mode=st.sampled_from(MODES),
       on_zero=st.sampled_from(["uniform", "anchor"]))
def test_rows_are_always_valid(data, n, k, mode, on_zero):
    if mode == "mixup":
        k = 1
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 1e-38, 1e-45, 0.5, 1e-7, 0.999999]) | st.floats(0, 1),
                                min_size=n, max_size=n))
    neighbours = data.draw(st.lists(st.lists(st.integers(0, n - 1), min_size=k, max_size=k), min_size=n, max_size=n))
    weights = mixing_weights(torch.tensor(values, dtype=torch.float32),
                             torch.tensor(neighbours, dtype=torch.int64).reshape(n, k), mode,
                             generator=torch.Generator().manual_seed(0), on_zero=on_zero)
    check_rows(weights, n, k)


@given(n=st.integers(2, 30), bad=st.sampled_from([float("nan"), float("inf"), -0.1, 1.5, -float("inf")]),
       position=st.integers(0, 100))
def test_bad_clean_probabilities_are_rejected(n, bad, position):
    w = torch.rand(n, generator=torch.Generator().manual_seed(n))
    index = position % n
    w[index] = bad
    with pytest.raises(ValueError, match=rf"clean_prob\[{index}\]"):
        mixing_weights(w, torch.zeros(n, 1, dtype=torch.int64))


@given(n=st.integers(1, 30), k=st.integers(1, 3), offset=st.sampled_from([-1, 0]), row=st.integers(0, 100))
def test_neighbours_out_of_range_are_rejected(n, k, offset, row):
    neighbours = torch.zeros(n, k, dtype=torch.int64)
    neighbours[row % n, k - 1] = n if offset == 0 else -1
    with pytest.raises(ValueError, match=r"neighbours must lie in \[0, N\)"):
        mixing_weights(torch.rand(n), neighbours)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"clean_prob": [0.5, 0.5]}, TypeError, "clean_prob"),
    ({"clean_prob": torch.ones(2, 1)}, ValueError, "clean_prob"),
    ({"clean_prob": torch.ones(2, dtype=torch.int64)}, ValueError, "clean_prob"),
    ({"neighbours": [[1], [0]]}, TypeError, "neighbours"),
    ({"neighbours": torch.tensor([[1], [0]], dtype=torch.int32)}, ValueError, "int64"),
    ({"neighbours": torch.tensor([1, 0])}, ValueError, "2-D"),
    ({"neighbours": torch.tensor([[1], [0], [1]])}, ValueError, "anchors="),
    ({"anchors": torch.tensor([0])}, ValueError, "anchors has 1"),
    ({"anchors": torch.tensor([0, 2])}, ValueError, "anchors must lie"),
    ({"anchors": torch.tensor([0, 1], dtype=torch.int32)}, ValueError, "anchors"),
    ({"mode": "nn"}, ValueError, "mode"),
    ({"on_zero": "skip"}, ValueError, "on_zero"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"generator": 3}, TypeError, "generator"),
])
def test_bad_arguments_are_rejected(kwargs, error, match):
    arguments = {"clean_prob": torch.tensor([0.2, 0.7]), "neighbours": torch.tensor([[1], [0]])}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        mixing_weights(**arguments)


# ------------------------------------------------------------------- random partners


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(2, 1), (5, 4), (9, 3), (1001, 1), (1001, 7), (3001, 3), (100_003, 2)])
def test_random_partners_are_distinct_others(device, n, k):
    g = torch.Generator(device=device).manual_seed(n + k)
    partners = random_partners(n, k, g)
    assert partners.shape == (n, k) and partners.dtype == torch.int64 and partners.device.type == device
    assert (partners >= 0).all() and (partners < n).all()
    assert not (partners == torch.arange(n, device=device).unsqueeze(1)).any()
    ordered = partners.sort(dim=1).values
    assert not (ordered[:, 1:] == ordered[:, :-1]).any()


@pytest.mark.parametrize("n,k", [(7, 2), (3001, 2)])
def test_random_partners_are_uniform(n, k):
    """Small n (sorted keys): every k-subset of the others equally likely. Large n (rejection): offsets uniform."""
    g = torch.Generator().manual_seed(1)
    if n == 7:
        counts = {}
        for _ in range(1500):
            for row, partners in enumerate(random_partners(n, k, g).tolist()):
                key = tuple(sorted((p - row) % n for p in partners))
                counts[key] = counts.get(key, 0) + 1
        assert set(counts) == set(itertools.combinations(range(1, n), k))
        observed = np.array(list(counts.values()))
    else:
        offsets = (random_partners(n, k, g) - torch.arange(n).unsqueeze(1)) % n
        # offsets 1..3000 in bins of 100: bin 0 holds 99 of them (1..99), bin 30 one (3000)
        observed = np.bincount(offsets.flatten().numpy() // 100, minlength=31)
        expected = np.array([99] + [100] * 29 + [1]) * (n * k / (n - 1))
        assert stats.chisquare(observed, expected).pvalue > 1e-3
        return
    assert stats.chisquare(observed).pvalue > 1e-3


def test_random_partners_edge_cases_and_validation():
    assert random_partners(1, 0).shape == (1, 0)
    assert random_partners(4, 0).shape == (4, 0)
    assert torch.equal(random_partners(2, 1), torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="k must be"):
        random_partners(3, 3)
    with pytest.raises(ValueError, match="k must be"):
        random_partners(3, -1)
    with pytest.raises(ValueError, match="n must be"):
        random_partners(0, 0)
    with pytest.raises(TypeError, match="generator"):
        random_partners(5, 1, generator=1)
    a = random_partners(50, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a, random_partners(50, 2, torch.Generator().manual_seed(4)))
