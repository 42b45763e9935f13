"""Recall of a neighbour list against exact search, counting ties as hits.

A returned neighbour j of query i is a hit when it is another sample (not i, not repeated
in the row) and its exact distance is no larger than the true k-th nearest distance of i.
So when several samples sit at exactly the k-th distance (duplicates, symmetric points),
any of them counts; recall@k is hits / (k x queries).
"""
from __future__ import annotations

import torch

from mixnn_fast.refresh.neighbours._validation import (
    as_feature_matrix,
    check_metric,
    check_positive_int,
    prepare_for_metric,
)
from mixnn_fast.refresh.neighbours.distances import squared_distances_to_candidates
from mixnn_fast.refresh.neighbours.exact import ExactSearcher
from mixnn_fast.refresh.neighbours.rows import HALF_DTYPES, FeatureRows

# Relative slack when comparing two float64 distances computed along different paths.
_TIE_RTOL = 1e-9


def _as_neighbour_ids(found, n: int, name: str = "found") -> torch.Tensor:
    if not isinstance(found, torch.Tensor):
        try:
            found = torch.as_tensor(found)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be an integer Tensor/ndarray of shape (N, k), "
                            f"got {type(found).__name__}") from exc
    if found.is_floating_point() or found.is_complex() or found.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {found.dtype}")
    if found.dim() != 2 or found.shape[0] != n or found.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, k) with N = {n} (rows of features) and k >= 1, "
                         f"got {tuple(found.shape)}")
    return found.to(torch.int64)


def _prepared_rows(features: torch.Tensor, metric: str) -> FeatureRows:
    """The vectors the search ranked, as it prepared them (half precision: widened by blocks)."""
    if features.dtype in HALF_DTYPES:
        return FeatureRows(features, metric=metric)
    return FeatureRows(prepare_for_metric(features, metric))


def _hit_fraction(found_rows: torch.Tensor, query_ids: torch.Tensor, kth_sq: torch.Tensor,
                  prepared: FeatureRows) -> float:
    """Share of valid, distinct, non-self entries of ``found_rows`` within the true k-th distance."""
    n = prepared.n
    valid = (found_rows >= 0) & (found_rows < n) & (found_rows != query_ids.unsqueeze(1))
    # A repeated id counts once: mark every occurrence after the first in its row as invalid.
    sorted_ids, order = found_rows.sort(dim=1, stable=True)
    repeat_sorted = torch.zeros_like(valid)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    valid &= ~torch.zeros_like(valid).scatter(1, order, repeat_sorted)
    safe = found_rows.clamp(0, n - 1)
    sq = squared_distances_to_candidates(prepared.take(query_ids), prepared, safe, dtype=torch.float64)
    hits = valid & (sq <= kth_sq.unsqueeze(1) * (1 + _TIE_RTOL))
    return float(hits.sum()) / hits.numel()


def recall_at_k(found, features, *, sample: int | None = 2000, seed: int = 0, metric: str = "euclidean") -> float:
    """Recall@k of ``found`` against exact search, on a random sample of queries.

    Args:
        found: int Tensor/ndarray[N, k], neighbours of every sample (e.g. from
            :func:`nearest_neighbours`); -1 or out-of-range entries count as misses.
        features: Tensor/ndarray[N, d] the neighbours were searched in.
        sample: number of query rows checked (drawn without replacement, seeded); ``None``
            or ``>= N`` checks every row.
        seed: picks the sample.
        metric: ``"euclidean"`` or ``"cosine"``, as used for the search.
    Returns:
        float in [0, 1]; ties with the true k-th distance count as hits.
    """
    metric = check_metric(metric)
    features = as_feature_matrix(features, "features")
    n = features.shape[0]
    found = _as_neighbour_ids(found, n).to(features.device)
    k = found.shape[1]
    if k > n - 1:
        raise ValueError(f"found has k = {k} columns but features has only {n - 1} other samples per row")
    sample = check_positive_int(sample, "sample", allow_none=True)
    seed = check_positive_int(seed, "seed", minimum=0)
    if sample is None or sample >= n:
        query_ids = torch.arange(n)
    else:
        query_ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    query_ids = query_ids.to(features.device)
    prepared = _prepared_rows(features, metric)
    _, true_sq = ExactSearcher(prepared).search(prepared.take(query_ids), k, exclude=query_ids)
    return _hit_fraction(found[query_ids], query_ids, true_sq[:, k - 1], prepared)


def recall_against(found, reference, features, *, metric: str = "euclidean") -> float:
    """Recall@k of ``found`` over all rows, given exact neighbours ``reference`` (same shape).

    For benchmarks that already ran the exact search: avoids running it again. The true
    k-th distance is taken from ``reference[:, k - 1]``, so ties still count as hits.
    """
    metric = check_metric(metric)
    features = as_feature_matrix(features, "features")
    n = features.shape[0]
    found = _as_neighbour_ids(found, n).to(features.device)
    reference = _as_neighbour_ids(reference, n, "reference").to(features.device)
    if reference.shape != found.shape:
        raise ValueError(f"reference must have the shape of found {tuple(found.shape)}, "
                         f"got {tuple(reference.shape)}")
    prepared = _prepared_rows(features, metric)
    query_ids = torch.arange(n, device=features.device)
    kth_sq = squared_distances_to_candidates(prepared, prepared, reference[:, -1:], dtype=torch.float64)[:, 0]
    return _hit_fraction(found, query_ids, kth_sq, prepared)
