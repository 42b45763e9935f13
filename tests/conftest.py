"""Shared fixtures; CUDA tests skip cleanly on machines without a GPU."""
from __future__ import annotations

import os
import zlib

# Before torch loads its OpenMP runtime: see mixnn_fast/__init__.py (spinning OpenMP threads
# starve DALI's workers on small machines).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

from hypothesis import settings

# Hypothesis: bounded and deterministic enough for CI on 2 cores.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=False, print_blob=True)
# A long search before a release: HYPOTHESIS_PROFILE=deep pytest -k <property tests>.
settings.register_profile("deep", max_examples=3000, deadline=None, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    """Which vector units this run computes with: float32 results round differently on AVX2 and
    AVX-512 (see docs/testing.md), so a failure report should say which one it came from."""
    from mixnn_fast._native import has_native, native

    mixer = native().selected_cpu_isa() if has_native() else "not built"
    return (f"cpu: torch {torch.backends.cpu.get_cpu_capability()} "
            f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}), "
            f"mixer kernel {mixer} (MIXNN_CPU_ISA={os.environ.get('MIXNN_CPU_ISA', 'unset')}), "
            f"{torch.get_num_threads()} threads")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name (reproducible, distinct across tests)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
