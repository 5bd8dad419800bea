"""Exports of the test zoos' models, made once and shared by every test module and worker.

A dynamo export takes seconds and several test modules explain the same (model, exporter)
pair; on pytest-xdist they may run in different worker processes. Each export is kept in
pytest's cache directory (``.pytest_cache/d/liftir-exports``), keyed by everything that
determines it: the source of the zoo module, of the exporters' options and of the
torchvision stand-in, the model's name and size arguments, the exporter, and the versions
of torch, onnx, onnxscript, timm and transformers. A clean clone (CI) exports each pair
once per run; a rerun on the same machine reuses them. Without pytest's
cache (``-p no:cacheprovider``) each process keeps its exports in memory only.

Files are written atomically (a temporary name, then a rename), so two workers exporting
the same pair at once both leave a whole file.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Callable

import onnx

TESTS = Path(__file__).resolve().parent

#: set by tests/conftest.py from pytest's cache; None keeps exports in memory only
DIRECTORY: Path | None = None

#: modules part of every key: export() and its options, and the torchvision stand-in timm builds on
SHARED = ("zoo_transformers", "vision_shim")

_MEMORY: dict = {}
_VERSIONED = ("torch", "onnx", "onnxscript", "timm", "transformers")


def _versions() -> str:
    found = []
    for package in _VERSIONED:
        try:
            found.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


def _path(zoo_module: str, name: str, how: str, sizes) -> Path | None:
    if DIRECTORY is None:
        return None
    source = "".join((TESTS / f"{module}.py").read_text() for module in sorted({zoo_module, *SHARED}))
    key = hashlib.sha256("|".join([source, name, how, repr(sizes), _versions()]).encode()).hexdigest()[:20]
    return DIRECTORY / f"{name}-{how}-{key}.onnx"


def export_once(zoo_module: str, name: str, how: str, make: Callable[[], onnx.ModelProto],
                sizes=None) -> onnx.ModelProto:
    """The export `make()` returns for this (zoo module, model, exporter, sizes), made at
    most once per machine and versions (once per process without pytest's cache)."""
    key = (zoo_module, name, how, repr(sizes))
    if key in _MEMORY:
        return _MEMORY[key]
    path = _path(zoo_module, name, how, sizes)
    if path is not None and path.exists():
        proto = onnx.load(str(path))
    else:
        proto = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
            os.close(handle)
            onnx.save(proto, partial)
            os.replace(partial, path)
    _MEMORY[key] = proto
    return proto
