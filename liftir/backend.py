"""Array backends: NumPy on the CPU (default), CuPy on a GPU.

Rules never import NumPy or CuPy themselves; they receive the array module `xp`.
CuPy is imported only when asked for, so `import liftir` works on machines without it.
"""
from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

from .errors import BackendError

BACKENDS = ("numpy", "cupy", "auto")


def _cupy_usable() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported on demand
    except Exception:  # ImportError, or a CUDA library failing to load
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum()  # a real kernel launch: catches broken drivers early
    except Exception:
        return None
    return cupy


def array_module(backend: str = "numpy") -> ModuleType:
    """The array module for `backend` ("numpy", "cupy" or "auto")."""
    if backend == "numpy":
        return np
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cupy = _cupy_usable()
    if cupy is not None:
        return cupy
    if backend == "auto":
        return np
    raise BackendError("backend='cupy' needs CuPy and a usable CUDA GPU; install liftir[gpu] "
                       "(cupy-cuda12x) on a GPU machine, or use backend='numpy' / 'auto'")


def to_host(a):
    """A NumPy copy of any backend array (no copy for NumPy arrays)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.asarray(a)
