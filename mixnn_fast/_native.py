"""Loads the compiled extension ``mixnn_fast._C`` once, and says why when it cannot.

Environment:
    MIXNN_CPU_ISA: the instruction set of the CPU mixer kernel (``mix_images`` on the host):
        ``auto`` (the default, also when unset or empty: the best kernel this CPU runs),
        ``base`` (the portable kernel, no vector intrinsics), ``avx2`` or ``avx512``. Read once,
        when this module is first imported (which loads the extension); later changes to the
        variable have no effect, use ``native().select_cpu_isa(name)`` then. A value outside
        these raises ValueError naming the variable and the allowed values; an instruction set
        this CPU (or this build) lacks raises ValueError too, naming the ones it has, rather
        than silently running another kernel.

        With torch's own ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``) it makes
        this machine compute as one with fewer vector units would, e.g. the whole test suite as
        on an AVX2-only AMD EPYC, or with no vector units at all (see docs/testing.md):

            ATEN_CPU_CAPABILITY=avx2 MIXNN_CPU_ISA=avx2 .venv/bin/python -m pytest
            ATEN_CPU_CAPABILITY=default MIXNN_CPU_ISA=base .venv/bin/python -m pytest
"""
from __future__ import annotations

import os
from types import ModuleType

CPU_ISA_ENV = "MIXNN_CPU_ISA"
# In increasing order of the vector units they need: each CPU that runs one runs those before it.
CPU_ISA_CHOICES = ("auto", "base", "avx2", "avx512")


def _cpu_isa_from_env() -> str:
    """MIXNN_CPU_ISA, validated and lower-cased; 'auto' when unset or empty."""
    value = os.environ.get(CPU_ISA_ENV, "").strip().lower()
    if not value:
        return "auto"
    if value not in CPU_ISA_CHOICES:
        raise ValueError(f"{CPU_ISA_ENV}={os.environ[CPU_ISA_ENV]!r} is not one of "
                         f"{', '.join(CPU_ISA_CHOICES)}")
    return value


# Checked before the extension loads, so a typo is reported even where _C is not built.
_CPU_ISA = _cpu_isa_from_env()

_IMPORT_ERROR: BaseException | None = None
try:
    from mixnn_fast import _C as _C_module  # type: ignore[attr-defined]
except ImportError as exc:  # not built (e.g. a source tree without `pip install -e .`)
    _C_module = None
    _IMPORT_ERROR = exc


def _apply_cpu_isa(module: ModuleType, name: str) -> None:
    if name == "auto":
        return  # the kernel picks the best instruction set on first use
    try:
        module.select_cpu_isa(name)
    except ValueError as exc:  # pybind11's translation of the kernel's std::invalid_argument
        raise ValueError(f"{CPU_ISA_ENV}={name}: this CPU or build has no {name} kernel "
                         f"(available: {', '.join(module.cpu_isas())}; or use auto)") from exc


if _C_module is not None:
    _apply_cpu_isa(_C_module, _CPU_ISA)


def native() -> ModuleType:
    """The compiled module; raises ImportError with the fix when it is missing."""
    if _C_module is None:
        raise ImportError(
            "mixnn_fast's native extension (mixnn_fast._C) is not built: run `bash scripts/setup.sh` "
            f"or `pip install -e .` in the repository ({_IMPORT_ERROR})"
        )
    return _C_module


def has_native() -> bool:
    return _C_module is not None


def configured_cpu_isa() -> str:
    """MIXNN_CPU_ISA as read at load time ('auto' when unset): the setting to return to after
    switching the kernel temporarily with ``native().select_cpu_isa``."""
    return _CPU_ISA


def allowed_cpu_isas() -> list[str]:
    """The CPU kernels this process may use: those this CPU runs (``native().cpu_isas()``), up to
    and including MIXNN_CPU_ISA when it names one (an AVX2-only machine's list under avx2)."""
    available = list(native().cpu_isas())
    if _CPU_ISA == "auto":
        return available
    ceiling = CPU_ISA_CHOICES.index(_CPU_ISA)
    return [isa for isa in available if CPU_ISA_CHOICES.index(isa) <= ceiling]


def cuda_compiled() -> bool:
    """True when the extension contains the CUDA kernels (compiled with nvcc)."""
    return _C_module is not None and bool(_C_module.cuda_compiled())


def build_info() -> dict:
    if _C_module is None:
        return {"native": False, "error": str(_IMPORT_ERROR)}
    info = dict(_C_module.build_info())
    info["native"] = True
    return info
