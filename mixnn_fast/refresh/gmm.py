"""Clean probability per sample: a two-component 1-D Gaussian mixture fitted by EM in torch.

MixNN (like DivideMix) min-max normalises the per-sample training losses, fits a
two-component Gaussian mixture to them and takes each sample's posterior of the
lower-mean component as its probability of being clean.

Why our own EM instead of ``sklearn.mixture.GaussianMixture``: the losses live on
the model's device (often CUDA), scikit-learn runs on the CPU in float64 and
takes ~1.4 s for 10^6 losses, and cuML has no Gaussian mixture. A 1-D,
two-component EM is a handful of element-wise passes, so we write it in torch
and check it against scikit-learn (tests/test_gmm.py): started from the same
parameters, the posteriors agree to within the rounding of the working dtype,
amplified by the fit's conditioning (the bounds are derived in the tests; see
docs/testing.md).

The EM mirrors scikit-learn's semantics:

- initialisation by k-means (k-means++ seeding with two local trials, then Lloyd
  iterations until the labels stop changing or the squared centre shift is at
  most 1e-4 x the data variance), or user-given means / variances / weights
  (scikit-learn's ``means_init`` / ``precisions_init`` (= 1/variance) /
  ``weights_init``). The k-means++ draws come from a torch generator, so the
  seeds differ from scikit-learn's for the same seed number;
- E-step, then M-step with ``nk = sum(resp) + 10 eps``, ``reg_covar`` added to
  the variances;
- convergence when the mean log-likelihood changes by less than ``tol`` between
  iterations, at most ``max_iter`` iterations, and a final E-step with the
  fitted parameters gives the returned posteriors.

Precision: the element-wise work runs in float32 by default (``dtype``), the
sufficient statistics are accumulated per 4096-element chunk and summed in
float64, and the parameters are float64. Measured on 10^6 losses
(bench/refresh_gmm.py, 2 CPU threads): float32 is ~2x faster than float64
(and float64 is slow on most GPUs) and its posteriors stay within ~3e-6 of
scikit-learn's from the same initial parameters. float32 resolves the mean log-likelihood to ~1e-7, which is
ample for the reference tol=1e-2; for tol below ~1e-4 use ``dtype=torch.float64``
(a slow fit may otherwise stop a few iterations apart from scikit-learn).
Internally the data are standardised (``z = (x - mean) / std``, with
``reg_covar / std^2``), which leaves the EM mathematically unchanged but keeps
float32 cancellation small for any loss scale and offset; all reported
parameters are in the input's units.

One device synchronisation per EM iteration (the convergence test needs the
log-likelihood on the host, as scikit-learn's loop does); no other host copies.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import torch

from mixnn_fast.refresh.gmm_numerics import (
    CollapsedComponentWarning, DegenerateData, DegenerateLossesWarning, KMEANS_MAX_ITER, KMEANS_TOL,
    NEGLIGIBLE_SPREAD, NK_EPS, Params, SEED_RANGE, SMALLEST_NORMAL_F64, Standardised, check_finite,
    check_losses, check_posterior, comfortable, midrange_and_half_range, pair, square_ratio, times_square)
from mixnn_fast.refresh.loss_history import LossHistory  # re-exported: it feeds the fit

__all__ = ["GMM1D", "clean_probability", "LossHistory", "DegenerateLossesWarning", "CollapsedComponentWarning"]

logger = logging.getLogger(__name__)


class GMM1D:
    """Two-component Gaussian mixture on 1-D data, fitted by EM in torch on the data's device.

    Mirrors ``sklearn.mixture.GaussianMixture(n_components=2, max_iter, tol, reg_covar)``
    (see the module docstring). Parameters:
        max_iter: EM iterations at most (>= 0; 0 keeps the initial parameters).
        tol: stop when the mean log-likelihood changes by less than this.
        reg_covar: added to each variance (>= 0), in the units of the data.
        seed: seeds the k-means++ initialisation (a torch.Generator on the data's device).
        means_init, variances_init, weights_init: 2 values each; any given replaces
            the k-means estimate of that parameter (variances_init = 1 / scikit-learn's
            precisions_init; not regularised, as in scikit-learn). weights must be > 0.
        dtype: torch.float32 (default) or torch.float64 for the element-wise work.

    After ``fit``: ``means_``, ``variances_`` (including reg_covar), ``weights_``
    (float64 CPU tensors of shape (2,)), ``n_iter_``, ``converged_``,
    ``lower_bound_`` (final mean log-likelihood) and ``lower_bounds_`` (per iteration).
    Data with fewer than two distinct values give a degenerate fit (``degenerate_``
    True): both components at that value with variance reg_covar, equal weights,
    every posterior 0.5, and a DegenerateLossesWarning. So do data whose spread is
    below float64's smallest normal number or 1e-100 x sqrt(reg_covar) (reg_covar
    then swamps it and the posteriors equal the weights to within 1e-200; both
    components sit at the midrange).
    """

    def __init__(self, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4, seed: int = 0,
                 means_init: Sequence[float] | torch.Tensor | None = None,
                 variances_init: Sequence[float] | torch.Tensor | None = None,
                 weights_init: Sequence[float] | torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if not (isinstance(reg_covar, (int, float)) and math.isfinite(reg_covar) and reg_covar >= 0):
            raise ValueError(f"reg_covar must be a finite number >= 0, got {reg_covar!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64) (a torch.Generator seed), got {seed}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.max_iter, self.tol, self.reg_covar, self.seed, self.dtype = max_iter, float(tol), float(reg_covar), seed, dtype
        self.means_init = None if means_init is None else pair(means_init, "means_init")
        self.variances_init = None if variances_init is None else pair(variances_init, "variances_init")
        if self.variances_init is not None and min(self.variances_init) <= 0:
            raise ValueError(f"variances_init must be > 0, got {self.variances_init}")
        self.weights_init = None if weights_init is None else pair(weights_init, "weights_init")
        if self.weights_init is not None:
            if min(self.weights_init) <= 0:
                raise ValueError(f"weights_init must be > 0 (a zero weight leaves a component empty), "
                                 f"got {self.weights_init}")
            if abs(sum(self.weights_init) - 1.0) > 1e-6:
                raise ValueError(f"weights_init must sum to 1, got {self.weights_init}")
        self._params: Params | None = None
        self._shift = 0.0
        self._scale = 1.0

    # ---------------------------------------------------------------- public API

    def fit(self, x: torch.Tensor) -> GMM1D:
        """Fit to ``x`` (Tensor[N], floating, finite, N >= 1) and return self."""
        self._fit(x)
        return self

    def fit_predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Fit to ``x`` and return its posteriors, Tensor[N, 2] in ``dtype`` on x's device.

        Same values as ``fit(x).predict_proba(x)`` (one E-step cheaper)."""
        data = self._fit(x)
        return torch.stack([self._fitted_posterior(data, 0), self._fitted_posterior(data, 1)], dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior of each component for ``x`` (Tensor[N], floating), Tensor[N, 2] in ``dtype``."""
        return torch.stack([self.posterior(x, 0), self.posterior(x, 1)], dim=1)

    def posterior(self, x: torch.Tensor, component: int) -> torch.Tensor:
        """P(component | x) for ``x`` (Tensor[N], floating, finite), Tensor[N] in ``dtype`` on x's device."""
        self._require_fitted()
        if component not in (0, 1):
            raise ValueError(f"component must be 0 or 1, got {component!r}")
        x = check_losses(x, "x")
        check_finite(x, "x")
        if self.degenerate_:
            return torch.full(x.shape, 0.5, dtype=self.dtype, device=x.device)
        # Standardised before any down-cast; in float64 when the scale (see Standardised) or the
        # log-odds' coefficients (huge for a component with a tiny variance) are extreme.
        c0, c1, c2 = self._params.log_odds_coefficients(component)
        if comfortable(self.dtype, self._scale) and comfortable(self.dtype, max(abs(c0), abs(c1), abs(c2), 1.0)):
            work_dtype = torch.promote_types(x.dtype, self.dtype)  # subtract before any down-cast
            z = (x.to(work_dtype) - self._shift).to(self.dtype).mul_(1.0 / self._scale)
        else:
            z = (x.to(torch.float64) - self._shift).div_(self._scale)
        probability = torch.sigmoid(torch.mul(z * z, c2).add_(z, alpha=c1).add_(c0))
        check_posterior(probability)
        return probability.to(self.dtype)

    @property
    def lower_mean_component(self) -> int:
        """Index (0 or 1) of the component with the smaller mean (0 on a tie)."""
        self._require_fitted()
        return int(self.means_[1] < self.means_[0])

    # ---------------------------------------------------------------- fitting

    def _fit(self, x: torch.Tensor) -> Standardised | DegenerateData:
        x = check_losses(x, "x")
        if x.numel() == 0:
            raise ValueError("x is empty; a mixture needs at least one value")
        lo, hi = (float(v) for v in torch.aminmax(x))
        check_finite(x, "x", (lo, hi))
        if lo == hi:
            self._fit_degenerate(x.numel(), f"are all equal ({lo:g})", lo)
            return DegenerateData(x.numel(), x.device)
        _, half_range = midrange_and_half_range(lo, hi)
        if half_range < SMALLEST_NORMAL_F64 or half_range < NEGLIGIBLE_SPREAD * math.sqrt(self.reg_covar):
            self._fit_degenerate(x.numel(), f"span only [{lo:g}, {hi:g}] (below float64's resolution or "
                                 f"{NEGLIGIBLE_SPREAD:g} x sqrt(reg_covar))", 0.5 * lo + 0.5 * hi)
            return DegenerateData(x.numel(), x.device)
        data = Standardised(x, self.dtype, lo, hi)
        reg_z = square_ratio(self.reg_covar, data.scale)
        params = self._initial_params(data, reg_z)

        lower_bound = -math.inf
        lower_bounds: list[float] = []
        converged = False
        n_iter = 0
        log_scale = math.log(data.scale)
        for n_iter in range(1, self.max_iter + 1):
            previous = lower_bound
            stats, sum_r_log_r = data.e_step(params)  # one device sync, as scikit-learn's loop needs
            # At the E-step's responsibilities r, log p(z_i) = sum_k r_ik (log p(k, z_i) - log r_ik) exactly.
            mean_log_lik_z = (params.expected_log_joint(stats) - sum_r_log_r) / data.n
            params = self._m_step(stats, reg_z)
            # in x's units: the density of x = shift + scale z is p(z) / scale
            lower_bound = mean_log_lik_z - log_scale
            lower_bounds.append(lower_bound)
            if abs(lower_bound - previous) < self.tol:
                converged = True
                break
        if not converged:
            logger.debug("GMM1D: EM stopped after max_iter=%d without reaching tol=%g", self.max_iter, self.tol)

        # the fitted state is set only now, so a fit that raises leaves the previous one intact
        self._params = params
        self._shift, self._scale = data.shift, data.scale
        self.degenerate_ = False
        self.n_iter_ = n_iter
        self.converged_ = converged
        self.lower_bound_ = lower_bound
        self.lower_bounds_ = lower_bounds
        self.means_ = torch.tensor([data.shift + data.scale * m for m in params.means], dtype=torch.float64)
        self.variances_ = torch.tensor([times_square(v, data.scale) for v in params.variances], dtype=torch.float64)
        self.weights_ = torch.tensor(params.weights, dtype=torch.float64)
        return data

    def _fit_degenerate(self, n: int, why: str, value: float) -> None:
        warnings.warn(f"GMM1D: the {n} value(s) {why}; two components cannot be told apart, "
                      "every posterior is 0.5", DegenerateLossesWarning, stacklevel=4)
        self.degenerate_ = True
        self._params = Params((0.0, 0.0), (1.0, 1.0), (0.5, 0.5))
        self._shift, self._scale = value, 1.0
        self.n_iter_ = 0
        self.converged_ = True
        self.lower_bound_ = -0.5 * math.log(2 * math.pi * self.reg_covar) if self.reg_covar > 0 else math.inf
        self.lower_bounds_ = []
        self.means_ = torch.tensor([value, value], dtype=torch.float64)
        self.variances_ = torch.tensor([self.reg_covar, self.reg_covar], dtype=torch.float64)
        self.weights_ = torch.tensor([0.5, 0.5], dtype=torch.float64)

    def _initial_params(self, data: Standardised, reg_z: float) -> Params:
        """k-means estimates, each replaced by the user's init when given (scikit-learn's rule)."""
        a, s = data.shift, data.scale
        given_means = None if self.means_init is None else tuple((m - a) / s for m in self.means_init)
        given_vars = None if self.variances_init is None else tuple(square_ratio(v, s) for v in self.variances_init)
        for name, given in (("means_init", given_means), ("variances_init", given_vars)):
            if given is not None and not all(math.isfinite(v) and abs(v) < 1e150 for v in given):
                raise ValueError(f"{name}={getattr(self, name)} is out of range for data with mean {a:g} and "
                                 f"standard deviation {s:g} (more than 1e150 of them away)")
        if given_means is not None and given_vars is not None and self.weights_init is not None:
            return Params(given_means, given_vars, self.weights_init)
        estimate = self._m_step(data.moments(self._kmeans_resp(data)), reg_z, weights_by_n=data.n)
        return Params(given_means or estimate.means, given_vars or estimate.variances,
                       self.weights_init or estimate.weights)

    def _m_step(self, stats: list[list[float]], reg_z: float, weights_by_n: int | None = None) -> Params:
        """scikit-learn's M-step from per-component [sum r, sum r z, sum r z^2]."""
        nk, means, variances = [], [], []
        for total, first, second in stats:
            n = total + NK_EPS
            mean = first / n
            # sum r (z - mean)^2 expanded; rounding can make it slightly negative.
            spread = max(second - 2.0 * mean * first + mean * mean * total, 0.0) / n
            variance = spread + reg_z
            if not variance > 0.0:
                raise ValueError("GMM1D: a component collapsed onto a single value (zero variance); increase "
                                 f"reg_covar (here {reg_z:g} x the data's variance; scikit-learn's default is "
                                 "1e-6, MixNN uses 5e-4 on normalised losses) or normalise the losses")
            nk.append(n)
            means.append(mean)
            variances.append(variance)
        # scikit-learn divides the k-means weights by N and the EM weights by sum(nk).
        norm = float(weights_by_n) if weights_by_n is not None else nk[0] + nk[1]
        return Params((means[0], means[1]), (variances[0], variances[1]), (nk[0] / norm, nk[1] / norm))

    def _kmeans_resp(self, data: Standardised) -> torch.Tensor:
        """Hard responsibilities (chunks, 2, chunk) from 2-means on z; component 0 has the lower centre."""
        lo, hi = self._lloyd(data, *sorted(self._kmeans_plusplus(data)))
        above, ones = data.resp[:, 1:], data.design[:, :1]
        torch.gt(data.z.unsqueeze(1), 0.5 * (lo + hi), out=above).mul_(ones)
        torch.sub(ones, above, out=data.resp[:, :1])
        return data.resp

    def _kmeans_plusplus(self, data: Standardised) -> tuple[float, float]:
        """Two seeds by k-means++ with scikit-learn's 2 + int(log k) = 2 local trials, in z units."""
        z, n = data.z, data.n  # z: (chunks, chunk) view, zero-padded
        chunk = z.shape[1]
        generator = torch.Generator(device=z.device).manual_seed(self.seed)
        first_index = int(torch.randint(n, (1,), generator=generator, device=z.device))
        first = float(z[first_index // chunk, first_index % chunk])
        dist_sq = data.work[:, 0]
        torch.sub(z, first, out=dist_sq).square_().mul_(data.design[:, 0])  # padding: 0, never drawn
        draws = torch.rand(2, generator=generator, device=z.device, dtype=torch.float64).tolist()
        chunk_cdf = torch.cumsum(dist_sq.sum(dim=1).to(torch.float64), dim=0)
        trial = data.work[:, 1]
        best, best_potential = first, math.inf
        for u in draws:
            index = self._draw_proportional(dist_sq, chunk_cdf, u)
            candidate = float(z[index // chunk, index % chunk])
            torch.sub(z, candidate, out=trial).square_()
            potential = float(torch.minimum(trial, dist_sq, out=trial).sum())
            if potential < best_potential:
                best, best_potential = candidate, potential
        return first, best

    @staticmethod
    def _lloyd(data: Standardised, lo: float, hi: float) -> tuple[float, float]:
        """Lloyd iterations from centres lo < hi (z units) with scikit-learn's stopping rules:
        labels unchanged, or squared centre shift <= 1e-4 x the variance of z; at most 300."""
        # In 1-D the clusters are split at the midpoint, so the labels are unchanged
        # exactly when the count above the midpoint is unchanged.
        z, n = data.z, data.n
        above, ones = data.resp[:, 1:], data.design[:, :1]
        var_z = data.sum_z2 / n - (data.sum_z / n) ** 2
        count_hi = -1.0
        for _ in range(KMEANS_MAX_ITER):
            torch.gt(z.unsqueeze(1), 0.5 * (lo + hi), out=above).mul_(ones)
            new_count, sum_hi, _ = data.moments(above)[0]
            if new_count == count_hi:
                break  # scikit-learn's "strict convergence"
            if new_count == 0 or new_count == n:
                break  # rounding emptied a cluster (near-tied values): keep the last two centres
            count_hi = new_count
            new_hi = sum_hi / new_count
            new_lo = (data.sum_z - sum_hi) / (n - new_count)
            shift = (new_lo - lo) ** 2 + (new_hi - hi) ** 2
            lo, hi = new_lo, new_hi
            if shift <= KMEANS_TOL * var_z:
                break  # converged by tolerance; the caller assigns labels from these centres
        return lo, hi

    @staticmethod
    def _draw_proportional(weights: torch.Tensor, chunk_totals: torch.Tensor, u: float) -> int:
        """The flat index drawn with probability proportional to ``weights`` (chunks, chunk, >= 0,
        not all 0; ``chunk_totals`` the cumulative sums of its rows), for a uniform draw ``u`` in
        [0, 1): inverse CDF over the chunk totals, then inside the chosen chunk (two short
        cumsums instead of one of length N)."""
        target = max(u, 1e-12) * float(chunk_totals[-1])  # u = 0 would land on a zero weight
        row = min(int(torch.searchsorted(chunk_totals, torch.tensor([target], dtype=torch.float64,
                                                                      device=weights.device))),
                  weights.shape[0] - 1)
        before = float(chunk_totals[row - 1]) if row > 0 else 0.0
        within = torch.cumsum(weights[row], dim=0, dtype=torch.float64)
        col = int(torch.searchsorted(within, torch.tensor([target - before], dtype=torch.float64,
                                                           device=weights.device)))
        col = min(col, int((weights[row] > 0).nonzero()[-1]))  # rounding past the end: last positive
        return col + row * weights.shape[1]

    def _fitted_posterior(self, data: Standardised | DegenerateData, component: int) -> torch.Tensor:
        """The final E-step on the data just fitted: P(component | x), Tensor[N]."""
        if isinstance(data, DegenerateData):
            return torch.full((data.n,), 0.5, dtype=self.dtype, device=data.device)
        return data.posterior(self._params, component)

    def _require_fitted(self) -> None:
        if self._params is None:
            raise RuntimeError("GMM1D is not fitted; call fit(x) first")


def clean_probability(losses: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                      normalise: bool = True, seed: int = 0, return_model: bool = False,
                      means_init: Sequence[float] | torch.Tensor | None = None,
                      variances_init: Sequence[float] | torch.Tensor | None = None,
                      weights_init: Sequence[float] | torch.Tensor | None = None,
                      min_clean_weight: float = 0.01,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor | tuple[torch.Tensor, GMM1D]:
    """Each sample's probability of being clean: the posterior of the lower-mean GMM component.

    Args:
        losses: Tensor[N] floating, finite (NaN/inf raise ValueError), on any device;
            the fit runs there. N >= 1.
        max_iter, tol, reg_covar: EM settings; the defaults are DivideMix's and MixNN's.
        normalise: min-max normalise the losses to [0, 1] first (as the authors do);
            reg_covar and the init parameters are then in normalised units.
        seed: seeds the k-means++ initialisation.
        return_model: also return the fitted GMM1D.
        means_init, variances_init, weights_init: see GMM1D.
        min_clean_weight: a lower-mean component with weight below this has collapsed
            onto a few very low losses and is no clean set; the other component is then
            taken as clean, with a CollapsedComponentWarning. 0 disables the rule.
        dtype: compute dtype, torch.float32 (default) or torch.float64.

    Returns:
        Tensor[N] in ``dtype`` on the losses' device, values in [0, 1] (and the model
        if return_model). Losses with fewer than two distinct values (including N == 1),
        or a spread GMM1D counts as none (see there), cannot be split: every
        probability is 0.5, with a DegenerateLossesWarning.
    """
    losses = check_losses(losses, "losses")
    if losses.numel() == 0:
        raise ValueError("losses is empty; need at least one sample")
    if not (isinstance(min_clean_weight, (int, float)) and 0.0 <= min_clean_weight < 0.5):
        raise ValueError(f"min_clean_weight must be in [0, 0.5), got {min_clean_weight!r}")
    lo, hi = (float(v) for v in torch.aminmax(losses))
    check_finite(losses, "losses", (lo, hi))
    x = losses
    if normalise and hi > lo:
        work = losses.to(torch.promote_types(losses.dtype, dtype))
        if comfortable(work.dtype, hi - lo):
            x = (work - lo).mul_(1.0 / (hi - lo))
        elif hi - lo <= torch.finfo(work.dtype).max:  # the reciprocal of a subnormal range overflows
            x = work.sub(lo).div_(hi - lo)
        else:  # hi - lo overflows: halve first
            x = work.mul(0.5).sub_(0.5 * lo).div_(0.5 * hi - 0.5 * lo)
    model = GMM1D(max_iter=max_iter, tol=tol, reg_covar=reg_covar, seed=seed, means_init=means_init,
                  variances_init=variances_init, weights_init=weights_init, dtype=dtype)
    data = model._fit(x)
    clean = model.lower_mean_component
    if not model.degenerate_ and float(model.weights_[clean]) < min_clean_weight:
        warnings.warn(f"clean_probability: the lower-mean component has weight {float(model.weights_[clean]):.3g} "
                      f"< min_clean_weight={min_clean_weight} (collapsed onto a few low losses); "
                      "taking the other component as clean", CollapsedComponentWarning, stacklevel=2)
        clean = 1 - clean
    probability = model._fitted_posterior(data, clean)
    return (probability, model) if return_model else probability
