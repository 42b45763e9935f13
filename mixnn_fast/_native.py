"""Loads the compiled extension ``mixnn_fast._C`` once, and says why when it cannot."""
from __future__ import annotations

from types import ModuleType

_IMPORT_ERROR: BaseException | None = None
try:
    from mixnn_fast import _C as _C_module  # type: ignore[attr-defined]
except ImportError as exc:  # not built (e.g. a source tree without `pip install -e .`)
    _C_module = None
    _IMPORT_ERROR = exc


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


def cuda_compiled() -> bool:
    """True when the extension contains the CUDA kernels (compiled with nvcc)."""
    return _C_module is not None and bool(_C_module.cuda_compiled())


def build_info() -> dict:
    if _C_module is None:
        return {"native": False, "error": str(_IMPORT_ERROR)}
    info = dict(_C_module.build_info())
    info["native"] = True
    return info
