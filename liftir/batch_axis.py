"""Where the samples live in every tensor, so that any op keeping them apart is accepted.

The forward runs over a stacked batch [actual rows; reference rows] fed on axis 0, but
exporters move that axis: attention transposes to (L, N, E), timm's qkv permute puts it
second, Swin reshapes it together with its windows, GPT-2 flattens to (N*T, E). A
`BatchAxis` says where the N samples are in one tensor: axis `axis`, whose size is
outer * N * inner (the samples merged with neighbouring axes by a reshape, row-major).
Seen as a flat array, every tensor is then (O, N, I), so slicing actual and reference
rows, repeating them for DeepLIFT-SHAP pairs or summing per sample are one reshape away.

`locate` derives the location of every computed tensor from the run's concrete shapes,
op by op, and raises `BatchAxisError`, naming the node, for an op that truly mixes
samples: a reduction, normalization, softmax, contraction, concatenation, slice or
reshape across the batch. Ops it does not know are accepted when their outputs keep the
shape of a batched input (elementwise) or the samples on axis 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import BatchAxisError


@dataclass(frozen=True)
class BatchAxis:
    """The samples on `axis`, merged as (outer, N, inner) within it."""

    axis: int
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def resized(self, shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
        """`shape` with `rows` samples instead of whatever it holds."""
        a = self.axis
        return tuple(shape[:a]) + (self.outer * rows * self.inner,) + tuple(shape[a + 1:])

    def rows_of(self, shape: tuple[int, ...]) -> int:
        return shape[self.axis] // (self.outer * self.inner)

    def split_shape(self, shape: tuple[int, ...], lead: int = 0) -> tuple[tuple[int, ...], int]:
        """(view shape with the batch factor on an axis of its own, that axis), for an array
        with `lead` extra leading axes (the K targets of a multiplier)."""
        a = self.axis + lead
        rows = self.rows_of(tuple(shape[lead:]))
        view = tuple(shape[:a]) + (self.outer, rows, self.inner) + tuple(shape[a + 1:])
        return view, a + 1


AXIS0 = BatchAxis(0)


# ---- array helpers: the same on NumPy and CuPy ----------------------------------------
def take_rows(value, loc: BatchAxis, start: int, stop: int, lead: int = 0):
    """Samples start:stop of `value` (`lead` leading axes before the tensor's own)."""
    if loc.plain:
        return value[(slice(None),) * (loc.axis + lead) + (slice(start, stop),)]
    shape = tuple(value.shape)
    view, b = loc.split_shape(shape, lead)
    part = value.reshape(view)[(slice(None),) * b + (slice(start, stop),)]
    return part.reshape(shape[:lead] + loc.resized(shape[lead:], stop - start))


def broadcast_rows(xp, value, loc: BatchAxis, rows: int, lead: int = 0):
    """One sample's rows made `rows` samples (plain axes broadcast lazily)."""
    view, b = loc.split_shape(tuple(value.shape), lead)
    if view[b] == rows:
        return value
    target = view[:b] + (rows,) + view[b + 1:]
    if loc.plain:
        return value  # a size-1 axis broadcasts by itself against `rows` samples
    out_shape = tuple(value.shape[:lead]) + loc.resized(tuple(value.shape[lead:]), rows)
    return xp.broadcast_to(value.reshape(view), target).reshape(out_shape)


def repeat_rows(xp, value, loc: BatchAxis, repeats: int):
    """Each sample repeated `repeats` times in place (sample-major pairs)."""
    view, b = loc.split_shape(tuple(value.shape))
    out = xp.repeat(value.reshape(view), repeats, axis=b)
    return out.reshape(loc.resized(tuple(value.shape), view[b] * repeats))


def tile_rows(xp, value, loc: BatchAxis, repeats: int):
    """All samples tiled `repeats` times (block-major)."""
    view, b = loc.split_shape(tuple(value.shape))
    reps = [1] * len(view)
    reps[b] = repeats
    out = xp.tile(value.reshape(view), tuple(reps))
    return out.reshape(loc.resized(tuple(value.shape), view[b] * repeats))


def samples_first(xp, value, loc: BatchAxis, lead: int = 0):
    """The array with its samples on the first axis after `lead`, each sample's own slice
    after it: (L, N, E) -> (N, L, E), (N*T, E) -> (N, T, E), (N*h, L, d) -> (N, h, L, d)."""
    if loc.plain and loc.axis == 0:
        return value
    view, b = loc.split_shape(tuple(value.shape), lead)
    rest = [view[i] for i in range(lead, len(view)) if i != b and not
            ((i == b - 1 and loc.outer == 1) or (i == b + 1 and loc.inner == 1))]
    moved = xp.moveaxis(value.reshape(view), b, lead)
    shape = [view[b]] + rest
    return moved.reshape(tuple(value.shape[:lead]) + tuple(shape))


# ---- the analysis --------------------------------------------------------------------
class _Node:
    """What a transfer function sees of one node in one run."""

    def __init__(self, node, in_shapes, in_locs, out_shapes, rows, host, frozen=()):
        self.node = node
        self.in_shapes = in_shapes  # per input: shape or None (absent)
        self.in_locs = in_locs  # per input: BatchAxis or None (not batched)
        self.out_shapes = out_shapes
        self.rows = rows
        self.host = host  # per input: host value if constant / static, else None
        self.frozen = frozen  # per input: True for a constant of the model (not shape-derived)

    def refuse(self, what: str) -> None:
        raise BatchAxisError(f"{self.node.op_type} node {self.node.name!r} {what}; its samples would "
                             f"mix (one sample's result would depend on another's). liftir accepts any op "
                             f"that keeps samples apart, wherever the batch axis is")

    def batched(self):
        return [(i, loc) for i, loc in enumerate(self.in_locs) if loc is not None]

    def attr(self, name, default=None):
        return self.node.attrs.get(name, default)

    def rank(self, index: int = 0) -> int:
        return len(self.in_shapes[index])


def _broadcast(n: _Node) -> list[BatchAxis | None]:
    """Elementwise with numpy broadcasting: every batched input must land on one axis."""
    found = None
    for out_shape in n.out_shapes[:1]:
        rank = len(out_shape)
        for i, loc in n.batched():
            a = loc.axis + rank - n.rank(i)
            if out_shape[a] != n.in_shapes[i][loc.axis]:
                n.refuse(f"broadcasts the batch axis of input {i}")
            cand = BatchAxis(a, loc.outer, loc.inner)
            if found is not None and cand != found:
                n.refuse("combines inputs whose samples lie on different axes")
            found = cand
    return [found if tuple(s) == tuple(n.out_shapes[0]) else _same_or_none(n, found, s) for s in n.out_shapes]


def _same_or_none(n: _Node, loc, shape):
    if loc is None or len(shape) <= loc.axis:
        return None
    return loc


def _first(n: _Node, index: int = 0) -> BatchAxis:
    loc = n.in_locs[index]
    if loc is None:
        n.refuse("takes its batched operand where a constant is expected")
    return loc


def _mixing_axes(axes_of: Callable[[_Node], list[int]]):
    """Ops that combine values along some axes (reductions, normalizations, softmax)."""

    def transfer(n: _Node):
        loc = _first(n)
        rank = n.rank(0)
        axes = sorted(a % rank for a in axes_of(n)) if rank else []
        if loc.axis in axes:
            n.refuse(f"combines values along axis {loc.axis}, which holds the batch")
        outs = []
        for shape in n.out_shapes:
            if len(shape) == rank:
                outs.append(loc)
            else:  # reduced axes dropped
                outs.append(BatchAxis(loc.axis - sum(1 for a in axes if a < loc.axis), loc.outer, loc.inner))
        return outs
    return transfer


def _reduce_axes(n: _Node) -> list[int]:
    axes = n.attr("axes")
    if axes is None and len(n.node.inputs) > 1 and n.node.inputs[1]:
        value = n.host[1]
        axes = None if value is None else value.tolist()
    if axes is None or (isinstance(axes, list) and not axes):
        return [] if n.attr("noop_with_empty_axes", 0) else list(range(n.rank(0)))
    return list(np.atleast_1d(axes))


def _softmax_axes(n: _Node) -> list[int]:
    axis = n.attr("axis", -1 if n.node.opset >= 13 else 1) % max(n.rank(0), 1)
    return list(range(axis, n.rank(0))) if n.node.opset < 13 else [axis]


def _from_axis(default):
    return lambda n: list(range(n.attr("axis", default) % n.rank(0), n.rank(0)))


def _one_axis(default):
    return lambda n: [n.attr("axis", default)]


def _cumsum_axes(n: _Node) -> list[int]:
    value = n.host[1]
    return [int(np.asarray(value).reshape(-1)[0])] if value is not None else list(range(n.rank(0)))


def _reshape(n: _Node):
    """Row-major reshapes (Reshape, Flatten, Squeeze, Unsqueeze): the batch block of the flat
    layout must fall inside one output axis."""
    loc = _first(n)
    shape = n.in_shapes[0]
    a = loc.axis
    outer = int(np.prod(shape[:a], dtype=np.int64)) * loc.outer
    inner = loc.inner * int(np.prod(shape[a + 1:], dtype=np.int64))
    out = n.out_shapes[0]
    pre = 1
    for j, size in enumerate(out):
        if outer % pre == 0:
            o = outer // pre
            if size % (o * n.rows) == 0:
                i = size // (o * n.rows)
                if i * int(np.prod(out[j + 1:], dtype=np.int64)) == inner:
                    return [BatchAxis(j, o, i)]
        pre *= size
        if pre > outer:
            break
    n.refuse(f"reshapes {tuple(shape)} to {tuple(out)} across the batch")


def _transpose(n: _Node):
    loc = _first(n)
    perm = n.attr("perm", list(reversed(range(n.rank(0)))))
    return [BatchAxis(list(perm).index(loc.axis), loc.outer, loc.inner)]


def _along(axis_of: Callable[[_Node], int], what: str):
    """Concat / Split / Slice-like ops: any axis but the batch's."""

    def transfer(n: _Node):
        batched = n.batched()
        loc = batched[0][1]
        if any(other != loc for _, other in batched):
            n.refuse("joins inputs whose samples lie on different axes")
        for i, other in batched:
            if n.rank(i) != n.rank(batched[0][0]):
                n.refuse("joins inputs of different ranks")
        axis = axis_of(n) % n.rank(batched[0][0])
        if axis == loc.axis:
            n.refuse(f"{what} along axis {axis}, which holds the batch")
        return [loc for _ in n.out_shapes]
    return transfer


def _keeps_size(n: _Node):
    """Slice, Pad, Tile, Resize and friends: fine wherever the batch axis keeps its size."""
    loc = _first(n)
    for shape in n.out_shapes:
        if len(shape) != n.rank(0) or shape[loc.axis] != n.in_shapes[0][loc.axis]:
            n.refuse(f"changes the size of axis {loc.axis}, which holds the batch")
    return [loc for _ in n.out_shapes]


def _on_axis0(n: _Node):
    """Convolutions, pools, batch/instance norms: rows of axis 0 are independent."""
    loc = _first(n)
    if loc.axis != 0 or any(l is not None and l != loc for _, l in n.batched()[1:]):
        n.refuse(f"needs the samples on axis 0 (they are on axis {loc.axis})")
    return [loc if len(s) and s[0] == n.in_shapes[0][0] else None for s in n.out_shapes]


def _gather(n: _Node):
    axis = n.attr("axis", 0) % n.rank(0)
    data, idx = n.in_locs[0], n.in_locs[1]
    idx_rank = n.rank(1)
    if data is not None and idx is not None:
        n.refuse("gathers batched data with batched indices")
    if data is not None:
        if data.axis == axis:
            found = _own_rows(n, data, axis)
            if found is None:
                n.refuse(f"gathers along axis {axis}, which holds the batch")
            return [found]
        shift = idx_rank - 1 if data.axis > axis else 0
        return [BatchAxis(data.axis + shift, data.outer, data.inner)]
    return [BatchAxis(axis + idx.axis, idx.outer, idx.inner)]  # an embedding lookup of batched ids


def _own_rows(n: _Node, data: BatchAxis, axis: int) -> BatchAxis | None:
    """Constant indices along the batch axis that give every sample its own values (HF's
    masks flatten (N, T) and gather b*T + t): where the samples land, or None if they mix."""
    idx = n.host[1]
    if idx is None or idx.ndim == 0 or n.frozen[1]:
        return None  # constant indices are frozen to one batch size: only shape-derived ones qualify
    idx = np.where(idx < 0, idx + n.in_shapes[0][axis], idx)
    sample = (idx // data.inner) % n.rows
    for j, size in enumerate(idx.shape):
        if size % n.rows:
            continue
        for inner in (d for d in range(1, size // n.rows + 1) if (size // n.rows) % d == 0):
            pos = np.arange(size).reshape((-1,) + (1,) * (idx.ndim - j - 1))
            if np.array_equal(np.broadcast_to((pos // inner) % n.rows, idx.shape), sample):
                return BatchAxis(axis + j, size // (n.rows * inner), inner)
    return None


def _gemm(n: _Node):
    a = n.in_locs[0]
    if n.in_locs[1] is not None:
        n.refuse("multiplies by a batched B operand")
    if a is not None and a.axis != (1 if n.attr("transA", 0) else 0):
        n.refuse("contracts the axis that holds the batch")
    out = BatchAxis(0, a.outer, a.inner) if a is not None else None
    c = n.in_locs[2] if len(n.in_locs) > 2 else None
    if c is not None:
        cand = BatchAxis(c.axis + 2 - n.rank(2), c.outer, c.inner)
        if out is not None and cand != out:
            n.refuse("adds a C operand whose samples lie elsewhere")
        out = cand
    return [out]


def _matmul(n: _Node):
    """numpy.matmul semantics, 1-D operands included: the batch may sit on a's rows, b's
    columns or a broadcast leading axis, never on the contracted one."""
    out_rank = len(n.out_shapes[0])
    ranks = (n.rank(0), n.rank(1))
    found = None
    for i, loc in n.batched():
        rank = ranks[i]
        contracted = rank - 1 if i == 0 else max(rank - 2, 0)
        if loc.axis == contracted:
            n.refuse(f"contracts the axis of operand {i} that holds the batch")
        other_vector = ranks[1 - i] == 1
        if other_vector:  # the vector's axis is contracted away; the rest keep their places
            axis = loc.axis if i == 0 else (out_rank - 1 if loc.axis == rank - 1 else loc.axis)
        elif i == 0 and loc.axis == rank - 2:
            axis = out_rank - 2
        elif i == 1 and loc.axis == rank - 1:
            axis = out_rank - 1
        else:
            axis = loc.axis + out_rank - rank
        if n.out_shapes[0][axis] != n.in_shapes[i][loc.axis]:
            n.refuse("broadcasts the batch axis")
        cand = BatchAxis(axis, loc.outer, loc.inner)
        if found is not None and cand != found:
            n.refuse("multiplies samples with each other (their batch axes do not line up)")
        found = cand
    return [found]


def _recurrent(n: _Node):
    """LSTM/GRU/RNN: X is (seq, batch, input) (layout 0) or (batch, seq, input) (layout 1)."""
    layout = n.attr("layout", 0)
    loc = _first(n)
    if loc.axis != (0 if layout else 1):
        n.refuse("runs its recurrence along the axis that holds the batch")
    outs = []
    for j, shape in enumerate(n.out_shapes):
        if j == 0:
            outs.append(BatchAxis(0 if layout else 2, loc.outer, loc.inner))
        else:
            outs.append(BatchAxis(0 if layout else 1, loc.outer, loc.inner))
    return outs


def _generic(n: _Node):
    """Ops liftir has no batch transfer for: elementwise shapes, or samples left on axis 0."""
    batched = n.batched()
    i, loc = batched[0]
    if all(tuple(s) == tuple(n.in_shapes[i]) for s in n.out_shapes):
        return [loc for _ in n.out_shapes]
    if all(l.axis == 0 for _, l in batched) and all(len(s) and s[0] == n.in_shapes[i][0] for s in n.out_shapes):
        return [loc for _ in n.out_shapes]
    n.refuse("changes shapes in a way liftir cannot follow (no batch-axis transfer is known for this op)")


ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "Where", "Equal", "Less",
               "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "PRelu",
               "Expand", "Clip", "Cast", "CastLike", "Identity", "Dropout", "Not", "IsNaN", "IsInf")
TRANSFERS: dict[str, Callable[[_Node], list]] = {
    **{op: _broadcast for op in ELEMENTWISE},
    **{op: _reshape for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    "Transpose": _transpose,
    "Concat": _along(lambda n: n.attr("axis"), "concatenates"),
    "Split": _along(lambda n: n.attr("axis", 0), "splits"),
    **{op: _keeps_size for op in ("Slice", "Pad", "Tile", "Resize", "Upsample", "ReverseSequence")},
    **{op: _on_axis0 for op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                                "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization",
                                "GroupNormalization", "LRN", "DepthToSpace", "SpaceToDepth", "MaxUnpool")},
    **{op: _mixing_axes(_reduce_axes) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                                                 "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                                 "ReduceLogSumExp", "ReduceSumSquare")},
    **{op: _mixing_axes(_softmax_axes) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    "LayerNormalization": _mixing_axes(_from_axis(-1)),
    "RMSNormalization": _mixing_axes(_from_axis(-1)),
    "MeanVarianceNormalization": _mixing_axes(lambda n: n.attr("axes", [0, 2, 3])),
    **{op: _mixing_axes(_one_axis(0)) for op in ("ArgMax", "ArgMin")},
    "TopK": _mixing_axes(_one_axis(-1)),
    "LpNormalization": _mixing_axes(_one_axis(-1)),
    "CumSum": _mixing_axes(_cumsum_axes),
    "Gather": _gather,
    "GatherElements": _along(lambda n: n.attr("axis", 0), "gathers"),
    "Gemm": _gemm,
    "MatMul": _matmul,
    **{op: _recurrent for op in ("LSTM", "GRU", "RNN")},
}


def locate(nodes, feeds: dict[str, Any], value_shape: Callable[[str], tuple | None],
           host_value: Callable[[str], Any], rows: int,
           type_only: Callable[[str], tuple[int, ...]],
           is_constant: Callable[[str], bool] = lambda name: False,
           batch_free: set[str] | None = None) -> dict[str, BatchAxis]:
    """The batch location of every tensor computed from the feeds (fed on axis 0).

    `nodes` in topological order (static ones excluded); `value_shape(name)` is the shape of
    a computed tensor (None if it was not computed); `host_value` a constant's or static
    tensor's value (None for activations); `type_only(node)` the inputs read for their
    type only. Raises BatchAxisError for the first node that mixes samples.
    `batch_free`, if given, receives the computed tensors that hold no samples at all: those
    of nodes that read activations for their type only (CastLike(constant, activation)) and
    of nodes computed from those alone. They are constants of the run, not per-sample rows.
    """
    locs: dict[str, BatchAxis] = {name: AXIS0 for name in feeds}
    for node in nodes:
        skip = type_only(node)
        in_locs = [locs.get(i) if i and k not in skip else None for k, i in enumerate(node.inputs)]
        if all(l is None for l in in_locs):
            if batch_free is not None:
                batch_free.update(o for o in node.outputs if o and value_shape(o) is not None)
            continue
        out_shapes = [value_shape(o) if o else None for o in node.outputs]
        present = [(o, s) for o, s in zip(node.outputs, out_shapes) if s is not None]
        if not present:
            continue
        in_shapes = [value_shape(i) if i else None for i in node.inputs]
        in_shapes = [s if s is not None else (tuple(np.shape(host_value(i))) if i else None)
                     for s, i in zip(in_shapes, node.inputs)]
        view = _Node(node, in_shapes, in_locs, [tuple(s) for _, s in present], rows,
                     [host_value(i) if i else None for i in node.inputs],
                     [bool(i) and is_constant(i) for i in node.inputs])
        transfer = TRANSFERS.get(node.op_type, _generic) if node.domain in ("", "ai.onnx") else _generic
        results = transfer(view)
        for (name, shape), loc in zip(present, results):
            if loc is None:
                continue
            if len(shape) <= loc.axis or shape[loc.axis] != loc.outer * rows * loc.inner:
                view.refuse(f"gives {name!r} the shape {tuple(shape)}, which does not hold the {rows} "
                            f"samples where expected (axis {loc.axis})")
            locs[name] = loc
    return locs
