"""Shared fixtures; CUDA tests skip cleanly on machines without a GPU, and tests that need an
optional module that is not installed (DALI, hnswlib, faiss, CuPy, Hypothesis, ...) skip with
the module's name instead of erroring (the GPU check's machine has none of them)."""
from __future__ import annotations

import importlib.util
import os
import re
import zlib

# Before torch loads its OpenMP runtime: see mixnn_fast/__init__.py (spinning OpenMP threads
# starve DALI's workers on small machines).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

try:
    from hypothesis import settings
except ModuleNotFoundError:  # the property-test modules skip (see OPTIONAL_MODULES)
    settings = None

if settings is not None:
    # Hypothesis: bounded and deterministic enough for CI on 2 cores.
    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=False, print_blob=True)
    # A long search before a release: HYPOTHESIS_PROFILE=deep pytest -k <property tests>.
    settings.register_profile("deep", max_examples=3000, deadline=None, derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Modules some tests need that a machine may lack (dotted names).  A test, or a whole test
#: module, that fails only because one of them is *not installed* is reported as skipped, naming
#: it; anything else an import raises (a broken install, a typo in a module name the package
#: imports) stays an error.
OPTIONAL_MODULES = ("nvidia.dali", "hnswlib", "faiss", "cupy", "hypothesis", "cleanlab", "tensorboard",
                    "torchvision", "PIL", "matplotlib", "tqdm", "yaml")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")

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


def _missing_optional(name: str | None) -> str | None:
    """The optional module that a ModuleNotFoundError for ``name`` means is not installed, or
    None (``name`` may be the module, a submodule of it, or a package above it: "nvidia")."""
    for optional in OPTIONAL_MODULES:
        if name and (name == optional or name.startswith(optional + ".") or optional.startswith(name + ".")):
            try:
                installed = importlib.util.find_spec(optional) is not None
            except (ImportError, ValueError):  # a parent package is missing
                installed = False
            return None if installed else optional
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(ModuleNotFoundError):
        missing = _missing_optional(call.excinfo.value.name)
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1], f"Skipped: needs {missing!r}, which is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module importing a missing optional module at its top: pytest turns the ImportError into
    # a collection error whose text alone survives; the name is read back from it.
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        found = _NO_MODULE.search(str(report.longrepr))
        missing = _missing_optional(found.group(1) if found else None)
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: needs {missing!r}, which is not installed")


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
