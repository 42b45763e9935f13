"""The per-class GMM of MixNN+'s --plus-gmm-per-class: each class's fit is the global routine on
that class's losses, it agrees with scikit-learn's fit per class, small or unsplittable classes
keep the fallback, and inside a refresh it stops calling a hard class's right labels noisy."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.mixture import GaussianMixture

from mixnn_fast.refresh.class_gmm import MIN_CLASS_SAMPLES, clean_probability_per_class
from mixnn_fast.refresh.gmm import clean_probability
from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.refresh import RefreshOptions, refresh
from mixnn_fast.refresh.targets import SoftTargets


def _two_bumps(rng, n, shift):
    """n losses: about 70% near ``shift``, the rest near ``shift + 3``."""
    noisy = rng.random(n) < 0.3
    return np.where(noisy, rng.normal(shift + 3.0, 0.4, n), rng.normal(shift, 0.3, n))


@pytest.mark.parametrize("sizes", [(20, 37, 101), (53, 19, 64, 7), (250,)])
def test_each_class_is_the_global_routine_on_its_own_losses(rng, sizes):
    labels = torch.from_numpy(np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])).long()
    perm = torch.from_numpy(rng.permutation(len(labels)))
    labels = labels[perm]
    losses = torch.from_numpy(rng.gamma(2.0, 1.0, len(labels))).float()
    fallback = torch.full((len(labels),), float("nan"))  # poison: every fitted class must overwrite it
    got, kept = clean_probability_per_class(losses, labels, fallback, seed=3)
    for c, size in enumerate(sizes):
        members = labels == c
        if size < MIN_CLASS_SAMPLES:
            assert torch.isnan(got[members]).all()
        else:
            assert torch.equal(got[members], clean_probability(losses[members], seed=3))
    assert kept == pytest.approx(sum(s for s in sizes if s < MIN_CLASS_SAMPLES) / len(labels))
    assert got.dtype == torch.float32


@pytest.mark.parametrize("n_per_class", [41, 150])
def test_matches_scikit_learns_gmm_fitted_per_class(rng, n_per_class):
    shifts = (0.0, 2.5, 5.0)  # three classes of different difficulty
    losses = np.concatenate([_two_bumps(rng, n_per_class, s) for s in shifts])
    labels = np.repeat(np.arange(len(shifts)), n_per_class)
    got, _ = clean_probability_per_class(torch.from_numpy(losses), torch.from_numpy(labels),
                                         torch.zeros(len(losses)), max_iter=500, tol=1e-10, reg_covar=1e-6,
                                         dtype=torch.float64)
    for c in range(len(shifts)):
        x = losses[labels == c]
        x = (x - x.min()) / (x.max() - x.min())  # the routine's min-max normalisation
        ref = GaussianMixture(2, max_iter=500, tol=1e-10, reg_covar=1e-6, random_state=0).fit(x[:, None])
        clean = int(np.argmin(ref.means_.ravel()))
        expected = ref.predict_proba(x[:, None])[:, clean]
        np.testing.assert_allclose(got[torch.from_numpy(labels == c)].numpy(), expected, atol=1e-4)


def test_a_class_that_cannot_be_split_keeps_the_fallback_without_a_warning(rng):
    labels = torch.tensor([0] * 30 + [1] * 40)
    losses = torch.cat([torch.full((30,), 1.25), torch.from_numpy(_two_bumps(rng, 40, 0.0)).float()])
    fallback = torch.from_numpy(rng.random(70)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, kept = clean_probability_per_class(losses, labels, fallback)
    assert torch.equal(got[:30], fallback[:30]) and not torch.equal(got[30:], fallback[30:])
    assert kept == pytest.approx(30 / 70)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), m=st.integers(0, 6), dtype=st.sampled_from([torch.int32, torch.int64, torch.float32]))
def test_mismatched_inputs_are_refused_by_name(n, m, dtype):
    losses, fallback = torch.rand(n), torch.rand(n)
    labels = torch.zeros(m, dtype=dtype)
    if m == n and dtype == torch.int64:
        clean_probability_per_class(losses, labels, fallback)  # well formed: no error
        return
    with pytest.raises(ValueError, match="labels"):
        clean_probability_per_class(losses, labels, fallback)


def test_in_a_refresh_it_stops_calling_a_hard_classs_right_labels_noisy(rng):
    """Class 0 is hard: its right labels have losses as high as the wrong labels of class 1.  One
    GMM over everything calls class 0's right labels noisy; one per class does not."""
    n, c = 240, 2
    given = torch.tensor([0] * (n // 2) + [1] * (n // 2))
    wrong = torch.from_numpy(rng.random(n) < 0.25)
    # the model's probability of the given label: right labels of class 0 ~0.03 (loss ~3.5), of
    # class 1 ~0.9 (~0.1), wrong ones ~0.01 (~4.6)
    p_given = torch.where(wrong, 0.01, torch.where(given == 0, 0.03, 0.9)) * torch.from_numpy(
        rng.uniform(0.8, 1.0, n))
    logit = torch.log(p_given / (1 - p_given)).float()
    logits = torch.zeros(n, c)
    logits[torch.arange(n), given] = logit
    features = torch.from_numpy(rng.normal(size=(n, 3))).float()
    results = {}
    for per_class in (False, True):
        scores = PoolScores(torch.arange(n), SoftTargets(given, c, start_epoch=0), given, 0, correct=False)
        scores.add(torch.arange(n), logits, features)
        results[per_class] = refresh(scores.covered(allow_missing=False), RefreshOptions(neighbour_backend="exact",
                                                                      gmm_per_class=per_class))
    right_hard = (given == 0) & ~wrong
    assert (results[False].clean_prob[right_hard] < 0.5).float().mean() > 0.5  # the global fit: called noisy
    assert (results[True].clean_prob[right_hard] > 0.5).all()
    assert (results[True].clean_prob[wrong] < 0.5).all()
    assert results[True].stats["gmm_class_fallback"] == 0.0 and "gmm_class_fallback" not in results[False].stats
    assert results[True].stats["gmm_separation"] == results[False].stats["gmm_separation"]  # the global fit's
