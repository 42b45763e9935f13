"""GMM1D / clean_probability / LossHistory against scikit-learn and plain references."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from mixnn_fast.refresh.gmm import (GMM1D, CollapsedComponentWarning, DegenerateLossesWarning, LossHistory,
                            clean_probability)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
E32, E64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# ------------------------------------------------------------------- tolerances
# Two fits of one mixture that differ only in rounding (ours in float32 or float64, scikit-learn in
# float64, ours on rescaled data) drift apart by each one's eps times how strongly EM amplifies a
# rounding error; that amplification depends on the data, not on the CPU (AVX2 and AVX-512 sum in
# other orders, which changes the rounding, never its size). _error_scales estimates it to first
# order from a float64 fit of the same problem, in the coordinates a fit computes in (ours: the
# standardised z; scikit-learn: the raw x), in units of eps:
#  - an E-step evaluates the log-odds d = c0 + c1 z + c2 z^2: rounding moves d by about
#    |c0| + |c1 z| + |c2| z^2; the M-step's sums move each mean by |m| + sd and each variance by
#    m^2 + v (sum r z^2 - 2 m sum r z + m^2 sum r cancels down to v), which moves d through its
#    derivatives in m and v. `terms` adds these up per sample;
#  - a log-odds error moves a posterior by p (1 - p) times it (`g`); the next M-step averages the
#    responsibilities' errors into the parameters, divided by the component's count (a
#    near-empty component amplifies them);
#  - EM contracts towards its fixed point, so the errors of the n_iter + 1 E-steps add at most
#    linearly (`steps`).
# This is an estimate, not a proof: over 1,080 random fits against scikit-learn (bimodal and
# unimodal losses, N from 2 to 30,011, float32 and float64, run on AVX-512, on AVX2 and without
# vector units) the observed differences reached at most 4.8x it, so the tests allow SAFETY = 8x.
# (One float64 fit of N = 2 points, one component holding 8e-4 of them, went 34x over the
# tolerance: EM on two points is that ill-conditioned; the tests' own draws are not.) A 1e-3
# change of one EM step still fails the tests (docs/testing.md lists the checks).
SAFETY = 8.0


def _error_scales(z: torch.Tensor, means, variances, weights, steps: int) -> dict:
    """Per-eps error scales of an EM run that ends at (means, variances, weights) in coordinates z."""
    (m0, m1), (v0, v1), (w0, w1) = means, variances, weights
    c2 = -0.5 / v0 + 0.5 / v1
    c1 = m0 / v0 - m1 / v1
    c0 = (-0.5 * m0 * m0 / v0 - 0.5 * math.log(v0) + math.log(w0)) - (
        -0.5 * m1 * m1 / v1 - 0.5 * math.log(v1) + math.log(w1))
    p = torch.sigmoid(c0 + c1 * z + c2 * z * z)
    terms = abs(c0) + abs(c1) * z.abs() + abs(c2) * z * z
    for m, v in zip(means, variances):
        terms = terms + ((z - m).abs() / v * (abs(m) + math.sqrt(v))
                         + ((z - m) ** 2 / (2 * v * v) - 0.5 / v).abs() * (m * m + v) + 1.0)
    g = p * (1 - p) * terms
    counts = [max(z.numel() * w, torch.finfo(torch.float64).tiny) for w in weights]
    return {
        "posterior": steps * float(g.max()),
        "weights": steps * (1.0 + float(g.mean())),
        "means": [steps * (abs(m) + math.sqrt(v) + float((g * (z - m).abs()).sum()) / k)
                  for m, v, k in zip(means, variances, counts)],
        "variances": steps * max((m * m + v) / v + float((g * ((z - m) ** 2 - v).abs()).sum()) / (k * v)
                                 for m, v, k in zip(means, variances, counts)),
        "loglik": steps * float(terms.mean()),
    }


@dataclass
class Tolerances:
    posterior: float  # atol on posteriors
    means: float  # atol on means, in the data's units
    variances: float  # rtol on variances
    weights: float  # atol on mixture weights
    loglik: float  # atol on mean log-likelihoods (lower_bound_, lower_bounds_)


def rounding_tolerances(x: np.ndarray, *fits: tuple[float, str], **settings) -> Tolerances:
    """How far fits of GMM1D(**settings) to x may differ by rounding alone: SAFETY x the sum, over
    ``fits`` = (eps, "ours" | "sklearn") pairs, of eps x that fit's error scales (see above)."""
    model = GMM1D(dtype=torch.float64, **settings).fit(torch.from_numpy(x))
    steps = model.n_iter_ + 1
    x64 = torch.from_numpy(x).double()
    shift, scale = model._shift, model._scale
    total = dict.fromkeys(("posterior", "means", "variances", "weights", "loglik"), 0.0)
    floor = 0.0  # a probability or weight near 1 is only known to its last bit
    posterior_floor = 0.0
    for eps, space in fits:
        if space == "ours":  # standardised coordinates; means map back through x = shift + scale z
            p = model._params
            scales = _error_scales((x64 - shift) / scale, p.means, p.variances, p.weights, steps)
            scales["means"] = scale * max(scales["means"]) + abs(shift) * E64 / eps
            posterior_floor += eps  # sigmoid of the log-odds: relative accuracy near 0 and 1
        else:  # scikit-learn works on the raw data, and sums all N samples at once (float64 BLAS),
            # whose rounding grows like sqrt(N) eps (ours sums chunks; the eps per statistic covers it)
            means, variances, weights = model.means_.tolist(), model.variances_.tolist(), model.weights_.tolist()
            scales = _error_scales(x64, means, variances, weights, steps)
            scales["means"] = max(scales["means"])
            scales = {key: value * math.sqrt(len(x)) for key, value in scales.items()}
            # its posteriors are exp(log density - log-sum-exp): off by eps x the log densities'
            # size, even where a posterior rounds to 1
            log_joint = torch.stack([math.log(w) - 0.5 * math.log(2 * math.pi * v) - 0.5 * (x64 - m) ** 2 / v
                                     for m, v, w in zip(means, variances, weights)], dim=1)
            posterior_floor += eps * (1 + 2 * float(log_joint.logsumexp(dim=1).abs().max()))
        for key in total:
            total[key] += eps * scales[key]
        floor += eps
    return Tolerances(posterior=SAFETY * total["posterior"] + posterior_floor, means=SAFETY * total["means"],
                      variances=SAFETY * total["variances"], weights=SAFETY * total["weights"] + floor,
                      loglik=SAFETY * total["loglik"])


def against_sklearn(dtype: torch.dtype) -> tuple[tuple[float, str], tuple[float, str]]:
    return (torch.finfo(dtype).eps, "ours"), (E64, "sklearn")


# Two fits of ours that differ only in rounding (rescaled or renormalised data) can be held much
# tighter: the estimate above must cover any data and sits ~100x above what these fits do. The
# rounding noise of our own fit is measured directly instead: refit the same data perturbed by up
# to an eps (relative, fixed draws), which rounds every step differently, as another CPU or a
# rescaling would. Over 600 random rescaled fits (float32 and float64) the difference between the
# two fits stayed below 0.5 x (8 x the largest of 6 refits' deviations + 4 eps); the estimate above
# stays as a cap, so a bug that makes the fit noisy cannot widen its own tolerance.
REFITS, REFIT_SAFETY = 6, 8.0


def refit_tolerances(x: np.ndarray, dtype: torch.dtype, **settings) -> Tolerances:
    eps = torch.finfo(dtype).eps
    fit = GMM1D(dtype=dtype, **settings).fit(torch.from_numpy(x))
    p = fit.predict_proba(torch.from_numpy(x)).double()
    draws = np.random.default_rng(0)
    deviation = dict.fromkeys(("posterior", "means", "variances", "weights"), 0.0)
    for _ in range(REFITS):
        again = GMM1D(dtype=dtype, **settings).fit(torch.from_numpy(x * (1 + eps * draws.uniform(-1, 1, len(x)))))
        for key, value in (("posterior", (again.predict_proba(torch.from_numpy(x)).double() - p).abs().max()),
                           ("means", (again.means_ - fit.means_).abs().max()),
                           ("variances", ((again.variances_ - fit.variances_) / fit.variances_).abs().max()),
                           ("weights", (again.weights_ - fit.weights_).abs().max())):
            deviation[key] = max(deviation[key], float(value))
    cap = rounding_tolerances(x, (eps, "ours"), (eps, "ours"), **settings)
    floor = {"posterior": 4 * eps, "means": 4 * eps * float(fit.means_.abs().max()), "variances": 4 * eps,
             "weights": 4 * eps}
    tight = {key: min(getattr(cap, key), REFIT_SAFETY * deviation[key] + floor[key]) for key in deviation}
    return Tolerances(loglik=cap.loglik, **tight)


def bimodal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Losses shaped like an epoch's: a tight low mode (clean) and a wide high one (noisy)."""
    n_clean = int(rng.uniform(0.3, 0.8) * n)
    low = rng.gamma(2.0, rng.uniform(0.02, 0.08), n_clean)
    high = rng.normal(rng.uniform(0.6, 1.5), rng.uniform(0.1, 0.4), n - n_clean)
    x = np.concatenate([low, np.abs(high)])
    return rng.permutation(x)


def unimodal(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        return rng.normal(rng.uniform(-2, 2), rng.uniform(0.1, 3), n)
    if kind == 1:
        return rng.exponential(rng.uniform(0.1, 2), n)
    return rng.uniform(0, rng.uniform(0.5, 5), n)


def random_init(rng: np.random.Generator, x: np.ndarray) -> dict:
    lo, hi = np.quantile(x, [0.2, 0.8])
    means = np.sort(rng.uniform(lo, hi, 2))
    variances = np.var(x) * rng.uniform(0.05, 1.0, 2)
    weights = rng.dirichlet([3.0, 3.0])
    return {"means_init": means, "variances_init": variances, "weights_init": weights}


def sklearn_gmm(x: np.ndarray, init: dict | None = None, **kw) -> GaussianMixture:
    extra = {}
    if init is not None:
        extra = {"means_init": np.asarray(init["means_init"])[:, None],
                 "precisions_init": 1.0 / np.asarray(init["variances_init"])[:, None, None],
                 "weights_init": np.asarray(init["weights_init"])}
    params = {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4, **kw}
    return GaussianMixture(n_components=2, **params, **extra).fit(x[:, None])


def assert_same_fit(ours: GMM1D, theirs: GaussianMixture, x: np.ndarray, device: str, tol: Tolerances) -> None:
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.converged_ == theirs.converged_
    np.testing.assert_allclose(ours.means_.numpy(), theirs.means_.ravel(), rtol=0, atol=tol.means)
    np.testing.assert_allclose(ours.variances_.numpy(), theirs.covariances_.ravel(), rtol=tol.variances, atol=0)
    np.testing.assert_allclose(ours.weights_.numpy(), theirs.weights_, rtol=0, atol=tol.weights)
    np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=0, atol=tol.loglik)
    ours_p = ours.predict_proba(torch.from_numpy(x).to(device)).double().cpu().numpy()
    np.testing.assert_allclose(ours_p, theirs.predict_proba(x[:, None]), rtol=0, atol=tol.posterior)


# ------------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["bimodal", "unimodal"])
@pytest.mark.parametrize("n", [2, 3, 17, 1001, 4096 * 3 + 7, 30011])
def test_matches_sklearn_from_same_init(rng, device, dtype, shape, n):
    for _ in range(3):
        x = (bimodal if shape == "bimodal" else unimodal)(rng, n)
        init = random_init(rng, x)
        theirs = sklearn_gmm(x, init)
        ours = GMM1D(dtype=dtype, **init)
        posteriors = ours.fit_predict_proba(torch.from_numpy(x).to(device))
        assert posteriors.device.type == device and posteriors.dtype == dtype and posteriors.shape == (n, 2)
        tol = rounding_tolerances(x, *against_sklearn(dtype), **init)
        np.testing.assert_allclose(posteriors.double().cpu().numpy(), theirs.predict_proba(x[:, None]),
                                   rtol=0, atol=tol.posterior)
        assert_same_fit(ours, theirs, x, device, tol)


@pytest.mark.parametrize("float64_sums", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 5, 4095, 4097, 3 * 4096 + 11])
def test_statistics_match_a_float64_reference(rng, dtype, n, float64_sums):
    """Both ways of summing the statistics (the CPU's matmul per chunk, the devices' float64 sums of
    the products), run here on the CPU, against float64 sums of the same float32/64 inputs."""
    from mixnn_fast.refresh.gmm_numerics import Standardised as _Standardised

    x = torch.from_numpy(bimodal(rng, n))
    data = _Standardised(x, dtype, float(x.min()), float(x.max()), float64_sums=float64_sums)
    resp = torch.from_numpy(rng.random(data.resp.shape)).to(dtype)
    ours = torch.tensor(data.moments(resp), dtype=torch.float64)
    if float64_sums:  # the products rounded to dtype, then summed in float64: only float64 rounding left
        products = (resp.unsqueeze(2) * data.design.unsqueeze(1)).double()
        eps = n * E64
    else:  # a chunk's dot product in dtype: at most chunk x eps of its terms (the standard bound)
        products = resp.double().unsqueeze(2) * data.design.double().unsqueeze(1)
        eps = data.design.shape[-1] * torch.finfo(dtype).eps
    expected = products.sum(dim=(0, 3))
    assert ((ours - expected).abs() <= eps * products.abs().sum(dim=(0, 3))).all()


@pytest.mark.parametrize("shape", ["bimodal", "unimodal"])
@pytest.mark.parametrize("n", [17, 4096 * 3 + 7, 30011])
def test_float64_sums_match_sklearn_from_same_init(rng, monkeypatch, shape, n):
    """The summation that CUDA devices use, run on the CPU, within the same rounding tolerance."""
    from mixnn_fast.refresh import gmm_numerics

    monkeypatch.setattr(gmm_numerics, "float64_sums_for", lambda device: True)
    x = (bimodal if shape == "bimodal" else unimodal)(rng, n)
    init = random_init(rng, x)
    theirs = sklearn_gmm(x, init)
    ours = GMM1D(dtype=torch.float32, **init)
    posteriors = ours.fit_predict_proba(torch.from_numpy(x))
    tol = rounding_tolerances(x, *against_sklearn(torch.float32), **init)
    np.testing.assert_allclose(posteriors.double().numpy(), theirs.predict_proba(x[:, None]), rtol=0,
                               atol=tol.posterior)
    assert_same_fit(ours, theirs, x, "cpu", tol)


@pytest.mark.parametrize("dtype,max_iter,tol,reg_covar", [
    (torch.float32, 1, 1e-2, 5e-4), (torch.float64, 1, 1e-2, 5e-4),
    (torch.float32, 100, 1e-4, 1e-6), (torch.float64, 100, 1e-4, 1e-6),
    # float32 resolves the mean log-likelihood to ~1e-7 and a slow fit's changes shrink slowly,
    # so tol far below 1e-4 can stop several iterations apart: such settings need float64
    (torch.float64, 50, 1e-6, 1e-6), (torch.float64, 200, 0.0, 1e-3)])
def test_matches_sklearn_other_settings(rng, dtype, max_iter, tol, reg_covar):
    x = bimodal(rng, 5003)
    init = random_init(rng, x)
    theirs = sklearn_gmm(x, init, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    ours = GMM1D(max_iter=max_iter, tol=tol, reg_covar=reg_covar, dtype=dtype, **init).fit(torch.from_numpy(x))
    bounds = rounding_tolerances(x, *against_sklearn(dtype), max_iter=max_iter, tol=tol, reg_covar=reg_covar, **init)
    assert_same_fit(ours, theirs, x, "cpu", bounds)
    # every iteration's error is at most the last one's (steps counts all of them)
    np.testing.assert_allclose(ours.lower_bounds_, theirs.lower_bounds_, rtol=0, atol=bounds.loglik)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_iter_zero_keeps_the_initial_parameters(rng, dtype):
    # (scikit-learn 1.9 fails on max_iter=0 with precisions_init, so the reference is Bayes' rule in float64)
    x = unimodal(rng, 999)
    init = random_init(rng, x)
    model = GMM1D(max_iter=0, dtype=dtype, **init).fit(torch.from_numpy(x))
    assert model.n_iter_ == 0 and not model.converged_ and model.lower_bound_ == -np.inf
    # the parameters go through the standardisation and back in float64: a few roundings of numbers
    # as large as the data (the shift) or the parameter
    np.testing.assert_allclose(model.means_.numpy(), init["means_init"], rtol=0,
                               atol=4 * E64 * (np.abs(x).max() + np.abs(init["means_init"]).max()))
    np.testing.assert_allclose(model.variances_.numpy(), init["variances_init"], rtol=4 * E64)
    m, v, w = (np.asarray(init[k]) for k in ("means_init", "variances_init", "weights_init"))
    joint = w * np.exp(-0.5 * (x[:, None] - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
    expected = joint / joint.sum(axis=1, keepdims=True)
    tol = rounding_tolerances(x, *against_sklearn(dtype), max_iter=0, **init)  # one E-step each
    np.testing.assert_allclose(model.predict_proba(torch.from_numpy(x)).double().numpy(), expected,
                               rtol=0, atol=tol.posterior)


def separated(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two clusters k-means cannot split any other way (both ours and scikit-learn's reach the same labels)."""
    n0 = int(rng.uniform(0.3, 0.7) * n)
    return rng.permutation(np.concatenate([rng.normal(0.2, 0.04, n0), rng.normal(0.8, 0.06, n - n0)]))


@pytest.mark.parametrize("n", [50, 1001, 20011])
def test_kmeans_init_matches_sklearn(rng, n):
    x = separated(rng, n)
    ours = GMM1D(max_iter=0).fit(torch.from_numpy(x))  # max_iter=0 keeps the k-means estimates
    km = KMeans(2, n_init=1, random_state=0).fit(x[:, None])
    order = np.argsort(km.cluster_centers_.ravel())
    tol = rounding_tolerances(x, *against_sklearn(torch.float32), max_iter=0)  # one M-step on the labels
    np.testing.assert_allclose(ours.means_.numpy(), km.cluster_centers_.ravel()[order], rtol=0, atol=tol.means)
    labels = order.argsort()[km.labels_]
    # same labels, so the same counts; ours adds scikit-learn's 10 eps (float64) to each count
    np.testing.assert_allclose(ours.weights_.numpy(), np.bincount(labels, minlength=2) / n, rtol=12 * E64)
    expected_vars = [x[labels == k].var() + 5e-4 for k in (0, 1)]
    np.testing.assert_allclose(ours.variances_.numpy(), expected_vars, rtol=tol.variances)


def test_partial_init_takes_the_rest_from_kmeans(rng):
    x = separated(rng, 3001)
    # scikit-learn orders components as its k-means labels them; ours puts the lower centre first
    order = np.argsort(KMeans(2, n_init=1, random_state=0).fit(x[:, None]).cluster_centers_.ravel())
    means_init = np.array([0.1, 0.9])
    theirs = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0,
                             means_init=means_init[order.argsort()][:, None]).fit(x[:, None])
    ours = GMM1D(means_init=means_init).fit(torch.from_numpy(x))
    tol = rounding_tolerances(x, *against_sklearn(torch.float32), means_init=means_init)
    np.testing.assert_allclose(ours.means_.numpy(), theirs.means_.ravel()[order], rtol=0, atol=tol.means)
    np.testing.assert_allclose(ours.variances_.numpy(), theirs.covariances_.ravel()[order], rtol=tol.variances)
    np.testing.assert_allclose(ours.weights_.numpy(), theirs.weights_[order], rtol=0, atol=tol.weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lloyd_matches_sklearn_from_the_same_centres(rng, dtype):
    """Overlapping modes, where scikit-learn's tol (not stable labels) ends k-means: same stopping point."""
    from mixnn_fast.refresh.gmm_numerics import Standardised as _Standardised

    for n in (999, 30011):
        x = bimodal(rng, n)
        lo, hi = np.sort(rng.choice(x, 2, replace=False))
        data = _Standardised(torch.from_numpy(x), dtype, float(x.min()), float(x.max()))
        to_z = lambda v: (v - data.shift) / data.scale
        ours = np.array(GMM1D._lloyd(data, to_z(lo), to_z(hi))) * data.scale + data.shift
        km = KMeans(2, init=np.array([[lo], [hi]]), n_init=1).fit(x[:, None])
        # same labels, so each centre is the same cluster mean: its sums round to a few eps of the
        # largest value summed (ours in z, back to x in float64; scikit-learn in x)
        z_max = float(np.abs(x - data.shift).max() / data.scale)
        atol = SAFETY * (torch.finfo(dtype).eps * data.scale * z_max + E64 * (abs(data.shift) + np.abs(x).max()))
        np.testing.assert_allclose(ours, np.sort(km.cluster_centers_.ravel()), rtol=0, atol=atol)


def test_kmeans_plusplus_seeds_one_centre_per_cluster(rng):
    x = separated(rng, 5000)
    data_x = torch.from_numpy(x)
    for seed in range(10):
        centres = GMM1D(max_iter=0, seed=seed).fit(data_x).means_
        assert float(centres[0]) < 0.5 < float(centres[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1001, 50000])
def test_clean_probability_matches_divide_mix_recipe(rng, device, n):
    """DivideMix / MixNN: min-max normalise, GaussianMixture(2, 10, 1e-2, 5e-4), posterior of the lower mean."""
    losses = bimodal(rng, n)
    normalised = (losses - losses.min()) / (losses.max() - losses.min())
    gmm = sklearn_gmm(normalised, random_state=0)
    expected = gmm.predict_proba(normalised[:, None])[:, gmm.means_.argmin()]
    ours = clean_probability(torch.from_numpy(losses).to(device))
    assert ours.shape == (n,) and ours.device.type == device and ours.dtype == torch.float32
    # both k-means initialisations reach the same labels here (tol ends neither), so the EM runs from
    # the same start and only rounding separates the fits
    tol = rounding_tolerances(normalised, *against_sklearn(torch.float32))
    np.testing.assert_allclose(ours.double().cpu().numpy(), expected, rtol=0, atol=tol.posterior)


def test_recovers_known_gaussians():
    rng = np.random.default_rng(7)
    truth = {"means": [0.15, 0.6], "stds": [0.05, 0.15], "weights": [0.65, 0.35]}
    n = 200_000
    component = rng.random(n) < truth["weights"][1]
    x = np.where(component, rng.normal(truth["means"][1], truth["stds"][1], n),
                 rng.normal(truth["means"][0], truth["stds"][0], n))
    model = GMM1D(max_iter=500, tol=1e-9, reg_covar=0.0).fit(torch.from_numpy(x))
    order = np.argsort(model.means_.numpy())
    # sampling error, not rounding: 4 standard errors of each estimate from n_k = n w_k draws (the
    # modes barely overlap, so the mixture's estimates are nearly as good as the components' alone)
    for k in (0, 1):
        n_k, std, w = n * truth["weights"][k], truth["stds"][k], truth["weights"][k]
        assert abs(float(model.means_[order[k]]) - truth["means"][k]) < 4 * std / math.sqrt(n_k)
        assert abs(math.sqrt(float(model.variances_[order[k]])) - std) < 4 * std / math.sqrt(2 * n_k)
        assert abs(float(model.weights_[order[k]]) - w) < 4 * math.sqrt(w * (1 - w) / n)
    assert model.converged_


def test_clean_probability_is_high_for_the_low_losses(rng):
    n_clean = 3000
    losses = np.concatenate([rng.gamma(2.0, 0.05, n_clean), rng.normal(2.0, 0.3, 2000)])
    p = clean_probability(torch.from_numpy(losses)).numpy()
    assert p[:n_clean].mean() > 0.95 and p[n_clean:].mean() < 0.05


# ------------------------------------------------------------------- invariances


def test_normalisation_is_min_max(rng):
    losses = torch.from_numpy(bimodal(rng, 3001))
    manual = (losses - losses.min()) / (losses.max() - losses.min())
    p_auto, model = clean_probability(losses, return_model=True)
    p_manual = clean_probability(manual, normalise=False)
    # the two normalisations round differently in float64, and so may the float32 fits after them
    tol = refit_tolerances(manual.numpy(), torch.float32)
    torch.testing.assert_close(p_auto, p_manual, rtol=0, atol=tol.posterior)
    assert 0.0 <= float(model.means_.min()) and float(model.means_.max()) <= 1.0


@pytest.mark.parametrize("scale,shift", [(1e-3, 0.0), (7.0, 100.0), (1e4, -3e4)])
def test_normalised_probability_ignores_affine_changes_of_the_losses(rng, scale, shift):
    losses = bimodal(rng, 4001)
    reference = clean_probability(torch.from_numpy(losses), dtype=torch.float64)
    changed = clean_probability(torch.from_numpy(losses * scale + shift), dtype=torch.float64)
    # x * scale + shift rounds to eps of its magnitude, and normalising divides by the range: the
    # normalised losses differ by this many eps, relative to their range of 1
    spread = (scale * np.abs(losses).max() + abs(shift)) / (scale * np.ptp(losses)) + 1
    normalised = (losses - losses.min()) / np.ptp(losses)
    tol = rounding_tolerances(normalised, (spread * E64, "ours"), (E64, "ours"))
    refits = refit_tolerances(normalised, torch.float64)  # the fit's own rounding noise, measured
    tol.posterior = min(tol.posterior, spread * refits.posterior)
    torch.testing.assert_close(changed, reference, rtol=0, atol=tol.posterior)


def test_unnormalised_fit_works_far_from_zero_in_float32(rng):
    # a large offset would wreck a naive float32 quadratic; the internal standardisation keeps it exact
    x = bimodal(rng, 5000) * 1e-2 + 1e3
    init = random_init(rng, x)
    theirs = sklearn_gmm(x, init, reg_covar=1e-8)
    ours = GMM1D(reg_covar=1e-8, **init).fit(torch.from_numpy(x))
    # scikit-learn's own float64 error dominates here (it works on x, 1e5 sd from zero)
    assert_same_fit(ours, theirs, x, "cpu", rounding_tolerances(x, *against_sklearn(torch.float32), reg_covar=1e-8,
                                                                **init))


@pytest.mark.parametrize("scale", [1e-150, 1e-40, 1e-10, 1e10, 1e150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unnormalised_fit_is_scale_invariant_from_tiny_to_huge_scales(rng, scale, dtype):
    # x * s with reg_covar * s^2 is the same mixture; s^2 and reg_covar / s^2 must not under- or overflow
    x = bimodal(rng, 3001)
    init = random_init(rng, x)
    reference = GMM1D(**init, dtype=dtype).fit(torch.from_numpy(x))
    scaled_init = {"means_init": init["means_init"] * scale, "variances_init": init["variances_init"] * scale ** 2,
                   "weights_init": init["weights_init"]}
    scaled = GMM1D(reg_covar=5e-4 * scale ** 2, **scaled_init, dtype=dtype).fit(torch.from_numpy(x * scale))
    # x * scale is not exactly x times a power of two, so the two fits are two computations that
    # round differently (each standardised value by up to an eps), and EM carries that through
    # every iteration: their difference is the fit's rounding noise (measured by refits of x
    # perturbed by an eps, see refit_tolerances), not a fixed number
    tol = refit_tolerances(x, dtype, **init)
    assert scaled.n_iter_ == reference.n_iter_
    torch.testing.assert_close(scaled.predict_proba(torch.from_numpy(x * scale)),
                               reference.predict_proba(torch.from_numpy(x)), rtol=0, atol=tol.posterior)
    torch.testing.assert_close(scaled.means_ / scale, reference.means_, rtol=0, atol=tol.means)
    torch.testing.assert_close(scaled.variances_ / scale ** 2, reference.variances_, rtol=tol.variances, atol=0)


@pytest.mark.parametrize("values,dtype", [
    ([0.0, 3.2229864679470793e-44], torch.float32),  # CI, 2026-11-25: a subnormal float32 range
    ([0.0, 1.401298464324817e-45], torch.float32),  # half the range rounds to 0 in float32
    ([0.0, 1.7773e-300], torch.float64),
    ([1.7976931348623155e+308, -2.9937604643020797e+292], torch.float64),  # hi - lo overflows
    ([-3e38, 3e38, 1.0], torch.float32),
])
def test_extreme_ranges_give_the_same_split_as_ordinary_ones(values, dtype):
    # two or three values, far apart relative to their range: normalised, each is its own cluster
    x = torch.tensor(values, dtype=dtype)
    p = clean_probability(x)
    lowest = torch.arange(len(values)) == int(x.argmin())
    assert (p[lowest] > 0.99).all() and (p[~lowest] < 0.01).all()
    # unnormalised, reg_covar = 5e-4 swamps these spreads and the fit gives probabilities, lowest loss
    # most clean; or it vanishes next to them, and the error says what to do
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateLossesWarning)  # [0, 1.8e-300]: below float64's resolution
            p = clean_probability(x, normalise=False)
    except ValueError as exc:
        assert "log-odds overflowed" in str(exc) or "collapsed" in str(exc)
        assert "reg_covar" in str(exc) and "normalise" in str(exc)
        return
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all() and (p[lowest] >= p[~lowest]).all()


def test_ranges_below_float64_resolution_or_reg_covar_are_degenerate():
    with pytest.warns(DegenerateLossesWarning, match="span only"):
        p = clean_probability(torch.tensor([0.0, 5e-324], dtype=torch.float64), normalise=False)
    assert torch.equal(p, torch.full((2,), 0.5))
    with pytest.warns(DegenerateLossesWarning, match="reg_covar"):
        model = GMM1D(reg_covar=1.0).fit(torch.tensor([0.0, 1e-101], dtype=torch.float64))
    assert model.degenerate_
    # just above the threshold it is an ordinary fit: the posteriors are the mixture weights
    model = GMM1D(reg_covar=1.0).fit(torch.tensor([0.0, 1e-99], dtype=torch.float64))
    assert not model.degenerate_


def test_clusters_too_tight_for_float32_log_odds_raise_a_clear_error():
    x = torch.tensor([0.0, 0.0, 1e30, 1e30])  # variance reg_covar = 5e-4 vs a spread of 1e30
    with pytest.raises(ValueError, match="log-odds overflowed.*reg_covar"):
        GMM1D(reg_covar=5e-4, means_init=[0.0, 1e30], variances_init=[5e-4, 5e-4],
              weights_init=[0.5, 0.5]).fit(torch.tensor([0.0, 1e-30, 1e30, 1e30 + 1e23]))
    # in float64 the same fit works and matches scikit-learn
    p = GMM1D(reg_covar=5e-4, dtype=torch.float64).fit_predict_proba(x.double())
    reference = sklearn_gmm(x.double().numpy(), reg_covar=5e-4).predict_proba(x.double().numpy()[:, None])
    # the clusters lie 1e30 / sqrt(5e-4) standard deviations apart: every posterior is 0 or 1, which
    # a float64 sigmoid or softmax gives exactly
    np.testing.assert_allclose(np.sort(p.numpy(), axis=1), np.sort(reference, axis=1), rtol=0, atol=E64)


def test_same_seed_same_result_and_seed_reaches_the_initialisation(rng):
    losses = torch.from_numpy(unimodal(rng, 2001))
    a = clean_probability(losses, seed=3)
    b = clean_probability(losses, seed=3)
    assert torch.equal(a, b)


# ------------------------------------------------------------------- edge cases


def test_n_zero_is_an_error():
    with pytest.raises(ValueError, match="losses is empty"):
        clean_probability(torch.empty(0))
    with pytest.raises(ValueError, match="empty"):
        GMM1D().fit(torch.empty(0))


@pytest.mark.parametrize("values", [[0.7], [2.0, 2.0], [5.0] * 1000])
def test_fewer_than_two_distinct_losses_give_one_half(values):
    with pytest.warns(DegenerateLossesWarning):
        p, model = clean_probability(torch.tensor(values), return_model=True)
    assert torch.equal(p, torch.full((len(values),), 0.5))
    assert model.degenerate_ and model.converged_
    torch.testing.assert_close(model.means_, torch.tensor([values[0]] * 2, dtype=torch.float64))
    torch.testing.assert_close(model.variances_, torch.tensor([5e-4, 5e-4], dtype=torch.float64))
    assert torch.equal(model.predict_proba(torch.tensor([0.0, 1.0])), torch.full((2, 2), 0.5))


def test_two_samples(rng):
    p = clean_probability(torch.tensor([0.1, 0.9]))
    assert p[0] > 0.99 and p[1] < 0.01


def test_component_whose_responsibilities_underflow_stays_finite_and_matches_sklearn(rng):
    x = rng.normal(0.3, 0.05, 4000)
    # component 1 starts 100 standard deviations away: its responsibilities underflow to 0
    init = {"means_init": [0.3, 5.0], "variances_init": [0.0025, 0.0025], "weights_init": [0.5, 0.5]}
    theirs = sklearn_gmm(x, init)
    for dtype in DTYPES:
        ours = GMM1D(dtype=dtype, **init).fit(torch.from_numpy(x))
        for attribute in ("means_", "variances_", "weights_"):
            assert torch.isfinite(getattr(ours, attribute)).all()
        assert float(ours.weights_[1]) < 1e-12
        tol = rounding_tolerances(x, *against_sklearn(dtype), **init)
        np.testing.assert_allclose(ours.predict_proba(torch.from_numpy(x)).double().numpy(),
                                   theirs.predict_proba(x[:, None]), rtol=0, atol=tol.posterior)
        np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=0, atol=tol.loglik)


def test_collapsed_lower_component_is_not_the_clean_set(rng):
    # a handful of near-zero losses far below the bulk: k-means gives them their own component,
    # which has the lower mean but holds ~0.1% of the samples
    losses = np.concatenate([np.full(5, 1e-4) + rng.uniform(0, 1e-5, 5), rng.normal(3.0, 0.01, 4995)])
    losses_t = torch.from_numpy(losses)
    with pytest.warns(CollapsedComponentWarning):
        p, model = clean_probability(losses_t, return_model=True)
    clean = 1 - model.lower_mean_component
    assert float(model.weights_[model.lower_mean_component]) < 0.01
    normalised = (losses_t - losses_t.min()) / (losses_t.max() - losses_t.min())
    # the fit's own final E-step against posterior(): the same parameters, each evaluated once in float32
    tol = rounding_tolerances(normalised.numpy(), (E32, "ours"), (E32, "ours"), max_iter=0,
                              means_init=model.means_, variances_init=model.variances_, weights_init=model.weights_)
    torch.testing.assert_close(p, model.posterior(normalised, clean), rtol=0, atol=tol.posterior)
    assert p[5:].mean() > 0.5
    # min_clean_weight=0: the literal rule (scikit-learn's argmin of the means)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedComponentWarning)
        literal = clean_probability(losses_t, min_clean_weight=0.0)
    assert literal[5:].max() < 1e-3


def test_zero_variance_without_reg_covar_is_a_clear_error():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="reg_covar"):
        GMM1D(reg_covar=0.0).fit(x)
    assert torch.isfinite(GMM1D(reg_covar=1e-6).fit_predict_proba(x)).all()


# ------------------------------------------------------------------- input validation


@given(n=st.integers(1, 300), position=st.integers(0, 10_000), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_non_finite_losses_raise_naming_the_index(n, position, bad, dtype):
    x = torch.linspace(0, 1, n, dtype=dtype)
    index = position % n
    x[index] = bad
    with pytest.raises(ValueError, match=rf"losses\[{index}\]"):
        clean_probability(x)
    with pytest.raises(ValueError, match="finite"):
        GMM1D().fit(x)


def _finite_loss_lists(width: int):
    """Lists of finite floats of one width, including subnormals, the extremes and near-ties:
    the ranges the standardisation must survive (CI once found [0.0, 3.2e-44] in float32)."""
    finfo = np.finfo(np.float32 if width == 32 else np.float64)
    anything = st.floats(allow_nan=False, allow_infinity=False, width=width)
    subnormal = st.floats(-float(finfo.smallest_normal), float(finfo.smallest_normal), width=width)
    ordinary = st.floats(-1e6, 1e6, allow_nan=False, width=width)
    near_one = st.integers(0, 3).map(lambda k: float(np.nextafter(finfo.dtype.type(1), 2, dtype=finfo.dtype) ** k)
                                     if k else 1.0)
    return st.lists(st.one_of(ordinary, subnormal, anything, near_one, st.sampled_from([0.0, -0.0])),
                    min_size=1, max_size=200)


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]), normalise=st.booleans(),
       compute=st.sampled_from([torch.float32, torch.float64]))
def test_any_finite_losses_give_probabilities(data, dtype, normalise, compute):
    values = data.draw(_finite_loss_lists(32 if dtype == torch.float32 else 64), label="values")
    x = torch.tensor(values, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateLossesWarning)
        warnings.simplefilter("ignore", CollapsedComponentWarning)
        try:
            p, model = clean_probability(x, normalise=normalise, dtype=compute, return_model=True)
        except ValueError as exc:  # only legitimate failure: zero variance needs reg_covar
            assert "reg_covar" in str(exc)
            return
    assert p.shape == x.shape and p.dtype == compute
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    if not normalise:  # the fitted model applied to the same losses again stays a probability
        again = model.posterior(x, model.lower_mean_component)
        assert torch.isfinite(again).all() and (again >= 0).all() and (again <= 1).all()


@pytest.mark.parametrize("bad,error,match", [
    (np.array([0.1, 0.2]), TypeError, "torch.Tensor"),
    ([0.1, 0.2], TypeError, "torch.Tensor"),
    (torch.tensor([1, 2, 3]), TypeError, "floating"),
    (torch.zeros(3, 2), ValueError, r"1-D"),
    (torch.tensor(0.5), ValueError, r"1-D"),
])
def test_bad_losses_are_rejected(bad, error, match):
    with pytest.raises(error, match=match):
        clean_probability(bad)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_iter": -1}, ValueError, "max_iter"),
    ({"max_iter": 2.5}, ValueError, "max_iter"),
    ({"tol": float("nan")}, ValueError, "tol"),
    ({"reg_covar": -1e-3}, ValueError, "reg_covar"),
    ({"seed": "a"}, TypeError, "seed"),
    ({"dtype": torch.float16}, TypeError, "dtype"),
    ({"means_init": [0.1]}, ValueError, "means_init"),
    ({"means_init": [0.1, float("inf")]}, ValueError, "means_init"),
    ({"means_init": "ab"}, TypeError, "means_init"),
    ({"variances_init": [0.1, 0.0]}, ValueError, "variances_init"),
    ({"weights_init": [0.5, 0.6]}, ValueError, "weights_init"),
    ({"weights_init": [1.0, 0.0]}, ValueError, "weights_init"),
])
def test_bad_settings_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        GMM1D(**kwargs)


def test_min_clean_weight_is_checked():
    with pytest.raises(ValueError, match="min_clean_weight"):
        clean_probability(torch.rand(10), min_clean_weight=0.7)


def test_unfitted_model_and_bad_component():
    with pytest.raises(RuntimeError, match="not fitted"):
        GMM1D().predict_proba(torch.rand(3))
    model = GMM1D().fit(torch.rand(100, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="component"):
        model.posterior(torch.rand(3), 2)
    with pytest.raises(ValueError, match=r"x\[1\]"):
        model.posterior(torch.tensor([0.1, float("nan")]), 0)


# ------------------------------------------------------------------- LossHistory


def test_loss_history_matches_a_plain_reference(rng):
    n, window = 37, 5
    history = LossHistory(n, window)
    reference: list[list[float]] = [[] for _ in range(n)]
    for epoch in range(12):
        if epoch % 3 == 0:  # a full pass
            idx, losses = None, rng.random(n)
            targets = range(n)
        else:  # a subset, as with per-epoch sampling
            idx_np = rng.choice(n, size=int(rng.integers(1, n)), replace=False)
            idx, losses = torch.from_numpy(idx_np), rng.random(len(idx_np))
            targets = idx_np.tolist()
        history.update(idx, torch.from_numpy(losses).float())
        for i, value in zip(targets, losses):
            reference[i] = (reference[i] + [float(np.float32(value))])[-window:]
        expected = torch.tensor([np.mean(r) for r in reference], dtype=torch.float32)
        # a float32 sum of at most `window` non-negative values and a division, against the float64
        # mean rounded once: window + 1 roundings, relative to the result
        rtol = (window + 1) * E32
        torch.testing.assert_close(history.mean(), expected, rtol=rtol, atol=0)
        some = torch.tensor([3, 0, 36])
        torch.testing.assert_close(history.mean(some), expected[some], rtol=rtol, atol=0)
        assert history.counts.tolist() == [len(r) for r in reference]


def test_loss_history_validation_and_state(rng):
    history = LossHistory(10, 3)
    history.update(torch.tensor([1, 4]), torch.tensor([0.5, 0.25]))
    with pytest.raises(ValueError, match="no loss recorded yet for sample 0"):
        history.mean()
    with pytest.raises(ValueError, match="no loss recorded yet for sample 7"):
        history.mean(torch.tensor([1, 7]))
    torch.testing.assert_close(history.mean(torch.tensor([4, 1])), torch.tensor([0.25, 0.5]))
    with pytest.raises(ValueError, match="distinct"):
        history.update(torch.tensor([2, 2]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        history.update(torch.tensor([10]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        history.update(torch.tensor([-1]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="int64"):
        history.update(torch.tensor([1], dtype=torch.int32), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="entries"):
        history.update(torch.tensor([1, 2]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="N=10"):
        history.update(None, torch.rand(9))
    with pytest.raises(ValueError, match=r"losses\[0\]"):
        history.update(torch.tensor([3]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="window"):
        LossHistory(10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        LossHistory(0)

    history.update(None, torch.rand(10, generator=torch.Generator().manual_seed(1)))
    restored = LossHistory(10, 3)
    restored.load_state_dict(history.state_dict())
    history.update(torch.tensor([4]), torch.tensor([1.0]))
    restored.update(torch.tensor([4]), torch.tensor([1.0]))
    torch.testing.assert_close(restored.mean(), history.mean())
    with pytest.raises(ValueError, match="shape"):
        LossHistory(11, 3).load_state_dict(history.state_dict())


def test_averaged_losses_feed_the_gmm(rng):
    n = 2000
    noisy = rng.random(n) < 0.4
    history = LossHistory(n, window=5)
    for _ in range(5):
        losses = np.where(noisy, rng.normal(1.0, 0.5, n), rng.normal(0.2, 0.5, n)).clip(0)
        history.update(None, torch.from_numpy(losses).float())
    p = clean_probability(history.mean())
    # averaging 5 epochs shrinks the per-sample spread, so the split gets sharper than one epoch's
    single = clean_probability(torch.from_numpy(losses).float())
    accuracy = lambda prob: float(((prob.numpy() > 0.5) == ~noisy).mean())
    assert accuracy(p) > 0.95 and accuracy(p) > accuracy(single)
