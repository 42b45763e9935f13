"""Input checks shared by every neighbour backend.

Each check names the argument it rejects, so a caller sees which input was wrong
and what was expected, instead of a crash deep inside hnswlib, faiss or a matmul.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

METRICS = ("euclidean", "cosine")
# Row norms whose float64 squares stay normal numbers; rows outside are rescaled before normalising.
_NORM_SAFE = (2.0 ** -480, 2.0 ** 480)


def as_feature_matrix(features, name: str = "features", *, min_rows: int = 2) -> torch.Tensor:
    """Return ``features`` as a 2-D floating torch tensor (no copy when it already is one).

    Accepts a ``torch.Tensor`` or ``numpy.ndarray`` of shape ``(N, d)`` with a floating
    dtype. float16/bfloat16 are kept as they are (the search widens a block of rows at a time,
    see ``rows.FeatureRows``). Raises ``TypeError`` for other types or non-floating dtypes,
    ``ValueError`` for a wrong shape, fewer than ``min_rows`` rows, zero columns or non-finite
    values.
    """
    if isinstance(features, np.ndarray):
        if not np.issubdtype(features.dtype, np.floating):
            raise TypeError(f"{name} must have a floating dtype, got numpy {features.dtype}")
        features = torch.from_numpy(np.ascontiguousarray(features))
    elif not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d), got shape {tuple(features.shape)}")
    n, d = features.shape
    if n < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got {n}")
    if d < 1:
        raise ValueError(f"{name} needs at least one column (feature), got shape {tuple(features.shape)}")
    features = features.detach()
    # A block of rows at a time: its min and max are NaN or infinite exactly when some entry
    # is, and finding them makes no temporary (a sum in a wider dtype would copy the block, and
    # a float16 sum of many entries would overflow); only a bad block is looked at entry by entry.
    step = max(1, (1 << 22) // d)
    bad = 0
    for start in range(0, n, step):
        block = features[start:start + step]
        if block.numel() == 0:
            continue
        lo, hi = torch.aminmax(block)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad += int((~torch.isfinite(block)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{name} contains NaN or inf values (in {bad} of {n} rows)")
    return features


def check_k(k, n_candidates: int, name: str = "k") -> int:
    """Return ``k`` as int after checking ``1 <= k <= n_candidates``.

    ``n_candidates`` is how many points a query may return: ``N - 1`` when each point's
    own entry is excluded.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= n_candidates:
        raise ValueError(f"{name} must be in [1, {n_candidates}] (the number of other samples), got {k}")
    return k


def check_metric(metric) -> str:
    """Return ``metric`` after checking it is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_positive_int(value, name: str, *, minimum: int = 1, maximum: int | None = None,
                       allow_none: bool = False):
    """Return ``value`` as int (or None when allowed) after checking ``minimum <= value <= maximum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def prepare_for_metric(features: torch.Tensor, metric: str, name: str = "features") -> torch.Tensor:
    """The vectors whose squared Euclidean distances rank neighbours under ``metric``.

    Euclidean: ``features`` unchanged. Cosine: rows scaled to unit norm (computed in float64,
    stored in the input dtype), since ``|a/|a| - b/|b||^2 = 2 (1 - cos(a, b))``; a zero row has
    no direction, so it is an error.
    """
    if metric == "euclidean":
        return features
    out = torch.empty_like(features)
    rows = max(1, (1 << 22) // features.shape[1])  # float64 temporaries of ~32 MiB
    for s in range(0, features.shape[0], rows):
        block = features[s:s + rows].to(torch.float64)
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
        # The squares of float64 rows beyond ~1e154 overflow (norm inf: the row would become 0) and
        # those of rows below ~1e-154 underflow (norm 0: a false "all-zero row"). Such rows are first
        # scaled by a power of two, which is exact and leaves their direction unchanged.
        extreme = ~((norms > _NORM_SAFE[0]) & (norms < _NORM_SAFE[1])).squeeze(1)
        if bool(extreme.any()):
            top = block[extreme].abs().amax(dim=1, keepdim=True)
            scaled = times_power_of_two(block[extreme], -torch.frexp(top).exponent)  # max |x| in [0.5, 1)
            block[extreme] = scaled
            norms[extreme] = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError(f"{name} has all-zero rows; cosine distance is undefined for them")
        out[s:s + rows] = block / norms
    return out


def times_power_of_two(x: torch.Tensor, exponents) -> torch.Tensor:
    """``x * 2**exponents`` (an int or an int tensor broadcasting against x), exact whenever the
    result is a normal number: in two steps, so that no factor overflows even for exponents
    beyond +-1023 (float64 subnormals scaled up, values near float64's maximum scaled down)."""
    exponents = torch.as_tensor(exponents, device=x.device)
    first = torch.div(exponents, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(x, first), exponents - first)


def squared_to_metric(squared: torch.Tensor, metric: str) -> torch.Tensor:
    """Convert squared Euclidean distances of prepared vectors to the reported distance.

    Euclidean → ``sqrt``; cosine → ``1 - cos = squared / 2``.
    """
    squared = squared.clamp_min(0)
    return squared.sqrt() if metric == "euclidean" else squared / 2
