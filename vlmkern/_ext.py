"""Optional compiled extensions, loaded once; a missing one is recorded, never raised on import.

``vlmkern._C``    CPU C++ kernels (data-loader side work), built on every machine.
``vlmkern._cuda`` CUDA C++ kernels, built only when torch has CUDA at install time.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_CACHE: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _CACHE:
        try:
            _CACHE[name] = (importlib.import_module(f"vlmkern.{name}"), None)
        except Exception as exc:  # ImportError, undefined symbol from a torch mismatch, ...
            _CACHE[name] = (None, f"extension vlmkern.{name} not built or not loadable ({type(exc).__name__}: {exc})")
    return _CACHE[name]


def cpu_ext() -> ModuleType | None:
    return _load("_C")[0]


def cuda_ext() -> ModuleType | None:
    return _load("_cuda")[0]


def cpu_ext_error() -> str | None:
    return _load("_C")[1]


def cuda_ext_error() -> str | None:
    return _load("_cuda")[1]
