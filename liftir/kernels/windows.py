"""Pooling windows as strided slices, one per kernel offset.

A pool with kernel k reads, for each of the prod(k) offsets inside the window, one
strided slice of the padded input: an array shaped like the output. MaxPool,
AveragePool and their backward passes are then a short loop over offsets (9 for a 3x3
kernel), each step a whole-array operation. Backward adds each offset's share into its
slice of the input gradient, so overlapping windows accumulate correctly (a max-unpool
that writes values, as Captum's does, overwrites them instead).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..compile.tracer import is_tracer


def pool_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                     dilation: int, ceil_mode: bool) -> int:
    span = dilation * (kernel - 1) + 1
    total = size + pad_begin + pad_end - span
    out = (math.ceil(total / stride) if ceil_mode else total // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window would start in the end padding: dropped (ONNX, PyTorch)
    return out


@dataclass(frozen=True)
class Windows:
    """Geometry of a pool over the trailing len(kernel) axes."""

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX [begin..., end...], as given
    out: tuple[int, ...]
    extra: tuple[int, ...]  # end padding added so every window of the output fits (ceil_mode)

    @classmethod
    def make(cls, spatial, kernel, strides, pads, dilations, ceil_mode=False) -> "Windows":
        nd = len(spatial)
        out, extra = [], []
        for d in range(nd):
            o = pool_output_size(spatial[d], kernel[d], strides[d], pads[d], pads[d + nd], dilations[d], ceil_mode)
            need = (o - 1) * strides[d] + dilations[d] * (kernel[d] - 1) + 1
            extra.append(max(0, need - (spatial[d] + pads[d] + pads[d + nd])))
            out.append(o)
        return cls(tuple(spatial), tuple(kernel), tuple(strides), tuple(dilations), tuple(pads),
                   tuple(out), tuple(extra))

    @property
    def nd(self) -> int:
        return len(self.kernel)

    def padded_shape(self) -> tuple[int, ...]:
        nd = self.nd
        return tuple(s + self.pads[d] + self.pads[d + nd] + self.extra[d] for d, s in enumerate(self.spatial))

    def pad(self, xp, x, fill):
        """x (..., *spatial) with explicit and ceil-mode padding filled with `fill`."""
        nd = self.nd
        if not any(self.pads) and not any(self.extra):
            return x
        out = xp.full(x.shape[:-nd] + self.padded_shape(), fill, dtype=x.dtype)
        out[(Ellipsis,) + tuple(slice(self.pads[d], self.pads[d] + s) for d, s in enumerate(self.spatial))] = x
        return out

    def unpad(self, x):
        return x[(Ellipsis,) + tuple(slice(self.pads[d], self.pads[d] + s) for d, s in enumerate(self.spatial))]

    @property
    def tiles(self) -> bool:
        """Windows that tile the input exactly (stride = kernel, no padding, no dilation):
        each input element lies in one window, at one offset."""
        return (self.strides == self.kernel and all(d == 1 for d in self.dilations) and not any(self.pads)
                and not any(self.extra) and all(o * k == s for o, k, s in zip(self.out, self.kernel, self.spatial)))

    def tiled(self, x):
        """A view of x (..., *spatial) as (..., out_1, k_1, out_2, k_2, ...) when `tiles`:
        offset (o_1, o_2, ...) of every window is then x_view[..., :, o_1, :, o_2, ...]."""
        shape = x.shape[:x.ndim - self.nd]
        for o, k in zip(self.out, self.kernel):
            shape += (o, k)
        return x.reshape(shape)

    def tile_index(self, offset: tuple[int, ...]):
        return (Ellipsis,) + tuple(part for o in offset for part in (slice(None), o))

    def offsets(self):
        """For each kernel offset, the slices of the padded input its window elements read."""
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            yield tuple(slice(o * dil, o * dil + (n - 1) * st + 1, st)
                        for o, dil, n, st in zip(offset, self.dilations, self.out, self.strides))

    def counts(self, include_pad: bool) -> np.ndarray:
        """How many elements each output window averages over (ONNX count_include_pad)."""
        inside = np.ones(self.spatial, dtype=np.float64)
        if include_pad:  # explicit pads count, the ceil-mode overhang does not
            nd = self.nd
            inside = np.pad(inside, [(self.pads[d], self.pads[d + nd]) for d in range(nd)], constant_values=1)
            inside = np.pad(inside, [(0, e) for e in self.extra])
            padded = inside
        else:
            padded = self.pad(np, inside, 0.0)
        total = np.zeros(self.out)
        for sl in self.offsets():
            total += padded[sl]
        return total


def window_max(xp, windows: Windows, x, best=None):
    """(max over each window, index of the first offset attaining it) for x (..., *spatial).

    Two passes: the running maximum (skipped when `best`, the pool's own output, is given:
    a max is exact, so it is the same array), then offsets in reverse marking where they
    equal it, so the first offset wins ties (one deterministic winner per window).
    """
    padded = windows.pad(xp, x, -np.inf)
    slices = [(Ellipsis,) + sl for sl in windows.offsets()]
    if best is None:
        best = padded[slices[0]].copy()
        for sl in slices[1:]:
            xp.maximum(best, padded[sl], out=best)
    first = xp.full(best.shape, len(slices) - 1, dtype=np.int16)
    for k in range(len(slices) - 2, -1, -1):
        if xp is np:
            np.putmask(first, padded[slices[k]] == best, k)
        else:
            first = xp.where(padded[slices[k]] == best, k, first).astype(np.int16)
    return best, first


def window_pieces(xp, windows: Windows, x, fill=-np.inf) -> list:
    """The elements of x (..., *spatial), padded with `fill`, at each window offset: one
    output-shaped array per offset (in `offsets` order). NumPy and CuPy take strided views.
    In a trace a strided Slice is a slow gather in onnxruntime (3.5 ms for one 3x3/2 pool
    offset of ResNet-18's stem, 9 of them per pass), so `_lattice_pieces` reads them from the
    stride lattices instead, where onnxruntime can."""
    if is_tracer(xp) and _lattice_block(windows, x.ndim):
        return _lattice_pieces(xp, windows, x, fill)
    padded = windows.pad(xp, x, fill)
    return [padded[(Ellipsis,) + sl] for sl in windows.offsets()]


def _lattice_block(windows: Windows, ndim: int) -> int:
    """The stride of a 1-D or 2-D pool whose strides are equal and above 1 (0 otherwise): the
    lattice step `_lattice_pieces` reads its offsets with."""
    if windows.nd not in (1, 2) or ndim <= windows.nd or len(set(windows.strides)) != 1 or windows.strides[0] < 2:
        return 0
    return windows.strides[0]


def _lattice_pieces(xp, windows: Windows, x, fill) -> list:
    """`window_pieces` of a padded input from its stride lattices: with stride s, offset o
    of axis d reads the positions of residue (o dil) mod s shifted by (o dil) // s lattice
    steps. Each window axis of n is viewed as (n / s, s) and its residues taken by slices of
    that residue axis, one axis at a time (onnxruntime runs a tensor's slices along one axis
    as one Split); then one step-1 slice per offset gives each piece. In onnxruntime, 1
    thread: 4x faster than strided slices (8x64x114x114: 7.2 against 30 ms for 9, through a
    SpaceToDepth then), and the residue slices 0.63x a SpaceToDepth and its split (a VGG
    pool's 16x32x64x64: 1.55 against 2.47 ms; a 1-D pool's 16x64x1024, 2 offsets: 0.32
    against 0.88 ms for strided slices). Copies only: the same bits."""
    s = _lattice_block(windows, x.ndim)
    # end padding up to whole blocks (never read by a window), in the same Pad
    whole = dataclasses.replace(windows, extra=tuple(e + -n % s for e, n in zip(windows.extra, windows.padded_shape())))
    padded = whole.pad(xp, x, fill)
    nd = windows.nd
    lead = padded.shape[:-nd]
    blocks = tuple(n // s for n in padded.shape[-nd:])
    lattices = {(): padded.reshape((-1,) + tuple(v for b in blocks for v in (b, s)))}  # (planes, b1, s, b2, s)
    for d in range(nd):
        at = (slice(None),) * (2 + 2 * d)
        lattices = {key + (r,): a[at + (slice(r, r + 1),)] for key, a in lattices.items() for r in range(s)}
    pieces = []
    for offset in itertools.product(*(range(k) for k in windows.kernel)):
        steps = [(o * dil % s, o * dil // s) for o, dil in zip(offset, windows.dilations)]
        piece = lattices[tuple(r for r, _ in steps)].reshape((-1,) + blocks)
        if any(q or n != b for (_, q), n, b in zip(steps, windows.out, blocks)):
            piece = piece[(slice(None),) + tuple(slice(q, q + n) for (_, q), n in zip(steps, windows.out))]
        pieces.append(piece.reshape(lead + tuple(windows.out)))
    return pieces


def window_max_hits(xp, windows: Windows, x, best=None):
    """(max over each window, one boolean mask per offset: where that offset holds the
    window's first maximum). The same winner as `window_max`, without an index array: the
    tiled max-rule backward multiplies by these masks directly. `best`: as in `window_max`."""
    pieces = window_pieces(xp, windows, x)
    if best is None:
        best = pieces[0].copy()
        for piece in pieces[1:]:
            xp.maximum(best, piece, out=best)
    hits, free = [], None
    for k, piece in enumerate(pieces):
        equal = piece == best
        if free is None:
            hits.append(equal)
            free = ~equal
        else:
            hits.append(equal & free)
            if k < len(pieces) - 1:
                free &= ~equal
    return best, hits


def untile(xp, windows: Windows, pieces, out) -> None:
    """Write one array per offset (in `offsets` order, each shaped like the pool's output)
    into `out`, for windows that tile the input: NumPy writes each into its strided view of
    `out` (one pass, no scatter); other array modules (the tracer, where strided writes
    become masked selects) interleave them by concatenation (`_interleave`)."""
    if xp is np:
        view = windows.tiled(out)
        for offset, piece in zip(itertools.product(*(range(k) for k in windows.kernel)), pieces):
            view[windows.tile_index(offset)] = piece
        return
    out[...] = _interleave(xp, windows, pieces).reshape(out.shape)


def _interleave(xp, windows: Windows, pieces):
    """The per-offset pieces of a tiling pool as one (..., *spatial) array: each viewed as
    (..., out_1, 1, out_2, 1), those of one row of offsets concatenated along the last unit
    axis, then the rows along the first (the inverse of `_lattice_pieces`' residue slices).
    In onnxruntime, 1 thread, a VGG pool's 16x32x32x32 pieces: 1.34 ms, against 1.75 for a
    stack on a new last axis and a transpose. Copies only: the same bits."""
    nd = windows.nd
    lead = tuple(pieces[0].shape[:pieces[0].ndim - nd])
    level = [p.reshape(lead + tuple(v for o in windows.out for v in (o, 1))) for p in pieces]
    for d in reversed(range(nd)):  # offsets are in C order: the last window axis varies fastest
        k = windows.kernel[d]
        level = [xp.concatenate(level[i:i + k], axis=len(lead) + 2 * d + 1) for i in range(0, len(level), k)]
    return level[0].reshape(lead + windows.spatial)


def route_to_winners(xp, windows: Windows, g, hits, out) -> None:
    """`untile` of g * hits[k] (a gradient routed to each window's winning offset), for
    windows that tile the input. In a trace the boolean hits are interleaved instead of the
    products (a quarter of the bytes, once for all targets) and g is spread over its windows
    by a nearest-neighbour Resize of 4-D planes: measured at 160x32x64x64 (1 thread), 62 ms
    against 99 for four casts and products and the float interleave. The same bits (g * 1, g * 0)."""
    nd = windows.nd
    if not is_tracer(xp) or nd > 2:  # onnxruntime's nearest Resize of a 5-D tensor is 13x its 4-D one
        untile(xp, windows, [g * hit for hit in hits], out)
        return
    lead = g.shape[:g.ndim - nd]
    planes = g.reshape((int(np.prod(lead)),) + (1,) * (3 - nd) + tuple(windows.out))  # 4-D: its fast kernel
    scales = np.array([1.0] * (4 - nd) + [float(k) for k in windows.kernel], np.float32)
    spread = xp.emit_node("Resize", [planes, None, scales], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                             "nearest_mode": "floor"},
                          out_shape=planes.shape[:4 - nd] + windows.spatial)
    out[...] = spread.reshape(lead + windows.spatial) * _interleave(xp, windows, hits)


def scatter_to_windows(xp, windows: Windows, lead: tuple[int, ...], pieces, dtype):
    """Sum per-offset values into the (unpadded) input: pieces(k) -> values for offset k or None."""
    grad = xp.zeros(lead + windows.padded_shape(), dtype=dtype)
    for k, sl in enumerate(windows.offsets()):
        values = pieces(k)
        if values is not None:
            grad[(Ellipsis,) + sl] += values
    return windows.unpad(grad)
