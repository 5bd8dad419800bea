"""Affine maps along axes (paper 2.3.1): CumSum, Resize/Upsample, and Einsum.

- CumSum is a triangular 0/1 matrix along its axis; backward is its transpose.
- Resize and Upsample in modes nearest, linear and cubic are separable linear maps: one
  matrix per resized axis. Each matrix is read off the standard's own implementation
  (onnx.reference) applied to an identity along that axis, so every coordinate
  transformation, nearest mode, cubic coefficient and antialias setting means what the
  standard says; forward applies the matrices, backward their transposes.
- Einsum is linear in each operand: affine with constant operands, and with two
  activations bilinear, where the product rule (2.3.5) generalises exactly: each operand's
  multiplier is the contraction with the mean of actual and reference of the other.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from liftir.methods import Mode
from liftir.registry import builtin_rule
from liftir.rule import MODES, Linear, Rule, RuleError


def _refuse(ctx, what):
    raise RuleError(f"{ctx.node.op_type} node {ctx.node.name!r}: {what}")


def _along(xp, x, matrix, axis):
    """Apply matrix (out, in) to axis `axis` of x."""
    moved = xp.moveaxis(x, axis, -1)
    return xp.moveaxis(xp.matmul(moved, xp.swapaxes(matrix, 0, 1)), -1, axis)


@builtin_rule("CumSum")
class CumSum(Linear):
    def _matrix(self, ctx, n, dtype):
        key = ("cumsum", n, np.dtype(dtype).str)
        if key not in ctx.cache:
            i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # y_i = sum_j M_ij x_j
            reverse, exclusive = ctx.attr("reverse", 0), ctx.attr("exclusive", 0)
            keep = (j >= i) if reverse else (j <= i)
            if exclusive:
                keep &= i != j
            ctx.cache[key] = ctx.xp.asarray(keep.astype(dtype))
        return ctx.cache[key]

    def _axis(self, ctx, ndim):
        axis = int(np.asarray(ctx.const(1)).reshape(-1)[0]) % ndim
        if axis == 0:
            _refuse(ctx, "sums along the batch axis 0; liftir needs every op to keep samples apart")
        return axis

    def forward(self, ctx, x, _):
        axis = self._axis(ctx, x.ndim)
        return _along(ctx.xp, x, self._matrix(ctx, x.shape[axis], x.dtype), axis)

    def backward(self, ctx, g):
        axis = self._axis(ctx, g.ndim - 1) + 1
        m = self._matrix(ctx, g.shape[axis], g.dtype)
        return _along(ctx.xp, g, m.T, axis), None


@builtin_rule("Resize", "Upsample")
class Resize(Linear):
    """Separable interpolation: one (out, in) matrix per resized axis, from onnx.reference."""

    def _options(self, ctx):
        def text(name, default):
            value = ctx.attr(name, default)
            return value.decode() if isinstance(value, bytes) else value
        mode = text("mode", "nearest")
        if mode not in ("nearest", "linear", "cubic", "bilinear", "trilinear"):
            _refuse(ctx, f"mode {mode!r} is not supported")
        if text("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
            _refuse(ctx, "coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
        if ctx.node.op_type == "Resize" and ctx.node.opset < 11:
            _refuse(ctx, "Resize before opset 11 is not supported (export at opset 11 or later)")
        if text("keep_aspect_ratio_policy", "stretch") != "stretch":
            _refuse(ctx, "keep_aspect_ratio_policy other than 'stretch' is not supported")
        return mode

    def _scales_sizes(self, ctx, rank):
        """Full-rank scales or sizes, as the node gives them (exactly one is not None)."""
        op = ctx.node.op_type
        if op == "Upsample":
            scales = ctx.attr("scales")
            if scales is None:
                scales = ctx.const(1)
            return [float(s) for s in np.asarray(scales).reshape(-1)], None
        scales = ctx.const(2) if len(ctx.node.inputs) > 2 and ctx.node.inputs[2] else None
        sizes = ctx.const(3) if len(ctx.node.inputs) > 3 and ctx.node.inputs[3] else None
        if scales is not None and scales.size == 0:
            scales = None
        for index, value in ((2, scales), (3, sizes)):
            if value is None and len(ctx.node.inputs) > index and ctx.node.inputs[index] \
                    and not ctx.is_const(index):
                _refuse(ctx, f"input {index} must be a constant or computed from shapes")
        axes = ctx.attr("axes")
        def full(values, fill):
            values = np.asarray(values).reshape(-1).tolist()
            if axes is None:
                return values
            out = [fill] * rank
            for a, v in zip(axes, values):
                out[a % rank] = v
            return out
        if scales is not None:
            return [float(s) for s in full(scales, 1.0)], None
        return None, [int(s) for s in full(sizes, None)]

    def _matrices(self, ctx, shape):
        """{axis: (out, in) matrix} for the per-sample input `shape` (axis 0 = batch)."""
        key = ("resize", tuple(shape[1:]))
        if key in ctx.cache:
            return ctx.cache[key]
        self._options(ctx)
        rank = len(shape)
        scales, sizes = self._scales_sizes(ctx, rank)
        if scales is not None and scales[0] != 1:  # (sizes[0] is the batch: it may be frozen in)
            _refuse(ctx, "resizes the batch axis 0")
        mode = ctx.attr("coordinate_transformation_mode", "half_pixel")
        if scales is not None and ctx.node.op_type == "Resize" and ctx.node.opset >= 11 \
                and (mode.decode() if isinstance(mode, bytes) else mode) == "align_corners":
            # align_corners maps by lengths only; onnx.reference wrongly uses the unfloored
            # length in * scale there, so give the probe the sizes the scales produce
            sizes = [shape[0]] + [int(np.floor(n * s)) for n, s in zip(shape[1:], scales[1:])]
            scales = None
        from onnx.reference import ReferenceEvaluator  # noqa: PLC0415
        matrices = {}
        for d in range(1, rank):
            n = shape[d]
            out_n = int(np.floor(n * scales[d])) if scales is not None else sizes[d]
            if out_n == n and (scales is None or scales[d] == 1):
                continue
            probe_shape = [1] * rank
            probe_shape[0], probe_shape[d] = n, n
            probe = np.eye(n).reshape([n] + [1] * (d - 1) + [n] + [1] * (rank - d - 1)).astype(np.float64)
            node, inits = self._probe_node(ctx, rank, d, scales, sizes, n)
            evaluator = ReferenceEvaluator(helper.make_model(
                helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", 11, probe_shape)],
                                  [helper.make_tensor_value_info("y", 11, None)], inits),
                opset_imports=[helper.make_opsetid("", max(ctx.node.opset, 13))]))  # Upsample probes as Resize
            response = np.asarray(evaluator.run(None, {"x": probe})[0])  # (n, 1.., out_n, 1..)
            matrices[d] = response.reshape(n, -1).T.copy()  # (out, in)
        ctx.cache[key] = matrices
        return matrices

    def _probe_node(self, ctx, rank, d, scales, sizes, n):
        """The node itself, resizing only axis d of a probe (n, 1, .., n, .., 1)."""
        attrs = {k: v for k, v in ctx.attrs.items() if k not in ("axes", "scales")}
        inits = []
        if ctx.node.op_type == "Upsample":
            # Upsample is Resize with asymmetric coordinates and floor for nearest (onnx.reference's
            # own Upsample does linear in two dimensions only)
            attrs = dict(attrs, coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        if scales is not None:
            probe_scales = [1.0] * rank
            probe_scales[d] = scales[d]
            inits.append(numpy_helper.from_array(np.asarray(probe_scales, np.float32), "s"))
            return helper.make_node("Resize", ["x", "", "s"], ["y"], **attrs), inits
        probe_sizes = [1] * rank
        probe_sizes[0], probe_sizes[d] = n, sizes[d]
        inits.append(numpy_helper.from_array(np.asarray(probe_sizes, np.int64), "z"))
        return helper.make_node("Resize", ["x", "", "", "z"], ["y"], **attrs), inits

    def forward(self, ctx, x, *unused):
        xp = ctx.xp
        for d, m in self._matrices(ctx, x.shape).items():
            x = _along(xp, x, xp.asarray(m, dtype=x.dtype), d)
        return x

    def backward(self, ctx, g):
        xp = ctx.xp
        shape = ctx.input_shape(0)
        for d, m in sorted(self._matrices(ctx, shape).items(), reverse=True):
            g = _along(xp, g, xp.asarray(m.T, dtype=g.dtype), d + 1)
        return (g,) + (None,) * (len(ctx.node.inputs) - 1)


@builtin_rule("Einsum")
class Einsum(Rule):
    """Linear in each operand: m_i = the contraction of g with the other operands (their
    means of actual and reference in DeepLIFT: the product rule 2.3.5, exact for two)."""

    modes = MODES
    paper_rule = "affine (2.3.1) with constant operands; product (2.3.5) for two activations"

    def describe(self, mode):
        if mode == Mode.DEEPLIFT:
            return self.paper_rule
        return "gradient: contraction with the other operands"

    @staticmethod
    def _equation(ctx):
        eq = ctx.attr("equation")
        return (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")

    def _parse(self, ctx):
        eq = self._equation(ctx)
        if "..." in eq or "->" not in eq:
            _refuse(ctx, "liftir needs an explicit output ('->') and no ellipsis in the equation")
        lhs, out = eq.split("->")
        terms = lhs.split(",")
        if any(len(set(t)) != len(t) for t in terms):
            _refuse(ctx, "repeated subscripts within one operand (diagonals) are not supported")
        return terms, out

    def _check_batch(self, ctx, terms, out):
        batch = out[:1]
        for i, t in enumerate(terms):
            if not ctx.is_const(i) and t[:1] != batch:
                _refuse(ctx, f"operand {i} ({t!r}) must carry the batch as its first subscript, like the "
                             f"output ({out!r})")
            if ctx.is_const(i) and batch in t:
                _refuse(ctx, f"constant operand {i} has the batch subscript {batch!r}")

    def forward(self, ctx, *operands):
        terms, out = self._parse(ctx)
        self._check_batch(ctx, terms, out)
        return ctx.xp.einsum(self._equation(ctx), *operands)

    def backward(self, ctx, g):
        xp = ctx.xp
        terms, out = self._parse(ctx)
        active = [i for i in range(len(terms)) if not ctx.is_const(i)]
        if ctx.mode == Mode.DEEPLIFT and len(active) > 2:
            _refuse(ctx, "DeepLIFT's product rule is exact for two activation operands; this has "
                         f"{len(active)}")
        used = set("".join(terms) + out)
        k = next(c for c in "KZYXWVUTSRQPONMLJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in used)

        def operand(i):
            if ctx.is_const(i):
                return ctx.input_value(i)
            x = ctx.x(i)
            x0 = ctx.x0(i) if ctx.mode == Mode.DEEPLIFT else None
            return x if x0 is None else (x + x0) * 0.5

        grads = []
        for i in range(len(terms)):
            if ctx.is_const(i):
                grads.append(None)
                continue
            others = [j for j in range(len(terms)) if j != i]
            present = set(k + out).union(*[set(terms[j]) for j in others])
            target = "".join(c for c in terms[i] if c in present)
            spec = ",".join([k + out] + [terms[j] for j in others]) + "->" + k + target
            gi = xp.einsum(spec, g, *[operand(j) for j in others])
            if target != terms[i]:  # subscripts summed in operand i alone: constant along them
                shape = ctx.input_shape(i)
                expand = [slice(None)] + [slice(None) if c in present else None for c in terms[i]]
                gi = xp.broadcast_to(gi[tuple(expand)], (g.shape[0],) + shape)
            grads.append(gi)
        return tuple(grads)
