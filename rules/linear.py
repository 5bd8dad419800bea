"""Affine ops (paper 2.3.1): the multiplier is the weight, so backward is the transpose.

The same backward serves every method: for an affine map the DeepLIFT multiplier, the
gradient, and the guided/deconvnet signals all coincide. Convolutions are in rules/conv.py.
"""
from __future__ import annotations

import numpy as np

from liftir import kernels as conv_kernels
from liftir.kernels.scatter import scatter_add
from liftir.kernels.windows import Windows, scatter_to_windows
from liftir.errors import InputError, ModelLoadError
from liftir.registry import builtin_rule
from liftir.rule import Linear, NodeContext, RuleError, accurate_sum, unbroadcast


def _require_const(ctx: NodeContext, index: int, what: str):
    if not ctx.is_const(index):
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: the {what} must be a constant "
                        f"(liftir treats it as the weight of an affine map)")


def _normalized_axes(axes, rank: int) -> list[int]:
    """Axes in [0, rank); whether they touch the batch is liftir/batch_axis.py's concern."""
    return [a % rank for a in np.atleast_1d(axes).tolist()] if axes is not None else []


@builtin_rule("Add", "Sub")
class AddSub(Linear):
    """Sums with broadcasting; both sides may be activations."""

    signed = True  # Sub's -1

    def abs_forward(self, ctx, da, db):
        terms = [d for d in (da, db) if d is not None]
        return terms[0] + terms[1] if len(terms) == 2 else terms[0]

    def abs_backward(self, ctx, g):
        ga = None if ctx.is_const(0) else unbroadcast(ctx.xp, g, ctx.input_shape(0))
        gb = None if ctx.is_const(1) else unbroadcast(ctx.xp, g, ctx.input_shape(1))
        return ga, gb

    def forward(self, ctx, a, b):
        return a + b if ctx.node.op_type == "Add" else a - b

    def backward(self, ctx, g):
        sign = -1 if ctx.node.op_type == "Sub" else 1
        ga = None if ctx.is_const(0) else unbroadcast(ctx.xp, g, ctx.input_shape(0))
        gb = None if ctx.is_const(1) else unbroadcast(ctx.xp, sign * g, ctx.input_shape(1))
        return ga, gb


@builtin_rule("Sum")
class Sum(Linear):
    def abs_forward(self, ctx, *deltas):
        return self.forward(ctx, *[d for d in deltas if d is not None])

    def forward(self, ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def backward(self, ctx, g):
        return tuple(None if ctx.is_const(i) else unbroadcast(ctx.xp, g, ctx.input_shape(i))
                     for i in range(len(ctx.node.inputs)))


@builtin_rule("Neg")
class Neg(Linear):
    signed = True

    def forward(self, ctx, x):
        return -x

    def abs_forward(self, ctx, d):
        return d

    def abs_backward(self, ctx, g):
        return (g,)

    def backward(self, ctx, g):
        return (-g,)


@builtin_rule("Gemm")
class Gemm(Linear):
    """Y = alpha * A' B' + beta * C with A the activation and B, C constants."""

    def _weight(self, ctx, b):
        _require_const(ctx, 1, "B operand")
        if ctx.attr("transA", 0):
            raise RuleError(f"Gemm node {ctx.node.name!r}: transA=1 would put the batch on axis 1")
        return b.T if ctx.attr("transB", 0) else b

    def forward(self, ctx, a, b, c=None):
        y = ctx.attr("alpha", 1.0) * (a @ self._weight(ctx, b))
        if c is not None:
            y = y + ctx.attr("beta", 1.0) * c
        return y.astype(a.dtype, copy=False)

    signed = True
    splits_by_term = True

    def _abs_weight(self, ctx):
        if "abs_w" not in ctx.cache:
            ctx.cache["abs_w"] = abs(self._weight(ctx, ctx.input_value(1)) * ctx.attr("alpha", 1.0))
        return ctx.cache["abs_w"]

    def abs_forward(self, ctx, d, *unused):
        return d @ self._abs_weight(ctx)

    def abs_backward(self, ctx, g):
        return g @ self._abs_weight(ctx).T, None, None

    def backward(self, ctx, g):
        xp = ctx.xp
        w = self._weight(ctx, ctx.input_value(1))
        ga = (ctx.attr("alpha", 1.0) * (g @ w.T)).astype(g.dtype, copy=False)
        gc = None
        if len(ctx.node.inputs) > 2 and ctx.node.inputs[2] and not ctx.is_const(2):
            gc = unbroadcast(xp, ctx.attr("beta", 1.0) * g, ctx.input_shape(2))
        return ga, None, gc


@builtin_rule("BatchNormalization")
class BatchNormalization(Linear):
    """Inference-mode batch norm: a per-channel scale and shift."""

    def _scale_shift(self, ctx, ndim: int, dtype):
        if ctx.attr("training_mode", 0):
            raise RuleError(f"BatchNormalization node {ctx.node.name!r} is in training mode; export the "
                            f"model in eval mode")
        for i in range(1, 5):
            _require_const(ctx, i, "scale/bias/mean/var")
        xp = ctx.xp
        if "scale_shift" not in ctx.cache:
            scale, bias, mean, var = (ctx.const(i).astype(np.float64) for i in range(1, 5))
            k = scale / np.sqrt(var + ctx.attr("epsilon", 1e-5))
            ctx.cache["scale_shift"] = (k, bias - mean * k)
        k, shift = ctx.cache["scale_shift"]
        shape = (1, -1) + (1,) * (ndim - 2)
        return xp.asarray(k.reshape(shape), dtype=dtype), xp.asarray(shift.reshape(shape), dtype=dtype)

    def _of_input(self, ctx):
        """The scale and shift as the input's rank and dtype take them (its value is not read)."""
        return self._scale_shift(ctx, len(ctx.input_shape(0)), ctx.input_dtype(0))

    def forward(self, ctx, x, *params):
        k, shift = self._scale_shift(ctx, x.ndim, x.dtype)
        return x * k + shift

    def backward(self, ctx, g, *unused):
        k, _ = self._of_input(ctx)
        return (g * k,)

    signed = True

    def abs_forward(self, ctx, d, *unused):
        return d * abs(self._scale_shift(ctx, d.ndim, d.dtype)[0])

    def abs_backward(self, ctx, g):
        return (g * abs(self._of_input(ctx)[0]),)


def _pool_windows(node, spatial, error=InputError) -> Windows:
    """The node's pooling windows over `spatial`; a window larger than the input is refused
    (onnx.checker and onnxruntime let it through, and its output would be empty)."""
    attrs = node.attrs
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = conv_kernels.resolve_auto_pad(attrs.get("auto_pad", "NOTSET"), list(spatial), kernel, strides,
                                         dilations, list(attrs.get("pads", [0] * 2 * nd)))
    windows = Windows.make(tuple(spatial), kernel, strides, pads, dilations, bool(attrs.get("ceil_mode", 0)))
    if any(o < 1 for o in windows.out):
        spans = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
        raise error(f"{node.op_type} node {node.name!r}: its window (kernel {tuple(kernel)}, dilations "
                    f"{tuple(dilations)}: spans {spans}) is larger than its input's spatial size "
                    f"{tuple(spatial)} with pads {tuple(pads)}; the output would be empty")
    return windows


def _pool_geometry(ctx, spatial) -> Windows:
    """The node's pooling windows for this input size (cached per node and size)."""
    key = ("windows", tuple(spatial))
    if key not in ctx.cache:
        ctx.cache[key] = _pool_windows(ctx.node, spatial)
    return ctx.cache[key]


class _Pool:
    """Mixin of the windowed pools: refuse at build a window the declared input cannot hold."""

    def check_shapes(self, node, shapes):
        shape = shapes[0] if shapes else None
        if shape is not None and len(shape) > 2 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
            _pool_windows(node, shape[2:], ModelLoadError)


@builtin_rule("AveragePool")
class AveragePool(_Pool, Linear):
    def _counts(self, ctx, windows: Windows, dtype):
        key = ("counts", windows.spatial, ctx.xp.__name__, dtype)
        if key not in ctx.cache:
            counts = windows.counts(bool(ctx.attr("count_include_pad", 0)))
            ctx.cache[key] = ctx.xp.asarray(counts, dtype=dtype)
        return ctx.cache[key]

    def forward(self, ctx, x):
        windows = _pool_geometry(ctx, x.shape[2:])
        padded = windows.pad(ctx.xp, x, 0)
        total = None
        for sl in windows.offsets():
            part = padded[(Ellipsis,) + sl]
            total = part.copy() if total is None else total + part
        return total / self._counts(ctx, windows, x.dtype)

    def backward(self, ctx, g):
        shape = ctx.input_shape(0)
        windows = _pool_geometry(ctx, shape[2:])
        share = g / self._counts(ctx, windows, g.dtype)
        return (scatter_to_windows(ctx.xp, windows, g.shape[:3], lambda k: share, g.dtype),)


@builtin_rule("GlobalAveragePool")
class GlobalAveragePool(Linear):
    def forward(self, ctx, x):
        return accurate_sum(x, tuple(range(2, x.ndim)), keepdims=True, mean=True)

    def backward(self, ctx, g):
        shape = ctx.input_shape(0)
        count = int(np.prod(shape[2:]))
        return (ctx.xp.broadcast_to(g / count, (g.shape[0],) + shape),)


def _reduce_axes(ctx, x_ndim):
    axes = ctx.attr_or_input("axes", 1, None)
    if axes is None or (isinstance(axes, list) and not axes):
        if ctx.attr("noop_with_empty_axes", 0):
            return []
        axes = list(range(x_ndim))
    return _normalized_axes(axes, x_ndim)


@builtin_rule("ReduceSum", "ReduceMean")
class ReduceLinear(Linear):
    def forward(self, ctx, x, *unused):
        axes = _reduce_axes(ctx, x.ndim)
        if not axes:
            return x
        return accurate_sum(x, tuple(axes), keepdims=bool(ctx.attr("keepdims", 1)),
                            mean=ctx.node.op_type == "ReduceMean")

    def backward(self, ctx, g):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        axes = _reduce_axes(ctx, len(shape))
        if not axes:
            return g, None
        if not ctx.attr("keepdims", 1):
            g = xp.expand_dims(g, tuple(a + 1 for a in sorted(axes)))
        if ctx.node.op_type == "ReduceMean":
            g = g / int(np.prod([shape[a] for a in axes]))
        return xp.broadcast_to(g, (g.shape[0],) + shape), None


@builtin_rule("Pad")
class Pad(Linear):
    """Constant, reflect, edge and wrap padding (linear in the padded input)."""

    def _pads(self, ctx, ndim):
        pads = ctx.attr_or_input("pads", 1, None)
        axes = ctx.const(3) if len(ctx.node.inputs) > 3 and ctx.node.inputs[3] else None
        axes = list(range(ndim)) if axes is None else [a % ndim for a in axes.tolist()]
        width = [(0, 0)] * ndim
        n = len(axes)
        for i, a in enumerate(axes):
            width[a] = (int(pads[i]), int(pads[i + n]))
        if any(p < 0 for pair in width for p in pair):
            raise RuleError(f"Pad node {ctx.node.name!r}: negative pads (cropping) are not supported")
        return width

    def abs_forward(self, ctx, d, *unused):
        return self.forward(ctx, d, zero_fill=True)

    def forward(self, ctx, x, *unused, zero_fill=False):
        xp = ctx.xp
        width = self._pads(ctx, x.ndim)
        mode = ctx.attr("mode", "constant")
        if mode == "constant":
            value = None if zero_fill else (ctx.const(2) if len(ctx.node.inputs) > 2 and ctx.node.inputs[2] else None)
            fill = ctx.attr("value", 0.0) if value is None or value.size == 0 else value.item()  # attr: opset < 11
            return xp.pad(x, width, mode="constant", constant_values=fill)
        return xp.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])

    def backward(self, ctx, g):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        width = self._pads(ctx, len(shape))
        mode = ctx.attr("mode", "constant")
        if mode == "constant":
            sl = (slice(None),) + tuple(slice(lo, lo + n) for (lo, _), n in zip(width, shape))
            return g[sl], None, None
        # reflect/edge/wrap read input positions several times: scatter-add through an index map
        index = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:])
        mapped = np.pad(index, width[1:], mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])
        rows = g.shape[0] * g.shape[1]
        gx = scatter_add(xp, g.reshape(rows, -1), mapped.reshape(-1), index.size)
        return gx.reshape((g.shape[0],) + shape), None, None


@builtin_rule("Scaler", domain="ai.onnx.ml")
class Scaler(Linear):
    """scikit-learn's StandardScaler/MinMaxScaler as skl2onnx exports it: y = (x - offset) * scale."""

    signed = True

    def _params(self, ctx, x):
        xp = ctx.xp
        offset = xp.asarray(np.asarray(ctx.attr("offset", [0.0]), dtype=x.dtype))
        scale = xp.asarray(np.asarray(ctx.attr("scale", [1.0]), dtype=x.dtype))
        return offset, scale

    def forward(self, ctx, x):
        offset, scale = self._params(ctx, x)
        return (x - offset) * scale

    def backward(self, ctx, g):
        return (g * self._params(ctx, g)[1],)

    def abs_forward(self, ctx, d):
        return d * abs(self._params(ctx, d)[1])

    def abs_backward(self, ctx, g):
        return (g * abs(self._params(ctx, g)[1]),)
