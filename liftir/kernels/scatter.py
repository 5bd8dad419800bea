"""Scatter-add along the last axis: the transpose of a gather with repeated indices."""
from __future__ import annotations


def scatter_add(xp, values, positions, size: int):
    """Sum `values` (B, M) into (B, size) at `positions` (B, M) or (M,); negatives dropped.

    One `bincount` over row-offset positions: vectorized, and it accumulates repeats
    (fancy-index assignment would keep only the last).
    """
    b = values.shape[0]
    positions = xp.broadcast_to(xp.asarray(positions), values.shape)
    keep = positions >= 0
    offsets = xp.arange(b, dtype=xp.int64)[:, None] * (size + 1)
    flat = xp.where(keep, positions, size) + offsets
    out = xp.bincount(flat.ravel(), weights=values.ravel().astype(xp.float64), minlength=b * (size + 1))
    return out.reshape(b, size + 1)[:, :size].astype(values.dtype)
