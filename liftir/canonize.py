"""Model rewrites that keep outputs but make DeepLIFT multipliers meaningful.

`normalize_constrained_inputs` is the weight normalization of the DeepLIFT paper
(Shrikumar et al. 2016, section 2.6). When the entries of an input along one axis
always sum to a constant c (one-hot DNA: the four bases at a position sum to 1), any
weight offset mu shared by those entries only shifts the output by c * mu, a constant
that the bias can absorb. The multipliers of an affine layer are its weights, so that
arbitrary offset leaks into every contribution; removing the per-group mean makes the
contributions of the positions a filter sees comparable with each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InputError

__all__ = ["normalize_constrained_inputs"]

_LAYOUT_OPS = ("Identity", "Transpose", "Flatten", "Reshape")
_AFFINE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class _Constraint:
    """Where the constrained groups lie in a tensor (axis 0 is the batch).

    Either `axis`: every slice along that axis is one group (any shape), or `ids`: a
    static array over the non-batch dims giving each element's group (after a Flatten
    or Reshape has mixed the group axis with others).
    """

    shape: tuple[int | None, ...]
    axis: int | None = None
    ids: np.ndarray | None = None

    def as_ids(self, what: str) -> np.ndarray:
        if self.ids is not None:
            return self.ids
        dims = self.shape[1:]
        if any(d is None for d in dims):
            raise InputError(
                f"{what}: following the constrained axis through it needs the static shape "
                f"of its input, but it is {self.shape}; export the model with fixed "
                "non-batch dimensions (e.g. a fixed sequence length)")
        return _axis_ids(tuple(int(d) for d in dims), self.axis - 1)


def _axis_ids(dims: tuple[int, ...], axis: int) -> np.ndarray:
    """Group ids over `dims` for groups that run along `axis`."""
    rest = dims[:axis] + dims[axis + 1:]
    ids = np.arange(math.prod(rest), dtype=np.int64).reshape(rest)
    return np.broadcast_to(np.expand_dims(ids, axis), dims).copy()


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    ua = np.unique(a.ravel(), return_inverse=True)[1]
    ub = np.unique(b.ravel(), return_inverse=True)[1]
    if ua.max(initial=-1) != ub.max(initial=-1):
        return False
    # Same partition iff the pair labels are in one-to-one correspondence.
    pairs = np.unique(np.stack([ua, ub]), axis=1)
    return pairs.shape[1] == ua.max(initial=-1) + 1


def _last_axis_groups(ids: np.ndarray, what: str) -> np.ndarray:
    """The partition of the contracted (last) axis, if the same for every leading index."""
    rows = ids.reshape(-1, ids.shape[-1])
    labels = np.stack([np.unique(r, return_inverse=True)[1] for r in rows])
    whole = np.unique(ids).size
    if not np.all(labels == labels[0]) or whole != rows.shape[0] * (labels[0].max() + 1):
        raise InputError(f"{what}: the constrained groups are not contained in the contracted "
                         "axis in the same way for every row, so no single weight matrix can "
                         "be normalized")
    return labels[0]


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node {node.name or '<unnamed>'!r} (#{index}, {node.op_type})"


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, total: float):
        self.model = model
        self.graph = model.graph
        self.total = float(total)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {vi.name for vi in self.graph.input}
        self.producers = {o: n for n in self.graph.node for o in n.output if o}
        self.names = set(self.inits) | self.graph_inputs | set(self.producers)
        self.names |= {n.name for n in self.graph.node}
        self.replaced: set[str] = set()

    # -- helpers ---------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        i, name = 0, f"{base}_cnorm"
        while name in self.names:
            i += 1
            name = f"{base}_cnorm{i}"
        self.names.add(name)
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor that is an initializer or a Constant (through Identity)."""
        seen = 0
        while seen < 64:
            if name in self.inits and name not in self.graph_inputs:
                return numpy_helper.to_array(self.inits[name])
            node = self.producers.get(name)
            if node is None:
                return None
            if node.op_type == "Identity":
                name, seen = node.input[0], seen + 1
                continue
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
            return None
        return None

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def set_input(self, node: onnx.NodeProto, i: int, name: str) -> None:
        old = node.input[i] if i < len(node.input) else ""
        if old:
            self.replaced.add(old)
        while len(node.input) <= i:
            node.input.append("")
        node.input[i] = name

    def consumers(self, tensor: str) -> list[tuple[int, onnx.NodeProto]]:
        return [(i, n) for i, n in enumerate(self.graph.node) if tensor in n.input]

    def drop_unused(self) -> None:
        used = {t for n in self.graph.node for t in n.input} | {o.name for o in self.graph.output}
        for n in self.graph.node:  # names referenced from subgraphs count as used
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    used |= {t for sub in g.node for t in sub.input}
        keep = [t for t in self.graph.initializer
                if t.name in used or t.name not in self.replaced or t.name in self.graph_inputs]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    # -- layout ops: carry the constraint to the next tensor -------------------------
    def follow(self, node: onnx.NodeProto, label: str, c: _Constraint) -> _Constraint:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        rank = len(c.shape)
        if op == "Identity":
            return c
        if op == "Transpose":
            perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
            if perm[0] != 0:
                raise InputError(f"{label} moves the batch axis 0 (perm={perm}); "
                                 "normalize_constrained_inputs assumes axis 0 is the batch")
            shape = tuple(c.shape[p] for p in perm)
            if c.ids is not None:
                return _Constraint(shape, ids=np.transpose(c.ids, [p - 1 for p in perm[1:]]))
            return _Constraint(shape, axis=perm.index(c.axis))
        if op == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise InputError(f"{label}: only Flatten(axis=1), which keeps the batch axis, "
                                 f"is supported; got axis={attrs.get('axis')}")
            ids = c.as_ids(label).ravel()
            return _Constraint((c.shape[0], ids.size), ids=ids)
        if op == "Reshape":
            target = self.constant(node.input[1])
            if target is None:
                raise InputError(f"{label}: its target shape {node.input[1]!r} is not a constant")
            target = [int(v) for v in target]
            ids = c.as_ids(label)
            if not target or target[0] not in (0, -1) and target[0] != c.shape[0]:
                raise InputError(f"{label} reshapes the batch axis (target {target}); the batch "
                                 "must stay axis 0")
            if target[0] == -1 and -1 in target[1:]:
                raise InputError(f"{label}: target {target} leaves the batch size ambiguous")
            rest = [ids.shape[i] if v == 0 and not attrs.get("allowzero", 0) else v
                    for i, v in enumerate(target[1:])]
            try:
                ids = ids.reshape(rest)
            except ValueError as exc:
                raise InputError(f"{label}: cannot reshape the non-batch dims {ids.shape} to "
                                 f"{rest}: {exc}") from exc
            return _Constraint((c.shape[0],) + ids.shape, ids=ids)
        raise AssertionError(op)

    # -- affine ops: rewrite the weights ---------------------------------------------
    def conv(self, node: onnx.NodeProto, label: str, slot: int, c: _Constraint) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if slot != 0:
            raise InputError(f"{label} takes the constrained tensor as its weight, not its input")
        if attrs.get("group", 1) != 1:
            raise InputError(f"{label} is a grouped convolution (group={attrs['group']}): each "
                             "group sees only part of the constrained channels, whose sum is "
                             "then not constant")
        axis = c.axis
        if c.ids is not None:  # after a Reshape: find the axis the groups run along, if any
            axis = next((a + 1 for a in range(c.ids.ndim)
                         if _same_partition(c.ids, _axis_ids(c.ids.shape, a))), None)
        if axis is None:
            raise InputError(f"{label}: the constrained groups do not run along one axis of its "
                             f"input (shape {c.shape}); pass the right group_axis")
        w = self.constant(node.input[1])
        if w is None:
            raise InputError(f"{label}: its weight {node.input[1]!r} is not a constant")
        b = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b is None:
            raise InputError(f"{label}: its bias {node.input[2]!r} is not a constant")
        w64 = w.astype(np.float64)
        shape = c.shape
        if axis == 1:  # one-hot on the channels, (N, 4, L): one mean per filter and tap
            mu = w64.mean(axis=1, keepdims=True)
            taps = mu[:, 0]
        else:  # one-hot on a spatial axis, (N, 1, 4, L) with a (4, k) kernel, as in Keras 1
            shape, attrs = self._spatial_group(label, attrs, w, axis, c.shape)
            mu = w64.mean(axis=axis, keepdims=True)
            taps = mu.sum(axis=1)
        self.set_input(node, 1, self.add_init(node.input[1], (w64 - mu).astype(w.dtype)))
        correction = self._conv_correction(label, attrs, taps, shape)
        if correction.ndim == 1:  # no padding: the same shift everywhere, into the bias
            bias = (np.zeros(w.shape[0]) if b is None else b.astype(np.float64)) + correction
            self.set_input(node, 2, self.add_init(node.input[2] if b is not None
                                                  else f"{node.name or node.output[0]}_bias",
                                                  bias.astype(w.dtype)))
        else:  # padded edges see fewer constrained taps: a per-position shift after the Conv
            self._add_after(node, correction[None].astype(w.dtype))

    def _spatial_group(self, label, attrs, w, axis, shape):
        """Check that the kernel covers the whole constrained spatial axis, unpadded.

        Then every output sees complete groups along it, and for the correction that axis
        behaves like a kernel and input of size 1.
        """
        spatial = w.ndim - 2
        d = axis - 2
        size = shape[axis] if len(shape) == w.ndim else None
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if (size is None or w.shape[axis] != size or pads[d] or pads[d + spatial]
                or auto.startswith("SAME")):
            raise InputError(
                f"{label} contracts the channel axis 1, but the constrained groups lie along "
                f"axis {axis} of its input (shape {shape}); that works only if the kernel spans "
                f"that whole axis without padding (kernel {w.shape[axis]}, input {size}, "
                f"pads {pads}, auto_pad {auto}); pass the right group_axis or transpose the "
                "input first")
        attrs = dict(attrs)
        for key, one in (("strides", 1), ("dilations", 1)):
            vals = list(attrs.get(key, [1] * spatial))
            vals[d] = one
            attrs[key] = vals
        shape = tuple(1 if i == axis else s for i, s in enumerate(shape))
        return shape, attrs

    def _conv_correction(self, label, attrs, mu, shape) -> np.ndarray:
        """total * sum of mu over the taps that land inside the input, per output position."""
        spatial = len(mu.shape) - 1
        kernel = mu.shape[1:]
        strides = list(attrs.get("strides", [1] * spatial))
        dil = list(attrs.get("dilations", [1] * spatial))
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        size = shape[2:] if len(shape) == spatial + 2 else (None,) * spatial
        if auto == "VALID":
            pads = [0] * (2 * spatial)
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            if any(s is None for s in size):
                raise InputError(f"{label} uses auto_pad={auto} but its input length is not "
                                 "static; export with a fixed input size")
            pads = [0] * (2 * spatial)
            for d in range(spatial):
                span = (kernel[d] - 1) * dil[d] + 1
                tot = max(0, (math.ceil(size[d] / strides[d]) - 1) * strides[d] + span - size[d])
                small, big = tot // 2, tot - tot // 2
                pads[d], pads[d + spatial] = (small, big) if auto == "SAME_UPPER" else (big, small)
        if not any(pads):
            return self.total * mu.reshape(mu.shape[0], -1).sum(axis=1)
        if any(s is None for s in size):
            raise InputError(f"{label} is padded (pads={pads}) and its input size is not static: "
                             "padded positions break the constraint, and the exact correction "
                             "needs the input size; export with a fixed input size")
        valid = []
        for d in range(spatial):
            span = (kernel[d] - 1) * dil[d] + 1
            n_out = (size[d] + pads[d] + pads[d + spatial] - span) // strides[d] + 1
            pos = (np.arange(n_out)[:, None] * strides[d] - pads[d]
                   + np.arange(kernel[d])[None, :] * dil[d])
            valid.append(((pos >= 0) & (pos < size[d])).astype(np.float64))
        letters = "abcdefgh"[:spatial]
        outs = "pqrstuvw"[:spatial]
        spec = "m" + letters + "," + ",".join(o + k for o, k in zip(outs, letters)) + "->m" + outs
        return self.total * np.einsum(spec, mu, *valid)

    def _add_after(self, node: onnx.NodeProto, value: np.ndarray) -> None:
        out = node.output[0]
        index = next(i for i, n in enumerate(self.graph.node) if out in n.output)
        pre = self.fresh(f"{out}_pre")
        node.output[0] = pre
        const = self.add_init(f"{node.name or out}_shift", value)
        add = helper.make_node("Add", [pre, const], [out],
                               name=self.fresh(f"{node.name or out}_add"))
        self.graph.node.insert(index + 1, add)

    def _normalize_rows(self, w: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Subtract per-(group, output) means from W (K, M); return W' and sum of means."""
        w64 = w.astype(np.float64)
        n_groups = int(groups.max()) + 1
        sums = np.zeros((n_groups, w.shape[1]))
        np.add.at(sums, groups, w64)
        mu = sums / np.bincount(groups, minlength=n_groups)[:, None]
        return w64 - mu[groups], mu.sum(axis=0)

    def _contraction_groups(self, label: str, c: _Constraint, k: int) -> np.ndarray:
        if c.ids is not None:
            groups = _last_axis_groups(c.ids, label)
        elif c.axis == len(c.shape) - 1:
            groups = np.zeros(k, dtype=np.int64)  # the whole contracted axis is one group
        else:
            raise InputError(
                f"{label} contracts the last axis of its input, but the constrained groups lie "
                f"along axis {c.axis} (input shape {c.shape}); pass the right group_axis, or "
                "Flatten/transpose the input first")
        if groups.size != k:
            raise InputError(f"{label}: weight has {k} input features but the constrained input "
                             f"has {groups.size}")
        return groups

    def gemm(self, node: onnx.NodeProto, label: str, slot: int, c: _Constraint) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if slot != 0 or attrs.get("transA", 0):
            raise InputError(f"{label}: only the constrained tensor as input A with transA=0 is "
                             "supported")
        w = self.constant(node.input[1])
        if w is None or w.ndim != 2:
            raise InputError(f"{label}: its weight {node.input[1]!r} is not a constant matrix")
        trans_b = attrs.get("transB", 0)
        wk = w.T if trans_b else w  # (K, M)
        groups = self._contraction_groups(label, c, wk.shape[0])
        w_new, mu_sum = self._normalize_rows(wk, groups)
        w_new = (w_new.T if trans_b else w_new).astype(w.dtype)
        self.set_input(node, 1, self.add_init(node.input[1], w_new))
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        shift = alpha * self.total * mu_sum
        has_c = len(node.input) > 2 and bool(node.input[2])
        bias = self.constant(node.input[2]) if has_c else None
        if has_c and bias is None:
            raise InputError(f"{label}: its bias {node.input[2]!r} is not a constant")
        if beta == 0.0:  # C is ignored: the shift becomes the whole of C, at beta = 1
            _set_attr(node, "beta", 1.0)
            new_c = shift
        elif bias is None:
            new_c = shift / beta
        else:
            new_c = bias.astype(np.float64) + shift / beta
        base = node.input[2] if has_c else f"{node.name or node.output[0]}_bias"
        self.set_input(node, 2, self.add_init(base, np.asarray(new_c).astype(w.dtype)))

    def matmul(self, node: onnx.NodeProto, label: str, slot: int, c: _Constraint) -> None:
        if slot != 0:
            raise InputError(f"{label} takes the constrained tensor as its right operand B; "
                             "only the left operand is supported")
        w = self.constant(node.input[1])
        if w is None or w.ndim != 2:
            raise InputError(f"{label}: its right operand {node.input[1]!r} is not a constant "
                             "matrix")
        groups = self._contraction_groups(label, c, w.shape[0])
        w_new, mu_sum = self._normalize_rows(w, groups)
        self.set_input(node, 1, self.add_init(node.input[1], w_new.astype(w.dtype)))
        self._add_after(node, (self.total * mu_sum).astype(w.dtype))

    # -- driver ----------------------------------------------------------------------
    def run(self, input_name: str, start: _Constraint) -> int:
        queue = [(input_name, start)]
        rewritten = 0
        done: set[str] = set()
        while queue:
            tensor, c = queue.pop(0)
            for index, node in self.consumers(tensor):
                key = node.output[0]  # unique in SSA form, unlike (optional) node names
                label = _node_label(node, index)
                slots = [i for i, t in enumerate(node.input) if t == tensor]
                if key in done:
                    continue
                done.add(key)
                if node.domain not in ("", "ai.onnx"):
                    raise InputError(f"{label}: op {node.domain}::{node.op_type} consumes the "
                                     "constrained input; only standard ops are supported")
                if node.op_type in _LAYOUT_OPS:
                    if slots != [0]:
                        raise InputError(f"{label} uses the constrained tensor as a shape input")
                    queue.append((node.output[0], self.follow(node, label, c)))
                    continue
                if len(slots) != 1:
                    raise InputError(f"{label} uses the constrained tensor twice")
                if node.op_type == "Conv":
                    self.conv(node, label, slots[0], c)
                elif node.op_type == "Gemm":
                    self.gemm(node, label, slots[0], c)
                elif node.op_type == "MatMul":
                    self.matmul(node, label, slots[0], c)
                else:
                    raise InputError(
                        f"{label} consumes the constrained input directly, but only affine ops "
                        f"({', '.join(_AFFINE_OPS)}), possibly after "
                        f"{', '.join(_LAYOUT_OPS)}, can be normalized")
                rewritten += 1
        return rewritten


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def normalize_constrained_inputs(model: onnx.ModelProto, input_name: str, group_axis: int,
                                 total: float = 1.0) -> onnx.ModelProto:
    """Mean-normalize the weights that read an input whose groups sum to a constant.

    Paper section 2.6: for every affine node (Conv, Gemm, MatMul) fed by `input_name`,
    directly or through Identity/Transpose/Flatten/Reshape, the weights are replaced by
    w - mu, mu being their mean over each constrained group (for a Conv on one-hot DNA
    (N, 4, L): one mean per filter and tap), and total * sum(mu) is added to the bias, so
    outputs are unchanged wherever the constraint holds. Zero-padded convolution edges
    get an exact per-position shift (an Add node) instead of a bias change.

    Parameters
    ----------
    model : onnx.ModelProto
        Left untouched; a rewritten copy is returned.
    input_name : str
        A graph input; axis 0 is the batch.
    group_axis : int
        The axis along which entries sum to `total` (the base axis: 1 for (N, 4, L),
        -1 for (N, L, 4)).
    total : float
        The constant sum (1 for one-hot).

    Notes
    -----
    Outputs change where the constraint does not hold, e.g. at all-zero N positions.

    Raises
    ------
    InputError (a ValueError)
        Naming the node when a consumer cannot be normalized exactly.
    """
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    if input_name not in inputs:
        raise InputError(f"{input_name!r} is not an input of the model; inputs are "
                         f"{sorted(inputs)}")
    ttype = inputs[input_name].type.tensor_type
    if not ttype.HasField("shape"):
        raise InputError(f"input {input_name!r} has no shape (rank) in the model")
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
    rank = len(shape)
    if not -rank <= group_axis < rank:
        raise InputError(f"group_axis={group_axis} is out of range for input {input_name!r} "
                         f"of rank {rank}")
    axis = group_axis % rank
    if axis == 0:
        raise InputError("group_axis must not be 0: axis 0 is the batch axis")
    if not math.isfinite(total):
        raise InputError(f"total must be finite, got {total}")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    rw = _Rewriter(new, total)
    count = rw.run(input_name, _Constraint(shape, axis=axis))
    if count == 0:
        raise InputError(f"no Conv, Gemm or MatMul reads input {input_name!r}; nothing to "
                         "normalize")
    rw.drop_unused()
    return new
