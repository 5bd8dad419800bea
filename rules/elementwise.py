"""Single-input elementwise activations: DeepLIFT's Rescale rule (paper 2.3.4).

Each op gives its function f and derivative df; `liftir.rule.Elementwise` turns them
into the Rescale multiplier dy/dx (derivative where dx is ~0) for DeepLIFT and f'(x)
for gradients. ReLU also carries the guided backpropagation and deconvnet rules of
Springenberg et al. 2014 (Figure 1 b/c).
"""
from __future__ import annotations

import math

import numpy as np

from liftir.kernels.parallel import over_rows
from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import (Elementwise, RuleError, blend, difference, exprel_of_negative, is_tracer,
                         refuse_infinite_steps, rescale_multiplier, scale_rows, select, sinhc)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


# Rational fits of Cephes' ndtr.c (S. L. Moshier): erf on |x| <= 1, erfc on 1 < |x| < 8 and
# |x| >= 8, each to double precision. Evaluated in the array's own dtype.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)  # monic
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)  # monic
_ERFC_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)
_ERFC_S = (2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)  # monic


def _poly(z, coefs, monic=False):
    """Horner's rule for finite z (its callers clip): the first step is z * c0 + c1 (or
    z + c0 when monic), the same values as from an accumulator of c0, one pass fewer."""
    acc = z + coefs[0] if monic else z * coefs[0] + coefs[1]
    for c in coefs[1:] if monic else coefs[2:]:
        acc = acc * z + c
    return acc


def _erf_inner(x):
    """erf on |x| <= 1 (x clipped there by the caller)."""
    z = x * x
    return x * _poly(z, _ERF_T) / _poly(z, _ERF_U, monic=True)


def _erfc_outer(xp, x):
    """erfc for |x| >= 1, with relative accuracy in the tail (no 1 - erf cancellation)."""
    a = xp.clip(abs(x), 1, 40)  # erfc(40) underflows in float64; clipping keeps the fits finite
    fit = select(xp, a < 8, lambda v: _poly(v, _ERFC_P) / _poly(v, _ERFC_Q, monic=True),
                 lambda v: _poly(v, _ERFC_R) / _poly(v, _ERFC_S, monic=True), a)
    tail = xp.exp(-x * x) * fit
    return blend(xp, x < 0, 2 - tail, tail)


def erf(xp, x):
    """erf to the precision of x's dtype on any backend (NumPy has none); each element
    evaluates the one rational fit of its range."""
    return select(xp, abs(x) <= 1, lambda v: _erf_inner(xp.clip(v, -1, 1)), lambda v: 1 - _erfc_outer(xp, v),
                  x).astype(x.dtype, copy=False)


def erfc(xp, x):
    """1 - erf(x), accurate relative to its own (tiny) value for large x. float32: one formula
    for every x (`_erfc_float32`); float64: the three fits of Cephes, each on its range."""
    if np.dtype(x.dtype).itemsize <= 4:
        return _erfc_float32(xp, x)
    return select(xp, abs(x) <= 1, lambda v: 1 - _erf_inner(xp.clip(v, -1, 1)), lambda v: _erfc_outer(xp, v),
                  x).astype(x.dtype, copy=False)


# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0: the Chebyshev fit of Numerical
# Recipes (Press et al., 2nd ed., section 6.2, "erfcc"), relative error < 1.2e-7 for every z >= 0
_ERFCC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
          1.48851587, -0.82215223, 0.17087277)


def _erfc_float32(xp, x):
    """erfc in float32 from two expressions and one blend, with no branch to select: a
    compiled pass computes every element of every branch, and Cephes' three fits with their
    selections cost ~100 full-size passes and two Wheres per evaluation (a GELU's backward
    evaluates it twice). On [-1, 0) 1 - erf(x) from Cephes' inner fit (1 + |erf|: no
    cancellation, 1.1e-7 relative); elsewhere the Numerical Recipes fit, whose exp(-z^2) is
    split as exp(-hi^2) exp(-lo (z + hi)) with hi = z to 8 fraction bits, so that hi^2 is
    exact (exp of -z^2 rounded as one float32 carries |z|^2 ulps: Cephes' float32 tail was
    2.4e-6 off at z ~ 5): within 5.2e-7 relative wherever erfc is a normal float32 (measured
    against float64 erfc; Cephes' fits in float32 were within 8.9e-7 on [0, 3])."""
    z = xp.minimum(abs(x), 11)  # erfc(11) ~ 1e-54 rounds to 0 in float32, as the result here does
    t = 1 / (1 + z * 0.5)
    fit = t * _ERFCC[-1] + _ERFCC[-2]
    for c in _ERFCC[-3::-1]:
        fit = fit * t + c
    hi = xp.floor(z * 256) * (1 / 256)  # at most 12 significant bits, as z <= 11 < 16
    lo = z - hi  # exact
    tail = t * xp.exp(-(hi * hi)) * xp.exp(fit - lo * (z + hi))
    negative = x < 0
    outer = blend(xp, negative, 2 - tail, tail)
    inner = 1 - _erf_inner(xp.clip(x, -1, 0))
    return blend(xp, negative & (x >= -1), inner, outer).astype(x.dtype, copy=False)


def _far_ratio(rule, xp, x, x0, ctx, near):
    """Plain (y - y0)/(x - x0) where |dx| >= 1 (no cancellation there), `near` elsewhere."""
    dx = difference(xp, x, x0)  # equal infinities (a mask's -inf in both passes) did not move
    far = abs(dx) >= 1
    # y recomputed with f, not read from the forward: see Elementwise.divided_difference
    ratio = (rule.f(xp, x, ctx) - rule.f(xp, x0, ctx)) / xp.where(far, dx, 1)
    return xp.where(far, ratio, near).astype(x.dtype, copy=False)


def _relu_quotient(xp, x, x0_high, x0_low, out):
    """DeepLIFT's Rescale multiplier of a ReLU into `out`: four elementwise passes, no branch.

    With hi = max(x, x0) and lo = min(x, x0), (relu(x) - relu(x0)) / (x - x0) is
    relu(hi) / (relu(hi) - min(lo, 0)): exactly 1 where both are positive (hi / hi), 0 where
    both are <= 0, and across the kink the very quotient hi / (hi - lo) the definition
    rounds to. Where x == x0 it is the slope: 1 above 0 (hi / hi), 0 below. Taking
    min(lo, -s) with s the smallest subnormal keeps x == x0 == 0 at 0 / s = 0 instead of
    0 / 0, and changes no difference of normal numbers. No comparison, no mask, no `where`
    (in the compiled graph `Where` and `Cast` cost more than the arithmetic).
    The reference's bounds come precomputed (`_relu_reference_bounds`): max and min are
    exact and associative, so max(max(x, x0), 0) = max(x, max(x0, 0)) bit for bit.
    """
    num = xp.maximum(x, x0_high)
    xp.minimum(x, x0_low, out=out)
    xp.subtract(num, out, out=out)
    xp.divide(num, out, out=out)


def _relu_reference_bounds(xp, x0):
    """max(x0, 0) and min(x0, -s) of `_relu_quotient`: computed once on the reference, which
    is usually one row broadcast to all samples, instead of once per sample (two full-size
    passes fewer: -20% for the rule in a compiled pass, measured on 8x64x56x56)."""
    tiny = np.finfo(x0.dtype).smallest_subnormal
    return xp.maximum(x0, 0), xp.minimum(x0, -tiny)


def sigmoid(xp, x):
    """sigma(x) from one exp(-|x|), which never overflows: 1 / (1 + e) for x >= 0,
    e / (1 + e) below, each without cancellation."""
    e = xp.exp(-abs(x))
    d = 1 + e
    s = _one_where(xp, x >= 0, e)
    s /= d
    return s


def _one_where(xp, mask, e):
    """where(mask, 1, e) for e in [0, 1], as max(e, mask): the same values, and a branch-free
    pass where a select is not (onnxruntime's Where costs 3-20x a Mul; NumPy's where with a
    sign mask took 13 ms on 2.4M float32, its maximum with the bool mask 1.3 ms)."""
    if is_tracer(xp):
        return xp.maximum(e, mask.astype(e.dtype))
    return xp.maximum(e, mask)


def _logistic_rescale(xp, x, x0, scale):
    """(f(x) - f(x0)) / (x - x0) for f(v) = sigma(v) (scale 1) or tanh(v) = 2 sigma(2 v) - 1
    (scale 2), from the identity sigma(a) - sigma(b) = sign(D) sigma(hi) sigma(-lo) (1 - e^-|D|)
    with D = a - b, hi = max(a, b), lo = min(a, b), a = scale x, b = scale x0:

        m = scale^2 exprel(-|D|) / ((1 + e^-hi) (1 + e^lo)),   exprel(u) = (e^u - 1) / u.

    Every factor is free of cancellation, so one formula serves every dx: no near/far
    branches to blend, no fill at dx == 0 (there exprel is 1 and m the derivative
    scale^2 sigma(a) sigma(-a)). exprel's argument is <= 0, and an overflowed e^-hi or e^lo
    (a saturated end) makes m 0, its limit. The quotient of f's values it replaces cancels
    where both ends saturate (sigma(8) - sigma(5) in float32 keeps three digits: tanh's
    needed a float64 Tanh in a trace). About 20 full-size passes in a trace, against 31
    with sigma(hi) sigma(-lo) from the sign-aware sigmoids of both ends."""
    dx = difference(xp, x, x0)  # equal infinities (a mask's -inf in both passes) did not move
    a, b = (x * scale, x0 * scale) if scale != 1 else (x, x0)
    with np.errstate(over="ignore"):  # e^-hi, e^lo = inf at a saturated end: m = 0 there
        den = xp.exp(-xp.maximum(a, b))
        den += 1
        den *= xp.exp(xp.minimum(a, b)) + 1
    step = xp.abs(dx, out=dx)  # dx is difference()'s new array: no other reader
    m = exprel_of_negative(xp, step, scale)
    m /= den
    if scale != 1:
        m *= scale * scale
    return m.astype(x.dtype, copy=False)


@builtin_rule("Relu")
class Relu(Elementwise):
    piecewise_linear = True
    exact_pieces = True

    def f(self, xp, x, ctx):
        return xp.maximum(x, 0)

    def df(self, xp, x, ctx):
        return (x > 0).astype(x.dtype)

    def divided_difference(self, xp, x, x0, ctx):
        m = xp.empty_like(x)
        rows = x.shape[0]
        high, low = _relu_reference_bounds(xp, x0)

        def part(s):
            if x0.shape[0] == rows:
                return _relu_quotient(xp, x[s], high[s], low[s], m[s])
            return _relu_quotient(xp, x[s], high, low, m[s])
        over_rows(xp, part, rows, x.size)
        return m

    def backward(self, ctx, g):
        xp = ctx.xp
        if ctx.mode == Mode.DECONVNET:  # mask by the top signal only
            return (xp.maximum(g, 0),)
        if ctx.mode == Mode.DEEPLIFT:
            return super().backward(ctx, g)
        # gradient modes: 1{x > 0} = 1{y > 0}, read from the output, so that the input (a
        # convolution's output) stays inside the forward, where onnxruntime fuses the Relu
        # into the convolution
        positive = self.df(xp, ctx.y(0), ctx)
        if ctx.mode == Mode.GUIDED_BACKPROP:  # mask by both the bottom data and the top signal
            return (xp.maximum(g, 0) * positive,)
        return (scale_rows(xp, g, positive, reuse=True),)

    def describe(self, mode):
        return {Mode.DECONVNET: "deconvnet: max(g, 0)",
                Mode.GUIDED_BACKPROP: "guided: max(g, 0) * 1{x > 0}"}.get(mode, super().describe(mode))


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
    exact_pieces = True

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
    exact_pieces = True

    def f(self, xp, x, ctx):
        return xp.where(x > ctx.attr("alpha", 1.0), x, 0).astype(x.dtype, copy=False)

    def df(self, xp, x, ctx):
        return (x > ctx.attr("alpha", 1.0)).astype(x.dtype)


@builtin_rule("Abs")
class Abs(Elementwise):
    piecewise_linear = True
    exact_pieces = True

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
        return s * sigmoid(xp, -x)  # s * (1 - s) would cancel to 0 for large x

    def divided_difference(self, xp, x, x0, ctx):
        return _logistic_rescale(xp, x, x0, 1)


@builtin_rule("Tanh")
class Tanh(Elementwise):
    def f(self, xp, x, ctx):
        return xp.tanh(x)

    def df(self, xp, x, ctx):
        e = xp.exp(-2 * abs(x))
        return 4 * e / ((1 + e) * (1 + e))  # sech^2 without the cancellation of 1 - tanh^2

    def divided_difference(self, xp, x, x0, ctx):
        return _logistic_rescale(xp, x, x0, 2)


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
        return x * xp.clip(x + 3, 0, 6) / 6  # x/6 + 0.5 would lose digits near x = -3

    def df(self, xp, x, ctx):
        return xp.where(x <= -3, 0.0, xp.where(x >= 3, 1.0, x / 3 + 0.5)).astype(x.dtype, copy=False)


@builtin_rule("Exp")
class Exp(Elementwise):
    def f(self, xp, x, ctx):
        return xp.exp(x)

    def df(self, xp, x, ctx):
        return xp.exp(x)

    def divided_difference(self, xp, x, x0, ctx):
        # e^x - e^x0 = 2 e^((x+x0)/2) sinh(dx/2): exact for |dx| < 1; beyond, the plain ratio
        # (e^x0 alone could underflow, or overflow in expm1(dx), where the ratio is finite)
        half = xp.clip(difference(xp, x, x0) * 0.5, -0.5, 0.5)
        near = xp.exp(x * 0.5 + x0 * 0.5) * sinhc(xp, half)  # halves first: finfo.min + finfo.min overflows
        return _far_ratio(self, xp, x, x0, ctx, near)


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

    def backward(self, ctx, g):
        """The quotient of the forward's own erf values, not of recomputed ones: unlike the
        activations Elementwise.divided_difference distrusts, onnxruntime's Erf is within one
        ulp of erf (measured on [-6, 6]; liftir's rational fit in float32 is within 2.5), and
        the rules' forward is this rule's f, so recomputing erf (two rational fits per element,
        half of a ViT's backward) would buy nothing."""
        if ctx.mode != Mode.DEEPLIFT:
            return super().backward(ctx, g)
        xp = ctx.xp
        m = rescale_multiplier(xp, ctx.x(0), ctx.x0(0), ctx.y(0), ctx.y0(0), lambda z: self.df(xp, z, ctx), False,
                               finite_map=True)
        return (scale_rows(xp, g, m, reuse=True),)


@builtin_rule("Gelu")
class Gelu(Elementwise):
    """x Phi(x), or its tanh form; both written so that x << 0 does not cancel (1 + erf, 1 + tanh)."""

    def _tanh_parts(self, xp, x):
        u2 = 2 * SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
        return sigmoid(xp, u2), sigmoid(xp, -u2)  # 0.5 (1 + tanh u) = sigma(2u)

    def f(self, xp, x, ctx):
        if ctx.attr("approximate", "none") == "tanh":
            return x * self._tanh_parts(xp, x)[0]
        return 0.5 * x * erfc(xp, x * (-1 / math.sqrt(2)))

    def df(self, xp, x, ctx):
        if ctx.attr("approximate", "none") == "tanh":
            s, s_neg = self._tanh_parts(xp, x)  # 1 - tanh(u)^2 = 4 sigma(2u) sigma(-2u)
            return (s + 2 * x * s * s_neg * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)).astype(x.dtype, copy=False)
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (0.5 * erfc(xp, x * (-1 / math.sqrt(2))) + x * pdf).astype(x.dtype, copy=False)

    def backward(self, ctx, g):
        """The exact (erf) form: Rescale on the quotient of the forward's own values, as Erf's
        rule does, not of recomputed ones. onnxruntime's float32 Gelu is within
        0.69 eps (1 + |x|) of x Phi(x) (measured on [-12, 12] against float64 erfc), the
        order of y's own rounding, which is what the quotient's error comes from either way;
        recomputing y and y0 (two rational fits per element) cost a BERT's compiled pass 22%
        and changed its attributions' error against float64 by 3% of itself (2.43e-6 against
        2.36e-6 of their max). The tanh form keeps the recomputation: onnxruntime's Tanh is
        less exact (2.5 ulps of the form measured, 5 of Tanh)."""
        if ctx.mode != Mode.DEEPLIFT or ctx.attr("approximate", "none") == "tanh":
            return super().backward(ctx, g)
        xp = ctx.xp
        x, x0, y, y0 = ctx.x(0), ctx.x0(0), ctx.y(0), ctx.y0(0)
        refuse_infinite_steps(ctx, xp, x, x0, y, y0)
        m = rescale_multiplier(xp, x, x0, y, y0, lambda z: self._slope_near(xp, z, ctx), False, finite_map=True)
        return (scale_rows(xp, g, m, reuse=True),)

    def _slope_near(self, xp, x, ctx):
        """The erf form's derivative Phi(x) + x phi(x) at the few elements where dx ~ 0. In a
        float32 compiled pass Phi comes from onnxruntime's Erf (within an ulp of erf), as
        1/2 + erf(x / sqrt 2) / 2: ten nodes where the rational fits of `erfc` took ~50,
        each ~6 us on the few hundred elements (a ViT GELU's fallback took 1 ms of its
        3.7). Its error is absolute, ~1e-7, which for x << 0 is relative to df's own small
        value: the quotient (y - y0) / dx the other elements get errs by eps |y| / |dx|,
        more than that. Elsewhere (NumPy, CuPy, float64) erfc's relative accuracy."""
        if is_tracer(xp) and x.dtype == np.float32:
            pdf = xp.exp(x * x * -0.5) * (1 / math.sqrt(2 * math.pi))
            return xp.erf(x * (1 / math.sqrt(2))) * 0.5 + 0.5 + x * pdf
        return self.df(xp, x, ctx)


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

    def divided_difference(self, xp, x, x0, ctx):
        """Squares and cubes (RMSNorm's x^2, GPT-2's GELU x^3) in closed form, without
        cancellation and with no dx ~ 0 case: x + x0, and x (x + x0) + x0^2 (the negative
        term is at most a quarter of the positive one; within 1.3 eps of the float64 value).
        Other exponents: the quotient of Elementwise."""
        p = np.asarray(self._exponent(ctx))
        if p.size == 1 and p.ndim <= x.ndim and float(p.reshape(())) in (2.0, 3.0):
            s = x + x0
            if float(p.reshape(())) == 3.0:
                s *= x
                s += x0 * x0
            return s
        return super().divided_difference(xp, x, x0, ctx)

    def backward(self, ctx, g):
        self._exponent(ctx)  # the check forward makes, for a forward run by onnxruntime
        return super().backward(ctx, g) + (None,)


@builtin_rule("Floor", "Ceil", "Round", "Sign")
class PiecewiseConstant(Elementwise):
    """Steps: zero gradient everywhere, yet DeepLIFT's dy/dx still conserves the difference."""

    piecewise_linear = True
    exact_pieces = True

    def f(self, xp, x, ctx):
        fn = {"Floor": xp.floor, "Ceil": xp.ceil, "Round": xp.round, "Sign": xp.sign}[ctx.node.op_type]
        return fn(x)

    def df(self, xp, x, ctx):
        return xp.zeros_like(x)


# Each rule above returns a new array from divided_difference and df, which Elementwise.backward
# may then overwrite with the multipliers (Relu's own kernel is left out).
for _rule in (LeakyRelu, PRelu, Clip, HardSigmoid, ThresholdedRelu, Abs, Sigmoid, Tanh, Softplus, Softsign, Elu,
              Selu, Celu, HardSwish, Exp, Log, Sqrt, Reciprocal, Sin, Cos, Atan, Erf, Gelu, Mish, Pow,
              PiecewiseConstant):
    _rule.fresh_multipliers = True
