"""Single-input elementwise activations: DeepLIFT's Rescale rule (paper 2.3.4).

Each op gives its function f and derivative df; `liftir.rule.Elementwise` turns them
into the Rescale multiplier dy/dx (derivative where dx is ~0) for DeepLIFT and f'(x)
for gradients. ReLU also carries the guided backpropagation and deconvnet rules of
Springenberg et al. 2014 (Figure 1 b/c).
"""
from __future__ import annotations

import math

from liftir.registry import builtin_rule
from liftir.rule import Elementwise, RuleError, expm1c, sinhc

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def erf(xp, x):
    """erf to float32 precision on any backend (NumPy has none): Numerical Recipes' erfc
    Chebyshev fit, fractional error < 1.2e-7."""
    z = abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * xp.exp(poly)
    return xp.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype, copy=False)


def _far_ratio(xp, x, x0, ctx, near):
    """Plain (y - y0)/(x - x0) where |dx| >= 1 (no cancellation there), `near` elsewhere."""
    dx = x - x0
    far = abs(dx) >= 1
    ratio = (ctx.y(0) - ctx.y0(0)) / xp.where(far, dx, 1)
    return xp.where(far, ratio, near).astype(x.dtype, copy=False)


def sigmoid(xp, x):
    # exp of -|x| never overflows
    e = xp.exp(-abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


@builtin_rule("Relu")
class Relu(Elementwise):
    piecewise_linear = True

    def f(self, xp, x, ctx):
        return xp.maximum(x, 0)

    def df(self, xp, x, ctx):
        return (x > 0).astype(x.dtype)

    def backward(self, ctx, g):
        xp = ctx.xp
        if ctx.mode == "deconvnet":  # mask by the top signal only
            return (xp.maximum(g, 0),)
        if ctx.mode == "guided_backprop":  # mask by both the bottom data and the top signal
            return (xp.maximum(g, 0) * self.df(xp, ctx.x(0), ctx),)
        return super().backward(ctx, g)

    def describe(self, mode):
        return {"deconvnet": "deconvnet: max(g, 0)",
                "guided_backprop": "guided: max(g, 0) * 1{x > 0}"}.get(mode, super().describe(mode))


@builtin_rule("LeakyRelu")
class LeakyRelu(Elementwise):
    piecewise_linear = True

    def f(self, xp, x, ctx):
        return xp.where(x >= 0, x, x * ctx.attr("alpha", 0.01))

    def df(self, xp, x, ctx):
        return xp.where(x >= 0, 1.0, ctx.attr("alpha", 0.01)).astype(x.dtype)


@builtin_rule("PRelu")
class PRelu(Elementwise):
    piecewise_linear = True

    def _slope(self, ctx, dtype):
        slope = ctx.const(1)
        if slope is None:
            raise RuleError(f"PRelu node {ctx.node.name!r}: the slope must be a constant")
        return ctx.xp.asarray(slope, dtype=dtype)

    def f(self, xp, x, ctx):
        return xp.where(x >= 0, x, x * self._slope(ctx, x.dtype))

    def df(self, xp, x, ctx):
        return xp.where(x >= 0, xp.ones((), x.dtype), self._slope(ctx, x.dtype))

    def backward(self, ctx, g, *_):
        return super().backward(ctx, g) + (None,)


@builtin_rule("Clip")
class Clip(Elementwise):
    piecewise_linear = True

    def _bounds(self, ctx):
        lo = ctx.attr_or_input("min", 1, None)
        hi = ctx.attr_or_input("max", 2, None)
        return lo, hi

    def f(self, xp, x, ctx):
        lo, hi = self._bounds(ctx)
        if lo is not None:
            x = xp.maximum(x, lo)
        if hi is not None:
            x = xp.minimum(x, hi)
        return x.astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        lo, hi = self._bounds(ctx)
        inside = xp.ones(x.shape, dtype=bool)
        if lo is not None:
            inside &= x > lo
        if hi is not None:
            inside &= x < hi
        return inside.astype(x.dtype)

    def backward(self, ctx, g):
        return super().backward(ctx, g) + (None, None)


@builtin_rule("HardSigmoid")
class HardSigmoid(Elementwise):
    piecewise_linear = True

    def f(self, xp, x, ctx):
        a, b = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
        return xp.clip(a * x + b, 0, 1).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        a, b = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
        z = a * x + b
        return ((z > 0) & (z < 1)).astype(x.dtype) * a


@builtin_rule("ThresholdedRelu")
class ThresholdedRelu(Elementwise):
    piecewise_linear = True

    def f(self, xp, x, ctx):
        return xp.where(x > ctx.attr("alpha", 1.0), x, 0).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        return (x > ctx.attr("alpha", 1.0)).astype(x.dtype)


@builtin_rule("Abs")
class Abs(Elementwise):
    piecewise_linear = True

    def f(self, xp, x, ctx):
        return abs(x)

    def df(self, xp, x, ctx):
        return xp.sign(x)


@builtin_rule("Sigmoid")
class Sigmoid(Elementwise):
    def f(self, xp, x, ctx):
        return sigmoid(xp, x)

    def df(self, xp, x, ctx):
        s = sigmoid(xp, x)
        return s * (1 - s)

    def divided_difference(self, xp, x, x0, ctx):
        # sigma(x) - sigma(x0) = sinh(dx/2) / (2 cosh(x/2) cosh(x0/2)): no cancellation
        # (used where |dx| < 1; larger steps have no cancellation and cosh could overflow)
        half = xp.clip((x - x0) * 0.5, -0.5, 0.5)
        near = (sinhc(xp, half) / (4 * xp.cosh(xp.clip(x, -80, 80) * 0.5) * xp.cosh(xp.clip(x0, -80, 80) * 0.5)))
        return _far_ratio(xp, x, x0, ctx, near)


@builtin_rule("Tanh")
class Tanh(Elementwise):
    def f(self, xp, x, ctx):
        return xp.tanh(x)

    def df(self, xp, x, ctx):
        return 1 - xp.tanh(x) ** 2

    def divided_difference(self, xp, x, x0, ctx):
        # tanh(x) - tanh(x0) = sinh(x - x0) / (cosh(x) cosh(x0))
        near = sinhc(xp, xp.clip(x - x0, -1, 1)) / (xp.cosh(xp.clip(x, -40, 40)) * xp.cosh(xp.clip(x0, -40, 40)))
        return _far_ratio(xp, x, x0, ctx, near)


@builtin_rule("Softplus")
class Softplus(Elementwise):
    def f(self, xp, x, ctx):
        return xp.logaddexp(x, 0).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        return sigmoid(xp, x)


@builtin_rule("Softsign")
class Softsign(Elementwise):
    def f(self, xp, x, ctx):
        return x / (1 + abs(x))

    def df(self, xp, x, ctx):
        return 1 / (1 + abs(x)) ** 2


@builtin_rule("Elu")
class Elu(Elementwise):
    def f(self, xp, x, ctx):
        a = ctx.attr("alpha", 1.0)
        return xp.where(x > 0, x, a * xp.expm1(xp.minimum(x, 0))).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        a = ctx.attr("alpha", 1.0)
        return xp.where(x > 0, 1.0, a * xp.exp(xp.minimum(x, 0))).astype(x.dtype, copy=False)


@builtin_rule("Selu")
class Selu(Elementwise):
    def f(self, xp, x, ctx):
        a, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
        return (gamma * xp.where(x > 0, x, a * xp.expm1(xp.minimum(x, 0)))).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        a, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
        return (gamma * xp.where(x > 0, 1.0, a * xp.exp(xp.minimum(x, 0)))).astype(x.dtype, copy=False)


@builtin_rule("Celu")
class Celu(Elementwise):
    def f(self, xp, x, ctx):
        a = ctx.attr("alpha", 1.0)
        return (xp.maximum(x, 0) + xp.minimum(0, a * xp.expm1(xp.minimum(x, 0) / a))).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        a = ctx.attr("alpha", 1.0)
        return xp.where(x > 0, 1.0, xp.exp(xp.minimum(x, 0) / a)).astype(x.dtype, copy=False)


@builtin_rule("HardSwish")
class HardSwish(Elementwise):
    def f(self, xp, x, ctx):
        return x * xp.clip(x / 6 + 0.5, 0, 1)

    def df(self, xp, x, ctx):
        return xp.where(x <= -3, 0.0, xp.where(x >= 3, 1.0, x / 3 + 0.5)).astype(x.dtype, copy=False)


@builtin_rule("Exp")
class Exp(Elementwise):
    def f(self, xp, x, ctx):
        return xp.exp(x)

    def df(self, xp, x, ctx):
        return xp.exp(x)

    def divided_difference(self, xp, x, x0, ctx):
        return (xp.exp(x0) * expm1c(xp, x - x0)).astype(x.dtype, copy=False)


@builtin_rule("Log")
class Log(Elementwise):
    def f(self, xp, x, ctx):
        return xp.log(x)

    def df(self, xp, x, ctx):
        return 1 / x


@builtin_rule("Sqrt")
class Sqrt(Elementwise):
    def f(self, xp, x, ctx):
        return xp.sqrt(x)

    def df(self, xp, x, ctx):
        return 0.5 / xp.sqrt(x)


@builtin_rule("Reciprocal")
class Reciprocal(Elementwise):
    def f(self, xp, x, ctx):
        return 1 / x

    def df(self, xp, x, ctx):
        return -1 / (x * x)


@builtin_rule("Sin")
class Sin(Elementwise):
    def f(self, xp, x, ctx):
        return xp.sin(x)

    def df(self, xp, x, ctx):
        return xp.cos(x)


@builtin_rule("Cos")
class Cos(Elementwise):
    def f(self, xp, x, ctx):
        return xp.cos(x)

    def df(self, xp, x, ctx):
        return -xp.sin(x)


@builtin_rule("Atan")
class Atan(Elementwise):
    def f(self, xp, x, ctx):
        return xp.arctan(x)

    def df(self, xp, x, ctx):
        return 1 / (1 + x * x)


@builtin_rule("Erf")
class Erf(Elementwise):
    def f(self, xp, x, ctx):
        return erf(xp, x)

    def df(self, xp, x, ctx):
        return (TWO_OVER_SQRT_PI * xp.exp(-x * x)).astype(x.dtype, copy=False)


@builtin_rule("Gelu")
class Gelu(Elementwise):
    def f(self, xp, x, ctx):
        if ctx.attr("approximate", "none") == "tanh":
            return 0.5 * x * (1 + xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
        return 0.5 * x * (1 + erf(xp, x * (1 / math.sqrt(2))))

    def df(self, xp, x, ctx):
        if ctx.attr("approximate", "none") == "tanh":
            inner = SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
            t = xp.tanh(inner)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (0.5 * (1 + erf(xp, x * (1 / math.sqrt(2)))) + x * pdf).astype(x.dtype, copy=False)


@builtin_rule("Mish")
class Mish(Elementwise):
    def f(self, xp, x, ctx):
        return x * xp.tanh(xp.logaddexp(x, 0)).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        t = xp.tanh(xp.logaddexp(x, 0))
        return (t + x * (1 - t * t) * sigmoid(xp, x)).astype(x.dtype, copy=False)


@builtin_rule("Pow")
class Pow(Elementwise):
    """x ** p with a constant exponent p (a constant base is not an elementwise activation)."""

    def _exponent(self, ctx):
        p = ctx.const(1)
        if p is None or not ctx.is_const(1) or (ctx.node.inputs[0] and ctx.is_const(0)):
            raise RuleError(f"Pow node {ctx.node.name!r}: liftir supports a constant exponent only")
        return p

    def f(self, xp, x, ctx):
        return (x ** xp.asarray(self._exponent(ctx), dtype=x.dtype)).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        p = xp.asarray(self._exponent(ctx), dtype=x.dtype)
        return (p * x ** (p - 1)).astype(x.dtype, copy=False)

    def backward(self, ctx, g):
        return super().backward(ctx, g) + (None,)


@builtin_rule("Floor", "Ceil", "Round", "Sign")
class PiecewiseConstant(Elementwise):
    """Steps: zero gradient everywhere, yet DeepLIFT's dy/dx still conserves the difference."""

    piecewise_linear = True

    def f(self, xp, x, ctx):
        fn = {"Floor": xp.floor, "Ceil": xp.ceil, "Round": xp.round, "Sign": xp.sign}[ctx.node.op_type]
        return fn(x)

    def df(self, xp, x, ctx):
        return xp.zeros_like(x)
