"""Pooling windows as index maps: which input position each window element reads.

MaxPool, AveragePool and their backward passes all reduce to gathering with, and
scatter-adding through, one small integer map per node (computed once on the host).
Scatter-adding with `bincount` accumulates overlapping windows correctly, which a
max-unpool that writes (overwrites) values does not.
"""
from __future__ import annotations

import math

import numpy as np

PAD = -1  # window element in the explicit padding
OUTSIDE = -2  # window element past the padded input (ceil_mode overhang)


def pool_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                     dilation: int, ceil_mode: bool) -> int:
    span = dilation * (kernel - 1) + 1
    total = size + pad_begin + pad_end - span
    out = (math.ceil(total / stride) if ceil_mode else total // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window would start in the end padding: dropped (ONNX, PyTorch)
    return out


def window_index(spatial: tuple[int, ...], kernel, strides, pads, dilations, ceil_mode=False):
    """(index (prod(out), prod(kernel)) into the flat unpadded input, PAD/OUTSIDE elsewhere; out shape)."""
    nd = len(spatial)
    axes_idx, out_shape = [], []
    for d in range(nd):
        out = pool_output_size(spatial[d], kernel[d], strides[d], pads[d], pads[d + nd], dilations[d], ceil_mode)
        starts = np.arange(out) * strides[d] - pads[d]
        pos = starts[:, None] + np.arange(kernel[d])[None, :] * dilations[d]  # (out, k)
        code = np.where((pos >= 0) & (pos < spatial[d]), pos,
                        np.where(pos < spatial[d] + pads[d + nd], PAD, OUTSIDE))
        axes_idx.append(code)
        out_shape.append(out)
    # combine per-axis positions into flat indices over all axes: (o1..on, k1..kn)
    flat = np.zeros([1] * (2 * nd), dtype=np.int64)
    status = np.zeros([1] * (2 * nd), dtype=np.int64)  # 0 inside, 1 pad, 2 outside
    stride_flat = 1
    for d in reversed(range(nd)):
        shape = [1] * (2 * nd)
        shape[d], shape[nd + d] = axes_idx[d].shape
        code = axes_idx[d].reshape(shape)
        flat = flat + np.where(code >= 0, code, 0) * stride_flat
        status = np.maximum(status, np.where(code == OUTSIDE, 2, np.where(code == PAD, 1, 0)))
        stride_flat *= spatial[d]
    index = np.where(status == 0, flat, np.where(status == 1, PAD, OUTSIDE))
    n_out, n_k = int(np.prod(out_shape)), int(np.prod(kernel))
    return index.reshape(n_out, n_k), tuple(out_shape)


def gather_windows(xp, x_flat, index, fill):
    """x_flat (B, S) -> (B, O, K) window elements; padding reads `fill`."""
    b, s = x_flat.shape
    ext = xp.concatenate([x_flat, xp.full((b, 1), fill, dtype=x_flat.dtype)], axis=1)
    safe = xp.asarray(np.where(index >= 0, index, s))
    return ext[:, safe]


def scatter_add(xp, values, positions, size: int):
    """Sum `values` (B, M) into (B, size) at `positions` (B, M) or (M,); negatives dropped."""
    b = values.shape[0]
    positions = xp.broadcast_to(xp.asarray(positions), values.shape)
    keep = positions >= 0
    offsets = xp.arange(b, dtype=xp.int64)[:, None] * (size + 1)
    flat = xp.where(keep, positions, size) + offsets
    out = xp.bincount(flat.ravel(), weights=values.ravel().astype(xp.float64), minlength=b * (size + 1))
    return out.reshape(b, size + 1)[:, :size].astype(values.dtype)
