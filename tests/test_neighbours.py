"""Nearest neighbours: every backend against brute-force float64 search, ties, duplicates,
self-exclusion, recall, validation.

The oracle is plain torch in float64 with distances from differences
(``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``), on fresh seeded
random inputs. A neighbour list is correct when, row by row, the exact distances of the
returned ids equal the true sorted distances to the other samples: that accepts any
choice among tied points and rejects everything else.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixnn_fast import NeighbourIndex, nearest_neighbours, recall_at_k
from mixnn_fast.refresh.neighbours import recall_against
from mixnn_fast.refresh.neighbours.distances import squared_distances_to_candidates
from mixnn_fast.refresh.neighbours.exact import ExactSearcher

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
E32, E64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
# The dtype each backend ranks its final candidates in: the exact backend re-ranks by float64
# distances, hnsw and faiss by float32 distances (float64 where those come within their rounding).
RANK_DTYPE = {"exact": torch.float64, "hnsw": torch.float32, "faiss": torch.float32}


# ----------------------------------------------------------------------------- helpers
def brute_force(x, metric: str = "euclidean") -> torch.Tensor:
    """Float64 distance matrix (Euclidean, or 1 - cos) with the diagonal set to inf."""
    x = torch.as_tensor(x).double().cpu()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / 2
    else:
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    return d


def distance_tolerance(d: int, rank_dtype: torch.dtype, metric: str = "euclidean",
                       stored_dtype: torch.dtype = torch.float64) -> dict:
    """How far two computations of one distance may differ: (rtol, atol) for assert_close.

    A squared distance summed from d squared differences rounds to at most (d + 2) eps of itself
    (d - 1 additions, a square and a subtraction per term: the worst case, whatever order the
    CPU's vector units sum in), once in the backend's ranking dtype and once in the float64 oracle.
    Cosine ranks vectors scaled to unit norm and stored in the features' dtype: each is off by
    eps / 2 per unit of norm, which moves 1 - cos = |u - v|^2 / 2 by up to |u - v| eps <= 2 eps,
    absolute. Neighbours closer to a tie than this may come back in either order."""
    rtol = (d + 2) * (torch.finfo(rank_dtype).eps + E64)
    atol = 2 * torch.finfo(stored_dtype).eps if metric == "cosine" else 0.0
    return {"rtol": rtol, "atol": atol}


def assert_exact_neighbours(ids: torch.Tensor, x, k: int, metric: str = "euclidean", dist=None, *,
                            rank_dtype: torch.dtype = torch.float64, stored_dtype: torch.dtype = torch.float64) -> None:
    """ids (N, k) must hold, per row, k distinct other samples at the true k smallest distances,
    to within the rounding of the distances the backend ranked by (see distance_tolerance)."""
    ids = ids.cpu()
    n = ids.shape[0]
    assert ids.shape == (n, k) and ids.dtype == torch.int64
    rows = torch.arange(n).unsqueeze(1)
    assert not (ids == rows).any(), "a sample was returned as its own neighbour"
    assert ((ids >= 0) & (ids < n)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all(), "an id repeated within a row"
    d = brute_force(x, metric)
    true_sorted = d.sort(dim=1).values[:, :k]
    got = d.gather(1, ids)
    dim = torch.as_tensor(x).shape[1]
    tol = distance_tolerance(dim, rank_dtype, metric, stored_dtype)
    torch.testing.assert_close(got, true_sorted, **tol)
    slack = tol["rtol"] * got[:, 1:] + tol["atol"]
    assert (got.diff(dim=1) >= -slack).all(), "neighbours not sorted by distance"
    if dist is not None:  # the reported distances: the backend's own, rounded once to their dtype
        out = dict(tol, rtol=tol["rtol"] + torch.finfo(dist.dtype).eps)
        torch.testing.assert_close(dist.cpu().double(), true_sorted, **out)


def clustered(rng: np.random.Generator, n: int, d: int, latent: int = 8, clusters: int = 5,
              noise: float = 0.05) -> np.ndarray:
    """Low-intrinsic-dimension features like a network's penultimate layer (float32)."""
    centres = rng.normal(0, 3.0, (clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, latent))
    x = z @ rng.normal(0, 1 / np.sqrt(latent), (latent, d))
    x += rng.normal(0, noise * x.std(), x.shape)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- exact backend
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,k", [(2, 1, 1), (3, 5, 2), (37, 3, 5), (257, 17, 1), (700, 64, 7)])
def test_exact_matches_brute_force(rng, device, n, d, k):
    x = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32)).to(device)
    ids, dist = nearest_neighbours(x, k, backend="exact", return_distances=True)
    assert ids.device.type == device and dist.device.type == device
    assert dist.dtype == torch.float32
    assert_exact_neighbours(ids, x, k, dist=dist)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_survives_float32_cancellation(rng, device):
    """Features far from the origin with close neighbours: the float32 expansion
    |a|^2 + |b|^2 - 2ab gets the neighbours wrong here; the exact backend must not."""
    n, d = 600, 32
    x = (1e3 + rng.normal(0, 1e-2, (n, d))).astype(np.float32)
    xt = torch.from_numpy(x)
    sq = (xt * xt).sum(1)
    naive = (sq[:, None] + sq[None] - 2 * xt @ xt.T).fill_diagonal_(float("inf")).argmin(1)
    truth = brute_force(x).argmin(1)
    assert (naive != truth).float().mean() > 0.2, "data too easy: the naive float32 search is right"
    ids = nearest_neighbours(xt.to(device), 1, backend="exact")
    assert_exact_neighbours(ids, x, 1)


def test_exact_chunking_and_fallback_paths(rng, monkeypatch):
    """Tiny blocks force many row/column chunks; heavy duplication (12 copies of each point,
    more than the 8 spare candidates) makes the float32 proof fail, so the float64 fallback
    must run and still be exact."""
    base = rng.normal(size=(40, 6))
    x = torch.from_numpy(np.repeat(base, 12, axis=0)[rng.permutation(480)].astype(np.float32))
    calls = []
    original = ExactSearcher._search_rows_float64

    def spy(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ExactSearcher, "_search_rows_float64", spy)
    searcher = ExactSearcher(x, block_elements=480 * 7)  # 7 query rows per block
    ids, sq = searcher.search(x, 3, exclude=torch.arange(480))
    assert calls and sum(calls) == 480
    assert_exact_neighbours(ids, x.numpy(), 3)
    assert (sq == 0).all()


def test_exact_float64_input_gives_float64_distances(rng):
    x = rng.normal(size=(101, 9))
    ids, dist = nearest_neighbours(x, 3, backend="exact", return_distances=True)
    assert dist.dtype == torch.float64
    assert_exact_neighbours(ids, x, 3, dist=dist)


def test_half_precision_input_is_searched_as_float32(rng):
    x = torch.from_numpy(rng.normal(size=(80, 12))).half()
    ids, dist = nearest_neighbours(x, 2, backend="exact", return_distances=True)
    assert dist.dtype == torch.float32
    assert_exact_neighbours(ids, x.float(), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_matches_brute_force(rng, device):
    x = rng.normal(size=(300, 20)) * rng.uniform(0.1, 10, (300, 1))  # norms must not matter
    xt = torch.from_numpy(x.astype(np.float32)).to(device)
    ids, dist = nearest_neighbours(xt, 4, backend="exact", metric="cosine", return_distances=True)
    # the oracle sees the float32 features the search saw (rounding x to float32 moves near-ties)
    # and normalises them in float64; the search stores the unit vectors in float32
    assert_exact_neighbours(ids, xt.cpu(), 4, metric="cosine", dist=dist, stored_dtype=torch.float32)
    scaled = nearest_neighbours(xt * 7.0, 4, backend="exact", metric="cosine")
    assert_exact_neighbours(scaled, (xt * 7.0).cpu(), 4, metric="cosine", stored_dtype=torch.float32)


# ----------------------------------------------------------------------------- duplicates / self
@pytest.mark.parametrize("backend,options", [
    ("exact", {}),
    ("hnsw", {"pca_dim": None}),
    ("hnsw", {"pca_dim": 8}),
    ("faiss", {}),
])
def test_duplicates_are_neighbours_self_never(rng, backend, options):
    """Every point appears twice: its copy (distance 0) is its one correct 1-NN."""
    base = clustered(rng, 300, 24)
    order = rng.permutation(600)
    x = np.concatenate([base, base])[order]
    ids, dist = nearest_neighbours(x, 1, backend=backend, return_distances=True, num_threads=2, **options)
    original = np.concatenate([np.arange(300), np.arange(300)])[order]
    assert (ids[:, 0] != torch.arange(600)).all()
    found_original = torch.from_numpy(original)[ids[:, 0]]
    is_copy = found_original == torch.from_numpy(original)
    assert is_copy.float().mean() >= (1.0 if backend != "hnsw" else 0.98)
    assert (dist[is_copy] == 0).all() and (dist[~is_copy] > 0).all()


def test_many_identical_points(rng):
    """All but two points identical: ties everywhere; any copy is a valid neighbour."""
    x = np.zeros((50, 4), np.float32)
    x[0] = 1.0
    x[1] = -2.0
    for backend in ("exact", "hnsw", "faiss"):
        ids = nearest_neighbours(x, 3, backend=backend, pca_dim=None) if backend == "hnsw" else \
            nearest_neighbours(x, 3, backend=backend)
        assert_exact_neighbours(ids, x, 3, rank_dtype=RANK_DTYPE[backend])


# ----------------------------------------------------------------------------- approximate backends
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("options", [{"pca_dim": None}, {"pca_dim": 16}, {}])
def test_hnsw_recall_against_exact(rng, metric, options):
    x = clustered(rng, 3001, 96, latent=10)
    ids, dist = nearest_neighbours(x, 3, metric=metric, return_distances=True, num_threads=2, **options)
    exact_ids = nearest_neighbours(x, 3, backend="exact", metric=metric)
    assert ids.shape == (3001, 3)
    assert not (ids == torch.arange(3001).unsqueeze(1)).any()
    recall = recall_against(ids, exact_ids, x, metric=metric)
    assert recall >= 0.95, recall
    # Distances are full-space distances of the returned ids (float32, from differences), sorted.
    truth = brute_force(x, metric).gather(1, ids)
    tol = distance_tolerance(x.shape[1], RANK_DTYPE["hnsw"], metric, stored_dtype=torch.float32)
    tol["rtol"] += E32  # rounded once more to float32 when reported
    torch.testing.assert_close(dist.double(), truth, **tol)
    assert (dist.diff(dim=1) >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hnsw_results_come_back_on_the_features_device(rng, device):
    x = torch.from_numpy(clustered(rng, 1200, 80)).to(device)
    index = NeighbourIndex(x, pca_dim=16, num_threads=2)
    ids, dist = index.query_all(2, return_distances=True)
    assert ids.device.type == device and dist.device.type == device
    assert recall_at_k(ids, x, sample=None) >= 0.95
    q_ids = index.query(x[:50], 1)
    assert q_ids.device.type == device and torch.equal(q_ids[:, 0].cpu(), torch.arange(50))


def test_faiss_backend_is_exact(rng):
    x = rng.normal(size=(513, 33)).astype(np.float32)
    ids, dist = nearest_neighbours(x, 5, backend="faiss", return_distances=True)
    assert_exact_neighbours(ids, x, 5, dist=dist, rank_dtype=RANK_DTYPE["faiss"])


def test_faiss_missing_gives_a_clear_error(rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        nearest_neighbours(rng.normal(size=(10, 3)), 1, backend="faiss")


def test_threads_do_not_change_reranked_results(rng):
    x = clustered(rng, 2000, 64)
    index = NeighbourIndex(x, pca_dim=8, num_threads=1, seed=3)
    one = index.query_all(2)
    index.num_threads = 2
    # bit-exact on every CPU: threads split the re-ranking into the same fixed row chunks, each
    # summed by the same code, and hnswlib answers each query alone
    assert torch.equal(one, index.query_all(2))


def test_low_explained_variance_falls_back_to_full_space(rng):
    x = rng.normal(size=(1500, 96)).astype(np.float32)  # isotropic: 32 of 96 axes keep ~40%
    with pytest.warns(UserWarning, match="principal axes keep only") as record:
        index = NeighbourIndex(x, pca_dim=32, num_threads=2)
    assert record[0].filename == __file__  # points at the caller, not at the package
    assert index.pca is None and 0.3 < index.explained_variance_ratio < 0.5
    full = index.query_all(1)
    forced = NeighbourIndex(x, pca_dim=32, pca_min_variance=0.0, num_threads=2)
    assert forced.pca is not None
    exact = nearest_neighbours(x, 1, backend="exact")
    # The fallback is what keeps recall up on unstructured features.
    assert recall_against(full, exact, x) > recall_against(forced.query_all(1), exact, x) + 0.2
    structured = NeighbourIndex(clustered(rng, 1500, 96), pca_dim=32)
    assert structured.pca is not None and structured.explained_variance_ratio > 0.9


# ----------------------------------------------------------------------------- index API
@pytest.mark.parametrize("backend", ["exact", "hnsw", "faiss"])
def test_index_query_external_points_and_exclude(rng, backend):
    x = rng.normal(size=(400, 10)).astype(np.float32)
    index = NeighbourIndex(x, backend=backend, pca_dim=None)
    q = rng.normal(size=(31, 10)).astype(np.float32)
    ids = index.query(q, 4)
    d = torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(x).double(),
                    compute_mode="donot_use_mm_for_euclid_dist")
    rtol = distance_tolerance(x.shape[1], RANK_DTYPE[backend])["rtol"]
    hit = d.gather(1, ids) <= d.sort(dim=1).values[:, 3:4] * (1 + rtol)
    assert hit.float().mean() >= (1.0 if backend != "hnsw" else 0.95)
    # Querying the indexed points themselves with exclude = own row equals query_all.
    same = index.query(x, 2, exclude=torch.arange(400))
    assert torch.equal(same, index.query_all(2))
    # exclude = -1 keeps the point itself: it is its own nearest.
    assert torch.equal(index.query(x[:20], 1, exclude=np.full(20, -1))[:, 0], torch.arange(20))
    empty = index.query(np.zeros((0, 10), np.float32), 3)
    assert empty.shape == (0, 3) and empty.dtype == torch.int64


def test_query_all_k_equal_n_minus_one(rng):
    x = rng.normal(size=(9, 3)).astype(np.float32)
    for backend in ("exact", "hnsw", "faiss"):
        ids = NeighbourIndex(x, backend=backend).query_all(8)
        assert_exact_neighbours(ids, x, 8, rank_dtype=RANK_DTYPE[backend])


def test_results_do_not_depend_on_input_container(rng):
    x = rng.normal(size=(150, 7))
    from_numpy = nearest_neighbours(x.astype(np.float32), 2, backend="exact")
    from_torch = nearest_neighbours(torch.from_numpy(x).float(), 2, backend="exact")
    assert torch.equal(from_numpy, from_torch)


# ----------------------------------------------------------------------------- recall helper
def test_recall_counts_ties_as_hits():
    """Points on a line at 0, 1, 2, ...: interior points have two neighbours at distance 1,
    so either is a hit; picking the one at distance 2 is not."""
    x = np.arange(10, dtype=np.float32)[:, None]
    left = np.maximum(np.arange(10) - 1, 0)
    left[0] = 1
    right = np.minimum(np.arange(10) + 1, 9)
    right[9] = 8
    assert recall_at_k(left[:, None], x, sample=None) == 1.0
    assert recall_at_k(right[:, None], x, sample=None) == 1.0
    far = np.where(np.arange(10) >= 2, np.arange(10) - 2, np.arange(10) + 2)
    assert recall_at_k(far[:, None], x, sample=None) == 0.0


def test_recall_penalises_self_repeats_and_invalid(rng):
    x = rng.normal(size=(200, 5))
    good = nearest_neighbours(x, 2, backend="exact")
    assert recall_at_k(good, x, sample=None) == 1.0
    assert recall_against(good, good, x) == 1.0
    selfish = good.clone()
    selfish[:, 0] = torch.arange(200)
    assert recall_at_k(selfish, x, sample=None) == pytest.approx(0.5)
    repeated = torch.stack([good[:, 0], good[:, 0]], dim=1)
    assert recall_at_k(repeated, x, sample=None) == pytest.approx(0.5)
    invalid = good.clone()
    invalid[:, 1] = -1
    assert recall_at_k(invalid, x, sample=None) == pytest.approx(0.5)


def test_recall_sample_estimates_full_recall(rng):
    x = rng.normal(size=(1500, 8))
    ids = nearest_neighbours(x, 1, backend="exact")
    noisy = ids.clone()
    wrong = torch.from_numpy(rng.random(1500) < 0.3)
    noisy[wrong, 0] = (noisy[wrong, 0] + 1 + torch.arange(int(wrong.sum()))) % 1500
    full = recall_at_k(noisy, x, sample=None)
    assert 0.6 < full < 0.8
    assert abs(recall_at_k(noisy, x, sample=500, seed=1) - full) < 0.07


# ----------------------------------------------------------------------------- validation
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(n=st.integers(2, 12), d=st.integers(1, 5), k=st.integers(-3, 15),
       backend=st.sampled_from(["exact", "hnsw", "faiss"]))
def test_k_must_be_between_one_and_n_minus_one(n, d, k, backend):
    x = np.random.default_rng(n * 100 + d).normal(size=(n, d)).astype(np.float32)
    if 1 <= k <= n - 1:
        ids = nearest_neighbours(x, k, backend=backend, pca_dim=None)
        assert_exact_neighbours(ids, x, k, rank_dtype=RANK_DTYPE[backend])
    else:
        with pytest.raises(ValueError, match=r"k must be in \[1, "):
            nearest_neighbours(x, k, backend=backend)


@settings(max_examples=30)
@given(n=st.integers(2, 20), d=st.integers(1, 6), row=st.integers(0, 19), col=st.integers(0, 5),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_features_are_rejected(n, d, row, col, bad):
    x = np.ones((n, d), np.float32)
    x[row % n, col % d] = bad
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        nearest_neighbours(x, 1, backend="exact")


@settings(max_examples=30)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).filter(lambda s: len(s) != 2))
def test_features_must_be_two_dimensional(shape):
    with pytest.raises(ValueError, match="features must have shape"):
        nearest_neighbours(np.zeros(shape, np.float32), 1)


@pytest.mark.parametrize("bad", [np.ones((5, 3), np.int64), torch.ones(5, 3, dtype=torch.int32),
                                 np.ones((5, 3), bool), [[1.0, 2.0], [3.0, 4.0]]])
def test_features_must_be_floating_arrays(bad):
    with pytest.raises(TypeError, match="features must"):
        nearest_neighbours(bad, 1)


def test_other_bad_arguments():
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="at least 2 rows"):
        nearest_neighbours(x[:1], 1)
    with pytest.raises(ValueError, match="at least one column"):
        nearest_neighbours(np.zeros((5, 0), np.float32), 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        nearest_neighbours(x, 1, backend="annoy")
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest_neighbours(x, 1, metric="manhattan")
    with pytest.raises(TypeError, match="k must be an int"):
        nearest_neighbours(x, 1.0)
    with pytest.raises(ValueError, match="pca_dim must be >= 1"):
        nearest_neighbours(x, 1, pca_dim=0)
    with pytest.raises(ValueError, match="pca_min_variance must be"):
        nearest_neighbours(x, 1, pca_min_variance=1.5)
    with pytest.raises(ValueError, match="M must be >= 2"):
        nearest_neighbours(x, 1, M=1)
    with pytest.raises(ValueError, match="all-zero rows"):
        nearest_neighbours(np.vstack([x, np.zeros((1, 4), np.float32)]), 1, metric="cosine")
    index = NeighbourIndex(x, backend="exact")
    with pytest.raises(ValueError, match="queries must have 4 columns"):
        index.query(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="exclude must have shape"):
        index.query(x, 1, exclude=torch.arange(3))
    with pytest.raises(ValueError, match="exclude values must be in"):
        index.query(x, 1, exclude=torch.full((20,), 20))
    with pytest.raises(TypeError, match="exclude must have an integer dtype"):
        index.query(x, 1, exclude=torch.zeros(20))
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        index.query(x, 21)
    with pytest.raises(ValueError, match="found must have shape"):
        recall_at_k(np.zeros((19, 1), np.int64), x)
    with pytest.raises(TypeError, match="found must have an integer dtype"):
        recall_at_k(np.zeros((20, 1)), x)


# ----------------------------------------------------------------------------- half-precision features
def assert_same_up_to_ties(ids_a: torch.Tensor, ids_b: torch.Tensor, x) -> None:
    """Equal neighbour lists, except where two ids lie at exactly the same float64 distance."""
    differ = ids_a != ids_b
    if not bool(differ.any()):
        return
    d = brute_force(x)
    torch.testing.assert_close(d.gather(1, ids_a.cpu())[differ], d.gather(1, ids_b.cpu())[differ], rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,options", [("exact", {}), ("hnsw", {"pca_dim": 12, "num_threads": 1}),
                                             ("hnsw", {"pca_dim": None, "num_threads": 1}), ("faiss", {})])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_half_features_give_the_results_of_their_float32_upcast(rng, half, backend, options, metric):
    """The search widens half-precision rows a block at a time, never the whole matrix: it must
    return what it returns for the same values upcast to float32 (one thread: hnswlib's graph
    then depends on nothing but its input)."""
    x = torch.from_numpy(clustered(rng, 1500, 48)).to(half)
    up = x.float()
    ids_h, dist_h = nearest_neighbours(x, 3, backend=backend, metric=metric, return_distances=True, **options)
    ids_f, dist_f = nearest_neighbours(up, 3, backend=backend, metric=metric, return_distances=True, **options)
    assert dist_h.dtype == torch.float32
    if backend == "faiss":  # faiss's own half storage proposes; the float64 re-ranking decides
        assert_same_up_to_ties(ids_h, ids_f, up.double() if metric == "euclidean" else up / up.norm(dim=1, keepdim=True))
    else:
        assert torch.equal(ids_h, ids_f)
        assert torch.equal(dist_h, dist_f)
    if backend == "exact":
        assert_exact_neighbours(ids_h, up, 3, metric=metric, stored_dtype=torch.float32 if metric == "cosine"
                                else torch.float64)
    # querying a half index with external points works like the float32 index
    q = torch.from_numpy(clustered(rng, 40, 48)).to(half)
    index_h = NeighbourIndex(x, backend=backend, metric=metric, **options)
    index_f = NeighbourIndex(up, backend=backend, metric=metric, **options)
    if backend != "faiss":
        assert torch.equal(index_h.query(q, 2), index_f.query(q.float(), 2))


def test_half_features_brute_force_and_recall(rng):
    x = torch.from_numpy(clustered(rng, 2500, 64)).half()
    exact = nearest_neighbours(x, 2, backend="exact")
    assert_exact_neighbours(exact, x.float(), 2)
    found = nearest_neighbours(x, 2, num_threads=2, pca_dim=16)
    assert recall_at_k(found, x, sample=None) == recall_at_k(found, x.float(), sample=None) >= 0.95
    assert recall_against(found, exact, x) == recall_against(found, exact, x.float())


def test_exact_search_tiles_half_features(rng, monkeypatch):
    """Without a float32 working copy the exact search walks the base in tiles; tiny tiles and
    blocks force many of them, and duplicates force the float64 fallback: still exact."""
    from mixnn_fast.refresh.neighbours import exact as exact_module

    monkeypatch.setattr(exact_module, "_TILE_ROWS", 37)
    base = rng.normal(size=(60, 10))
    x = torch.from_numpy(np.repeat(base, 10, axis=0)[rng.permutation(600)]).half()
    searcher = ExactSearcher(exact_module.FeatureRows(x), block_elements=37 * 5)
    assert searcher.work is None and searcher.tile_rows == 37
    ids, sq = searcher.search(exact_module.FeatureRows(x), 4, exclude=torch.arange(600))
    assert_exact_neighbours(ids, x.float(), 4)
    assert (sq == 0).all()


def test_pca_projection_finds_the_principal_subspace(rng):
    """The randomized fit against the eigendecomposition of the sample covariance: the same
    subspace (principal angles near 0) and the same explained variance."""
    from mixnn_fast.refresh.neighbours.reduction import PCAProjection

    x = torch.from_numpy(clustered(rng, 4000, 200, latent=12))
    pca = PCAProjection(x.half(), 12, sample=3000, seed=5)
    rows = torch.randperm(4000, generator=torch.Generator().manual_seed(5))[:3000].sort().values
    sample = x.half()[rows].double()
    centred = sample - sample.mean(dim=0)
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)
    top = eigvecs[:, -12:]
    cosines = torch.linalg.svdvals(top.T @ pca.components.double())
    assert float(cosines.min()) > 0.999
    expected = float(eigvals[-12:].sum() / eigvals.sum())
    assert pca.explained_variance_ratio == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(pca.components.double().T @ pca.components.double(), torch.eye(12, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    projected = pca.transform(x.half())
    torch.testing.assert_close(projected, (x.half().float() - pca.mean) @ pca.components, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- deterministic re-ranking
def test_rerank_breaks_float32_near_ties_in_float64(rng):
    """Two float32 candidates one ulp apart in one coordinate: their squared distances differ
    by ~1e-9 relative, which float32 sums cannot resolve; the float64 recomputation orders
    them, whichever order they were proposed in."""
    from mixnn_fast.refresh.neighbours.distances import float32_rounding_bound, rerank

    d = 256
    q = torch.from_numpy(rng.normal(size=(1, d)).astype(np.float32))
    a = q + 0.5
    b = a.clone()
    b[0, 0] = torch.nextafter(a[0, 0], torch.tensor(np.float32(10.0)))  # one ulp further from q
    base = torch.cat([b, a, q + 5.0])
    truth = ((base[:2].double() - q.double()) ** 2).sum(dim=1)
    assert float(truth[0]) > float(truth[1])  # a is nearer
    d32 = squared_distances_to_candidates(q, base, torch.tensor([[0, 1]]), dtype=torch.float32)
    assert abs(float(d32[0, 0] - d32[0, 1])) <= float32_rounding_bound(d) * float(d32.sum())  # a near-tie
    for order in ([0, 1, 2], [1, 0, 2], [2, 0, 1]):
        cand = torch.tensor([order])
        sq, ids = rerank(q, base, cand, torch.zeros_like(cand, dtype=torch.bool), 2)
        assert ids.tolist() == [[1, 0]]
        assert sq.dtype == torch.float64  # the row was recomputed
        torch.testing.assert_close(sq[0], truth.flip(0), rtol=1e-15, atol=0)


def test_rerank_is_the_same_whatever_float32_rounding(rng, monkeypatch):
    """What another CPU's SIMD kernel could do to the float32 distances: perturb each by up to a
    quarter of the rounding bound. The neighbour ids must not change."""
    from mixnn_fast.refresh.neighbours import distances

    x = clustered(rng, 1500, 64)
    x = np.concatenate([x, x[:200] + rng.normal(0, 1e-7, (200, 64)).astype(np.float32)])  # near-duplicates
    index = NeighbourIndex(x, pca_dim=16, num_threads=1)
    reference = index.query_all(3)
    original = distances.squared_distances_to_candidates
    noise = np.random.default_rng(7)

    def perturbed(*args, dtype=torch.float64, **kwargs):
        out = original(*args, dtype=dtype, **kwargs)
        if dtype == torch.float32:
            scale = 1 + distances.float32_rounding_bound(64) / 4 * torch.from_numpy(
                noise.uniform(-1, 1, tuple(out.shape))).float()
            out = out * scale
        return out

    monkeypatch.setattr(distances, "squared_distances_to_candidates", perturbed)
    assert torch.equal(index.query_all(3), reference)
    monkeypatch.setattr(distances, "_RERANK_BLOCK", 97)  # blocks of queries: the same answer
    assert torch.equal(index.query_all(3), reference)


@pytest.mark.parametrize("n,threads,expected", [(300, 2, 1), (50_000, 4, 1), (50_001, 4, 4), (50_001, 1, 1)])
def test_small_graphs_are_built_with_one_thread(monkeypatch, n, threads, expected):
    """hnswlib's threaded build varies the insertion order from run to run: up to
    SINGLE_THREAD_BUILD_MAX_POINTS points the graph is built with one thread (queries keep
    every thread), so small runs are bit-reproducible."""
    import types

    from mixnn_fast.refresh.neighbours import hnsw

    calls = []

    class RecordingIndex:  # stands in for hnswlib.Index: records the threads of each call
        def __init__(self, space, dim):
            pass

        def init_index(self, **kwargs):
            pass

        def add_items(self, data, ids, num_threads):
            calls.append(("build", num_threads))

    monkeypatch.setitem(sys.modules, "hnswlib", types.SimpleNamespace(Index=RecordingIndex))
    assert hnsw.SINGLE_THREAD_BUILD_MAX_POINTS == 50_000
    searcher = hnsw.HnswSearcher([(0, torch.zeros(4, 3))], n, M=16, ef_construction=64, ef=16,
                                 num_threads=threads, seed=0)
    assert calls == [("build", expected)] and searcher.num_threads == threads


def test_a_graph_of_a_few_thousand_points_is_the_same_twice_with_two_threads(rng):
    """The end-to-end consequence: two indexes over the same features, asked for two threads,
    give the same neighbours."""
    x = torch.from_numpy(rng.standard_normal((3000, 24)).astype(np.float32))
    first = nearest_neighbours(x, 5, backend="hnsw", num_threads=2)
    assert all(torch.equal(first, nearest_neighbours(x, 5, backend="hnsw", num_threads=2)) for _ in range(3))
