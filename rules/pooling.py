"""Max operations (paper 2.3.2): MaxPool, GlobalMaxPool, ReduceMax.

Two DeepLIFT rules, chosen with `Explainer(max_rule=...)`:

- "cross_max" (default): with M = max(y, y0), the actual argmax gets contribution
  M - y0 and the reference argmax gets y - M, each divided by that position's dx. It
  equals the paper's rule wherever y >= y0, keeps multipliers in [0, 1], and is the rule
  Captum, SHAP and tangermeme use.
- "paper": the literal m = 1{A_x = A_y} dy/dx at the actual argmax (eq. 11). Where the
  actual max is below the reference max, dx at the argmax can be tiny and multipliers
  explode; where dx is exactly 0 (while y != y0) the rule is undefined and liftir falls
  back to the gradient there: summation-to-delta then fails at that window, as the paper's
  rule must, and the Explainer warns (liftir.diagnostics.ConvergenceWarning).

Contributions from every window are scatter-added before dividing by dx, so overlapping
windows accumulate (Captum's max-unpool overwrites them). Gradient methods route the
multiplier through the actual pass's switches (argmax positions).
"""
from __future__ import annotations

import itertools

import numpy as np

from liftir.kernels.parallel import over_rows
from liftir.kernels.windows import (route_to_winners, scatter_to_windows, untile, window_max, window_max_hits,
                                    window_pieces)
from liftir.errors import InputError, ModelLoadError
from liftir.methods import MaxRule, Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, RuleError, blend, difference, is_tracer

from .linear import _Pool, _pool_geometry, _reduce_axes


def paper_rule(ctx) -> bool:
    return ctx.options.get("max_rule", MaxRule.CROSS_MAX) == MaxRule.PAPER


def window_share(ctx, g, y, y0):
    """What each window's output multiplier g gives its argmaxes, by the max rule chosen
    (module docstring), as one value and the side that takes it: (g (y - y0), y >= y0), the
    mask True where the actual argmax takes it (None: always, the paper rule).

    Under cross_max the actual argmax's share g (M - y0) and the reference argmax's
    g (y - M) are never both nonzero (where y >= y0, M = y and the reference's vanishes;
    elsewhere M = y0 and the actual's does), so placing the one difference at the argmax
    of its side gives both (up to the sign of a zero) with one product instead of two."""
    share = g * (y - y0)
    return share, None if paper_rule(ctx) else y >= y0


def _taker(hit_actual, hit_reference, actual_side, other_side):
    """Where offset k holds the argmax that takes its window's share (boolean)."""
    if actual_side is None:
        return hit_actual
    return (hit_actual & actual_side) | (hit_reference & other_side)


def quotient_or_gradient(xp, contrib, dx, gradient, vanishing: bool = False):
    """contrib / dx, and the gradient where dx == 0 (there the contribution is 0 by
    construction; like Captum, pass the gradient). Both branches are finite: `blend`.

    `vanishing`: contrib is exactly 0 wherever dx == 0, as cross_max's is (a position that
    did not move is the actual argmax only where y <= y0, where its share M - y0 is 0, and
    the reference argmax only where y >= y0, where y - M is 0). Then in a trace
    (contrib + gradient z) / (dx + z) with z = 1{dx == 0} gives the same values in five
    passes instead of two blends' ten (the paper rule's contribution need not vanish there).
    """
    if vanishing and is_tracer(xp):
        still = (dx == 0).astype(dx.dtype)
        return (contrib + gradient * still) / (dx + still)
    nonzero = dx != 0
    return blend(xp, nonzero, contrib / blend(xp, nonzero, dx, 1), gradient)


def max_rule_multipliers(ctx, g, x, x0, y, y0, place):
    """Input multipliers of a max from output multipliers g (K, ...).

    `place(values, side)` puts per-output values at the argmax of each output's window
    into an input-shaped array: the actual pass's argmax, or with a `side` mask
    (`window_share`) the actual's where it is True and the reference's where it is False.
    """
    xp = ctx.xp
    if ctx.mode != Mode.DEEPLIFT:
        return place(g, None)
    share, actual_side = window_share(ctx, g, y, y0)
    contrib = place(share, actual_side)
    dx = difference(xp, x, x0)  # a masked -inf in both passes did not move (not NaN)
    nonzero = dx != 0
    if bool(nonzero.all()):
        return contrib / dx
    return quotient_or_gradient(xp, contrib, dx, place(g, None), vanishing=actual_side is not None)


class _MaxRule(Rule):
    modes = MODES
    paper_rule = "max (2.3.2): cross_max (default) or paper"

    def describe(self, mode):
        return "switches (gradient)" if mode != Mode.DEEPLIFT else self.paper_rule


@builtin_rule("MaxPool")
class MaxPool(_Pool, _MaxRule):
    def forward(self, ctx, x):
        xp = ctx.xp
        if ctx.attr("storage_order", 0) and len(ctx.node.outputs) > 1:
            raise RuleError(f"MaxPool node {ctx.node.name!r}: column-major Indices are not supported")
        windows = _pool_geometry(ctx, x.shape[2:])
        y, first = window_max(xp, windows, x)
        if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
            return y, self._indices(xp, windows, first, x.shape)
        return y

    @staticmethod
    def _indices(xp, windows, first, shape):
        """ONNX Indices: flat positions into the (N, C, *spatial) input."""
        offsets = xp.asarray(np.array(list(itertools.product(*(range(k) for k in windows.kernel)))))
        flat = xp.zeros(first.shape, dtype=np.int64)
        for d in range(windows.nd):
            grid_shape = [1] * first.ndim
            grid_shape[2 + d] = windows.out[d]
            start = xp.arange(windows.out[d]).reshape(grid_shape) * windows.strides[d] - windows.pads[d]
            coord = start + offsets[first.astype(np.int64), d] * windows.dilations[d]
            flat = flat * shape[2 + d] + coord
        base = xp.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape[:2] + (1,) * windows.nd)
        return flat + base * int(np.prod(shape[2:]))

    def backward(self, ctx, g, *unused):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        windows = _pool_geometry(ctx, shape[2:])
        x, x0, y = ctx.x(0), ctx.x0(0), ctx.y(0)
        rows = shape[0]
        tiled = windows.tiles
        # the forward's maxima (1 or P reference rows) serve the winners: no max recomputed
        reference = None if x0 is None else _winners(xp, windows, x0, tiled, ctx.y0(0))
        out = xp.empty(g.shape[:1] + tuple(shape), dtype=g.dtype)

        def rows_of(a, s):
            return a[s] if a.shape[0] == rows else a

        def work(s):  # samples are independent: row chunks run on parallel threads
            ref = None if reference is None else (rows_of(reference[0], s), [rows_of(h, s) for h in reference[1]]
                                                  if isinstance(reference[1], list) else rows_of(reference[1], s))
            x0_rows = rows_of(x0, s) if x0 is not None else None
            if tiled:
                self._tiled_multipliers(ctx, windows, g[:, s], x[s], y[s], x0_rows, ref, out[:, s])
            else:
                out[:, s] = self._multipliers(ctx, windows, g[:, s], x[s], y[s], x0_rows, ref)

        over_rows(xp, work, rows, g.size)
        return (out,)

    @staticmethod
    def _tiled_multipliers(ctx, windows, g, x, y, x0, reference, out):
        """`_multipliers` for windows that tile the input (stride = kernel, the common 2x2
        pool): each input element is one offset of one window, so each offset's multipliers
        are computed at the output's size and written once into `out` (K, P, ...), with no
        scatter-add, no zeroed buffers and no input-sized `where` (the same arithmetic, so
        the same bits, as the general path)."""
        xp = ctx.xp
        y, hits_a = window_max_hits(xp, windows, x, y)
        if ctx.mode != Mode.DEEPLIFT:
            route_to_winners(xp, windows, g, hits_a, out)
            return
        y0, hits_r = reference
        share, actual_side = window_share(ctx, g, y, y0)
        other_side = None if actual_side is None else ~actual_side
        xs, x0s = window_pieces(xp, windows, x), window_pieces(xp, windows, x0)
        pieces = []
        for k in range(len(xs)):
            contrib = share * _taker(hits_a[k], hits_r[k], actual_side, other_side)
            dx = xs[k] - x0s[k]
            nonzero = dx != 0
            if bool(nonzero.all()):
                pieces.append(contrib / dx)
            else:
                pieces.append(quotient_or_gradient(xp, contrib, dx, g * hits_a[k], actual_side is not None))
        untile(xp, windows, pieces, out)

    @staticmethod
    def _multipliers(ctx, windows, g, x, y, x0, reference):
        """max_rule_multipliers for one chunk of rows, its scatters fused in one loop."""
        xp = ctx.xp
        y, hit_a = _winner_masks(*_winners(xp, windows, x, best=y))
        if ctx.mode != Mode.DEEPLIFT:
            return scatter_to_windows(xp, windows, g.shape[:3], lambda k: g * hit_a(k), g.dtype)
        y0, hit_r = _winner_masks(*reference)
        share, actual_side = window_share(ctx, g, y, y0)
        other_side = None if actual_side is None else ~actual_side
        dx = x - x0
        nonzero = dx != 0
        # where dx == 0 the contribution is 0 by construction; like Captum, pass the gradient
        # there (needed only if such positions exist: rare after a conv, common after a ReLU)
        need_gradient = not bool(nonzero.all())
        # cross_max: the gradient rides in the contributions' scatter (`_still_argmax`)
        fold = need_gradient and actual_side is not None
        x0_pieces = window_pieces(xp, windows, x0) if fold else None
        lead = g.shape[:3]
        contrib = xp.zeros(lead + windows.padded_shape(), dtype=g.dtype)
        gradient = xp.zeros(lead + windows.padded_shape(), dtype=g.dtype) if need_gradient and not fold else None
        for k, sl in enumerate(windows.offsets()):
            index = (Ellipsis,) + sl
            hit = hit_a(k)
            values = share * _taker(hit, hit_r(k), actual_side, other_side)
            if fold:
                values = values + g * _still_argmax(hit, y, x0_pieces[k])
            contrib[index] += values
            if gradient is not None:
                gradient[index] += g * hit
        contrib = windows.unpad(contrib)
        if not need_gradient:
            return contrib / dx
        if fold:
            return _quotient_or_itself(xp, contrib, dx, nonzero)
        return quotient_or_gradient(xp, contrib, dx, windows.unpad(gradient), actual_side is not None)


def _still_argmax(hit, y, x0_piece):
    """Where offset k holds its window's actual argmax and that position did not move (its
    x, the window's max y, equals x0 there): the positions whose multiplier is the gradient.

    Under cross_max the contribution a position receives from every window is exactly 0 where
    it did not move (`quotient_or_gradient`), so adding each window's g there instead, in the
    same scatter, leaves the sum at every moving position as it was and makes it the
    gradient at the others: one scatter where two took ~40% of an overlapping pool's
    backward (ResNet's 3x3/2 stem, profiled), at two comparisons and a product per offset."""
    return hit & (y == x0_piece)


def _quotient_or_itself(xp, numerator, dx, nonzero):
    """numerator / dx where dx != 0, the numerator itself elsewhere (the same bits as
    `quotient_or_gradient` of the unfolded sums): in a trace numerator / (dx + 1{dx == 0})."""
    if is_tracer(xp):
        return numerator / (dx + (~nonzero).astype(dx.dtype))
    return blend(xp, nonzero, numerator / blend(xp, nonzero, dx, 1), numerator)


def _winners(xp, windows, x, tiled=False, best=None):
    """(max over each window, its winners): for NumPy's general path the index of each
    window's first max (one int16 array, filled by putmask), elsewhere one boolean mask per
    offset (the tracer would otherwise emit one full-size `where` per offset, and onnxruntime's
    Where costs 10-20x a comparison). The same winners either way."""
    return (window_max_hits if tiled or xp is not np else window_max)(xp, windows, x, best)


def _winner_masks(best, winners):
    """(best, k -> where offset k holds the window's first max) from either form of `_winners`."""
    if isinstance(winners, list):
        return best, winners.__getitem__
    return best, lambda k: winners == k


def _as_rows(xp, x, axes):
    """Move reduced axes last and flatten them: (rows..., S), and how to undo it."""
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = x.transpose(rest + list(axes))
    return moved.reshape(moved.shape[: len(rest)] + (-1,)), moved.shape, rest + list(axes)


@builtin_rule("GlobalMaxPool", "ReduceMax")
class ReduceMax(_MaxRule):
    def _axes(self, ctx, ndim):
        if ctx.node.op_type == "GlobalMaxPool":
            return list(range(2, ndim))
        return _reduce_axes(ctx, ndim)

    def check_shapes(self, node, shapes):
        """A declared empty axis among the reduced ones is refused at build."""
        shape = shapes[0] if shapes else None
        if shape is None or node.op_type != "ReduceMax" or len(node.inputs) > 1:
            return  # axes given as an input (opset 18) are checked at call time
        axes = node.attrs.get("axes")
        if axes is None and not node.attrs.get("noop_with_empty_axes", 0):
            axes = range(len(shape))
        empty = [a % len(shape) for a in (axes or []) if shape[a % len(shape)] == 0]
        if empty:
            raise ModelLoadError(f"ReduceMax node {node.name!r} takes the max over axis {empty[0]} of "
                                 f"its input of declared shape {shape}, which is empty")

    def _keepdims(self, ctx):
        return ctx.node.op_type == "GlobalMaxPool" or bool(ctx.attr("keepdims", 1))

    def forward(self, ctx, x, *unused):
        axes = self._axes(ctx, x.ndim)
        if not axes:
            return x
        empty = [a for a in axes if x.shape[a] == 0]
        if empty:  # ONNX would give -inf, from which no difference-from-reference is defined
            raise InputError(f"{ctx.node.op_type} node {ctx.node.name!r} takes the max over axis "
                             f"{empty[0]} of its input of shape {tuple(x.shape)}, which is empty")
        return x.max(axis=tuple(axes), keepdims=self._keepdims(ctx))

    def backward(self, ctx, g, *unused):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        axes = self._axes(ctx, len(shape))
        if not axes:
            return g, None
        k = g.shape[0]
        x, moved_shape, perm = _as_rows(xp, ctx.x(0), axes)
        pos_a = x.argmax(axis=-1)[..., None]
        y = xp.take_along_axis(x, pos_a, axis=-1)[..., 0]
        x0 = ctx.x0(0)
        if x0 is not None:
            x0, _, _ = _as_rows(xp, xp.broadcast_to(x0, shape), axes)
            pos_r = x0.argmax(axis=-1)[..., None]
            y0 = xp.take_along_axis(x0, pos_r, axis=-1)[..., 0]
        else:
            x0, pos_r, y0 = x, pos_a, y
        rows = g.reshape((k,) + y.shape)

        positions = xp.arange(x.shape[-1])

        def place(values, side):
            # one-hot placement (an argmax mask per row), which needs nothing beyond
            # broadcasting on any backend
            taker = positions == pos_a
            if side is not None:
                side = side[..., None]
                taker = _taker(taker, positions == pos_r, side, ~side)
            return values[..., None] * taker

        m = max_rule_multipliers(ctx, rows, x, x0, y, y0, place)
        m = m.reshape((k,) + moved_shape).transpose([0] + [p + 1 for p in np.argsort(perm)])
        return m, None
