"""The refresh's "auto" neighbour search: exact on a CUDA device when the pool fits, hnswlib
(then faiss, then exact) on the host otherwise — and the same partners either way."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mixnn_fast.refresh.neighbours import nearest_neighbours
from mixnn_fast.refresh.neighbours.choice import DEVICE_MEMORY_SHARE, choose_backend, exact_search_bytes
from mixnn_fast.refresh.pool_scores import PoolScores
from mixnn_fast.refresh.refresh import RefreshOptions, refresh
from mixnn_fast.refresh.targets import SoftTargets

GIB = 1 << 30


def test_a_named_backend_is_kept_and_searched_on_the_host():
    for backend in ("hnsw", "exact", "faiss"):
        assert choose_backend(backend, 10**6, 2048, torch.float16, "cuda:0", free_bytes=100 * GIB) == \
            (backend, torch.device("cpu"))


def test_auto_on_the_cpu_is_hnswlib():
    assert choose_backend("auto", 128_000, 2048, torch.float16, "cpu") == ("hnsw", torch.device("cpu"))
    assert choose_backend("auto", 100, 8, torch.float32, None) == ("hnsw", torch.device("cpu"))


def test_auto_on_a_cuda_device_searches_exactly_there_when_the_pool_fits():
    # Clothing1M's pool, 128k x 2048 float16 (512 MiB), on a device with 100 GiB free
    assert choose_backend("auto", 128_000, 2048, torch.float16, "cuda:1", free_bytes=100 * GIB) == \
        ("exact", torch.device("cuda:1"))
    need = exact_search_bytes(128_000, 2048, torch.float16)
    assert 128_000 * 2048 * 2 < need < 128_000 * 2048 * 2 + GIB
    # just too little free memory: the host's hnswlib
    free = int(need / DEVICE_MEMORY_SHARE) - 1
    assert choose_backend("auto", 128_000, 2048, torch.float16, "cuda", free_bytes=free)[0] == "hnsw"
    assert choose_backend("auto", 128_000, 2048, torch.float16, "cuda", free_bytes=free + 2)[0] == "exact"
    # float32 features need a float32 working copy besides themselves; half-precision ones do not
    assert exact_search_bytes(1000, 64, torch.float32) - exact_search_bytes(1000, 64, torch.float16) == \
        1000 * 64 * (4 + 4 - 2)


def test_auto_without_hnswlib_takes_faiss_then_the_exact_search(monkeypatch):
    real = importlib.util.find_spec
    missing: set[str] = {"hnswlib"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    expected = "faiss" if real("faiss") is not None else "exact"
    assert choose_backend("auto", 1000, 64, torch.float32, "cpu")[0] == expected
    missing.add("faiss")
    assert choose_backend("auto", 1000, 64, torch.float32, "cpu")[0] == "exact"


def _pool_scores(rng, n: int, c: int, d: int, dtype: torch.dtype) -> PoolScores:
    labels = torch.from_numpy(rng.integers(0, c, n))
    targets = SoftTargets(labels, c, start_epoch=0)
    ids = torch.arange(n)
    scores = PoolScores(ids, targets, labels, epoch=0, features_dtype=dtype)
    centres = rng.normal(size=(c, d)) * 3
    features = centres[labels.numpy()] + rng.normal(size=(n, d))
    scores.add(ids, torch.from_numpy(rng.normal(size=(n, c))).float(), torch.from_numpy(features).float())
    return scores


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_auto_refresh_on_cuda_finds_the_exact_partners(rng, dtype):
    scores = _pool_scores(rng, 3001, 7, 96, dtype)
    expected = nearest_neighbours(scores.features.float(), 1, backend="exact")
    result = refresh(scores, RefreshOptions(neighbour_backend="auto", device="cuda"))
    assert result.stats["neighbours_exact_on_device"] == 1.0
    assert result.table.partners.device.type == "cpu"
    assert torch.equal(result.table.partners[:, 0], scores.ids[expected[:, 0]])


def test_auto_refresh_on_the_cpu_is_the_hnsw_refresh(rng):
    scores = _pool_scores(rng, 501, 5, 16, torch.float32)
    auto = refresh(scores, RefreshOptions(neighbour_backend="auto", device="cpu", num_threads=1))
    hnsw = refresh(scores, RefreshOptions(neighbour_backend="hnsw", num_threads=1))
    assert auto.stats["neighbours_exact_on_device"] == hnsw.stats["neighbours_exact_on_device"] == 0.0
    assert torch.equal(auto.table.partners, hnsw.table.partners)
    assert torch.equal(auto.table.weights, hnsw.table.weights)
