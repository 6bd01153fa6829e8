"""The native runtime `asyncdiff_rt._C` (csrc/ + python/bindings.cpp), loaded on first use.

Importing asyncdiff_rt never imports the extension and never touches CUDA: `load()` does, and says how to build
it when it is missing. `available()` and `build_info()` answer without raising.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["load", "available", "build_info", "NativeUnavailableError"]

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository (needs cmake, ninja, pybind11; the "
    "CUDA variant also needs nvcc and nvidia-nccl-cu13), or run scripts/device_build.sh on a GPU machine"
)


class NativeUnavailableError(ImportError):
    """The extension asyncdiff_rt._C is not built or cannot be loaded."""


_module: ModuleType | None = None
_error: BaseException | None = None


def load() -> ModuleType:
    """Import and return `asyncdiff_rt._C`; raise NativeUnavailableError with build instructions if missing."""
    global _module, _error
    if _module is not None:
        return _module
    try:
        _module = importlib.import_module("asyncdiff_rt._C")
    except ImportError as err:
        _error = err
        msg = f"the native extension asyncdiff_rt._C is not available ({err}); {_BUILD_HINT}"
        raise NativeUnavailableError(msg) from err
    return _module


def available() -> bool:
    """True when the extension imports (says nothing about a GPU: see build_info()['runtime_ok'])."""
    try:
        load()
    except ImportError:
        return False
    return True


def build_info() -> dict[str, Any]:
    """The extension's build information, or {'available': False, 'error': ...} when it is missing."""
    try:
        mod = load()
    except ImportError as err:
        return {"available": False, "error": str(err)}
    info = dict(mod.build_info())
    info["available"] = True
    return info
