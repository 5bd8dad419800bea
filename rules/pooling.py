"""Max operations (paper 2.3.2): MaxPool, GlobalMaxPool, ReduceMax.

Two DeepLIFT rules, chosen with `Explainer(max_rule=...)`:

- "cross_max" (default): with M = max(y, y0), the actual argmax gets contribution
  M - y0 and the reference argmax gets y - M, each divided by that position's dx. It
  equals the paper's rule wherever y >= y0, keeps multipliers in [0, 1], and is the rule
  Captum, SHAP and tangermeme use.
- "paper": the literal m = 1{A_x = A_y} dy/dx at the actual argmax (eq. 11). Where the
  actual max is below the reference max, dx at the argmax can be tiny and multipliers
  explode; where dx is exactly 0 the rule is undefined and liftir falls back to the
  gradient there (summation-to-delta then fails at that window, as the paper's rule must).

Contributions from every window are scatter-added before dividing by dx, so overlapping
windows accumulate (Captum's max-unpool overwrites them). Gradient methods route the
multiplier through the actual pass's switches (argmax positions).
"""
from __future__ import annotations

import numpy as np

from liftir.kernels.windows import gather_windows, scatter_add
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, RuleError

from .linear import _pool_geometry, _reduce_axes


def _window_max(xp, x_flat, index_dev, index):
    """(max (B, O), flat input position of the first argmax (B, O)) of each window."""
    win = gather_windows(xp, x_flat, index, -np.inf)
    local = win.argmax(axis=-1)
    pos = index_dev[xp.arange(index.shape[0])[None, :], local]
    return xp.take_along_axis(win, local[..., None], axis=-1)[..., 0], pos


def max_multipliers(ctx, g, x_flat, x0_flat, index):
    """Input multipliers (K, B, S) from output multipliers g (K, B, O) of a windowed max."""
    xp = ctx.xp
    key = ("index_dev", index.shape, ctx.xp.__name__)
    if key not in ctx.cache:
        ctx.cache[key] = xp.asarray(index)
    index_dev = ctx.cache[key]
    k, b, o = g.shape
    s = x_flat.shape[1]
    y, pos_a = _window_max(xp, x_flat, index_dev, index)
    rows = k * b

    def scatter(values, positions):  # values (K, B, O'), positions (B, O')
        pos = xp.broadcast_to(positions[None], values.shape).reshape(rows, -1)
        return scatter_add(xp, values.reshape(rows, -1), pos, s).reshape(k, b, s)

    gradient = scatter(g, pos_a)
    if ctx.mode != "deeplift":
        return gradient
    y0, pos_r = _window_max(xp, x0_flat, index_dev, index)  # R rows: 1 or B
    y0 = xp.broadcast_to(y0, y.shape)
    pos_r = xp.broadcast_to(pos_r, pos_a.shape)
    if ctx.options.get("max_rule", "cross_max") == "paper":
        contrib = scatter(g * (y - y0), pos_a)
    else:
        top = xp.maximum(y, y0)
        contrib = scatter(xp.concatenate([g * (top - y0), g * (y - top)], axis=-1),
                          xp.concatenate([pos_a, pos_r], axis=-1))
    dx = x_flat - x0_flat
    nonzero = dx != 0
    return xp.where(nonzero, contrib / xp.where(nonzero, dx, 1), gradient)


class _MaxRule(Rule):
    modes = MODES
    paper_rule = "max (2.3.2): cross_max (default) or paper"

    def describe(self, mode):
        return "switches (gradient)" if mode != "deeplift" else self.paper_rule


@builtin_rule("MaxPool")
class MaxPool(_MaxRule):
    def forward(self, ctx, x):
        xp = ctx.xp
        if ctx.attr("storage_order", 0) and len(ctx.node.outputs) > 1:
            raise RuleError(f"MaxPool node {ctx.node.name!r}: column-major Indices are not supported")
        index, out_shape = _pool_geometry(ctx, x.shape[2:])
        b, c = x.shape[:2]
        key = ("index_dev", index.shape, xp.__name__)
        if key not in ctx.cache:
            ctx.cache[key] = xp.asarray(index)
        y, pos = _window_max(xp, x.reshape(b * c, -1), ctx.cache[key], index)
        y = y.reshape((b, c) + out_shape)
        if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
            spatial = int(np.prod(x.shape[2:]))
            base = xp.arange(b * c, dtype=xp.int64)[:, None] * spatial
            return y, (pos + base).reshape((b, c) + out_shape)
        return y

    def backward(self, ctx, g, *unused):
        shape = ctx.input_shape(0)
        index, _ = _pool_geometry(ctx, shape[2:])
        k = g.shape[0]
        bc = shape[0] * shape[1]
        x = ctx.x(0).reshape(bc, -1)
        x0 = ctx.x0(0)
        x0 = None if x0 is None else ctx.xp.broadcast_to(x0, shape).reshape(bc, -1)
        m = max_multipliers(ctx, g.reshape(k, bc, -1), x, x0, index)
        return (m.reshape((k,) + shape),)


def _as_reduction(xp, x, axes):
    """Move reduced axes last: (B', S) rows and how to undo it."""
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = x.transpose(rest + list(axes))
    return moved.reshape(int(np.prod(moved.shape[: len(rest)])), -1), moved.shape, rest + list(axes)


@builtin_rule("GlobalMaxPool", "ReduceMax")
class ReduceMax(_MaxRule):
    def _axes(self, ctx, ndim):
        if ctx.node.op_type == "GlobalMaxPool":
            return list(range(2, ndim))
        return _reduce_axes(ctx, ndim)

    def _keepdims(self, ctx):
        return ctx.node.op_type == "GlobalMaxPool" or bool(ctx.attr("keepdims", 1))

    def forward(self, ctx, x, *unused):
        axes = self._axes(ctx, x.ndim)
        if not axes:
            return x
        return x.max(axis=tuple(axes), keepdims=self._keepdims(ctx))

    def backward(self, ctx, g, *unused):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        axes = self._axes(ctx, len(shape))
        if not axes:
            return g, None
        k = g.shape[0]
        x, moved_shape, perm = _as_reduction(xp, ctx.x(0), axes)
        x0 = ctx.x0(0)
        if x0 is not None:
            x0, _, _ = _as_reduction(xp, xp.broadcast_to(x0, shape), axes)
        s = x.shape[1]
        index = np.arange(s, dtype=np.int64)[None, :]
        m = max_multipliers(ctx, g.reshape(k, x.shape[0], 1), x, x0, index)
        m = m.reshape((k,) + moved_shape).transpose([0] + [p + 1 for p in np.argsort(perm)])
        return m, None
