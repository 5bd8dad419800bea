"""Nonlinear reductions: ReduceSumSquare, ReduceL1, ReduceL2 (norms, F.normalize).

Each is a sum over `axes` of a one-variable function, optionally followed by another,
so its DeepLIFT rule is the composition of Rescale (2.3.4) with the affine sum (2.3.1),
in closed forms free of cancellation:

- ReduceSumSquare, y = sum x^2:   m = (x^2 - x0^2)/(x - x0) = x + x0
- ReduceL1, y = sum |x|:          m = (|x| - |x0|)/(x - x0)  (sign(x) where x = x0)
- ReduceL2, y = sqrt(sum x^2):    m = (x + x0) * (y - y0)/(s - s0) = (x + x0)/(y + y0)

From opset 18 ONNX also defines these by function bodies; the rules here serve every
opset (and win over the expansion, being one op instead of three).
"""
from __future__ import annotations

from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule

from .linear import _reduce_axes


class _Reduction(Rule):
    modes = MODES

    def _axes(self, ctx, ndim):
        axes = _reduce_axes(ctx, ndim)
        return tuple(axes) if axes else None  # None: nothing reduced (noop_with_empty_axes)

    def _reduce(self, ctx, x, fn):
        axes = self._axes(ctx, x.ndim)
        if axes is None:
            return fn(x)
        return fn(x).sum(axis=axes, keepdims=bool(ctx.attr("keepdims", 1)))

    def multiplier(self, ctx, x, x0):
        raise NotImplementedError

    def backward(self, ctx, g, *unused):
        x = ctx.x(0)
        x0 = ctx.x0(0) if ctx.mode == "deeplift" else None
        axes = self._axes(ctx, x.ndim)
        if axes is not None and not ctx.attr("keepdims", 1):  # give g back its reduced axes
            g = ctx.xp.expand_dims(g, tuple(a + 1 for a in sorted(axes)))
        m = g * self.multiplier(ctx, x, x0)
        return (m.astype(g.dtype, copy=False),) + (None,) * (len(ctx.node.inputs) - 1)


@builtin_rule("ReduceSumSquare")
class ReduceSumSquare(_Reduction):
    paper_rule = "Rescale (2.3.4) of x^2 then affine sum: m = x + x0"

    def forward(self, ctx, x, *unused):
        return self._reduce(ctx, x, lambda t: t * t)

    def multiplier(self, ctx, x, x0):
        return 2 * x if x0 is None else x + x0


@builtin_rule("ReduceL1")
class ReduceL1(_Reduction):
    paper_rule = "Rescale (2.3.4) of |x| then affine sum: m = (|x| - |x0|)/(x - x0)"

    def forward(self, ctx, x, *unused):
        return self._reduce(ctx, x, abs)

    def multiplier(self, ctx, x, x0):
        xp = ctx.xp
        if x0 is None:
            return xp.sign(x)
        dx = x - x0
        same = dx == 0
        return xp.where(same, xp.sign(x), (abs(x) - abs(x0)) / xp.where(same, xp.ones_like(dx), dx))


@builtin_rule("ReduceL2")
class ReduceL2(_Reduction):
    paper_rule = "Rescale (2.3.4) of x^2, affine sum, Rescale of sqrt: m = (x + x0)/(y + y0)"

    def forward(self, ctx, x, *unused):
        return ctx.xp.sqrt(self._reduce(ctx, x, lambda t: t * t))

    def _norm(self, ctx, x):
        axes = self._axes(ctx, x.ndim)
        squares = x * x
        return ctx.xp.sqrt(squares if axes is None else squares.sum(axis=axes, keepdims=True))

    def multiplier(self, ctx, x, x0):
        xp = ctx.xp
        y = self._norm(ctx, x)
        if x0 is None:  # the gradient x / y, 0 at y = 0 (the subgradient torch takes)
            return xp.where(y > 0, x / xp.where(y > 0, y, xp.ones_like(y)), xp.zeros_like(x))
        total = y + self._norm(ctx, x0)
        return xp.where(total > 0, (x + x0) / xp.where(total > 0, total, xp.ones_like(total)), xp.zeros_like(x))
