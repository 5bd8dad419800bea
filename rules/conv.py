"""Convolutions (paper 2.3.1, affine): Conv and ConvTranspose, the backward an adjoint convolution.

A convolution is a linear map of its input, so its multiplier is the weight for every
method and its backward is the adjoint convolution (liftir/kernels: cached onnxruntime
sessions on NumPy float32, im2col elsewhere). RevealCancel's |L| is the same op with |w|.
"""
from __future__ import annotations

from liftir import kernels as conv_kernels
from liftir.registry import builtin_rule
from liftir.rule import Linear, RuleError

from .linear import _require_const


def _conv_params(ctx, spatial, kernel, transpose=False):
    nd = len(kernel)
    strides = list(ctx.attr("strides", [1] * nd))
    dilations = list(ctx.attr("dilations", [1] * nd))
    try:
        pads = conv_kernels.resolve_auto_pad(
            ctx.attr("auto_pad", "NOTSET"), list(spatial), list(kernel), strides, dilations,
            list(ctx.attr("pads", [0] * 2 * nd)), transpose=transpose,
            output_shape=ctx.attr("output_shape"), output_padding=ctx.attr("output_padding"))
    except ValueError as exc:
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {exc}") from None
    return strides, pads, dilations


class _ConvFamily(Linear):
    """RevealCancel's |L| for a convolution is the same op with |w| and no bias."""

    signed = True
    splits_by_term = True

    def abs_forward(self, ctx, d, *unused):
        return self.forward(ctx, d, _abs_weight(ctx), None)

    def abs_backward(self, ctx, g):
        return _with_abs_weight(ctx, lambda: self.backward(ctx, g))


@builtin_rule("Conv")
class Conv(_ConvFamily):
    """Convolution (1D/2D/3D, groups, strides, pads, dilations, auto_pad). Backward: its transpose."""

    def forward(self, ctx, x, w, b=None):
        _require_const(ctx, 1, "weight")
        strides, pads, dilations = _conv_params(ctx, x.shape[2:], w.shape[2:])
        return conv_kernels.conv(ctx.xp, x, w, b, strides=strides, pads=pads, dilations=dilations,
                                 group=ctx.attr("group", 1), cache=ctx.cache)

    def backward(self, ctx, g):
        w = ctx.input_value(1)
        shape = ctx.input_shape(0)
        strides, pads, dilations = _conv_params(ctx, shape[2:], w.shape[2:])
        k = g.shape[0]
        gx = conv_kernels.conv_adjoint(ctx.xp, ctx.merge_targets(g), w, input_shape=(k * shape[0],) + shape[1:],
                                       strides=strides, pads=pads, dilations=dilations,
                                       group=ctx.attr("group", 1), cache=ctx.cache)
        return ctx.split_targets(gx, k), None, None


def _abs_weight(ctx):
    """|w| as one array kept per node, so kernel caches keyed by the weight reuse it."""
    if "abs_w" not in ctx.cache:
        ctx.cache["abs_w"] = abs(ctx.input_value(1))
    return ctx.cache["abs_w"]


def _with_abs_weight(ctx, backward):
    """Run a backward that reads its weight via ctx.input_value(1) with |w| instead."""
    original = ctx.input_value
    abs_w = _abs_weight(ctx)
    ctx.input_value = lambda i: abs_w if i == 1 else original(i)
    try:
        return backward()
    finally:
        ctx.input_value = original


@builtin_rule("ConvTranspose")
class ConvTranspose(_ConvFamily):
    def _params(self, ctx, spatial, kernel):
        strides, pads, dilations = _conv_params(ctx, spatial, kernel, transpose=True)
        nd = len(kernel)
        output_padding = list(ctx.attr("output_padding", [0] * nd))
        if ctx.attr("output_shape") is not None:  # what the pads do not give, output_padding adds at the end
            output_padding = [0] * nd
            for d in range(nd):
                natural = (strides[d] * (spatial[d] - 1) + (kernel[d] - 1) * dilations[d] + 1
                           - pads[d] - pads[d + nd])
                output_padding[d] = int(ctx.attr("output_shape")[-nd + d]) - natural
        return strides, pads, dilations, output_padding

    def forward(self, ctx, x, w, b=None):
        _require_const(ctx, 1, "weight")
        strides, pads, dilations, output_padding = self._params(ctx, x.shape[2:], w.shape[2:])
        return conv_kernels.conv_transpose(ctx.xp, x, w, b, strides=strides, pads=pads, dilations=dilations,
                                           group=ctx.attr("group", 1), output_padding=output_padding,
                                           cache=ctx.cache)

    def backward(self, ctx, g):
        w = ctx.input_value(1)
        shape = ctx.input_shape(0)
        strides, pads, dilations, _ = self._params(ctx, shape[2:], w.shape[2:])
        k = g.shape[0]
        gx = conv_kernels.conv_transpose_adjoint(ctx.xp, ctx.merge_targets(g), w,
                                                 input_shape=(k * shape[0],) + shape[1:], strides=strides,
                                                 pads=pads, dilations=dilations, group=ctx.attr("group", 1),
                                                 cache=ctx.cache)
        return ctx.split_targets(gx, k), None, None
