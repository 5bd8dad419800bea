"""Normalization layers: LayerNorm, InstanceNorm, GroupNorm, RMSNorm, as exact DeepLIFT rules.

All four compute, over a group of D elements, n = c / sqrt(v + eps) with c = x - mean(x)
(RMSNorm: c = x) and v = mean(c^2), then y = n * scale + bias. That is a multivariate
nonlinearity; its DeepLIFT rule here is the composition of the paper's rules on exactly
that decomposition, written out in closed form:

- the centring c = x - mean(x) and the mean v = mean(c^2) are affine (2.3.1);
- c^2 is Rescale (2.3.4) of one variable: m = (c^2 - c0^2) / (c - c0) = c + c0;
- r = (v + eps)^(-1/2) is Rescale of one variable, with the cancellation-free divided
  difference (r - r0) / (v - v0) = -r r0 / (s + s0), s = sqrt(v + eps);
- n = c * r is a product of two activations (2.3.5): m_c = (r + r0)/2, m_r = (c + c0)/2.

So the rule conserves exactly (summation-to-delta), and it equals liftir's result on the
decomposed graph (the opset-14 torch export, or the ONNX function body) up to rounding. In
the gradient modes x0 = x and every factor becomes the derivative. Scale and bias must be
constants: the affine tail is then the weight (2.3.1).

Ali et al. 2022 ("XAI for Transformers") instead treat the normalizer r as a constant.
For DeepLIFT's differences that does not conserve: with r frozen at the actual input,
dy = c r - c0 r0 while the attributions sum to (c - c0) r; the README says more.
"""
from __future__ import annotations

import numpy as np

from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, RuleError


def _moments(x, axes, centre):
    c = x - x.mean(axis=axes, keepdims=True) if centre else x
    return c, (c * c).mean(axis=axes, keepdims=True)


def normalize(xp, x, axes, eps, centre=True):
    """n = c / sqrt(v + eps) over `axes`, with the mean and 1/sqrt(v + eps) (keepdims)."""
    c, v = _moments(x, axes, centre)
    r = 1 / xp.sqrt(v + eps)
    mean = x.mean(axis=axes, keepdims=True) if centre else xp.zeros_like(v)
    return (c * r).astype(x.dtype, copy=False), mean, r


def normalized_multiplier(xp, g, x, x0, axes, eps, centre=True):
    """Multiplier of x, given g (K, P, ...) the multiplier of n = c / sqrt(v + eps).

    x0 None: the gradient. Otherwise the composed DeepLIFT rule of the module docstring.
    The moments are recomputed here, two-pass (c first, then mean(c^2)), rather than read
    from the forward: onnxruntime's CPU LayerNormalization takes its InvStdDev from
    mean(x^2) - mean(x)^2 in float32, which cancels where |mean| >> std; and a
    ReduceSumSquare in place of c * c and its mean measured slower there (a 16x197x192
    tensor: 215 against 88 us), so a compiled pass writes c * c.
    """
    axes = tuple(axes)
    size = int(np.prod([x.shape[a] for a in axes]))
    c, v = _moments(x, axes, centre)
    s = xp.sqrt(v + eps)
    r = 1 / s
    if x0 is None:
        c0, s0, r0 = c, s, r
    else:
        c0, v0 = _moments(x0, axes, centre)
        s0 = xp.sqrt(v0 + eps)
        r0 = 1 / s0
    g_axes = tuple(a + 1 for a in axes)
    # c + c0 = 2 (c + c0) / 2, the product rule's midpoint doubled: its halves fall on the
    # rows' sums and the scalar below, where scaling by 2 keeps every bit (one full-size
    # pass fewer); reused in place below
    c_sum = c + c0
    g_r = (g * c_sum).sum(axis=g_axes, keepdims=True) * 0.5  # product rule, r's side
    g_v = g_r * (-(r * r0) / (s + s0))  # Rescale of (v + eps)^(-1/2)
    g_c = g * ((r + r0) * 0.5)  # product rule, c's side; then the square's c + c0 and the mean
    if g.shape[0] == 1 and tuple(c_sum.shape) == tuple(g.shape[1:]):
        c_sum *= g_v[0] * (1 / size)  # one target: c_sum is a temporary of g's shape
        g_c += c_sum
    else:
        g_c += g_v * (c_sum * (1 / size))
    if centre:
        g_c -= g_c.mean(axis=g_axes, keepdims=True)
    return g_c.astype(g.dtype, copy=False)


class _Normalization(Rule):
    """y = normalize(x) * scale + bias with constant scale and bias; subclasses say over what."""

    modes = MODES
    paper_rule = ("composed exactly: affine centring and mean (2.3.1), Rescale of c^2 and of "
                  "(v + eps)^-1/2 (2.3.4), product c * r (2.3.5)")
    centre = True

    def describe(self, mode):
        return self.paper_rule if mode == Mode.DEEPLIFT else "gradient"

    def _constants(self, ctx, indices):
        for i in indices:
            if i < len(ctx.node.inputs) and ctx.node.inputs[i] and not ctx.is_const(i):
                raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: input {i} (scale or bias) "
                                f"must be a constant; liftir treats it as the weight of an affine map")

    def _axes(self, ctx, rank):
        """Axes normalized together, for the (possibly regrouped) input."""
        raise NotImplementedError

    def _grouped(self, ctx, x):
        """x reshaped so that `_axes` groups it (GroupNorm); the identity elsewhere."""
        return x

    def _affine_params(self, ctx, x_shape, dtype):
        """scale and bias broadcastable against the input."""
        raise NotImplementedError

    def _eps(self, ctx):
        return float(ctx.attr("epsilon", 1e-5))

    def forward(self, ctx, x, *params):
        self._constants(ctx, range(1, len(ctx.node.inputs)))
        xg = self._grouped(ctx, x)
        n, mean, r = normalize(ctx.xp, xg, self._axes(ctx, xg.ndim), self._eps(ctx), self.centre)
        scale, bias = self._affine_params(ctx, x.shape, x.dtype)
        y = n.reshape(x.shape) * scale
        if bias is not None:
            y = y + bias
        return y.astype(x.dtype, copy=False), mean, r

    def backward(self, ctx, g, *unused):
        if any(u is not None for u in unused):
            raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: its Mean/InvStdDev outputs feed "
                            f"the explained output; liftir explains through Y only")
        self._constants(ctx, range(1, len(ctx.node.inputs)))
        xp = ctx.xp
        x = ctx.x(0)
        x0 = ctx.x0(0) if ctx.mode == Mode.DEEPLIFT else None
        scale, _ = self._affine_params(ctx, x.shape, g.dtype)
        gn = g * scale
        xg = self._grouped(ctx, x)
        k = g.shape[0]
        gg = gn.reshape((k,) + xg.shape)
        x0g = None if x0 is None else self._grouped(ctx, x0)
        m = normalized_multiplier(xp, gg, xg, x0g, self._axes(ctx, xg.ndim), self._eps(ctx), self.centre)
        return (m.reshape(g.shape),) + (None,) * (len(ctx.node.inputs) - 1)


def _trailing_axes(ctx, rank):
    axis = int(ctx.attr("axis", -1))
    if not -rank <= axis < rank:
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: axis {axis} is out of range for rank {rank}")
    axis %= rank
    if axis == 0:
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r} normalizes over the batch axis 0 "
                        f"(axis=0); liftir needs every op to keep samples apart on axis 0")
    return tuple(range(axis, rank))


@builtin_rule("LayerNormalization")
class LayerNormalization(_Normalization):
    """Normalizes over the axes from `axis` on; Scale and B broadcast against them."""

    def _axes(self, ctx, rank):
        return _trailing_axes(ctx, rank)

    def _affine_params(self, ctx, x_shape, dtype):
        xp = ctx.xp
        bias = ctx.const(2)
        return (xp.asarray(ctx.const(1), dtype=dtype),
                None if bias is None else xp.asarray(bias, dtype=dtype))


@builtin_rule("RMSNormalization", since=23)
class RMSNormalization(LayerNormalization):
    """x / sqrt(mean(x^2) + eps) * scale over the axes from `axis` on (no centring, no bias)."""

    centre = False
    paper_rule = ("composed exactly: affine mean (2.3.1), Rescale of x^2 and of (v + eps)^-1/2 "
                  "(2.3.4), product x * r (2.3.5)")


def _per_channel(xp, value, x_shape, dtype):
    return xp.asarray(value, dtype=dtype).reshape((-1,) + (1,) * (len(x_shape) - 2))


@builtin_rule("InstanceNormalization")
class InstanceNormalization(_Normalization):
    """(N, C, ...) normalized over the spatial axes of each sample and channel."""

    def _axes(self, ctx, rank):
        if rank < 3:
            raise RuleError(f"InstanceNormalization node {ctx.node.name!r}: needs an (N, C, D1, ...) input")
        return tuple(range(2, rank))

    def _affine_params(self, ctx, x_shape, dtype):
        xp = ctx.xp
        return _per_channel(xp, ctx.const(1), x_shape, dtype), _per_channel(xp, ctx.const(2), x_shape, dtype)


@builtin_rule("GroupNormalization", since=21)
class GroupNormalization(_Normalization):
    """(N, C, ...) in `num_groups` groups of channels, each normalized over its channels and
    spatial axes; scale and bias per channel. (Opset 18's per-group version is deprecated:
    onnx.checker refuses it, so no model liftir loads has it.)"""

    def _groups(self, ctx, channels):
        groups = int(ctx.attr("num_groups"))
        if groups < 1 or channels % groups:
            raise RuleError(f"GroupNormalization node {ctx.node.name!r}: {channels} channels do not split "
                            f"into {groups} groups")
        return groups

    def _grouped(self, ctx, x):
        return x.reshape((x.shape[0], self._groups(ctx, x.shape[1]), -1))

    def _axes(self, ctx, rank):
        return (2,)

    def _affine_params(self, ctx, x_shape, dtype):
        xp = ctx.xp
        return _per_channel(xp, ctx.const(1), x_shape, dtype), _per_channel(xp, ctx.const(2), x_shape, dtype)
