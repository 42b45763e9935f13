"""The numerics under the 1-D GMM (gmm.py): constants shared with scikit-learn's EM, the
scale-guarded arithmetic that keeps standardisation exact for losses of any magnitude, the
parameter record, and the input checks with their error messages.

Separate from gmm.py so that the estimator reads as the EM it is; nothing here is public API.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# scikit-learn adds 10 * eps (of the responsibilities' dtype, float64 there) to
# each component's total responsibility so an empty component divides safely.
NK_EPS = 10 * torch.finfo(torch.float64).eps
# Elements per chunk of the sufficient-statistics reduction: the float32 GEMM
# accumulates within a chunk (short sums, small error), chunks are summed in float64.
CHUNK = 4096
# scikit-learn's KMeans defaults, used by GaussianMixture's "kmeans" initialisation.
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
# Spreads below this many sqrt(reg_covar) are treated as one value: reg_covar then exceeds the
# data's variance by 1e200 and every posterior equals its mixture weight to within 1e-200, while
# reg_covar / std^2 in the standardised space would approach float64 overflow.
NEGLIGIBLE_SPREAD = 1e-100
# Below float64's smallest normal number a range has lost its precision; it counts as one value.
SMALLEST_NORMAL_F64 = torch.finfo(torch.float64).tiny
# The seeds torch.Generator.manual_seed accepts (it raises a bare "Overflow" outside them).
SEED_RANGE = (-(2**63), 2**64)


def float64_sums_for(device: torch.device) -> bool:
    """Whether a fit on ``device`` sums its statistics' products in float64 (see Standardised.moments)."""
    return device.type != "cpu"


def midrange_and_half_range(lo: float, hi: float) -> tuple[float, float]:
    """(midrange, half-range) of [lo, hi], lo < hi finite, both finite and the half-range > 0
    even when hi - lo overflows (|lo|, |hi| near float64's max) or halving it underflows."""
    span = hi - lo
    if not math.isfinite(span):
        return 0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo
    half = 0.5 * span
    midrange = 0.5 * (lo + hi) if math.isfinite(lo + hi) else lo + half  # any value in [lo, hi] serves
    return midrange, half if half > 0.0 else span


def normal_square(x: float) -> float | None:
    """x ** 2 when it is a normal, finite float64 number, else None (it under- or overflows).
    pow, not x * x, as before these guards: results on ordinary data stay bit-identical."""
    try:
        square = x ** 2
    except OverflowError:
        return None
    return square if SMALLEST_NORMAL_F64 <= square < math.inf else None


def times_square(value: float, factor: float) -> float:
    """value * factor^2 for value >= 0 without the under- or overflow of factor^2 alone
    (inf, not OverflowError, when the product exceeds float64: variances of x near 1e308)."""
    square = normal_square(factor)
    if square is not None:
        return value * square
    root = math.sqrt(value) * factor
    return root * root


def square_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator^2 for numerator >= 0, denominator > 0, without the underflow of
    denominator^2 (a tiny data scale would otherwise divide by zero)."""
    square = normal_square(denominator)
    if square is not None:
        return numerator / square
    ratio = math.sqrt(numerator) / denominator
    return ratio * ratio if numerator > 0.0 else 0.0  # inf rather than OverflowError


def comfortable(dtype: torch.dtype, *values: float) -> bool:
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
class Params:
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


class Standardised:
    """The data of one fit, standardised and laid out for few, allocation-free passes.

    ``design`` is (chunks, 3, chunk) holding rows [1, z, z^2], zero past N (the
    padding then adds nothing to any sum). One (2,3) x (3, chunk) matmul per chunk
    gives both components' log-odds, one (2, chunk) x (chunk, 3) matmul their
    sufficient statistics; buffers are allocated once per fit because fresh
    multi-megabyte tensors cost page faults on every pass.
    """

    def __init__(self, x: torch.Tensor, dtype: torch.dtype, lo: float, hi: float, *,
                 float64_sums: bool | None = None) -> None:
        """``x`` Tensor[N] with N >= 2 and min ``lo`` < max ``hi``.  ``float64_sums``: how ``moments``
        sums (default: ``float64_sums_for(x.device)``)."""
        n = x.numel()
        self.n = n
        self.float64_sums = float64_sums_for(x.device) if float64_sums is None else float64_sums
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.to(dtype)
        # z = (x - shift) / scale with x's mean and std: any shift and positive scale leave the EM
        # unchanged (reg_covar is rescaled with them), and O(1) values keep float32 cancellation
        # small. A first pass centres x on its midrange in x's own dtype before the write into the
        # design casts, so float64 losses far from zero keep their resolution in float32 work.
        # When the range is extreme for the design's dtype (CI found a subnormal float32 range,
        # whose squares underflow; a half-range can round to 0 or hi - lo overflow), that pass
        # also divides by the half-range, in float64, so the design holds values in [-1, 1].
        midrange, half_range = midrange_and_half_range(lo, hi)
        unit = 1.0 if comfortable(dtype, half_range) else half_range
        chunk = min(CHUNK, n)
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

        On the CPU: one matmul per chunk, accumulated in ``dtype`` within a chunk and in float64
        across chunks.  Elsewhere the products (in ``dtype``) are summed in float64.  Measured on an
        H200 (docs/testing.md): cuBLAS's float32 dot products of a chunk erred by up to 5.8 eps of
        the terms' sum, and 4 of 36 random fits ended beyond tests/test_gmm.py's rounding tolerance
        against scikit-learn (up to 5.7x it); summed in float64, the statistics err by 0.005 eps and
        every fit stays within 0.25x, at the same speed there (a fit of 10^6 losses: 2.35 ms
        against 2.32 ms).  The CPU keeps the matmul: 50x faster there (0.4 ms against 20 ms for
        10^6 losses on 2 cores), and its fits stay within 0.44x of the tolerance."""
        if self.float64_sums:
            products = resp.unsqueeze(2) * self.design.unsqueeze(1)  # (chunks, k, 3, chunk)
            return products.sum(dim=(0, 3), dtype=torch.float64).tolist()
        per_chunk = torch.bmm(resp, self.design.transpose(1, 2))  # (chunks, k, 3)
        return per_chunk.sum(dim=0, dtype=torch.float64).tolist()

    def e_step(self, params: Params) -> tuple[list[list[float]], float]:
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
            raise overflow_error(self.design.dtype)
        return stats, float(sum_r_log_r)

    def posterior(self, params: Params, component: int) -> torch.Tensor:
        """P(component | z) for the fitted data, Tensor[N] (a view into a fresh buffer)."""
        coefficients = torch.tensor([params.log_odds_coefficients(component)],
                                    dtype=self.design.dtype).to(self.design.device, non_blocking=True)
        out = torch.bmm(coefficients.expand(self.design.shape[0], 1, 3), self.design).sigmoid_()
        probability = out.view(-1)[: self.n]
        check_posterior(probability)
        return probability


def overflow_error(dtype: torch.dtype) -> ValueError:
    return ValueError(f"GMM1D: the log-odds overflowed {dtype} (a component's variance is tiny next to the "
                      "data's spread: the data sit in a few tight clusters far apart); increase reg_covar, "
                      "or normalise the losses")


def check_posterior(probability: torch.Tensor) -> None:
    """The posterior from the expanded log-odds is NaN only where opposite infinities met."""
    if bool(torch.isnan(probability).any()):
        raise overflow_error(probability.dtype)


@dataclass(frozen=True)
class DegenerateData:
    """Stands in for Standardised when the data have a single distinct value."""

    n: int
    device: torch.device


def check_losses(x: object, name: str) -> torch.Tensor:
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


def check_finite(x: torch.Tensor, name: str, bounds: tuple[float, float] | None = None) -> None:
    """ValueError naming the first NaN/inf of ``x``. ``bounds`` = (min, max) of x, when already
    computed, makes the check free: NaN propagates into min/max and inf shows there."""
    if bounds is not None:
        if math.isfinite(bounds[0]) and math.isfinite(bounds[1]):
            return
    elif x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).nonzero()[0, 0].item()
    raise ValueError(f"{name} must be finite; {name}[{bad}] = {x[bad].item()}")


def pair(value: object, name: str) -> tuple[float, float]:
    try:
        values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be 2 numbers, got {value!r}") from exc
    if len(values) != 2:
        raise ValueError(f"{name} must hold exactly 2 values (one per component), got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values[0], values[1]
