"""Products of two activations (paper 2.3.5), and Mul/MatMul/Div with a constant operand.

For y = x1 * x2: dy = dx1 (x0_2 + dx2/2) + dx2 (x0_1 + dx1/2), so the multipliers are
m1 = x0_2 + dx2/2 and m2 = x0_1 + dx1/2 (the mean of actual and reference of the other
factor). The same bilinear split holds for MatMul of two activations (attention scores):
with A' = (A + A0)/2, dY = dA B' + A' dB exactly. With one constant operand both ops are
affine (2.3.1) and the multiplier is that constant.
"""
from __future__ import annotations

import numpy as np

from liftir.errors import InputError
from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Rule, unbroadcast


def _midpoint(ctx, index):
    x0 = ctx.x0(index)
    x = ctx.x(index)
    if x0 is None:
        return x
    mid = x + x0
    mid *= 0.5
    return mid


class _Bilinear(Rule):
    """Shared by Mul and MatMul: bilinear in two activations, affine with a constant operand."""

    modes = MODES
    paper_rule = "affine (2.3.1) with a constant operand; product (2.3.5) of two activations"
    signed = True  # a constant operand may be negative: RevealCancel's |L| uses |constant|

    def describe(self, mode):
        if mode == Mode.DEEPLIFT:
            return "product (2.3.5): m1 = x0_2 + dx2/2; affine (2.3.1) with a constant operand"
        return "gradient: m1 = x2; affine with a constant operand"

    def is_affine(self, ctx):
        return ctx.is_const(0) or ctx.is_const(1)

    def _op(self, xp):
        raise NotImplementedError

    def forward(self, ctx, a, b):
        return self._op(ctx.xp)(a, b)

    def abs_forward(self, ctx, da, db):
        op = self._op(ctx.xp)
        return op(da, abs(ctx.input_value(1))) if da is not None else op(abs(ctx.input_value(0)), db)

    def abs_backward(self, ctx, g):
        original = ctx.input_value
        ctx.input_value = lambda i: abs(original(i))
        try:
            return self.backward(ctx, g)
        finally:
            ctx.input_value = original


def _actual_rows(ctx, index, value):
    """A shape-derived operand (e.g. ConstantOfShape(Shape(x))) spans all stacked rows,
    actual and reference; it is equal on both, so the P actual rows of it pair with g."""
    rows = ctx.n_actual
    stacked = ctx.node.inputs[index] and not ctx.node.inputs[index] in ctx._plan.graph.constants
    if stacked and value.ndim and value.shape[0] not in (1, rows):
        return value[:rows]
    return value


@builtin_rule("Mul")
class Mul(_Bilinear):
    def _op(self, xp):
        return xp.multiply

    def backward(self, ctx, g):
        xp = ctx.xp
        const_a, const_b = ctx.is_const(0), ctx.is_const(1)

        def other(index):
            # with a constant factor the midpoint is the constant itself: one formula serves both
            if ctx.is_const(index):
                return _actual_rows(ctx, index, ctx.input_value(index))
            return _midpoint(ctx, index) if ctx.mode == Mode.DEEPLIFT else ctx.x(index)

        # each factor's multiplier is the other's midpoint: computed only for an input that
        # gets a multiplier (never for a constant's), and written over when it is a temporary
        ga = None if const_a else unbroadcast(xp, _times(xp, g, other(1), ctx.mode == Mode.DEEPLIFT and not const_b),
                                              ctx.input_shape(0))
        gb = None if const_b else unbroadcast(xp, _times(xp, g, other(0), ctx.mode == Mode.DEEPLIFT and not const_a),
                                              ctx.input_shape(1))
        return ga, gb


def _times(xp, g, factor, temporary):
    """g * factor, into factor's own memory when it is a temporary of g's shape (one target)."""
    if temporary and xp is np and g.shape[0] == 1 and tuple(factor.shape) == tuple(g.shape[1:]) \
            and factor.dtype == np.result_type(g.dtype, factor.dtype) and factor.flags.c_contiguous:
        out = factor.reshape(g.shape)
        return xp.multiply(g, factor, out=out)
    return g * factor


@builtin_rule("MatMul")
class MatMul(_Bilinear):
    splits_by_term = True  # with a constant operand: a dense layer (RevealCancel's linear rule)

    def _op(self, xp):
        return xp.matmul

    def check_shapes(self, node, shapes):
        """Refuse, when the Explainer is built, a product whose declared shapes show it sums
        over a symbolic leading axis of an operand (x^T x over the samples, a 1-D activation):
        a batch axis the product would contract. Moved batch axes elsewhere are found by
        liftir/batch_axis.py from the run's shapes."""
        from liftir.errors import BatchAxisError

        shapes = list(shapes) + [None] * (2 - len(shapes))
        for index, shape in enumerate(shapes[:2]):
            if not shape:
                continue
            contracted = len(shape) - 1 if index == 0 or len(shape) == 1 else len(shape) - 2
            if contracted == 0 and isinstance(shape[0], str):
                raise BatchAxisError(
                    f"MatMul node {node.name!r}: its {'first' if index == 0 else 'second'} operand is a "
                    f"{len(shape)}-D activation of shape {tuple(shape)}, so the product sums over its "
                    f"axis 0 ({shape[0]!r}), the batch axis: one sample's result would depend on another's")

    def forward(self, ctx, a, b):
        """Name the node on a shape mismatch. (A product that contracts or broadcasts the
        batch axis is refused by liftir/batch_axis.py, wherever the exporter put the batch.)"""
        try:
            return ctx.xp.matmul(a, b)
        except ValueError as exc:
            raise InputError(f"MatMul node {ctx.node.name!r}: operands of shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)} do not multiply ({exc})") from None

    def _operand(self, ctx, index):
        if ctx.is_const(index):
            return ctx.input_value(index)
        return _midpoint(ctx, index) if ctx.mode == Mode.DEEPLIFT else ctx.x(index)

    def backward(self, ctx, g):
        xp = ctx.xp
        const_a, const_b = ctx.is_const(0), ctx.is_const(1)
        # each operand is read only for the other's multiplier (a dense layer: the weight
        # alone); of an activation next to a constant, only the rank
        if ctx.mode == Mode.DEEPLIFT and not (const_a or const_b) \
                and ctx.x0(0) is not None and ctx.x0(1) is not None:
            a, b, g = _halved_once(ctx, g)
        else:
            a = None if const_b else self._operand(ctx, 0)
            b = None if const_a else self._operand(ctx, 1)
        a_ndim = len(ctx.input_shape(0)) if a is None else a.ndim
        b_ndim = len(ctx.input_shape(1)) if b is None else b.ndim
        ga = gb = None
        if not const_a:
            if b_ndim == 1:
                ga = g[..., None] * b
            else:
                ga = _blas_matmul(xp, g if a_ndim > 1 else g[..., None, :], xp.swapaxes(b, -1, -2))
                if a_ndim == 1:
                    ga = ga[..., 0, :]
            ga = unbroadcast(xp, ga, ctx.input_shape(0))
        if not const_b:
            if a_ndim == 1:
                gb = a[:, None] * (g[..., None, :] if b_ndim > 1 else g[..., None])
                gb = gb if b_ndim > 1 else gb[..., 0]
            else:
                gg = g if b_ndim > 1 else g[..., None]
                gb = _blas_matmul(xp, xp.swapaxes(a, -1, -2), gg)
                if b_ndim == 1:
                    gb = gb[..., 0]
            gb = unbroadcast(xp, gb, ctx.input_shape(1))
        return ga, gb


def _halved_once(ctx, g):
    """Two activations' product rule, dY = dA B' + A' dB with A' = (A + A0) / 2: the sums
    A + A0, B + B0 and the half put on g, which serves both products, when g is the smaller
    (attention's P V: g and V are a quarter of P's scores), else on the sums. Scaling by 1/2
    is exact, so either way every bit is the midpoints'. The interpreter saves a pass over P
    (Enformer-style net 0.96x, order-balanced ab.py); a compiled pass gains nothing, as
    onnxruntime folds either scale into its MatMul (MatMulScaleFusion)."""
    a = ctx.x(0) + ctx.x0(0)
    b = ctx.x(1) + ctx.x0(1)
    if g.size <= a.size + b.size:
        return a, b, g * 0.5
    a *= 0.5
    b *= 0.5
    return a, b, g


def _blas_matmul(xp, a, b):
    """a @ b as few BLAS calls as it can be.

    NumPy's stacked matmul runs one small product per leading index, and falls back to its
    own loop (10-20x slower) when an operand's matrices are not contiguous, as a multiplier
    that came through a Transpose, or a transposed weight, often is. A 2-D right operand
    (a weight) makes the whole stack one product of (rows, n) x (n, p); otherwise both
    operands are made contiguous first."""
    if b.ndim == 2 and a.ndim > 2:
        rows = xp.ascontiguousarray(a).reshape(-1, a.shape[-1])
        return xp.matmul(rows, b).reshape(a.shape[:-1] + (b.shape[-1],))
    if a.ndim > 2 or b.ndim > 2:
        return xp.matmul(xp.ascontiguousarray(a), xp.ascontiguousarray(b))
    return xp.matmul(a, b)


@builtin_rule("Div")
class Div(Rule):
    """a / b. A constant divisor makes it affine (2.3.1): m = 1/b. An activation divisor is
    the product a * (1/b): Rescale (2.3.4) on the reciprocal, m = -1/(b b0), and the product
    rule (2.3.5) on the product, so m_a = (1/b + 1/b0)/2 and m_b = -(a + a0)/2 / (b b0),
    which conserve a/b - a0/b0 exactly (a constant numerator is its own midpoint)."""

    modes = MODES
    signed = True  # a constant divisor may be negative: RevealCancel's |L| uses 1/|b|

    def describe(self, mode):
        if mode == Mode.DEEPLIFT:
            return "product (2.3.5) of a and Rescale (2.3.4) 1/b; affine (2.3.1) with a constant divisor"
        return "gradient: m_a = 1/b, m_b = -a/b^2; affine with a constant divisor"

    def is_affine(self, ctx):
        return ctx.is_const(1)

    def forward(self, ctx, a, b):
        return a / b

    def backward(self, ctx, g):
        xp = ctx.xp
        if ctx.is_const(1):
            b = xp.asarray(ctx.input_value(1), dtype=g.dtype)
            return unbroadcast(xp, g / b, ctx.input_shape(0)), None
        b = ctx.x(1)
        b0 = ctx.x0(1) if ctx.mode == Mode.DEEPLIFT else b
        a_mid = ctx.input_value(0) if ctx.is_const(0) else (
            _midpoint(ctx, 0) if ctx.mode == Mode.DEEPLIFT else ctx.x(0))
        ga = None
        if not ctx.is_const(0):
            m_a = 1 / b
            m_a += 1 / b0
            m_a *= 0.5
            ga = unbroadcast(xp, _times(xp, g, m_a, True), ctx.input_shape(0))
        m_b = b * b0  # then -a_mid / (b b0), in place where the shapes allow
        if tuple(m_b.shape) == tuple(np.broadcast_shapes(tuple(a_mid.shape), tuple(m_b.shape))):
            m_b = xp.divide(a_mid, m_b, out=m_b)
        else:
            m_b = a_mid / m_b
        m_b *= -1
        gb = unbroadcast(xp, _times(xp, g, m_b, True), ctx.input_shape(1))
        return ga, gb

    def abs_forward(self, ctx, d, _):
        return d / abs(ctx.input_value(1))

    def abs_backward(self, ctx, g):
        b = ctx.xp.asarray(abs(ctx.input_value(1)), dtype=g.dtype)
        return unbroadcast(ctx.xp, g / b, ctx.input_shape(0)), None
