"""Views and data movement: reshapes, transposes, slices, concatenation, casts.

All linear (paper 2.3.1) with 0/1 weights, so backward moves multipliers back to where
each value came from, summing where one input value feeds several outputs. Views may move
the samples to any axis (liftir/batch_axis.py follows them and refuses, by node name, a
view that mixes them), so the rules here compute the op exactly as ONNX defines it.
"""
from __future__ import annotations

import numpy as np

from liftir.kernels.scatter import scatter_add
from liftir.errors import InputError
from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import Linear, RuleError, difference, unbroadcast


class _Reshaping(Linear):
    """Any op whose backward is reshaping the multiplier to the input's shape."""

    def abs_forward(self, ctx, d, *unused):
        # RevealCancel runs |L| on the actual rows only; a target shape computed from the
        # stacked batch would not fit them, so take the output's own actual-rows shape
        return d.reshape(ctx.output_shape(0))

    def backward(self, ctx, g):
        return (g.reshape((g.shape[0],) + ctx.input_shape(0)),)


@builtin_rule("Reshape")
class Reshape(_Reshaping):
    """ONNX's Reshape; where the exporter froze a batch size into a target shape that no
    longer fits the stacked batch, the samples keep axis 0."""

    def forward(self, ctx, x, shape_value):
        shape = [int(s) for s in ctx.const(1)]
        if not ctx.attr("allowzero", 0):
            shape = [x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)]
        if not _fits(x.size, shape):
            if not shape or not _fits(int(np.prod(x.shape[1:])), shape[1:]):
                raise RuleError(f"Reshape node {ctx.node.name!r} cannot reshape {tuple(x.shape)} to {tuple(shape)}")
            shape[0] = x.shape[0]  # a frozen batch size: the samples stay on axis 0
        return x.reshape(shape)

    def backward(self, ctx, g):
        return super().backward(ctx, g) + (None,)


def _fits(size: int, shape: list[int]) -> bool:
    known = int(np.prod([s for s in shape if s != -1]))
    return (known > 0 and size % known == 0) if -1 in shape else known == size


@builtin_rule("Flatten")
class Flatten(_Reshaping):
    def forward(self, ctx, x):
        axis = ctx.attr("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape((int(np.prod(x.shape[:axis])), -1))


@builtin_rule("Squeeze")
class Squeeze(_Reshaping):
    def forward(self, ctx, x, *unused):
        axes = ctx.attr_or_input("axes", 1, None)
        if axes is None:
            axes = [i for i, s in enumerate(x.shape) if s == 1 and i > 0]
        axes = [a % x.ndim for a in np.atleast_1d(axes).tolist()]
        return ctx.xp.squeeze(x, axis=tuple(axes)) if axes else x

    def backward(self, ctx, g):
        return super().backward(ctx, g) + (None,)


@builtin_rule("Unsqueeze")
class Unsqueeze(_Reshaping):
    def forward(self, ctx, x, *unused):
        axes = np.atleast_1d(ctx.attr_or_input("axes", 1, None)).tolist()
        out_rank = x.ndim + len(axes)
        axes = sorted(a % out_rank for a in axes)
        return ctx.xp.expand_dims(x, tuple(axes))

    def backward(self, ctx, g):
        return super().backward(ctx, g) + (None,)


@builtin_rule("Identity", "Dropout")
class Identity(Linear):
    """Identity, and Dropout in inference (its mask output, if any, is all ones)."""

    def forward(self, ctx, x, *unused):
        if ctx.node.op_type == "Dropout" and ctx.attr("training_mode") is None and ctx.const(2) is not None \
                and bool(ctx.const(2)):
            raise RuleError(f"Dropout node {ctx.node.name!r} is in training mode; export in eval mode")
        if len(ctx.node.outputs) > 1:
            return x, ctx.xp.ones(x.shape, dtype=bool)
        return x

    def backward(self, ctx, g, *unused):
        return (g,)


@builtin_rule("Cast", "CastLike")
class Cast(Linear):
    """Casts read booleans and integers as the numbers 0/1 and n, as rules/selection.py does.

    Between number types that keep the value (float to float, bool or int to float: Keras'
    `Cast(mask, float)`) the cast is the identity, m = 1. Into bool or an integer type from
    a float it is a step function (x != 0, truncation): DeepLIFT's Rescale m = dy/dx (zero
    where nothing changed), the gradient is zero. Before, a mask cast from bool cut the
    path (its change through the masked product was lost, so DeepLIFT missed
    summation-to-delta silently) and a float-to-bool cast passed m = 1.
    """

    type_only_inputs = (1,)  # CastLike(constant, activation) is a constant per sample

    def forward(self, ctx, x, *like):
        if ctx.node.op_type == "CastLike":
            dtype = like[0].dtype
        else:
            from onnx import helper
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ctx.attr("to")))
        return x.astype(dtype)

    def _is_step(self, ctx) -> bool:
        return ctx.input_dtype(0).kind == "f" and ctx.output_dtype(0).kind != "f"

    def backward(self, ctx, g, *unused):
        none = (None,) * len(unused)
        if not self._is_step(ctx):
            source = ctx.input_dtype(0)
            return (g.astype(source) if source.kind == "f" else g,) + none
        if ctx.mode != Mode.DEEPLIFT:
            return (None,) + none
        xp = ctx.xp
        dtype = g.dtype
        x, x0 = ctx.x(0).astype(dtype), ctx.x0(0)
        dy = ctx.y(0).astype(dtype) - ctx.y0(0).astype(dtype)
        dx = difference(xp, x, x0.astype(dtype))
        changed = dy != 0  # then dx != 0
        m = xp.where(changed, dy / xp.where(changed, dx, xp.ones_like(dx)), xp.zeros_like(dx))
        return (xp.where(changed, g * m, xp.zeros_like(g)),) + none

    def describe(self, mode):
        step = "rescale (2.3.4) of a step" if mode == Mode.DEEPLIFT else "zero gradient"
        return f"affine (2.3.1): m = 1; float to bool/int: {step}"

    def is_affine(self, ctx) -> bool:
        return not self._is_step(ctx)


@builtin_rule("Transpose")
class Transpose(Linear):
    def _perm(self, ctx, ndim):
        return ctx.attr("perm", list(reversed(range(ndim))))

    def forward(self, ctx, x):
        return x.transpose(self._perm(ctx, x.ndim))

    def backward(self, ctx, g):
        perm = self._perm(ctx, g.ndim - 1)
        inverse = np.argsort(perm)
        return (g.transpose((0,) + tuple(int(p) + 1 for p in inverse)),)


@builtin_rule("Concat")
class Concat(Linear):
    def abs_forward(self, ctx, *deltas):
        xp = ctx.xp
        ref = next(d for d in deltas if d is not None)
        parts = [d if d is not None else xp.zeros((ref.shape[0],) + tuple(ctx.input_value(i).shape[1:]), ref.dtype)
                 for i, d in enumerate(deltas)]
        return self.forward(ctx, *parts)

    def forward(self, ctx, *xs):
        axis = ctx.attr("axis") % xs[0].ndim
        return ctx.xp.concatenate(xs, axis=axis)

    def backward(self, ctx, g):
        ndim = g.ndim - 1
        axis = ctx.attr("axis") % ndim
        grads, start = [], 0
        for i in range(len(ctx.node.inputs)):
            size = ctx.input_shape(i)[axis]
            sl = (slice(None),) * (axis + 1) + (slice(start, start + size),)
            grads.append(None if ctx.is_const(i) else g[sl])
            start += size
        return tuple(grads)


@builtin_rule("Split")
class Split(Linear):
    def _sizes(self, ctx, x_shape, axis):
        split = ctx.attr_or_input("split", 1, None)
        if split is None:
            n = ctx.attr("num_outputs", len(ctx.node.outputs))
            size = -(-x_shape[axis] // n)
            split = [min(size, x_shape[axis] - i * size) for i in range(n)]
        return [int(s) for s in np.atleast_1d(split)]

    def forward(self, ctx, x, *unused):
        axis = ctx.attr("axis", 0) % x.ndim
        sizes = self._sizes(ctx, x.shape, axis)
        return tuple(ctx.xp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))

    def backward(self, ctx, *grads):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        axis = ctx.attr("axis", 0) % len(shape)
        sizes = self._sizes(ctx, shape, axis)
        k = next(g for g in grads if g is not None).shape[0]
        parts = []
        for g, size in zip(grads, sizes):
            if g is None:
                part_shape = (k,) + shape[:axis] + (size,) + shape[axis + 1:]
                g = xp.zeros(part_shape, dtype=next(g for g in grads if g is not None).dtype)
            parts.append(g)
        return (xp.concatenate(parts, axis=axis + 1),)


@builtin_rule("Slice")
class Slice(Linear):
    def _slices(self, ctx, shape):
        ndim = len(shape)
        if "starts" in ctx.attrs:  # opset < 10
            starts, ends = ctx.attr("starts"), ctx.attr("ends")
            axes, steps = ctx.attr("axes", list(range(len(starts)))), [1] * len(starts)
        else:
            starts, ends = ctx.const(1).tolist(), ctx.const(2).tolist()
            axes = ctx.const(3).tolist() if ctx.const(3) is not None else list(range(len(starts)))
            steps = ctx.const(4).tolist() if ctx.const(4) is not None else [1] * len(starts)
        sl = [slice(None)] * ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            a %= ndim
            size = shape[a]
            s = int(max(-size - 1, min(s, size)))
            e = int(max(-size - 1, min(e, size)))
            if st < 0 and e < -size:
                e = None
            sl[a] = slice(s, e, int(st))
        return tuple(sl)

    def forward(self, ctx, x, *unused):
        return x[self._slices(ctx, x.shape)]

    def backward(self, ctx, g):
        shape = ctx.input_shape(0)
        gx = ctx.xp.zeros((g.shape[0],) + shape, dtype=g.dtype)
        gx[(slice(None),) + self._slices(ctx, shape)] = g
        return (gx, None, None, None, None)


@builtin_rule("Gather")
class Gather(Linear):
    """Gather with constant indices (an embedding lookup of token ids is held: see
    Explainer, integer inputs)."""

    def _indices(self, ctx, shape, axis):
        if not ctx.is_const(1):
            raise RuleError(f"Gather node {ctx.node.name!r}: the indices must be constants")
        idx = ctx.const(1).astype(np.int64)
        return np.where(idx < 0, idx + shape[axis], idx)

    def forward(self, ctx, x, _):
        axis = ctx.attr("axis", 0) % x.ndim
        return ctx.xp.take(x, ctx.xp.asarray(self._indices(ctx, x.shape, axis)), axis=axis)

    def backward(self, ctx, g):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        axis = ctx.attr("axis", 0) % len(shape)
        idx = self._indices(ctx, shape, axis)
        a = axis + 1  # the gathered axes start here in g, after the target axis K
        run = idx.ndim == 1 and idx.size > 0 and bool((np.diff(idx) == 1).all())  # idx[0], idx[0] + 1, ...
        if idx.ndim == 0 or run or (xp is np and np.unique(idx).size == idx.size):
            # no index repeats (a scalar index: q, k, v taken apart; the positions
            # liftir/pruning.py keeps): the transpose is a plain placement into zeros, no
            # scatter-add (a bincount in float64 of every element)
            gx = xp.zeros((g.shape[0],) + tuple(shape), dtype=g.dtype)
            if idx.ndim == 0:  # as a length-1 slice, which a trace records (an int key it does not)
                i = int(idx)
                gx[(slice(None),) * a + (slice(i, i + 1),)] = g.reshape(g.shape[:a] + (1,) + g.shape[a:])
            elif run:  # a slice as well
                gx[(slice(None),) * a + (slice(int(idx[0]), int(idx[-1]) + 1),)] = g
            else:
                gx[(slice(None),) * a + (idx,)] = g
            return gx, None
        g = xp.moveaxis(g, list(range(a, a + idx.ndim)), list(range(g.ndim - idx.ndim, g.ndim)))
        front = g.shape[: g.ndim - idx.ndim]
        gx = scatter_add(xp, g.reshape(-1, idx.size), idx.reshape(-1), shape[axis])
        return xp.moveaxis(gx.reshape(front + (shape[axis],)), -1, a), None


@builtin_rule("Expand")
class Expand(Linear):
    """Broadcast; a batch size the exporter froze into the shape (axis 0) follows the batch."""

    def forward(self, ctx, x, shape):
        return ctx.xp.broadcast_to(x, self._target(ctx, tuple(x.shape)))

    @staticmethod
    def _target(ctx, have: tuple[int, ...]) -> tuple[int, ...]:
        """The broadcast shape of the stacked rows (new leading axes are fine: liftir/batch_axis.py
        follows the samples wherever they go).

        A traced export may bake its batch size into the shape (Expand to (8, C) for a
        batch of 8): when that matches the call's batch, the 8 is read as "the batch"
        and every stacked row (actual and reference) keeps its own sample.
        """
        want = [int(s) for s in ctx.const(1)]
        # the batch is also the stacked rows' count, n + r, when the shape was read off the
        # stacked forward (a Shape folded per call) and this Expand runs on actual rows alone
        # (RevealCancel's split forward)
        if len(want) == len(have) and want[0] not in (1, have[0]):
            if want[0] not in (ctx.n_actual, ctx.n_actual + ctx.n_reference):
                raise InputError(f"Expand node {ctx.node.name!r} expands axis 0 to {want[0]}, a batch "
                                 f"size baked into the model at export, but this call has "
                                 f"{ctx.n_actual} samples: export with a dynamic batch axis, or pass "
                                 f"{want[0]} samples at a time (batch_size={want[0]})")
            want[0] = 1
        aligned = [1] * (len(have) - len(want)) + want
        target = []
        for axis, (h, w) in enumerate(zip(have, aligned)):
            if h != w and 1 not in (h, w):
                raise InputError(f"Expand node {ctx.node.name!r} cannot broadcast its input of shape "
                                 f"{have} to {tuple(want)} (axis {axis}: {h} vs {w})")
            target.append(h if w == 1 else w)
        return tuple(target)

    def backward(self, ctx, g):
        return unbroadcast(ctx.xp, g, ctx.input_shape(0)), None


@builtin_rule("Tile")
class Tile(Linear):
    def forward(self, ctx, x, repeats):
        reps = [int(r) for r in ctx.const(1)]
        return ctx.xp.tile(x, reps)

    def backward(self, ctx, g):
        shape = ctx.input_shape(0)
        reps = [int(r) for r in ctx.const(1)]
        split = (g.shape[0],) + tuple(v for r, s in zip(reps, shape) for v in (r, s))
        summed = g.reshape(split).sum(axis=tuple(1 + 2 * i for i in range(len(shape))))  # the repeat axes
        return summed, None


@builtin_rule("DepthToSpace", "SpaceToDepth")
class DepthSpace(Linear):
    """Pixel (un)shuffles: fixed permutations. Both ops take `mode` (SpaceToDepth since opset
    28): DCR orders the moved channels depth-column-row (block offsets outermost), CRD
    column-row-depth (input channel outermost). SpaceToDepth(mode) and DepthToSpace(mode)
    are each other's inverse, so each one's backward is the other with the same mode."""

    @staticmethod
    def _mode(ctx):
        mode = ctx.attr("mode", "DCR")
        if mode not in ("DCR", "CRD"):
            raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: unknown mode {mode!r} "
                            f"(ONNX defines 'DCR' and 'CRD')")
        return mode

    @staticmethod
    def _move(x, op, block, mode):
        n, c, h, w = x.shape
        if op == "DepthToSpace":
            if mode == "CRD":
                y = x.reshape(n, c // block ** 2, block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
            else:
                y = x.reshape(n, block, block, c // block ** 2, h, w).transpose(0, 3, 4, 1, 5, 2)
            return y.reshape(n, c // block ** 2, h * block, w * block)
        y = x.reshape(n, c, h // block, block, w // block, block)
        y = y.transpose(0, 1, 3, 5, 2, 4) if mode == "CRD" else y.transpose(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * block ** 2, h // block, w // block)

    def forward(self, ctx, x):
        return self._move(x, ctx.node.op_type, ctx.attr("blocksize"), self._mode(ctx))

    def backward(self, ctx, g):
        k = g.shape[0]
        flat = g.reshape((k * g.shape[1],) + g.shape[2:])
        inverse = "DepthToSpace" if ctx.node.op_type == "SpaceToDepth" else "SpaceToDepth"
        back = self._move(flat, inverse, ctx.attr("blocksize"), self._mode(ctx))
        return (back.reshape((k,) + ctx.input_shape(0)),)


@builtin_rule("ReverseSequence")
class ReverseSequence(Linear):
    """Each sample's first `sequence_lens[b]` steps reversed along the time axis (Keras'
    go_backwards and Bidirectional through tf2onnx): a permutation per sample, linear with
    0/1 weights, and its own inverse, so backward applies the same reversal to the
    multipliers. Lengths computed from the input are fixed only where actual and reference
    agree (as for gathers by computed indices); DeepLIFT refuses otherwise."""

    @staticmethod
    def _reverse(xp, x, lens, time_axis: int, batch_axis: int):
        steps = x.shape[time_axis]
        lens = xp.asarray(lens).astype(np.int64).reshape(-1)
        t = xp.arange(steps, dtype=np.int64)
        shape_t = [1] * x.ndim
        shape_t[time_axis] = steps
        shape_b = [1] * x.ndim
        shape_b[batch_axis] = lens.shape[0]
        t, lens = t.reshape(shape_t), lens.reshape(shape_b)
        index = xp.where(t < lens, lens - 1 - t, t)
        return xp.take_along_axis(x, xp.broadcast_to(index, x.shape), axis=time_axis)

    def _axes(self, ctx, ndim):
        return ctx.attr("time_axis", 0) % ndim, ctx.attr("batch_axis", 1) % ndim

    def forward(self, ctx, x, lens):
        time_axis, batch_axis = self._axes(ctx, x.ndim)
        if lens.shape[0] != x.shape[batch_axis]:
            raise RuleError(f"ReverseSequence node {ctx.node.name!r}: sequence_lens has {lens.shape[0]} "
                            f"entries for {x.shape[batch_axis]} rows on batch axis {batch_axis}")
        return self._reverse(ctx.xp, x, lens, time_axis, batch_axis)

    def _actual_lens(self, ctx, rows: int):
        xp = ctx.xp
        if not ctx.is_const(1):
            lens = ctx.x(1)
            ref = ctx.x0(1)
            if ctx.mode == Mode.DEEPLIFT and ref is not None and bool((xp.asarray(ref) != xp.asarray(lens)).any()):
                raise RuleError(f"ReverseSequence node {ctx.node.name!r}: the sequence lengths, computed from the "
                                f"input, differ between a sample and its reference; DeepLIFT has no rule for a "
                                f"change of the permutation (give the reference the sample's lengths)")
            return lens
        lens = np.asarray(ctx.const(1)).reshape(-1)
        if lens.shape[0] == rows or bool((lens == lens[0]).all()):
            return np.full(rows, lens[0]) if lens.shape[0] != rows else lens
        if lens.shape[0] >= ctx.n_actual == rows:
            return lens[:rows]  # the stacked batch: actual rows first
        raise RuleError(f"ReverseSequence node {ctx.node.name!r}: per-sample constant sequence_lens "
                        f"({lens.shape[0]} entries) do not fit the {rows} rows of this pass")

    def backward(self, ctx, g):
        time_axis, batch_axis = self._axes(ctx, g.ndim - 1)
        lens = self._actual_lens(ctx, g.shape[1 + batch_axis])
        return (self._reverse(ctx.xp, g, lens, time_axis + 1, batch_axis + 1), None)
