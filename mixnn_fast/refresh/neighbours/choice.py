"""Which neighbour search a refresh runs when the setting is ``"auto"``, and on which device.

On a CUDA device, an exact chunked search over the pool (``exact``: matrix products a block of
queries at a time, then exact re-ranking) is both exact and faster than copying the features to
the host and building an hnswlib graph: a 128k x 2048 pool is ~17 TFLOP of products, seconds on
one GPU. So ``auto`` runs it on the training device whenever the features and the search's
working memory fit in half of the device's free memory. Otherwise (CPU training, or a pool too
large for the device) the work is O(P^2 D) on the host, which hnswlib avoids: ``auto`` picks
hnswlib, then faiss, and falls back to the exact search on the host only when neither is
installed (the GPU machines this engine is tested on have neither).
"""
from __future__ import annotations

import importlib.util

import torch

from mixnn_fast.refresh.neighbours.exact import _BLOCK_ELEMENTS

# fraction of the device's free memory the exact search may take: the model, its optimiser state
# and the caching allocator's pools share the device with it
DEVICE_MEMORY_SHARE = 0.5


def exact_search_bytes(num_rows: int, dim: int, dtype: torch.dtype) -> int:
    """Device bytes an exact search over (num_rows, dim) features of ``dtype`` holds at its peak:
    the features, a float32 centred working copy (none for float16/bfloat16 features, which are
    widened a tile at a time), the squared norms, and a few (block x N) distance blocks."""
    item = torch.empty((), dtype=dtype).element_size()
    features = num_rows * dim * item
    working = 0 if dtype in (torch.float16, torch.bfloat16) else num_rows * dim * max(item, 4)
    return features + working + 8 * num_rows + 4 * 4 * _BLOCK_ELEMENTS


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str, num_rows: int, dim: int, dtype: torch.dtype,
                   device: torch.device | str | None = None, *, free_bytes: int | None = None) -> tuple[str, torch.device]:
    """The backend and device of a refresh's neighbour search.

    Args:
        requested: "auto", or a backend ("hnsw", "exact", "faiss"), returned as it is with the CPU.
        num_rows, dim, dtype: the pool's features, (num_rows, dim) of ``dtype``.
        device: the training device; only a CUDA device makes ``auto`` search on a device.
        free_bytes: the device's free memory (default: ``torch.cuda.mem_get_info``).
    Returns:
        (backend, device): where to move the features and which backend to search them with.
    """
    cpu = torch.device("cpu")
    if requested != "auto":
        return requested, cpu
    device = torch.device(device) if device is not None else cpu
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        if exact_search_bytes(num_rows, dim, dtype) <= DEVICE_MEMORY_SHARE * free_bytes:
            return "exact", device
    if _installed("hnswlib"):
        return "hnsw", cpu
    if _installed("faiss"):
        return "faiss", cpu
    return "exact", cpu
