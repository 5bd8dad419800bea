"""Nonlinear reductions: ReduceSumSquare, ReduceL1, ReduceL2 (norms, F.normalize),
ReduceLogSum, ReduceLogSumExp (torch.logsumexp), and ReduceProd (torch.prod).

Each is a sum over `axes` of a one-variable function, optionally followed by another,
so its DeepLIFT rule is the composition of Rescale (2.3.4) with the affine sum (2.3.1),
in closed forms free of cancellation:

- ReduceSumSquare, y = sum x^2:   m = (x^2 - x0^2)/(x - x0) = x + x0
- ReduceL1, y = sum |x|:          m = (|x| - |x0|)/(x - x0)  (sign(x) where x = x0)
- ReduceL2, y = sqrt(sum x^2):    m = (x + x0) * (y - y0)/(s - s0) = (x + x0)/(y + y0)
- ReduceLogSum, y = log(s), s = sum x:          m = (log s - log s0)/(s - s0)
- ReduceLogSumExp, y = log(s), s = sum exp(x):  m = (e^x - e^x0)/(x - x0) * (log s - log s0)/(s - s0)

The log's divided difference is 2 atanh(u)/(u (s + s0)) with u = (s - s0)/(s + s0) near
s = s0, and exp's is e^((x + x0)/2) sinh(dx/2)/(dx/2) near x = x0; LogSumExp works with
x - max and log s - max (the product of the two quotients does not change), so that
inputs in the hundreds neither overflow nor lose the reference's sum to underflow.

ReduceProd is a product of many activations, not a sum: it is taken as a balanced tree of
two-factor products, each split by the product rule (2.3.5), m1 = x0_2 + dx2/2. The bilinear
split conserves exactly at every level, so the tree does; for two factors it is the product
rule itself (the Shapley split), and in gradient modes it gives the exact gradient.

From opset 18 ONNX also defines these by function bodies; the rules here serve every
opset (and win over the expansion, being one op instead of three).
"""
from __future__ import annotations

from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, sinhc

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
        x0 = ctx.x0(0) if ctx.mode == Mode.DEEPLIFT else None
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


def _log_quotient(xp, s, s0):
    """(log s - log s0)/(s - s0) for s, s0 > 0, without cancellation (1/s where s = s0).

    Near s = s0 it is 2 atanh(u)/(u (s + s0)), u = (s - s0)/(s + s0); far apart the plain
    quotient has no cancellation (and stays finite where u rounds to 1)."""
    total = s + s0
    u = (s - s0) / total
    near = abs(u) < 0.5
    safe = xp.where(near, u, xp.zeros_like(u))
    small = abs(safe) < 1e-3
    safe_u = xp.where(small, xp.ones_like(u), safe)
    atanhc = xp.where(small, 1 + safe * safe / 3, 0.5 * (xp.log1p(safe_u) - xp.log1p(-safe_u)) / safe_u)
    far = (xp.log(s) - xp.log(s0)) / xp.where(near, xp.ones_like(u), s - s0)
    return xp.where(near, 2 * atanhc / total, far)


def _exp_quotient(xp, a, a0):
    """(e^a - e^a0)/(a - a0): e^((a + a0)/2) sinh(d/2)/(d/2) near a = a0, the plain quotient
    where |a - a0| >= 1 (there the product would under- and overflow, the quotient cannot)."""
    d = a - a0
    near = abs(d) < 1
    close = xp.exp((a + a0) * 0.5) * sinhc(xp, xp.where(near, d, xp.zeros_like(d)) * 0.5)
    return xp.where(near, close, (xp.exp(a) - xp.exp(a0)) / xp.where(near, xp.ones_like(d), d))


@builtin_rule("ReduceLogSum")
class ReduceLogSum(_Reduction):
    paper_rule = "affine sum then Rescale (2.3.4) of log: m = (log s - log s0)/(s - s0)"

    def forward(self, ctx, x, *unused):
        return ctx.xp.log(self._reduce(ctx, x, lambda t: t))

    def _sum(self, ctx, x):
        axes = self._axes(ctx, x.ndim)
        return x if axes is None else x.sum(axis=axes, keepdims=True)

    def multiplier(self, ctx, x, x0):
        s = self._sum(ctx, x)
        m = 1 / s if x0 is None else _log_quotient(ctx.xp, s, self._sum(ctx, x0))
        return ctx.xp.broadcast_to(m, x.shape)


@builtin_rule("ReduceLogSumExp")
class ReduceLogSumExp(_Reduction):
    paper_rule = "Rescale (2.3.4) of exp, affine sum, Rescale of log"

    def _shift(self, ctx, *xs):
        axes = self._axes(ctx, xs[0].ndim)
        peaks = [x if axes is None else x.max(axis=axes, keepdims=True) for x in xs]
        return peaks[0] if len(peaks) == 1 else ctx.xp.maximum(*peaks)

    def _sum(self, ctx, e):
        axes = self._axes(ctx, e.ndim)
        return e if axes is None else e.sum(axis=axes, keepdims=True)

    def forward(self, ctx, x, *unused):
        xp = ctx.xp
        peak = self._shift(ctx, x)
        y = xp.log(self._sum(ctx, xp.exp(x - peak))) + peak
        axes = self._axes(ctx, x.ndim)
        if axes is not None and not ctx.attr("keepdims", 1):
            y = y.squeeze(axis=axes)
        return y.astype(x.dtype, copy=False)

    def multiplier(self, ctx, x, x0):
        xp = ctx.xp
        if x0 is None:  # the softmax over the reduced axes
            e = xp.exp(x - self._shift(ctx, x))
            return e / self._sum(ctx, e)
        peak = self._shift(ctx, x, x0)
        a, a0 = x - peak, x0 - peak
        # log s and log s0 relative to the shared peak, each from its own peak so that
        # neither underflows; then m = exp's quotient / exp's quotient of the logs, since
        # (log s - log s0)/(s - s0) = 1 / ((e^log s - e^log s0)/(log s - log s0))
        peak_x, peak_x0 = self._shift(ctx, x), self._shift(ctx, x0)
        log_s = xp.log(self._sum(ctx, xp.exp(x - peak_x))) + (peak_x - peak)
        log_s0 = xp.log(self._sum(ctx, xp.exp(x0 - peak_x0))) + (peak_x0 - peak)
        return _exp_quotient(xp, a, a0) / _exp_quotient(xp, log_s, log_s0)


@builtin_rule("ReduceProd")
class ReduceProd(_Reduction):
    paper_rule = "product (2.3.5) over a balanced tree of pairs: m1 = x0_2 + dx2/2 per level"

    def forward(self, ctx, x, *unused):
        axes = self._axes(ctx, x.ndim)
        if axes is None:
            return x
        return x.prod(axis=axes, keepdims=bool(ctx.attr("keepdims", 1)))

    def describe(self, mode):
        return self.paper_rule if mode == Mode.DEEPLIFT else "gradient: m_i = prod of the other factors"

    def backward(self, ctx, g, *unused):
        xp = ctx.xp
        x = ctx.x(0)
        x0 = ctx.x0(0) if ctx.mode == Mode.DEEPLIFT else None
        axes = self._axes(ctx, x.ndim)
        if axes is None:
            return (g,) + (None,) * (len(ctx.node.inputs) - 1)
        if not ctx.attr("keepdims", 1):
            g = xp.expand_dims(g, tuple(a + 1 for a in sorted(axes)))
        kept = [a for a in range(x.ndim) if a not in axes]
        order = kept + sorted(axes)

        def factors(v):  # the reduced axes flattened last: (kept..., n)
            v = xp.transpose(v, order)
            return v.reshape(v.shape[:len(kept)] + (-1,))

        f = factors(x)
        f0 = None if x0 is None else factors(xp.broadcast_to(x0, x.shape))
        m = _tree_product_multipliers(xp, f, f0)  # (kept..., n)
        # back to x's layout, then times g (K, P, ...) broadcast over the reduced axes
        m = m.reshape(m.shape[:len(kept)] + tuple(x.shape[a] for a in sorted(axes)))
        m = xp.transpose(m, [order.index(a) for a in range(x.ndim)])
        return ((g * m).astype(g.dtype, copy=False),) + (None,) * (len(ctx.node.inputs) - 1)


def _tree_product_multipliers(xp, f, f0):
    """d prod(f) / d f_i under the product rule on a balanced tree of pairs, last axis reduced.

    Levels pad with a factor 1 (equal in both passes, so it takes no share); each level's
    pair (a, b) gives a the weight of b's midpoint (b + b0)/2 (b itself without a
    reference), and the weights multiply down the tree."""
    n = f.shape[-1]
    levels = []  # per level, the weights of the left and right factor of each pair
    while f.shape[-1] > 1:
        if f.shape[-1] % 2:
            pad = xp.ones(f.shape[:-1] + (1,), dtype=f.dtype)
            f = xp.concatenate([f, pad], axis=-1)
            f0 = None if f0 is None else xp.concatenate([f0, pad], axis=-1)
        a, b = f[..., 0::2], f[..., 1::2]
        if f0 is None:
            levels.append((b, a, f.shape[-1]))
            f = a * b
        else:
            a0, b0 = f0[..., 0::2], f0[..., 1::2]
            levels.append(((b + b0) * 0.5, (a + a0) * 0.5, f.shape[-1]))
            f, f0 = a * b, a0 * b0
    m = xp.ones(f.shape, dtype=f.dtype)
    for left, right, width in reversed(levels):
        m = m[..., :width // 2]  # drop the weight of the level above's padding
        m = xp.stack([m * left, m * right], axis=-1).reshape(m.shape[:-1] + (width,))
    return m[..., :n]
