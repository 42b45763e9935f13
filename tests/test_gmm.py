"""GMM1D / clean_probability / LossHistory against scikit-learn and plain references."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from mixnn_fast.gmm import (GMM1D, CollapsedComponentWarning, DegenerateLossesWarning, LossHistory,
                            clean_probability)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# float32 element-wise work must stay within the 1e-3; float64 shows the EM is the same EM.
DTYPE_TOL = [(torch.float32, 1e-3), (torch.float64, 1e-8)]

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


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


def assert_same_fit(ours: GMM1D, theirs: GaussianMixture, x: np.ndarray, device: str, atol: float) -> None:
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.converged_ == theirs.converged_
    np.testing.assert_allclose(ours.means_.numpy(), theirs.means_.ravel(), rtol=atol, atol=atol)
    np.testing.assert_allclose(ours.variances_.numpy(), theirs.covariances_.ravel(), rtol=atol, atol=atol * 1e-2)
    np.testing.assert_allclose(ours.weights_.numpy(), theirs.weights_, rtol=atol, atol=atol)
    np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=atol, atol=atol)
    ours_p = ours.predict_proba(torch.from_numpy(x).to(device)).double().cpu().numpy()
    np.testing.assert_allclose(ours_p, theirs.predict_proba(x[:, None]), rtol=0, atol=atol)


# ------------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPE_TOL)
@pytest.mark.parametrize("shape", ["bimodal", "unimodal"])
@pytest.mark.parametrize("n", [2, 3, 17, 1001, 4096 * 3 + 7, 30011])
def test_matches_sklearn_from_same_init(rng, device, dtype, atol, shape, n):
    for _ in range(3):
        x = (bimodal if shape == "bimodal" else unimodal)(rng, n)
        init = random_init(rng, x)
        theirs = sklearn_gmm(x, init)
        ours = GMM1D(dtype=dtype, **init)
        posteriors = ours.fit_predict_proba(torch.from_numpy(x).to(device))
        assert posteriors.device.type == device and posteriors.dtype == dtype and posteriors.shape == (n, 2)
        np.testing.assert_allclose(posteriors.double().cpu().numpy(), theirs.predict_proba(x[:, None]),
                                   rtol=0, atol=atol)
        assert_same_fit(ours, theirs, x, device, atol)


@pytest.mark.parametrize("dtype,atol,max_iter,tol,reg_covar", [
    (torch.float32, 1e-3, 1, 1e-2, 5e-4), (torch.float64, 1e-8, 1, 1e-2, 5e-4),
    (torch.float32, 1e-3, 100, 1e-4, 1e-6), (torch.float64, 1e-8, 100, 1e-4, 1e-6),
    # float32 resolves the mean log-likelihood to ~1e-7 and a slow fit's changes shrink slowly,
    # so tol far below 1e-4 can stop several iterations apart: such settings need float64
    (torch.float64, 1e-8, 50, 1e-6, 1e-6), (torch.float64, 1e-8, 200, 0.0, 1e-3)])
def test_matches_sklearn_other_settings(rng, dtype, atol, max_iter, tol, reg_covar):
    x = bimodal(rng, 5003)
    init = random_init(rng, x)
    theirs = sklearn_gmm(x, init, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    ours = GMM1D(max_iter=max_iter, tol=tol, reg_covar=reg_covar, dtype=dtype, **init).fit(torch.from_numpy(x))
    assert_same_fit(ours, theirs, x, "cpu", atol)
    np.testing.assert_allclose(ours.lower_bounds_, theirs.lower_bounds_, rtol=atol, atol=atol)


@pytest.mark.parametrize("dtype,atol", DTYPE_TOL)
def test_max_iter_zero_keeps_the_initial_parameters(rng, dtype, atol):
    # (scikit-learn 1.9 fails on max_iter=0 with precisions_init, so the reference is Bayes' rule in float64)
    x = unimodal(rng, 999)
    init = random_init(rng, x)
    model = GMM1D(max_iter=0, dtype=dtype, **init).fit(torch.from_numpy(x))
    assert model.n_iter_ == 0 and not model.converged_ and model.lower_bound_ == -np.inf
    np.testing.assert_allclose(model.means_.numpy(), init["means_init"], rtol=1e-12)
    np.testing.assert_allclose(model.variances_.numpy(), init["variances_init"], rtol=1e-12)
    m, v, w = (np.asarray(init[k]) for k in ("means_init", "variances_init", "weights_init"))
    joint = w * np.exp(-0.5 * (x[:, None] - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
    expected = joint / joint.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict_proba(torch.from_numpy(x)).double().numpy(), expected, atol=atol)


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
    np.testing.assert_allclose(ours.means_.numpy(), km.cluster_centers_.ravel()[order], rtol=1e-5)
    labels = order.argsort()[km.labels_]
    np.testing.assert_allclose(ours.weights_.numpy(), np.bincount(labels, minlength=2) / n, rtol=1e-9)
    expected_vars = [x[labels == k].var() + 5e-4 for k in (0, 1)]
    np.testing.assert_allclose(ours.variances_.numpy(), expected_vars, rtol=1e-4)


def test_partial_init_takes_the_rest_from_kmeans(rng):
    x = separated(rng, 3001)
    # scikit-learn orders components as its k-means labels them; ours puts the lower centre first
    order = np.argsort(KMeans(2, n_init=1, random_state=0).fit(x[:, None]).cluster_centers_.ravel())
    means_init = np.array([0.1, 0.9])
    theirs = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0,
                             means_init=means_init[order.argsort()][:, None]).fit(x[:, None])
    ours = GMM1D(means_init=means_init).fit(torch.from_numpy(x))
    np.testing.assert_allclose(ours.means_.numpy(), theirs.means_.ravel()[order], rtol=1e-4)
    np.testing.assert_allclose(ours.variances_.numpy(), theirs.covariances_.ravel()[order], rtol=1e-3)
    np.testing.assert_allclose(ours.weights_.numpy(), theirs.weights_[order], rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lloyd_matches_sklearn_from_the_same_centres(rng, dtype):
    """Overlapping modes, where scikit-learn's tol (not stable labels) ends k-means: same stopping point."""
    from mixnn_fast.gmm import _Standardised

    for n in (999, 30011):
        x = bimodal(rng, n)
        lo, hi = np.sort(rng.choice(x, 2, replace=False))
        data = _Standardised(torch.from_numpy(x), dtype, float(x.min()), float(x.max()))
        to_z = lambda v: (v - data.shift) / data.scale
        ours = np.array(GMM1D._lloyd(data, to_z(lo), to_z(hi))) * data.scale + data.shift
        km = KMeans(2, init=np.array([[lo], [hi]]), n_init=1).fit(x[:, None])
        np.testing.assert_allclose(ours, np.sort(km.cluster_centers_.ravel()), rtol=1e-4)


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
    np.testing.assert_allclose(ours.double().cpu().numpy(), expected, rtol=0, atol=1e-3)


def test_recovers_known_gaussians():
    rng = np.random.default_rng(7)
    truth = {"means": [0.15, 0.6], "stds": [0.05, 0.15], "weights": [0.65, 0.35]}
    n = 200_000
    component = rng.random(n) < truth["weights"][1]
    x = np.where(component, rng.normal(truth["means"][1], truth["stds"][1], n),
                 rng.normal(truth["means"][0], truth["stds"][0], n))
    model = GMM1D(max_iter=500, tol=1e-9, reg_covar=0.0).fit(torch.from_numpy(x))
    order = np.argsort(model.means_.numpy())
    np.testing.assert_allclose(model.means_.numpy()[order], truth["means"], atol=5e-3)
    np.testing.assert_allclose(np.sqrt(model.variances_.numpy()[order]), truth["stds"], atol=5e-3)
    np.testing.assert_allclose(model.weights_.numpy()[order], truth["weights"], atol=1e-2)
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
    torch.testing.assert_close(p_auto, p_manual, rtol=0, atol=1e-5)
    assert 0.0 <= float(model.means_.min()) and float(model.means_.max()) <= 1.0


@pytest.mark.parametrize("scale,shift", [(1e-3, 0.0), (7.0, 100.0), (1e4, -3e4)])
def test_normalised_probability_ignores_affine_changes_of_the_losses(rng, scale, shift):
    losses = bimodal(rng, 4001)
    reference = clean_probability(torch.from_numpy(losses), dtype=torch.float64)
    changed = clean_probability(torch.from_numpy(losses * scale + shift), dtype=torch.float64)
    torch.testing.assert_close(changed, reference, rtol=0, atol=1e-6)


def test_unnormalised_fit_works_far_from_zero_in_float32(rng):
    # a large offset would wreck a naive float32 quadratic; the internal standardisation keeps it exact
    x = bimodal(rng, 5000) * 1e-2 + 1e3
    init = random_init(rng, x)
    theirs = sklearn_gmm(x, init, reg_covar=1e-8)
    ours = GMM1D(reg_covar=1e-8, **init).fit(torch.from_numpy(x))
    assert_same_fit(ours, theirs, x, "cpu", 1e-3)


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
    torch.testing.assert_close(scaled.predict_proba(torch.from_numpy(x * scale)),
                               reference.predict_proba(torch.from_numpy(x)), rtol=0, atol=1e-5)
    torch.testing.assert_close(scaled.means_ / scale, reference.means_, rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled.variances_ / scale ** 2, reference.variances_, rtol=1e-5, atol=0)


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
    np.testing.assert_allclose(np.sort(p.numpy(), axis=1), np.sort(reference, axis=1), atol=1e-9)


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
    for dtype, atol in DTYPE_TOL:
        ours = GMM1D(dtype=dtype, **init).fit(torch.from_numpy(x))
        for attribute in ("means_", "variances_", "weights_"):
            assert torch.isfinite(getattr(ours, attribute)).all()
        assert float(ours.weights_[1]) < 1e-12
        np.testing.assert_allclose(ours.predict_proba(torch.from_numpy(x)).double().numpy(),
                                   theirs.predict_proba(x[:, None]), atol=atol)
        np.testing.assert_allclose(ours.lower_bound_, theirs.lower_bound_, rtol=atol)


def test_collapsed_lower_component_is_not_the_clean_set(rng):
    # a handful of near-zero losses far below the bulk: k-means gives them their own component,
    # which has the lower mean but holds ~0.1% of the samples
    losses = np.concatenate([np.full(5, 1e-4) + rng.uniform(0, 1e-5, 5), rng.normal(3.0, 0.01, 4995)])
    losses_t = torch.from_numpy(losses)
    with pytest.warns(CollapsedComponentWarning):
        p, model = clean_probability(losses_t, return_model=True)
    clean = 1 - model.lower_mean_component
    assert float(model.weights_[model.lower_mean_component]) < 0.01
    torch.testing.assert_close(p, model.posterior(
        (losses_t - losses_t.min()) / (losses_t.max() - losses_t.min()), clean))
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
        torch.testing.assert_close(history.mean(), expected)
        some = torch.tensor([3, 0, 36])
        torch.testing.assert_close(history.mean(some), expected[some])
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
