"""References for a chunk of regions, made inside the chunk and never for the whole job.

Dinucleotide shuffles of region i are drawn from the seed (seed, i), i the region's
record index, so they are the same whatever chunk, worker or restart computes them.
The other kinds are deterministic: all-zero, a fixed base composition (GC background),
or the user's own (S, L, 4) references shared by every region.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..genomics import dinucleotide_shuffle

KINDS = ("shuffle", "zeros", "gc", "file")


@dataclass(frozen=True)
class ReferenceSpec:
    """How to build each region's references.

    kind : "shuffle" (``n`` dinucleotide shuffles), "zeros" (one all-zero reference),
        "gc" (one reference of base frequencies (1-gc)/2, gc/2, gc/2, (1-gc)/2 for A, C,
        G, T) or "file" (the (S, L, 4) array of ``path``, shared by all regions).
    """
    kind: str = "shuffle"
    n: int = 20
    seed: int = 0
    gc: float = 0.41
    path: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"reference kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "shuffle" and (not isinstance(self.n, int) or self.n < 1):
            raise InputError(f"the number of shuffles must be a positive int, got {self.n!r}")
        if self.kind == "gc" and not 0.0 <= self.gc <= 1.0:
            raise InputError(f"gc must lie in [0, 1], got {self.gc}")
        if self.kind == "file" and not self.path:
            raise InputError("reference kind 'file' needs a path to an (S, L, 4) .npy")

    def describe(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == "shuffle":
            out.update(shuffles=self.n, seed=self.seed)
        elif self.kind == "gc":
            out["gc"] = self.gc
        elif self.kind == "file":
            out["path"] = str(self.path)
        return out


def load_reference_file(path: str, width: int) -> np.ndarray:
    """The user's references as (S, L, 4) float32 (an (L, 4) or (S, 4, L) array is accepted)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read references {path!r}: {exc}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3 and arr.shape[1] == 4 and arr.shape[2] == width and width != 4:
        arr = arr.transpose(0, 2, 1)
    if arr.ndim != 3 or arr.shape[1:] != (width, 4):
        raise InputError(f"references {path!r} must have shape (S, {width}, 4), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"references {path!r} contain NaN or Inf")
    return np.ascontiguousarray(arr)


def make_references(spec: ReferenceSpec, onehot: np.ndarray, index: np.ndarray,
                    user: np.ndarray | None = None) -> np.ndarray:
    """References (n, S, L, 4) for the chunk's one-hot rows (n, L, 4) of record indices `index`."""
    n, width, _ = onehot.shape
    if spec.kind == "shuffle":
        seeds = [(int(spec.seed), int(i)) for i in index]
        return dinucleotide_shuffle(onehot, spec.n, seeds=seeds)
    if spec.kind == "zeros":
        ref = np.zeros((1, width, 4), np.float32)
    elif spec.kind == "gc":
        at, gc = (1.0 - spec.gc) / 2.0, spec.gc / 2.0
        ref = np.broadcast_to(np.asarray([at, gc, gc, at], np.float32), (1, width, 4))
    else:
        ref = user
    return np.broadcast_to(ref[None], (n,) + ref.shape)
