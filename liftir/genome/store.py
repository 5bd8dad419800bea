"""The output store: a chunked, compressed Zarr group that a run fills chunk by chunk.

Layout (N regions, L bases, A/C/G/T on the last axis):

* ``onehot`` (N, L, 4) uint8, ``contributions`` and ``hypothetical`` (N, L, 4) float32,
  ``delta`` (N,) float64: the summation-to-delta residual of each region;
* ``regions/chrom`` (int32 code into attrs ``chrom_names``), ``regions/start``,
  ``regions/end``, ``regions/line`` (line of the BED record), ``regions/index``;
* ``chunk_done`` (one uint8 per store chunk), ``chunk_non_acgt``, ``chunk_soft_masked``;
* attrs ``liftir``: the run's configuration (model sha256, method, references, seed,
  width, liftir version...), and ``summary`` once every chunk is done.

Restart safety: a store chunk's marker in ``chunk_done`` is written only after all of
its data, and Zarr writes each file atomically (temporary file + rename), so a chunk
interrupted at any point is recomputed on the next run, and since every region's
result is deterministic the store ends byte-identical. The store's own chunking is
fixed by ``store_chunk``, not by the task size or the worker count.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError
from .regions import Regions

DATA_ARRAYS = ("onehot", "contributions", "hypothetical", "delta")
REGION_ARRAYS = ("chrom", "start", "end", "line", "index")


def _zarr():
    try:
        import zarr
    except ImportError:
        raise InputError("the genome pipeline needs zarr: pip install 'liftir[genome]'") from None
    return zarr


def _compressors():
    from zarr.codecs import BloscCodec
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]


def create_or_resume(path: str, config: dict, regions: Regions, width: int,
                     store_chunk: int) -> None:
    """Create the store for `config`, or check that an existing one is the same run.

    A new store is built under a temporary name and renamed into place, so a crash
    while creating it leaves nothing at `path` that looks like a store.
    """
    zarr = _zarr()
    target = Path(path)
    if target.exists():
        try:
            group = zarr.open_group(str(target), mode="r")
            old = dict(group.attrs).get("liftir")
        except Exception:
            old = None
        if old is None:
            raise InputError(f"{path} exists and is not a liftir genome store; remove it or "
                             f"choose another output")
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise InputError(f"{path} holds a different run (differs in: {', '.join(diff)}); "
                             f"remove it to start over, or choose another output")
        _sweep_torn_writes(target)
        return
    n = len(regions)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.creating")
    try:
        group = zarr.open_group(str(tmp), mode="w-")
        for name, dtype in (("onehot", "uint8"), ("contributions", "float32"),
                            ("hypothetical", "float32")):
            group.create_array(name, shape=(n, width, 4), chunks=(store_chunk, width, 4),
                               dtype=dtype, compressors=_compressors(), fill_value=0)
        group.create_array("delta", shape=(n,), chunks=(store_chunk,), dtype="float64",
                           compressors=_compressors(), fill_value=0)
        n_chunks = -(-n // store_chunk)
        for name in ("chunk_done", "chunk_non_acgt", "chunk_soft_masked"):
            group.create_array(name, shape=(n_chunks,), chunks=(1,),
                               dtype="uint8" if name == "chunk_done" else "int64", fill_value=0)
        reg = group.create_group("regions")
        for name in REGION_ARRAYS:
            values = getattr(regions, name)
            arr = reg.create_array(name, shape=(n,), chunks=(max(1, min(n, 1 << 16)),),
                                   dtype=values.dtype, compressors=_compressors(), fill_value=0)
            arr[:] = values
        group.attrs["chrom_names"] = list(regions.chrom_names)
        group.attrs["skipped_lines"] = [int(v) for v in regions.skipped_lines]
        group.attrs["liftir"] = config
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the temporary file of a Zarr write in flight (LocalStore: "<key>.<uuid4 hex>.partial")
_TORN_WRITE = re.compile(r".*\.[0-9a-f]{32}\.partial")


def _sweep_torn_writes(root: Path) -> None:
    """Delete the temporary files of writes a killed run left behind: they were never
    renamed into place, so they hold nothing the store reads, and a resumed run must end
    with exactly the files of an uninterrupted one."""
    for stale in root.rglob("*.partial"):
        if _TORN_WRITE.fullmatch(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)


def done_chunks(path: str) -> np.ndarray:
    """Boolean per store chunk: written completely by some earlier task or run."""
    zarr = _zarr()
    return zarr.open_array(str(Path(path) / "chunk_done"), mode="r")[:] == 1


def write_chunk(path: str, chunk: int, store_chunk: int, onehot: np.ndarray, actual: np.ndarray,
                hypothetical: np.ndarray, delta: np.ndarray, non_acgt: int, soft_masked: int) -> None:
    """Write one store chunk's rows, then (last) its done marker."""
    zarr = _zarr()
    root = Path(path)
    lo = chunk * store_chunk
    hi = lo + len(onehot)
    for name, values in (("onehot", onehot.astype(np.uint8)), ("contributions", actual),
                         ("hypothetical", hypothetical), ("delta", delta)):
        zarr.open_array(str(root / name), mode="r+")[lo:hi] = values
    zarr.open_array(str(root / "chunk_non_acgt"), mode="r+")[chunk] = non_acgt
    zarr.open_array(str(root / "chunk_soft_masked"), mode="r+")[chunk] = soft_masked
    zarr.open_array(str(root / "chunk_done"), mode="r+")[chunk] = 1


def finish(path: str, summary: dict) -> None:
    """Record the summary: the store is complete from here on."""
    _zarr().open_group(str(path), mode="r+").attrs["summary"] = summary


def open_store(path: str):
    """The store as a zarr group, checked to be a complete liftir genome store."""
    zarr = _zarr()
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path} is not a Zarr store: {exc}") from None
    attrs = dict(group.attrs)
    if "liftir" not in attrs:
        raise InputError(f"{path} is not a liftir genome store")
    if "summary" not in attrs:
        raise InputError(f"{path} is incomplete (an interrupted run): rerun the same command "
                         f"to finish it")
    return group


def export_modisco(path: str, out_dir: str) -> tuple[str, str]:
    """Write TF-MoDISco's inputs: ``ohe.npz`` and ``shap.npz`` (hypothetical), (N, 4, L).

    Then: ``modisco motifs -s ohe.npz -a shap.npz -n 2000 -o modisco_results.h5``.
    Each file is written under a temporary name and renamed, so it is complete or absent.
    """
    group = open_store(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, dtype in (("ohe.npz", "onehot", np.float32), ("shap.npz", "hypothetical", np.float32)):
        values = np.ascontiguousarray(np.asarray(group[key][:], dtype=dtype).transpose(0, 2, 1))
        final = out / name
        tmp = out / f".{name}.{uuid.uuid4().hex}.tmp.npz"
        try:
            np.savez(tmp, values)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(str(final))
    return written[0], written[1]
