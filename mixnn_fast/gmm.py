"""Clean probability per sample: a two-component 1-D Gaussian mixture fitted by EM in torch.

MixNN (like DivideMix) min-max normalises the per-sample training losses, fits a
two-component Gaussian mixture to them and takes each sample's posterior of the
lower-mean component as its probability of being clean.

Why our own EM instead of ``sklearn.mixture.GaussianMixture``: the losses live on
the model's device (often CUDA), scikit-learn runs on the CPU in float64 and
takes ~1.4 s for 10^6 losses, and cuML has no Gaussian mixture. A 1-D,
two-component EM is a handful of element-wise passes, so we write it in torch
and check it against scikit-learn (tests/test_gmm.py): started from the same
parameters, the posteriors agree to 1e-3 (float32) and ~1e-9 (float64).

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
from dataclasses import dataclass
from typing import Sequence

import torch

from mixnn_fast._checks import check_device, check_sample_ids

__all__ = ["GMM1D", "clean_probability", "LossHistory", "DegenerateLossesWarning", "CollapsedComponentWarning"]

logger = logging.getLogger(__name__)

# scikit-learn adds 10 * eps (of the responsibilities' dtype, float64 there) to
# each component's total responsibility so an empty component divides safely.
_NK_EPS = 10 * torch.finfo(torch.float64).eps
# Elements per chunk of the sufficient-statistics reduction: the float32 GEMM
# accumulates within a chunk (short sums, small error), chunks are summed in float64.
_CHUNK = 4096
# scikit-learn's KMeans defaults, used by GaussianMixture's "kmeans" initialisation.
_KMEANS_MAX_ITER = 300
_KMEANS_TOL = 1e-4
# Spreads below this many sqrt(reg_covar) are treated as one value: reg_covar then exceeds the
# data's variance by 1e200 and every posterior equals its mixture weight to within 1e-200, while
# reg_covar / std^2 in the standardised space would approach float64 overflow.
_NEGLIGIBLE_SPREAD = 1e-100
# Below float64's smallest normal number a range has lost its precision; it counts as one value.
_SMALLEST_NORMAL_F64 = torch.finfo(torch.float64).tiny
# The seeds torch.Generator.manual_seed accepts (it raises a bare "Overflow" outside them).
_SEED_RANGE = (-(2**63), 2**64)


def _midrange_and_half_range(lo: float, hi: float) -> tuple[float, float]:
    """(midrange, half-range) of [lo, hi], lo < hi finite, both finite and the half-range > 0
    even when hi - lo overflows (|lo|, |hi| near float64's max) or halving it underflows."""
    span = hi - lo
    if not math.isfinite(span):
        return 0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo
    half = 0.5 * span
    midrange = 0.5 * (lo + hi) if math.isfinite(lo + hi) else lo + half  # any value in [lo, hi] serves
    return midrange, half if half > 0.0 else span


def _normal_square(x: float) -> float | None:
    """x ** 2 when it is a normal, finite float64 number, else None (it under- or overflows).
    pow, not x * x, as before these guards: results on ordinary data stay bit-identical."""
    try:
        square = x ** 2
    except OverflowError:
        return None
    return square if _SMALLEST_NORMAL_F64 <= square < math.inf else None


def _times_square(value: float, factor: float) -> float:
    """value * factor^2 for value >= 0 without the under- or overflow of factor^2 alone
    (inf, not OverflowError, when the product exceeds float64: variances of x near 1e308)."""
    square = _normal_square(factor)
    if square is not None:
        return value * square
    root = math.sqrt(value) * factor
    return root * root


def _square_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator^2 for numerator >= 0, denominator > 0, without the underflow of
    denominator^2 (a tiny data scale would otherwise divide by zero)."""
    square = _normal_square(denominator)
    if square is not None:
        return numerator / square
    ratio = math.sqrt(numerator) / denominator
    return ratio * ratio if numerator > 0.0 else 0.0  # inf rather than OverflowError


def _comfortable(dtype: torch.dtype, *values: float) -> bool:
    """Every nonzero value is far enough inside ``dtype``'s range that its square (and products
    with O(1) numbers) stays a normal number: scales and log-odds coefficients of extreme data
    would otherwise under- or overflow (CI found a subnormal float32 range)."""
    bound = 1e15 if dtype == torch.float32 else 1e150
    return all(v == 0.0 or 1.0 / bound < abs(v) < bound for v in values)


class DegenerateLossesWarning(UserWarning):
    """The losses cannot be split into two groups (fewer than two distinct values, or a spread
    below float64's resolution or 1e-100 x sqrt(reg_covar))."""


class CollapsedComponentWarning(UserWarning):
    """The lower-mean component holds (almost) no samples, so it cannot be the clean set."""


@dataclass(frozen=True)
class _Params:
    """Mixture parameters in the standardised space z (float64 Python scalars)."""

    means: tuple[float, float]
    variances: tuple[float, float]
    weights: tuple[float, float]

    def log_odds_coefficients(self, component: int) -> list[float]:
        """[c0, c1, c2] with ``log p(comp, z) - log p(other, z) = c0 + c1 z + c2 z^2``."""
        (m0, m1), (v0, v1), (w0, w1) = self.means, self.variances, self.weights
        c2 = -0.5 / v0 + 0.5 / v1
        c1 = m0 / v0 - m1 / v1
        c0 = (-0.5 * m0 * m0 / v0 - 0.5 * math.log(v0) + math.log(w0)) - (
            -0.5 * m1 * m1 / v1 - 0.5 * math.log(v1) + math.log(w1))
        sign = 1.0 if component == 0 else -1.0
        return [sign * c0, sign * c1, sign * c2]

    def expected_log_joint(self, stats: list[list[float]]) -> float:
        """``sum_i sum_k r_ik log(w_k N(z_i | mu_k, v_k))`` from per-component [sum r, sum r z, sum r z^2]."""
        total = 0.0
        for (count, first, second), m, v, w in zip(stats, self.means, self.variances, self.weights):
            sq_dist = max(second - 2.0 * m * first + m * m * count, 0.0)  # sum r (z - m)^2
            total += -0.5 * sq_dist / v + (math.log(w) - 0.5 * math.log(2.0 * math.pi * v)) * count
        return total


class _Standardised:
    """The data of one fit, standardised and laid out for few, allocation-free passes.

    ``design`` is (chunks, 3, chunk) holding rows [1, z, z^2], zero past N (the
    padding then adds nothing to any sum). One (2,3) x (3, chunk) matmul per chunk
    gives both components' log-odds, one (2, chunk) x (chunk, 3) matmul their
    sufficient statistics; buffers are allocated once per fit because fresh
    multi-megabyte tensors cost page faults on every pass.
    """

    def __init__(self, x: torch.Tensor, dtype: torch.dtype, lo: float, hi: float) -> None:
        """``x`` Tensor[N] with N >= 2 and min ``lo`` < max ``hi``."""
        n = x.numel()
        self.n = n
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.to(dtype)
        # z = (x - shift) / scale with x's mean and std: any shift and positive scale leave the EM
        # unchanged (reg_covar is rescaled with them), and O(1) values keep float32 cancellation
        # small. A first pass centres x on its midrange in x's own dtype before the write into the
        # design casts, so float64 losses far from zero keep their resolution in float32 work.
        # When the range is extreme for the design's dtype (CI found a subnormal float32 range,
        # whose squares underflow; a half-range can round to 0 or hi - lo overflow), that pass
        # also divides by the half-range, in float64, so the design holds values in [-1, 1].
        midrange, half_range = _midrange_and_half_range(lo, hi)
        unit = 1.0 if _comfortable(dtype, half_range) else half_range
        chunk = min(_CHUNK, n)
        chunks = -(-n // chunk)
        full, self.tail = divmod(n, chunk)
        self.design = torch.empty((chunks, 3, chunk), dtype=dtype, device=x.device)
        ones, z = self.design[:, 0], self.design[:, 1]
        ones.fill_(1.0)
        if self.tail:
            ones[full, self.tail:] = 0.0
        centred = x if unit == 1.0 else torch.sub(x.to(torch.float64), midrange).div_(unit)
        offset = midrange if unit == 1.0 else 0.0
        if full:
            torch.sub(centred[: full * chunk].view(full, chunk), offset, out=z[:full])
        if self.tail:
            torch.sub(centred[full * chunk:], offset, out=z[full, : self.tail])
            z[full, self.tail:] = 0.0
        del centred
        total, first, second = self._fill_square_and_sum()
        mean = first / total
        std = math.sqrt(max(second / total - mean * mean, 0.0))
        if not std > 2e-6 * half_range / unit:  # spread lost to rounding: the range serves as well
            std = 2.0 * half_range / unit
        # std is comfortable for the dtype in both cases (see above), so is its reciprocal
        z.sub_(mean).mul_(ones).mul_(1.0 / std)  # mul by ones keeps the padding at 0
        self.shift = midrange + mean * unit
        self.scale = std * unit
        self.total, self.sum_z, self.sum_z2 = self._fill_square_and_sum()
        self.resp = torch.empty((chunks, 2, chunk), dtype=dtype, device=x.device)
        self.work = torch.empty_like(self.resp)

    def _fill_square_and_sum(self) -> list[float]:
        torch.mul(self.design[:, 1], self.design[:, 1], out=self.design[:, 2])
        return self.moments(self.design[:, :1])[0]

    @property
    def z(self) -> torch.Tensor:
        return self.design[:, 1]

    def moments(self, resp: torch.Tensor) -> list[list[float]]:
        """Per row k of resp (chunks, k, chunk): [sum r_k, sum r_k z, sum r_k z^2] in float64.

        Accumulated in ``dtype`` within a chunk (short sums) and in float64 across chunks."""
        per_chunk = torch.bmm(resp, self.design.transpose(1, 2))  # (chunks, k, 3)
        return per_chunk.sum(dim=0, dtype=torch.float64).tolist()

    def e_step(self, params: _Params) -> tuple[list[list[float]], float]:
        """Responsibilities into ``self.resp``; returns their statistics and ``sum r log r``."""
        coefficients = torch.tensor([params.log_odds_coefficients(0), params.log_odds_coefficients(1)],
                                    dtype=self.design.dtype).to(self.design.device, non_blocking=True)
        torch.bmm(coefficients.expand(self.design.shape[0], 2, 3), self.design, out=self.resp)  # d and -d
        self.resp.sigmoid_()  # r0 = sigmoid(d), r1 = sigmoid(-d): each accurate when tiny
        # sum r log r; r is clamped only inside the log (r = 0 contributes 0 either way)
        torch.clamp(self.resp, min=torch.finfo(self.resp.dtype).tiny, out=self.work).log_()
        if self.tail:
            self.work[-1, :, self.tail:] = 0.0  # padding: r = 1/2 there, must not count
        sum_r_log_r = self.work.mul_(self.resp).sum()  # torch's cascade sum: accurate in float32
        stats = self.moments(self.resp)
        if not all(math.isfinite(v) for row in stats for v in row):  # NaN responsibilities reach the sums
            raise _overflow_error(self.design.dtype)
        return stats, float(sum_r_log_r)

    def posterior(self, params: _Params, component: int) -> torch.Tensor:
        """P(component | z) for the fitted data, Tensor[N] (a view into a fresh buffer)."""
        coefficients = torch.tensor([params.log_odds_coefficients(component)],
                                    dtype=self.design.dtype).to(self.design.device, non_blocking=True)
        out = torch.bmm(coefficients.expand(self.design.shape[0], 1, 3), self.design).sigmoid_()
        probability = out.view(-1)[: self.n]
        _check_posterior(probability)
        return probability


def _overflow_error(dtype: torch.dtype) -> ValueError:
    return ValueError(f"GMM1D: the log-odds overflowed {dtype} (a component's variance is tiny next to the "
                      "data's spread: the data sit in a few tight clusters far apart); increase reg_covar, "
                      "or normalise the losses")


def _check_posterior(probability: torch.Tensor) -> None:
    """The posterior from the expanded log-odds is NaN only where opposite infinities met."""
    if bool(torch.isnan(probability).any()):
        raise _overflow_error(probability.dtype)


@dataclass(frozen=True)
class _DegenerateData:
    """Stands in for _Standardised when the data have a single distinct value."""

    n: int
    device: torch.device


def _check_losses(x: object, name: str) -> torch.Tensor:
    """A 1-D floating tensor of finite values, or a TypeError/ValueError naming ``name``.

    Returned detached: losses straight from a training step require grad, and neither the fit
    (whose out= passes autograd refuses) nor the stored history should hold on to their graph."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (use torch.from_numpy for arrays), got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x.detach()


def _check_finite(x: torch.Tensor, name: str, bounds: tuple[float, float] | None = None) -> None:
    """ValueError naming the first NaN/inf of ``x``. ``bounds`` = (min, max) of x, when already
    computed, makes the check free: NaN propagates into min/max and inf shows there."""
    if bounds is not None:
        if math.isfinite(bounds[0]) and math.isfinite(bounds[1]):
            return
    elif x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).nonzero()[0, 0].item()
    raise ValueError(f"{name} must be finite; {name}[{bad}] = {x[bad].item()}")


def _pair(value: object, name: str) -> tuple[float, float]:
    try:
        values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be 2 numbers, got {value!r}") from exc
    if len(values) != 2:
        raise ValueError(f"{name} must hold exactly 2 values (one per component), got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values[0], values[1]


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
        if not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64) (a torch.Generator seed), got {seed}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.max_iter, self.tol, self.reg_covar, self.seed, self.dtype = max_iter, float(tol), float(reg_covar), seed, dtype
        self.means_init = None if means_init is None else _pair(means_init, "means_init")
        self.variances_init = None if variances_init is None else _pair(variances_init, "variances_init")
        if self.variances_init is not None and min(self.variances_init) <= 0:
            raise ValueError(f"variances_init must be > 0, got {self.variances_init}")
        self.weights_init = None if weights_init is None else _pair(weights_init, "weights_init")
        if self.weights_init is not None:
            if min(self.weights_init) <= 0:
                raise ValueError(f"weights_init must be > 0 (a zero weight leaves a component empty), "
                                 f"got {self.weights_init}")
            if abs(sum(self.weights_init) - 1.0) > 1e-6:
                raise ValueError(f"weights_init must sum to 1, got {self.weights_init}")
        self._params: _Params | None = None
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
        x = _check_losses(x, "x")
        _check_finite(x, "x")
        if self.degenerate_:
            return torch.full(x.shape, 0.5, dtype=self.dtype, device=x.device)
        # Standardised before any down-cast; in float64 when the scale (see _Standardised) or the
        # log-odds' coefficients (huge for a component with a tiny variance) are extreme.
        c0, c1, c2 = self._params.log_odds_coefficients(component)
        if _comfortable(self.dtype, self._scale) and _comfortable(self.dtype, max(abs(c0), abs(c1), abs(c2), 1.0)):
            work_dtype = torch.promote_types(x.dtype, self.dtype)  # subtract before any down-cast
            z = (x.to(work_dtype) - self._shift).to(self.dtype).mul_(1.0 / self._scale)
        else:
            z = (x.to(torch.float64) - self._shift).div_(self._scale)
        probability = torch.sigmoid(torch.mul(z * z, c2).add_(z, alpha=c1).add_(c0))
        _check_posterior(probability)
        return probability.to(self.dtype)

    @property
    def lower_mean_component(self) -> int:
        """Index (0 or 1) of the component with the smaller mean (0 on a tie)."""
        self._require_fitted()
        return int(self.means_[1] < self.means_[0])

    # ---------------------------------------------------------------- fitting

    def _fit(self, x: torch.Tensor) -> _Standardised | _DegenerateData:
        x = _check_losses(x, "x")
        if x.numel() == 0:
            raise ValueError("x is empty; a mixture needs at least one value")
        lo, hi = (float(v) for v in torch.aminmax(x))
        _check_finite(x, "x", (lo, hi))
        if lo == hi:
            self._fit_degenerate(x.numel(), f"are all equal ({lo:g})", lo)
            return _DegenerateData(x.numel(), x.device)
        _, half_range = _midrange_and_half_range(lo, hi)
        if half_range < _SMALLEST_NORMAL_F64 or half_range < _NEGLIGIBLE_SPREAD * math.sqrt(self.reg_covar):
            self._fit_degenerate(x.numel(), f"span only [{lo:g}, {hi:g}] (below float64's resolution or "
                                 f"{_NEGLIGIBLE_SPREAD:g} x sqrt(reg_covar))", 0.5 * lo + 0.5 * hi)
            return _DegenerateData(x.numel(), x.device)
        data = _Standardised(x, self.dtype, lo, hi)
        reg_z = _square_ratio(self.reg_covar, data.scale)
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
        self.variances_ = torch.tensor([_times_square(v, data.scale) for v in params.variances], dtype=torch.float64)
        self.weights_ = torch.tensor(params.weights, dtype=torch.float64)
        return data

    def _fit_degenerate(self, n: int, why: str, value: float) -> None:
        warnings.warn(f"GMM1D: the {n} value(s) {why}; two components cannot be told apart, "
                      "every posterior is 0.5", DegenerateLossesWarning, stacklevel=4)
        self.degenerate_ = True
        self._params = _Params((0.0, 0.0), (1.0, 1.0), (0.5, 0.5))
        self._shift, self._scale = value, 1.0
        self.n_iter_ = 0
        self.converged_ = True
        self.lower_bound_ = -0.5 * math.log(2 * math.pi * self.reg_covar) if self.reg_covar > 0 else math.inf
        self.lower_bounds_ = []
        self.means_ = torch.tensor([value, value], dtype=torch.float64)
        self.variances_ = torch.tensor([self.reg_covar, self.reg_covar], dtype=torch.float64)
        self.weights_ = torch.tensor([0.5, 0.5], dtype=torch.float64)

    def _initial_params(self, data: _Standardised, reg_z: float) -> _Params:
        """k-means estimates, each replaced by the user's init when given (scikit-learn's rule)."""
        a, s = data.shift, data.scale
        given_means = None if self.means_init is None else tuple((m - a) / s for m in self.means_init)
        given_vars = None if self.variances_init is None else tuple(_square_ratio(v, s) for v in self.variances_init)
        for name, given in (("means_init", given_means), ("variances_init", given_vars)):
            if given is not None and not all(math.isfinite(v) and abs(v) < 1e150 for v in given):
                raise ValueError(f"{name}={getattr(self, name)} is out of range for data with mean {a:g} and "
                                 f"standard deviation {s:g} (more than 1e150 of them away)")
        if given_means is not None and given_vars is not None and self.weights_init is not None:
            return _Params(given_means, given_vars, self.weights_init)
        estimate = self._m_step(data.moments(self._kmeans_resp(data)), reg_z, weights_by_n=data.n)
        return _Params(given_means or estimate.means, given_vars or estimate.variances,
                       self.weights_init or estimate.weights)

    def _m_step(self, stats: list[list[float]], reg_z: float, weights_by_n: int | None = None) -> _Params:
        """scikit-learn's M-step from per-component [sum r, sum r z, sum r z^2]."""
        nk, means, variances = [], [], []
        for total, first, second in stats:
            n = total + _NK_EPS
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
        return _Params((means[0], means[1]), (variances[0], variances[1]), (nk[0] / norm, nk[1] / norm))

    def _kmeans_resp(self, data: _Standardised) -> torch.Tensor:
        """Hard responsibilities (chunks, 2, chunk) from 2-means on z; component 0 has the lower centre."""
        lo, hi = self._lloyd(data, *sorted(self._kmeans_plusplus(data)))
        above, ones = data.resp[:, 1:], data.design[:, :1]
        torch.gt(data.z.unsqueeze(1), 0.5 * (lo + hi), out=above).mul_(ones)
        torch.sub(ones, above, out=data.resp[:, :1])
        return data.resp

    def _kmeans_plusplus(self, data: _Standardised) -> tuple[float, float]:
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
    def _lloyd(data: _Standardised, lo: float, hi: float) -> tuple[float, float]:
        """Lloyd iterations from centres lo < hi (z units) with scikit-learn's stopping rules:
        labels unchanged, or squared centre shift <= 1e-4 x the variance of z; at most 300."""
        # In 1-D the clusters are split at the midpoint, so the labels are unchanged
        # exactly when the count above the midpoint is unchanged.
        z, n = data.z, data.n
        above, ones = data.resp[:, 1:], data.design[:, :1]
        var_z = data.sum_z2 / n - (data.sum_z / n) ** 2
        count_hi = -1.0
        for _ in range(_KMEANS_MAX_ITER):
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
            if shift <= _KMEANS_TOL * var_z:
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

    def _fitted_posterior(self, data: _Standardised | _DegenerateData, component: int) -> torch.Tensor:
        """The final E-step on the data just fitted: P(component | x), Tensor[N]."""
        if isinstance(data, _DegenerateData):
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
    losses = _check_losses(losses, "losses")
    if losses.numel() == 0:
        raise ValueError("losses is empty; need at least one sample")
    if not (isinstance(min_clean_weight, (int, float)) and 0.0 <= min_clean_weight < 0.5):
        raise ValueError(f"min_clean_weight must be in [0, 0.5), got {min_clean_weight!r}")
    lo, hi = (float(v) for v in torch.aminmax(losses))
    _check_finite(losses, "losses", (lo, hi))
    x = losses
    if normalise and hi > lo:
        work = losses.to(torch.promote_types(losses.dtype, dtype))
        if _comfortable(work.dtype, hi - lo):
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


class LossHistory:
    """Each sample's last ``window`` recorded losses, for averaging before the GMM fit.

    The authors average each sample's (min-max normalised) loss over the last 5 epochs
    at very high noise. Storage is an (N, window) ring buffer per sample, so samples
    seen in different epochs (per-epoch subsets, e.g. Clothing1M) each keep their own
    last ``window`` values.

    Args:
        num_samples: N >= 1.
        window: m >= 1, how many of each sample's most recent losses to keep.
        device, dtype: where and how the (N, m) store lives (floating dtype).
    """

    def __init__(self, num_samples: int, window: int = 5, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = check_device(device)
        self.num_samples, self.window = num_samples, window
        self.values = torch.zeros((num_samples, window), dtype=dtype, device=device)
        self.counts = torch.zeros(num_samples, dtype=torch.int64, device=device)  # records so far, capped at m
        self._next = torch.zeros(num_samples, dtype=torch.int64, device=device)  # ring position per sample

    def update(self, indices: torch.Tensor | None, losses: torch.Tensor) -> None:
        """Record ``losses`` (Tensor[B], finite) for samples ``indices`` (Tensor[B] int64, distinct,
        in [0, N)); with ``indices=None``, losses must be Tensor[N], one per sample in order."""
        losses = _check_losses(losses, "losses")
        if losses.device != self.values.device:
            raise ValueError(f"losses is on {losses.device}, the history on {self.values.device}")
        _check_finite(losses, "losses")
        if indices is None:
            if losses.numel() != self.num_samples:
                raise ValueError(f"without indices, losses must have N={self.num_samples} values, got {losses.numel()}")
            indices = torch.arange(self.num_samples, device=losses.device)
        else:
            indices = self._check_indices(indices, "indices")
            if indices.numel() != losses.numel():
                raise ValueError(f"indices has {indices.numel()} entries but losses has {losses.numel()}")
            if indices.numel() and int(torch.bincount(indices, minlength=1).max()) > 1:
                raise ValueError("indices must be distinct (one loss per sample per update)")
        slot = self._next[indices]
        self.values[indices, slot] = losses.to(self.values.dtype)
        self._next[indices] = (slot + 1) % self.window
        self.counts[indices] = torch.clamp(self.counts[indices] + 1, max=self.window)

    def mean(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of each sample's recorded losses (up to the last m), Tensor[N] or Tensor[B] for ``indices``.

        Raises ValueError if a requested sample has no recorded loss yet."""
        if indices is None:
            values, counts = self.values, self.counts
        else:
            indices = self._check_indices(indices, "indices")
            values, counts = self.values[indices], self.counts[indices]
        if counts.numel() and int(counts.min()) == 0:
            missing = (counts == 0).nonzero()[0, 0].item()
            raise ValueError(f"no loss recorded yet for sample {missing if indices is None else int(indices[missing])}")
        # unused slots hold 0, so summing all m slots and dividing by the count is exact
        return values.sum(dim=1) / counts.to(values.dtype)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone(), "next": self._next.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``. Everything is checked before anything is copied, so a
        corrupted state raises a ValueError/TypeError naming it and leaves the history as it was
        (an out-of-range ring position would otherwise fail later, inside ``update``)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from LossHistory.state_dict(), got {type(state).__name__}")
        for key, current in (("values", self.values), ("counts", self.counts), ("next", self._next)):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            floating = key == "values"
            if value.is_floating_point() != floating or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"state[{key!r}] must be {'floating' if floating else 'an integer tensor'}, "
                                f"got {value.dtype}")
        values, counts, ring = state["values"], state["counts"], state["next"]
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError("state['values'] holds NaN or infinity; the history only records finite losses")
        for key, value, upper in (("counts", counts, self.window + 1), ("next", ring, self.window)):
            if value.numel() and not (int(value.min()) >= 0 and int(value.max()) < upper):
                raise ValueError(f"state[{key!r}] must lie in [0, {upper}), got values in "
                                 f"[{int(value.min())}, {int(value.max())}]")
        self.values.copy_(values)
        self.counts.copy_(counts)
        self._next.copy_(ring)

    def _check_indices(self, indices: object, name: str) -> torch.Tensor:
        return check_sample_ids(indices, name, self.num_samples, self.values.device, "the history")
