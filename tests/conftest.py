"""What the whole test session shares, and why each piece is here.

- **One thread per parallel worker.** The README's test command runs the suite on
  pytest-xdist workers (``-n auto``, at most `MAX_WORKERS`). Each worker's onnxruntime
  sessions, torch and OpenMP pools get one thread: two workers with two spinning threads
  each on two cores run slower than one worker alone. No test depends on the thread count
  (tests/test_threads.py sets the variable it tests; the examples set their own).
- **torch's ONNX op registry, built once per process.** ``torch.onnx.export(dynamo=True)``
  rebuilds its table of ~2,000 ATen-to-ONNX functions for every export (about a second
  each); the suite makes dozens of exports. Each export still gets its own copy of the
  table, so nothing an export registers leaks into the next, and the exports are exactly
  what a user's ``torch.onnx.export`` writes.
- **The zoo exports, made once for all workers** (tests/export_cache.py), in pytest's cache
  directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: more workers than this duplicate imports and exports faster than they add cores
MAX_WORKERS = 4

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("LIFTIR_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the suite also runs without it
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the cores this process may use (the Slurm / taskset share), capped."""
    from liftir.threads import cpu_threads
    return max(1, min(MAX_WORKERS, cpu_threads()))


def _build_torch_onnx_registry_once() -> None:
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # another torch layout: exports just build it each time
        return
    registry_class = _registration.ONNXRegistry
    build = registry_class.from_torchlib.__func__
    built: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(cls, *args, **kwargs)
        copy = cls.__new__(cls)
        copy.__dict__.update(built[key].__dict__)
        copy.functions = {target: list(decomps) for target, decomps in built[key].functions.items()}
        return copy

    if hasattr(registry_class(), "functions"):
        registry_class.from_torchlib = classmethod(from_torchlib)


_build_torch_onnx_registry_once()


def pytest_configure(config):
    """Exports shared through pytest's cache directory (tests/export_cache.py)."""
    import export_cache
    cache = getattr(config, "cache", None)
    if cache is not None:
        export_cache.DIRECTORY = Path(cache.mkdir("liftir-exports"))


class _ExposureFallbacks(__import__("logging").Handler):
    """Counts the Explainer's "a rule read a tensor its pass did not expose" fallbacks."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "forwards return every tensor" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_exposure_fallback(request):
    """Every interpreted pass exposes only what its trace says its backward reads
    (liftir/compile/compiler.py: forward_exposure); a rule whose array code reads more falls
    back to exposing everything, correct but slower and no longer the compiled engine's
    forward bit for bit. Any test that makes that happen fails, unless it tests the fallback."""
    import logging
    handler = _ExposureFallbacks()
    logger = logging.getLogger("liftir")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    if handler.messages and "exposure_fallback" not in request.keywords:
        pytest.fail(f"an interpreted pass read a tensor its forward did not expose: {handler.messages[0]}")
