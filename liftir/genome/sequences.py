"""Where the one-hot sequences of a chunk come from: an indexed FASTA or one-hot arrays.

A source is a small picklable description (paths, names) that opens its file lazily in
the process that reads it, so a Dask worker opens the FASTA once and reuses it. Every
source hands out (n, L, 4) float32 one-hot rows in A, C, G, T order plus the counts the
summary reports: N and other non-ACGT bases become all-zero columns (they add nothing
to any contribution), and lower-case soft-masked bases are read as upper case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .regions import Regions

_CODE = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    _CODE[ord(_b)] = _i
    _CODE[ord(_b.lower())] = _i
_LOWER = np.zeros(256, dtype=bool)
_LOWER[[ord(c) for c in "acgtn"]] = True
_EYE = np.eye(5, 4, dtype=np.float32)


def encode_bytes(seqs: np.ndarray) -> tuple[np.ndarray, int, int]:
    """ASCII codes (n, L) uint8 -> one-hot (n, L, 4), count of non-ACGT, count of soft-masked."""
    codes = _CODE[seqs]
    return _EYE[codes], int((codes == 4).sum()), int(_LOWER[seqs].sum())


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"the genome pipeline needs {module!r}: pip install 'liftir[genome]'") from None


@dataclass
class FastaSource:
    """Windows of an indexed FASTA (pyfaidx; the .fai index is built on first use)."""
    path: str
    _fasta: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {"path": self.path, "_fasta": None}

    def open(self):
        if self._fasta is None:
            pyfaidx = _require("pyfaidx")
            path = Path(self.path)
            if not path.is_file():
                raise InputError(f"FASTA file {self.path!r} does not exist")
            if path.stat().st_size == 0:
                raise InputError(f"FASTA file {self.path!r} is empty")
            try:
                self._fasta = pyfaidx.Fasta(self.path, as_raw=True, sequence_always_upper=False,
                                            rebuild=False)
            except Exception as exc:  # pyfaidx's FastaIndexingError & co. on a malformed file
                raise InputError(f"FASTA file {self.path!r} cannot be indexed: {exc}") from None
            if len(self._fasta.keys()) == 0:
                raise InputError(f"FASTA file {self.path!r} has no sequences")
        return self._fasta

    def chrom_sizes(self) -> dict[str, int]:
        fasta = self.open()
        return {name: len(fasta[name]) for name in fasta.keys()}

    def fetch(self, regions: Regions) -> tuple[np.ndarray, int, int]:
        """One-hot windows of `regions`; bases beyond a chromosome end read as N."""
        fasta = self.open()
        width = int(regions.end[0] - regions.start[0]) if len(regions) else 0
        raw = np.full((len(regions), width), ord("N"), dtype=np.uint8)
        pad = 0
        for row, (code, lo, hi) in enumerate(zip(regions.chrom, regions.start, regions.end)):
            record = fasta[regions.chrom_names[code]]
            a, b = max(int(lo), 0), min(int(hi), len(record))
            if b > a:
                raw[row, a - lo:b - lo] = np.frombuffer(record[a:b].encode("ascii"), dtype=np.uint8)
            pad += width - max(b - a, 0)
        onehot, non_acgt, masked = encode_bytes(raw)
        return onehot, non_acgt - pad, masked


@dataclass
class ArraySource:
    """One-hot rows of an array file: .npy (memory-mapped), .npz, HDF5 (.h5/.hdf5) or Zarr.

    ``key`` names the array inside an .npz / HDF5 / Zarr group (default: its only one).
    ``channels_first`` is decided from the shape: (N, 4, L) when axis 1 has 4 entries.
    """
    path: str
    key: str | None = None
    _array: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "_array": None}

    def open(self):
        if self._array is None:
            self._array = _open_array(Path(self.path), self.key)
            shape = self._array.shape
            if len(shape) != 3 or 4 not in (shape[1], shape[2]):
                raise InputError(f"{self.path}: one-hot sequences must have shape (N, L, 4) or "
                                 f"(N, 4, L), got {shape}")
        return self._array

    @property
    def channels_first(self) -> bool:
        shape = self.open().shape
        return shape[1] == 4 and shape[2] != 4

    def regions(self) -> Regions:
        arr = self.open()
        n = arr.shape[0]
        if n == 0:
            raise InputError(f"{self.path}: the array holds no sequences")
        width = arr.shape[2] if self.channels_first else arr.shape[1]
        idx = np.arange(n, dtype=np.int64)
        return Regions(["row"], np.zeros(n, np.int32), np.zeros(n, np.int64),
                       np.full(n, width, np.int64), idx + 1, idx, [])

    def fetch(self, regions: Regions) -> tuple[np.ndarray, int, int]:
        arr = self.open()
        lo, hi = int(regions.index[0]), int(regions.index[-1]) + 1
        x = np.asarray(arr[lo:hi], dtype=np.float32)
        if self.channels_first:
            x = np.ascontiguousarray(x.transpose(0, 2, 1))
        if not np.all((x == 0) | (x == 1)) or np.any(x.sum(axis=2) > 1):
            raise InputError(f"{self.path}: rows {lo}..{hi - 1} are not one-hot (entries 0/1, at "
                             f"most one 1 per position)")
        return x, int((x.sum(axis=2) == 0).sum()), 0


def _open_array(path: Path, key: str | None):
    if not path.exists():
        raise InputError(f"sequence file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".npz":
        with np.load(path) as data:
            return data[_pick_key(list(data.files), key, path)]
    if suffix in (".h5", ".hdf5"):
        h5py = _require("h5py")
        handle = h5py.File(path, "r")
        return handle[_pick_key(list(handle.keys()), key, path)]
    if suffix == ".zarr" or path.is_dir():
        zarr = _require("zarr")
        node = zarr.open(str(path), mode="r")
        if hasattr(node, "shape"):
            return node
        return node[_pick_key(list(node.array_keys()), key, path)]
    raise InputError(f"{path}: sequences must be a FASTA (with --bed) or a .npy/.npz/.h5/.zarr "
                     f"one-hot array")


def _pick_key(keys: list[str], key: str | None, path: Path) -> str:
    if key is not None:
        if key not in keys:
            raise InputError(f"{path}: no array {key!r}; it holds {keys}")
        return key
    if len(keys) != 1:
        raise InputError(f"{path} holds {len(keys)} arrays {keys}; name one (key=... / --key)")
    return keys[0]
