"""Selections: comparisons and boolean logic, Where, and gathers/scatters by index.

Booleans are read as the numbers 0 and 1, so every op here has an exact multiplier:
- a comparison c = cmp(u, v) is a step function of d = u - v (Equal an indicator), and
  DeepLIFT's Rescale rule (2.3.4) gives m_u = -m_v = dc/dd, zero where c did not change
  (the gradient is zero almost everywhere, which is what saliency uses);
- Not = 1 - p is affine; And = pq, Or = p + q - pq and Xor = p + q - 2pq are bilinear and
  take the product rule (2.3.5), exact as for Mul;
- Where(c, a, b) = b + c (a - b) is bilinear in c and (a - b): m_a = c', m_b = 1 - c',
  m_c = a' - b' with ' the mean of actual and reference (c' = 1/2 where the condition
  switched). This is the Shapley value of the three changes and conserves exactly:
  dy = c' da + (1 - c') db + dc (a' - b'). For Where(x > t, x, f(x)) of one tensor the
  three paths meet at x, so x gets (y - y0)/(x - x0): the Rescale of the piecewise function.
Gathers and scatters are affine maps (2.3.1) for fixed indices: backward is a scatter-add
(of a gather) through flat positions per sample. Indices computed from the input (an
argmax) are fixed only if actual and reference select the same positions; where they do
not, DeepLIFT has no rule for the switch and the rule refuses.
"""
from __future__ import annotations

import operator

import numpy as np

from liftir.kernels.scatter import scatter_add
from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Linear, Rule, RuleError, difference, is_traced, unbroadcast


def _midpoint_number(ctx, index, dtype):
    """(x + x0)/2 of input `index` as a float array (constants: the constant itself)."""
    if ctx.is_const(index):
        return ctx.input_value(index).astype(dtype)
    x = ctx.x(index).astype(dtype)
    x0 = ctx.x0(index)
    return x if x0 is None else (x + x0.astype(dtype)) * 0.5


class _Boolean(Rule):
    """Ops with a boolean (or integer) output: multipliers only in DeepLIFT, where booleans
    are the numbers 0/1; their gradients are zero, so gradient modes pass none."""

    modes = MODES
    paper_rule = "boolean output read as 0/1"

    def describe(self, mode):
        return self.paper_rule if mode == Mode.DEEPLIFT else "zero gradient (no multiplier)"

    def backward(self, ctx, g):
        if ctx.mode != Mode.DEEPLIFT:
            return (None,) * len(ctx.node.inputs)
        return self.deeplift(ctx, g)


_COMPARE = {"Greater": operator.gt, "Less": operator.lt, "Equal": operator.eq,
            "GreaterOrEqual": operator.ge, "LessOrEqual": operator.le}


@builtin_rule(*_COMPARE)
class Compare(_Boolean):
    """c = cmp(u, v), a step (Equal: an indicator) of u - v: Rescale m_u = -m_v = dc/dd."""

    paper_rule = "rescale (2.3.4) of a step of u - v: m_u = -m_v = dc/d(u - v)"

    def forward(self, ctx, a, b):
        return _COMPARE[ctx.node.op_type](a, b)

    def deeplift(self, ctx, g):
        xp = ctx.xp
        dtype = g.dtype
        dc = ctx.y(0).astype(dtype) - ctx.y0(0).astype(dtype)
        dd = 0
        for i, sign in ((0, 1), (1, -1)):
            if not ctx.is_const(i):
                dd = dd + sign * difference(xp, ctx.x(i).astype(dtype), ctx.x0(i).astype(dtype))
        dd = xp.broadcast_to(xp.asarray(dd, dtype=dtype), dc.shape)
        changed = dc != 0  # then u - v changed sign (or left 0), so dd != 0
        m = xp.where(changed, dc / xp.where(changed, dd, xp.ones_like(dd)), xp.zeros_like(dc))
        gm = xp.where(changed, g * m, xp.zeros_like(g))  # g may be inf where nothing switched
        return tuple(None if ctx.is_const(i) else unbroadcast(xp, sign * gm, ctx.input_shape(i))
                     for i, sign in ((0, 1), (1, -1)))


@builtin_rule("IsNaN", "IsInf")
class NonFiniteTest(_Boolean):
    """Constant (False) on finite numbers: no multiplier."""

    paper_rule = "constant on finite inputs: m = 0"

    def forward(self, ctx, x):
        xp = ctx.xp
        if ctx.node.op_type == "IsNaN":
            return x != x
        pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
        inf = xp.asarray(np.inf, dtype=x.dtype)
        return ((x == inf) & bool(pos)) | ((x == -inf) & bool(neg))

    def deeplift(self, ctx, g):
        return (None,)


@builtin_rule("ArgMax", "ArgMin")
class ArgExtreme(_Boolean):
    """Integer positions (indices for a gather): no multiplier; a gather using them checks
    that actual and reference select alike."""

    paper_rule = "integer output: no multiplier"

    def forward(self, ctx, x):
        xp = ctx.xp
        axis = ctx.attr("axis", 0) % x.ndim
        if axis == 0:
            raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r} reduces the batch axis 0")
        score = x if ctx.node.op_type == "ArgMax" else -x
        if ctx.attr("select_last_index", 0):
            flipped = score[(slice(None),) * axis + (slice(None, None, -1),)]
            pick = x.shape[axis] - 1 - xp.argmax(flipped, axis=axis)
        else:
            pick = xp.argmax(score, axis=axis)
        pick = pick.astype(np.int64)
        return xp.expand_dims(pick, axis) if ctx.attr("keepdims", 1) else pick

    def deeplift(self, ctx, g):
        return (None,)


@builtin_rule("Not")
class Not(_Boolean):
    paper_rule = "affine (2.3.1): 1 - p, m = -1"

    def forward(self, ctx, p):
        return ~p

    def deeplift(self, ctx, g):
        return (-g,)


@builtin_rule("And", "Or", "Xor")
class Logic(_Boolean):
    """On 0/1: And = pq, Or = p + q - pq, Xor = p + q - 2pq; product rule (2.3.5)."""

    paper_rule = "product (2.3.5) on 0/1: And = pq, Or = p + q - pq, Xor = p + q - 2pq"

    def forward(self, ctx, p, q):
        op = ctx.node.op_type
        return (p & q) if op == "And" else (p | q) if op == "Or" else (p ^ q)

    def deeplift(self, ctx, g):
        linear, product = {"And": (0, 1), "Or": (1, -1), "Xor": (1, -2)}[ctx.node.op_type]
        xp = ctx.xp
        grads = []
        for i in (0, 1):
            if ctx.is_const(i):
                grads.append(None)
                continue
            other = _midpoint_number(ctx, 1 - i, g.dtype)
            grads.append(unbroadcast(xp, g * (linear + product * other), ctx.input_shape(i)))
        return tuple(grads)


@builtin_rule("Where")
class Where(Rule):
    """y = b + c (a - b): m_a = c', m_b = 1 - c', m_c = a' - b' (means of actual and reference)."""

    modes = MODES
    paper_rule = "selection: m_a = c', m_b = 1 - c', m_cond = a' - b' (product rule 2.3.5 on b + c(a - b))"

    def describe(self, mode):
        if mode == Mode.DEEPLIFT:
            return self.paper_rule
        return "gradient: m_a = c, m_b = 1 - c"

    def forward(self, ctx, c, a, b):
        return ctx.xp.where(c, a, b)

    def backward(self, ctx, g):
        xp = ctx.xp
        dtype = g.dtype
        if ctx.mode == Mode.DEEPLIFT:
            c = _midpoint_number(ctx, 0, dtype)
        else:
            c = ctx.input_value(0) if ctx.is_const(0) else ctx.x(0)
            c = c.astype(dtype)
        ga = None if ctx.is_const(1) else unbroadcast(xp, g * c, ctx.input_shape(1))
        gb = None if ctx.is_const(2) else unbroadcast(xp, g * (1 - c), ctx.input_shape(2))
        gc = None
        if ctx.mode == Mode.DEEPLIFT and not ctx.is_const(0):
            switched = ctx.x(0) != ctx.x0(0)
            if bool(switched.any()):
                spread = _midpoint_number(ctx, 1, dtype) - _midpoint_number(ctx, 2, dtype)
                spread = xp.where(switched, spread, xp.zeros_like(spread))  # inf branches stay put
                with np.errstate(invalid="ignore"):  # 0 * inf where a branch is infinite: below
                    gc = xp.where(switched, g * spread, xp.zeros_like(g))
                jump = ~(abs(spread) < np.inf)  # switched to or from an infinite branch (a -inf mask)
                if bool(jump.any()):
                    gc = _infinite_switch(ctx, xp, g, gc, jump)
                gc = unbroadcast(xp, gc, ctx.input_shape(0))
            else:
                gc = xp.zeros((g.shape[0],) + ctx.input_shape(0), dtype=dtype)
        return gc, ga, gb


def _infinite_switch(ctx, xp, g, gc, jump):
    """A condition that switches the output between a finite and an infinite branch (a -inf
    mask in one pass only) changes it by an infinite amount. Where nothing downstream reads
    that change (g = 0: a Relu flat there, say) the condition carries nothing, not 0 * inf =
    NaN; where something does, no finite multiplier can carry it: refuse by node name."""
    jump = xp.broadcast_to(jump, g.shape)
    if not is_traced(g) and bool((jump & (g != 0)).any()):
        raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: its condition switches the output between "
                        f"a finite and an infinite branch (e.g. a -inf attention mask that differs between the "
                        f"input and its reference), an infinite change that no finite DeepLIFT multiplier "
                        f"carries; give the reference the input's own mask, or use a gradient method")
    return xp.where(jump, xp.zeros((), dtype=gc.dtype), gc)


# ---- gathers and scatters: flat positions per sample ---------------------------------------

def _refuse(ctx, what):
    raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {what}")


def _index_rows(ctx, idx, rows):
    """Indices with one row per batch row: constants of a batch-1 export are shared."""
    if idx.shape[0] == rows:
        return idx
    if idx.shape[0] == 1:
        return ctx.xp.broadcast_to(idx, (rows,) + tuple(idx.shape[1:]))
    _refuse(ctx, f"the indices have {idx.shape[0]} rows on axis 0 where the data has {rows}; "
                 f"liftir needs every op to keep samples apart on axis 0")


def _normalized(xp, idx, size):
    idx = idx.astype(np.int64)
    return xp.where(idx < 0, idx + size, idx)


def _sample_strides(data_shape):
    """Flat strides of dims 1.. within one sample (strides[d - 1] for dim d)."""
    return [int(np.prod(data_shape[d + 1:])) for d in range(1, len(data_shape))]


def _element_positions(ctx, xp, idx, data_shape, axis):
    """GatherElements/ScatterElements: flat position in one sample's data of each index entry."""
    idx = _normalized(xp, idx, data_shape[axis])
    strides = _sample_strides(data_shape)
    pos = xp.zeros(idx.shape, dtype=np.int64)
    for d in range(1, len(data_shape)):
        if d == axis:
            coord = idx
        else:
            shape = [1] * idx.ndim
            shape[d] = idx.shape[d]
            coord = xp.arange(idx.shape[d], dtype=np.int64).reshape(shape)
        pos = pos + coord * int(strides[d - 1])
    return pos


def _nd_positions(ctx, xp, idx, data_shape, batch_dims, shared=False):
    """GatherND/ScatterND: flat per-sample positions (rows, ...out) of every selected element.

    With batch_dims 0 the first coordinate picks the row: it must be the row itself, or 0 in
    indices shared by all rows (a constant of a batch-1 export)."""
    if batch_dims == 0:
        rows = xp.arange(idx.shape[0], dtype=np.int64).reshape((-1,) + (1,) * (idx.ndim - 2))
        first = _normalized(xp, idx[..., 0], data_shape[0])
        if idx.ndim < 2 or not (bool((first == rows).all()) or (shared and not bool(first.any()))):
            _refuse(ctx, "the indices select across samples (their first coordinate is not the row of "
                         "axis 0); liftir needs every op to keep samples apart on axis 0")
        idx, b = idx[..., 1:], 1
    else:
        b = batch_dims
    k_rest = idx.shape[-1]
    strides = _sample_strides(data_shape)
    base = xp.zeros(idx.shape[:-1], dtype=np.int64)
    for d in range(1, b):  # batch dims beyond axis 0: the coordinate is the position itself
        shape = [1] * (idx.ndim - 1)
        shape[d] = idx.shape[d]
        base = base + xp.arange(idx.shape[d], dtype=np.int64).reshape(shape) * int(strides[d - 1])
    for j in range(k_rest):
        d = b + j
        base = base + _normalized(xp, idx[..., j], data_shape[d]) * int(strides[d - 1])
    inner_shape = tuple(data_shape[b + k_rest:])
    inner = int(np.prod(inner_shape)) if inner_shape else 1
    pos = base.reshape(base.shape + (1,)) + xp.arange(inner, dtype=np.int64)
    return pos.reshape(base.shape + inner_shape)


class _Indexed(Linear):
    """Shared by gathers and scatters: indices fixed per sample, checked equal in DeepLIFT."""

    index_input = 1

    def _shared(self, ctx):
        """Constant indices with one row, shared by every batch row."""
        return ctx.is_const(self.index_input) and ctx.const(self.index_input).shape[0] == 1

    def _indices(self, ctx, rows, stacked=None):
        if ctx.is_const(self.index_input):
            return _index_rows(ctx, ctx.xp.asarray(ctx.const(self.index_input)), rows)
        idx = stacked if stacked is not None else ctx.x(self.index_input)
        if stacked is None and ctx.mode == Mode.DEEPLIFT:
            ref = ctx.x0(self.index_input)
            if ref is not None and not bool((ref == idx).all()):
                _refuse(ctx, "its indices depend on the input and differ between the actual input and the "
                             "reference; DeepLIFT has no rule for a switch of integer indices. Use a reference "
                             "that selects the same positions, or a gradient method")
        return _index_rows(ctx, idx, rows)

    @staticmethod
    def _gather_flat(xp, data, pos):
        """data (rows, ...) at per-sample flat positions pos (rows, ...)."""
        rows = data.shape[0]
        flat = data.reshape(rows, -1)
        return xp.take_along_axis(flat, pos.reshape(rows, -1), axis=1).reshape(pos.shape)

    @staticmethod
    def _scatter_flat(xp, values, pos, size):
        """Transpose of `_gather_flat`: values (K, P, ...out) summed into (K, P, size)."""
        k, p = values.shape[0], values.shape[1]
        m = int(np.prod(pos.shape[1:]))
        offsets = xp.arange(p, dtype=np.int64)[:, None] * size
        flat_pos = (pos.reshape(p, m) + offsets).reshape(-1)
        return scatter_add(xp, values.reshape(k, p * m), flat_pos, p * size).reshape(k, p, size)


class _Gather(_Indexed):
    def forward(self, ctx, x, idx):
        pos = self._positions(ctx, x.shape, self._indices(ctx, x.shape[0], stacked=idx))
        return self._gather_flat(ctx.xp, x, pos)

    def abs_forward(self, ctx, dx, _):
        """|L| = L (0/1 weights), on the P actual rows with their indices."""
        pos = self._positions(ctx, dx.shape, self._indices(ctx, dx.shape[0]))
        return self._gather_flat(ctx.xp, dx, pos)

    def backward(self, ctx, g):
        shape = ctx.input_shape(0)
        pos = self._positions(ctx, shape, self._indices(ctx, shape[0]))
        size = int(np.prod(shape[1:]))
        return self._scatter_flat(ctx.xp, g, pos, size).reshape((g.shape[0],) + shape), None


def _axis_positions(ctx, shape, idx, verb: str):
    """Flat positions of GatherElements / ScatterElements along `axis`, never the batch's."""
    axis = ctx.attr("axis", 0) % len(shape)
    if axis == 0:
        _refuse(ctx, f"{verb} along the batch axis 0; liftir needs every op to keep samples apart")
    return _element_positions(ctx, ctx.xp, idx, shape, axis)


@builtin_rule("GatherElements")
class GatherElements(_Gather):
    def _positions(self, ctx, shape, idx):
        return _axis_positions(ctx, shape, idx, "gathers")


@builtin_rule("GatherND")
class GatherND(_Gather):
    def _positions(self, ctx, shape, idx):
        return _nd_positions(ctx, ctx.xp, idx, shape, ctx.attr("batch_dims", 0), self._shared(ctx))


class _Scatter(_Indexed):
    """y = data with updates written (or added) at the indices: affine in (data, updates)."""

    def _reduction(self, ctx):
        reduction = ctx.attr("reduction", "none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction not in ("none", "add"):
            _refuse(ctx, f"reduction {reduction!r} is not affine in the updates; liftir supports 'none' "
                         f"and 'add'")
        return reduction

    def _apply(self, ctx, data, updates, idx):
        xp = ctx.xp
        rows = data.shape[0]
        pos = self._positions(ctx, data.shape, idx).reshape(rows, -1)
        size = int(np.prod(data.shape[1:]))
        added = scatter_add(xp, updates.reshape(rows, -1), pos, size).astype(data.dtype)
        flat = data.reshape(rows, size)
        if self._reduction(ctx) == "none":
            hit = scatter_add(xp, xp.ones(pos.shape, dtype=data.dtype), pos, size) > 0
            flat = xp.where(hit, xp.zeros_like(flat), flat)
        return (flat + added).reshape(data.shape)

    def forward(self, ctx, data, idx, updates):
        return self._apply(ctx, data, updates, self._indices(ctx, data.shape[0], stacked=idx))

    def abs_forward(self, ctx, d_data, _, d_updates):
        """|L| = L (0/1 weights) on the differences; a constant side contributes none."""
        xp = ctx.xp
        ref = d_data if d_data is not None else d_updates
        p = ref.shape[0]
        if d_data is None:
            d_data = xp.zeros((p,) + tuple(ctx.input_value(0).shape[1:]), dtype=ref.dtype)
        if d_updates is None:
            d_updates = xp.zeros((p,) + tuple(ctx.input_value(2).shape[1:]), dtype=ref.dtype)
        return self._apply(ctx, d_data, d_updates, self._indices(ctx, p))

    def backward(self, ctx, g):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        p = shape[0]
        pos = self._positions(ctx, shape, self._indices(ctx, p)).reshape(p, -1)
        k = g.shape[0]
        flat = g.reshape(k, p, -1)
        g_updates = None
        if not ctx.is_const(2):
            g_updates = xp.take_along_axis(flat, pos[None], axis=2).reshape((k,) + ctx.input_shape(2))
        g_data = None
        if not ctx.is_const(0):
            g_data = flat
            if self._reduction(ctx) == "none":
                hit = scatter_add(xp, xp.ones(pos.shape, dtype=g.dtype), pos, flat.shape[2]) > 0
                g_data = xp.where(hit[None], xp.zeros_like(flat), flat)
            g_data = g_data.reshape((k,) + shape)
        return g_data, None, g_updates


@builtin_rule("ScatterElements")
class ScatterElements(_Scatter):
    def _positions(self, ctx, shape, idx):
        return _axis_positions(ctx, shape, idx, "scatters")


@builtin_rule("ScatterND")
class ScatterND(_Scatter):
    def _positions(self, ctx, shape, idx):
        return _nd_positions(ctx, ctx.xp, idx, shape, 0, self._shared(ctx))
