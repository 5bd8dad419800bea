"""Compute only the positions of a tensor that the explained output reads.

Models often read one position of a tensor that every layer before computed whole: a
classifier on the class token (``x[:, 0]``: ViT, BERT's pooler), a language model's
next-token logits (``logits[:, -1]``: GPT-2). A selection along one axis (a Gather of
constant indices, a Slice of constant bounds) commutes with every op that computes each
position of that axis from the same position of its inputs: elementwise ops (a broadcast
input is read whole), a MatMul's rows and batch axes, LayerNorm, Softmax and reductions over
other axes, Transpose, Concat along another axis, a Reshape of other axes. Moved above such
an op, the selection picks the op's inputs instead, and the op computes the selected
positions only. Repeated until no selection moves, the last block's per-token layers (its
MLP and norms, a language model's head over the whole vocabulary) run on one token instead
of all of them, in the forward and in every backward pass alike.

Each selected position is the same arithmetic on the same numbers as before (a kernel may
round a shorter matrix in another order: the last bit), and the removed positions had no
path to the output, so the attributions are the model's. A selection stops at a tensor that
anything else reads (identical selections of one tensor merge first), a graph input or
output, a tensor the caller keeps, and an op that mixes positions along the axis. It never
moves along axis 0, where the samples are. The shortened tensors leave the graph:
``graph.pruned_tensors`` maps each to the selection that shortened it, for the error that
names one (an Explainer built with ``prune=False`` keeps every tensor whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import Graph, Node, TensorInfo, tensor_info_of
from .onnx_models import make_model
from .registry import is_builtin, lookup

#: ops computing each output position from the same position of every input (broadcasting)
_ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu",
    "Clip", "Cos", "Cosh", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater",
    "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or", "Pow",
    "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus",
    "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
})
_REDUCTIONS = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                         "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})
_NORMALIZATIONS = frozenset({"LayerNormalization", "RMSNormalization"})


@dataclass(frozen=True)
class _Selection:
    """Gather(indices, axis) of a tensor: indices may count from the end, as Gather's do."""

    axis: int
    indices: tuple[int, ...]
    scalar: bool = False  # a scalar index, which drops the axis


def prune_unread_positions(graph: Graph, overrides=None, keep: set[str] = frozenset()) -> int:
    """Move every selection of constant positions above the ops it commutes with; returns how
    many ops now compute fewer positions. `keep`: tensors to leave whole (a named output).
    Nothing moves where a user rule (`overrides`, a registered plugin) serves the Gather or
    Identity nodes the rewrite writes: they were not written for them."""
    opset = graph.opsets.get("", 1)
    if not all(rule is not None and is_builtin(rule) for rule in (lookup(op, "", opset, overrides)
                                                                   for op in ("Gather", "Identity"))):
        return 0
    if not any(_selection(graph, node) for node in graph.nodes.values()):
        return 0
    _refine_shapes(graph)
    moved, origins = 0, _Origins(graph.tensor_names())
    while True:
        for name in list(graph.order):
            node = graph.nodes.get(name)
            found = _selection(graph, node) if node is not None else None
            if found is None:
                continue
            if _move_above_producer(graph, node.inputs[0], found, keep, origins):
                moved += 1
                graph.rebuild()
                break
            if _unflatten_row_product(graph, graph.producer.get(node.inputs[0], ""), keep,
                                      origins.selection_of.get(node.name, node.name)):
                graph.rebuild()
                break  # the selection meets a MatMul and an Add now
        else:
            return moved


#: ops whose output's size is an input's value
_SIZED_BY_VALUES = frozenset({"ConstantOfShape", "Expand", "EyeLike", "OneHot", "Pad", "Range", "Resize", "Tile",
                              "Upsample"})
#: a constant with more elements than this enters shape inference by its shape alone
_SHAPE_ARITHMETIC_SIZE = 64


def _refine_shapes(graph: Graph) -> None:
    """Shape inference again, with data propagation, on the folded graph: the sizes exporters
    compute at run time (Shape -> Gather -> Concat -> Reshape: attention's heads split and
    merged) become known where they follow from static sizes, which the moves need. On the
    folded graph, not the model as read: constant folding has refused (under its budget)
    every constant too large to hold, which data propagation would otherwise try to build.
    Weights enter as shapes only; small integer constants, the shape arithmetic's, as values."""
    used = {i for node in graph.nodes.values() for i in node.inputs if i}
    values, shapes = [], []
    for name, value in graph.constants.items():
        if name not in used:
            continue
        value = np.asarray(value)
        if value.dtype.kind in "iu" and value.size <= _SHAPE_ARITHMETIC_SIZE:
            values.append(numpy_helper.from_array(value, name))
        elif value.dtype.kind in "fiub":
            shapes.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                        list(value.shape)))
    # ops that build tensors from sizes enter by their outputs' shapes alone: their values
    # would be built unbudgeted (an activation's size times 10**9 in a Range)
    nodes = [graph.nodes[n] for n in graph.order]
    cut = [o for node in nodes if node.op_type in _SIZED_BY_VALUES for o in node.outputs if o]
    infos = [i for i in graph.inputs if i.dtype is not None]
    infos += [graph.value_info[o] for o in cut if o in graph.value_info and graph.value_info[o].dtype is not None]
    inputs = [helper.make_tensor_value_info(i.name, helper.np_dtype_to_tensor_dtype(i.dtype), None if i.shape is None
                                            else [d if d is not None else "" for d in i.shape]) for i in infos]
    body = helper.make_graph([node.proto for node in nodes if node.op_type not in _SIZED_BY_VALUES], "liftir_shapes",
                             inputs + shapes, [onnx.ValueInfoProto(name=o.name) for o in graph.outputs], values)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            make_model(body, [helper.make_opsetid(d, v) for d, v in graph.opsets.items()]),
            strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a help: without them fewer selections move
        return
    for vi in inferred.graph.value_info:
        info = tensor_info_of(vi)
        old = graph.value_info.get(vi.name)
        if info.shape is not None and (old is None or old.shape is None or _more_known(info.shape, old.shape)):
            graph.value_info[vi.name] = TensorInfo(vi.name, info.dtype if old is None else old.dtype, info.shape)


def _more_known(new: tuple, old: tuple) -> bool:
    """`new` knows a size `old` does not, and contradicts none it knows."""
    if len(new) != len(old):
        return False
    if any(isinstance(o, int) and n != o for n, o in zip(new, old)):
        return False
    return any(isinstance(n, int) and not isinstance(o, int) for n, o in zip(new, old))


def _unflatten_row_product(graph: Graph, name: str, keep, origin: str) -> bool:
    """Reshape(Gemm(Reshape(x, [-1, K]), W, b), [..., N]) -> Add(MatMul(x, W), b), the same
    rows' products without flattening x's leading axes into one (a Conv1D as transformers'
    GPT-2 exports it through dynamo): a selection of those axes then moves on. Only where a
    selection waits below, with alpha = beta = 1, W and b constants, nothing else reading
    the flat tensors. `origin`: the model's selection waiting below."""
    unflatten = graph.nodes.get(name)
    if unflatten is None or unflatten.op_type != "Reshape" or unflatten.domain != "":
        return False
    gemm = _only_producer(graph, unflatten.inputs[0], "Gemm", keep)
    flatten = _only_producer(graph, gemm.inputs[0], "Reshape", keep) if gemm is not None else None
    if flatten is None or gemm.attrs.get("transA", 0) or gemm.attrs.get("alpha", 1.0) != 1.0 or \
            gemm.attrs.get("beta", 1.0) != 1.0 or gemm.inputs[1] not in graph.constants:
        return False
    x, weight = flatten.inputs[0], np.asarray(graph.constants[gemm.inputs[1]])
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 and gemm.inputs[2] else ""
    x_shape, out_shape = _shape(graph, x), _shape(graph, unflatten.outputs[0])
    if gemm.attrs.get("transB", 0):
        weight = np.ascontiguousarray(weight.T)
    if x_shape is None or out_shape is None or weight.ndim != 2 or len(out_shape) < 3:
        return False
    lead, trail = tuple(x_shape[:len(out_shape) - 1]), x_shape[len(out_shape) - 1:]
    if (lead != tuple(out_shape[:-1]) or out_shape[-1] != weight.shape[1] or not trail
            or not all(isinstance(d, int) for d in trail) or int(np.prod(trail)) != weight.shape[0]
            or (bias and (bias not in graph.constants or np.ndim(graph.constants[bias]) > 1))):
        return False
    product = unflatten.outputs[0] if not bias else _new_node_name(graph, f"{gemm.name}/rows")
    w_name = _new_constant(graph, f"{gemm.inputs[1]}/rows", weight) if gemm.attrs.get("transB", 0) else gemm.inputs[1]
    for node in (flatten, gemm, unflatten):
        del graph.nodes[node.name]
    if len(trail) > 1:  # [..., heads, head size] -> [..., K]: the leading axes copied (0)
        rows = _new_node_name(graph, f"{flatten.name}/rows")
        shape = _new_constant(graph, f"{rows}/shape", np.array([0] * len(lead) + [weight.shape[0]], dtype=np.int64))
        graph.value_info[rows] = TensorInfo(rows, graph.tensor_info(x).dtype, lead + (weight.shape[0],))
        _add(graph, flatten, "Reshape", [x, shape], rows, rows)
        x = rows
    graph.value_info[product] = TensorInfo(product, graph.tensor_info(unflatten.outputs[0]).dtype, out_shape)
    _add(graph, gemm, "MatMul", [x, w_name], product, gemm.name)
    if bias:
        _add(graph, gemm, "Add", [product, bias], unflatten.outputs[0], _new_node_name(graph, f"{gemm.name}/bias"))
    graph.pruned_tensors[flatten.outputs[0]] = origin  # the flat tensors leave the graph
    graph.pruned_tensors[gemm.outputs[0]] = origin
    return True


def _only_producer(graph: Graph, tensor: str, op_type: str, keep) -> Node | None:
    """The standard-domain `op_type` node making `tensor`, when nothing else reads `tensor`."""
    node = graph.nodes.get(graph.producer.get(tensor, ""))
    if (node is None or node.op_type != op_type or node.domain != "" or tensor in keep
            or len(graph.consumers.get(tensor, [])) != 1 or tensor in {o.name for o in graph.outputs}):
        return None
    return node


def _add(graph: Graph, like: Node, op_type: str, inputs: list[str], out: str, name: str) -> None:
    graph.nodes[name] = _node(name, op_type, inputs, [out], {}, like)


def _node(name: str, op_type: str, inputs: list[str], outputs: list[str], attrs: dict, like: Node,
          copied=()) -> Node:
    """A standard-domain node of the rewrite, at `like`'s opset and place in the order;
    `copied`: attribute protos taken as they are (the producer's own, re-made on fewer rows)."""
    proto = helper.make_node(op_type, inputs, outputs, name=name, **({} if copied else attrs))
    proto.attribute.extend(copied)
    return Node(name=name, op_type=op_type, domain="", inputs=tuple(inputs), outputs=tuple(outputs), attrs=attrs,
                opset=like.opset, index=like.index, proto=proto)


def _shape(graph: Graph, name: str) -> tuple | None:
    if name in graph.constants:
        return tuple(np.shape(graph.constants[name]))
    info = graph.tensor_info(name)
    if info is None or info.shape is None or any(d is None for d in info.shape):
        return None
    return info.shape


def _int_constant(graph: Graph, name: str) -> np.ndarray | None:
    value = graph.constants.get(name) if name else None
    if value is None or np.asarray(value).dtype.kind not in "iu":
        return None
    return np.asarray(value).astype(np.int64)


def _selection(graph: Graph, node: Node) -> _Selection | None:
    """The positions `node` selects from its first input, or None (not a constant selection
    along one axis other than 0)."""
    if node.domain != "" or not node.inputs or node.op_type not in ("Gather", "Slice"):
        return None
    shape = _shape(graph, node.inputs[0])
    if shape is None or node.inputs[0] in graph.constants:
        return None
    rank = len(shape)
    if node.op_type == "Gather":
        indices = _int_constant(graph, node.inputs[1])
        if indices is None or indices.ndim > 1:
            return None
        axis = node.attrs.get("axis", 0)
        if not -rank <= axis < rank or axis % rank == 0:
            return None
        if len(set(indices.reshape(-1).tolist())) != indices.size:
            return None  # repeated positions (an embedding-like lookup): left where it is
        found = _Selection(axis % rank, tuple(int(i) for i in indices.reshape(-1)), indices.ndim == 0)
        # every position in order (the scalar Gather a move leaves on its one position): nothing to move
        return None if found.indices == tuple(range(shape[axis] if isinstance(shape[axis], int) else -1)) else found
    if node.opset < 10 or len(node.inputs) < 3:
        return None
    starts, ends = _int_constant(graph, node.inputs[1]), _int_constant(graph, node.inputs[2])
    axes = _int_constant(graph, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else np.arange(
        0 if starts is None else starts.size)
    steps = _int_constant(graph, node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else np.ones_like(axes)
    if any(v is None or v.ndim != 1 or v.size != 1 for v in (starts, ends, axes, steps)):
        return None
    axis = int(axes[0])
    if not -rank <= axis < rank or axis % rank == 0 or not isinstance(shape[axis], int) or steps[0] == 0:
        return None
    # ONNX clamps a Slice's bounds as Python slicing does (INT64_MAX ends included)
    kept = range(shape[axis])[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
    return None if kept == range(shape[axis]) else _Selection(axis % rank, tuple(kept))


def _merged_readers(graph: Graph, tensor: str, axis: int) -> list[tuple[Node, _Selection]] | None:
    """Every reader of `tensor` with what it selects, when each selects positions along `axis`."""
    readers = []
    for name in graph.consumers.get(tensor, []):
        reader = graph.nodes[name]
        found = _selection(graph, reader)
        if found is None or found.axis != axis or reader.inputs[0] != tensor or tensor in reader.inputs[1:]:
            return None
        readers.append((reader, found))
    return readers


def _union(readers: list[tuple[Node, _Selection]], size) -> tuple[int, ...] | None:
    """The positions any reader selects, in the order they first appear; None when they are
    every position of the axis (nothing to shorten)."""
    union = tuple(dict.fromkeys(i for _, found in readers for i in found.indices))
    if isinstance(size, int) and {i % size for i in union} == set(range(size)):
        return None
    return union


def _input_axis(out_shape, in_shape, axis: int, indices: tuple[int, ...]) -> int | None | bool:
    """Where output `axis` lies in a broadcast input: its axis, None (read whole: the input
    has no such axis or size 1 there), or False (sizes that may differ: not moved). A size
    shape inference left unknown is the output's or 1 (broadcasting allows no other), and
    the first and the last position select the same from both."""
    at = axis - (len(out_shape) - len(in_shape))
    if at < 0 or in_shape[at] == 1:
        return None
    if in_shape[at] == out_shape[axis]:
        return at
    return at if isinstance(in_shape[at], str) and set(indices) <= {0, -1} else False


def _reduced_axes(graph: Graph, node: Node, rank: int) -> set[int] | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        value = _int_constant(graph, node.inputs[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    if not axes:
        return None  # every axis (or none, by noop_with_empty_axes): not moved
    return {int(a) % rank for a in axes}


def _input_axes(graph: Graph, node: Node, axis: int, indices: tuple[int, ...]) -> list | None:
    """For each input of `node`, the axis holding output `axis` (None: read whole), or None
    when `node` mixes positions along it."""
    op = node.op_type
    out_shape = _shape(graph, node.outputs[0])
    shapes = [_shape(graph, i) if i else () for i in node.inputs]
    if out_shape is None or any(s is None for s in shapes):
        return None
    rank = len(out_shape)
    if op in _ELEMENTWISE or (op == "Concat" and node.attrs.get("axis", 0) % rank != axis):
        axes = [_input_axis(out_shape, s, axis, indices) if i else None for s, i in zip(shapes, node.inputs)]
        return None if any(a is False for a in axes) else axes
    if op == "MatMul":
        if min(len(s) for s in shapes) < 2 or axis == rank - 1:
            return None
        if axis == rank - 2:
            return [len(shapes[0]) - 2, None]
        axes = [_input_axis(out_shape[:-2], s[:-2], axis, indices) for s in shapes]
        return None if any(a is False for a in axes) else axes
    if op in _NORMALIZATIONS:
        if axis >= node.attrs.get("axis", -1) % rank or any(o and graph.consumers.get(o) for o in node.outputs[1:]):
            return None
        return [axis] + [None] * (len(node.inputs) - 1)
    if op in ("Softmax", "LogSoftmax"):
        softmax_axis = node.attrs.get("axis", -1 if node.opset >= 13 else 1) % rank
        mixes = axis == softmax_axis if node.opset >= 13 else axis >= softmax_axis
        return None if mixes else [axis]
    if op == "Transpose":
        perm = node.attrs.get("perm") or list(range(rank))[::-1]
        return [int(perm[axis])]
    if op in _REDUCTIONS:
        reduced = _reduced_axes(graph, node, len(shapes[0]))
        if reduced is None:
            return None
        if node.attrs.get("keepdims", 1):
            at = axis
        else:
            kept = [a for a in range(len(shapes[0])) if a not in reduced]
            at = kept[axis]
        return None if at in reduced else [at] + [None] * (len(node.inputs) - 1)
    if op == "Reshape":
        return _reshape_axes(graph, node, shapes[0], out_shape, axis)
    return None


def _reshape_axes(graph, node, in_shape, out_shape, axis):
    """A Reshape that leaves axes 0..axis as they are: the selection moves to the same axis
    (`_shrunk_reshape` says how the shape changes)."""
    if tuple(in_shape[:axis + 1]) != tuple(out_shape[:axis + 1]):
        return None
    if _shrunk_shape(graph, node, in_shape, out_shape, axis, 1) is False:
        return None
    return [axis, None]


def _shrunk_shape(graph, node, in_shape, out_shape, axis, count):
    """The shape input of the Reshape of `count` selected positions: its constant with the
    entry at the axis set to `count` (0 and -1 stay: they copy or infer it), None for an
    Identity (a shape computed at run time that equals the input's), the inferred output
    shape as a constant where shape arithmetic computes it from static sizes, else False."""
    shape = _int_constant(graph, node.inputs[1])
    zero_is_literal = node.attrs.get("allowzero", 0)
    if shape is not None:
        if zero_is_literal and (shape == 0).any():
            return False
        shape = shape.copy()
        if shape[axis] > 0:
            shape[axis] = count
        return shape
    if tuple(in_shape) == tuple(out_shape):
        return None
    if not all(isinstance(d, int) for a, d in enumerate(out_shape) if a not in (0, axis)):
        return False  # a size known at run time only: the computed shape would not shrink
    # the batch size as the input's: copied (0), or inferred (-1) where 0 means 0
    return np.array([-1 if zero_is_literal else 0] + [count if a == axis else d for a, d in enumerate(out_shape)][1:],
                    dtype=np.int64)


class _Origins:
    """What the moves need to name the model's own tensors and selections in errors: the
    tensors the model had (liftir's own are not listed as pruned) and, for each Gather a
    move wrote, the model's selection it comes from."""

    def __init__(self, model_tensors: set[str]):
        self.model_tensors = model_tensors
        self.selection_of: dict[str, str] = {}


def _move_above_producer(graph: Graph, tensor: str, selection: _Selection, keep, origins: _Origins) -> bool:
    """Rewrite producer(tensor) -> selections into selections of its inputs -> producer."""
    producer = graph.nodes.get(graph.producer.get(tensor, ""))
    outputs = {o.name for o in graph.outputs}
    if producer is None or producer.domain != "" or tensor in outputs or tensor in keep or producer.captures:
        return False
    if any(o != tensor and o and (graph.consumers.get(o) or o in outputs) for o in producer.outputs):
        return False
    readers = _merged_readers(graph, tensor, selection.axis)
    shape = _shape(graph, tensor)
    union = _union(readers, shape[selection.axis]) if readers and shape else None
    if union is None:
        return False
    selection = _Selection(selection.axis, union)
    axes = _input_axes(graph, producer, selection.axis, selection.indices)
    if axes is None:
        return False
    inputs = list(producer.inputs)
    added: list[Node] = []
    for position, (name, at) in enumerate(zip(producer.inputs, axes)):
        if at is None or not name:
            continue
        picked = _Selection(at, selection.indices)
        if name in graph.constants:
            inputs[position] = _new_constant(graph, f"{name}/pruned",
                                             np.take(graph.constants[name], list(picked.indices), axis=at))
        else:
            gather = _gather(graph, name, picked, _new_node_name(graph, f"{producer.name}/pruned input {position}"),
                             producer)
            added.append(gather)
            inputs[position] = gather.outputs[0]
    op_type, attrs = producer.op_type, dict(producer.attrs)
    if op_type == "Reshape":
        op_type, inputs = _shrunk_reshape(graph, producer, inputs, selection)
    first, selected = readers[0]
    # one reader taking the union as it comes: the producer writes that reader's output
    direct = len(readers) == 1 and not selected.scalar
    out = first.outputs[0] if direct else _new_node_name(graph, f"{tensor}/pruned")
    if not direct:
        _set_info(graph, out, tensor, selection)
    same_op = op_type == producer.op_type
    del graph.nodes[producer.name]
    graph.nodes[producer.name] = _node(producer.name, op_type, inputs, [out], attrs if same_op else {}, producer,
                                       copied=list(producer.proto.attribute) if same_op else ())
    for gather in added:
        graph.nodes[gather.name] = gather
    if direct:
        del graph.nodes[first.name]
    for reader, found in ([] if direct else readers):  # each takes its own positions of the union
        at = [union.index(i) for i in found.indices]
        if found.scalar:
            index = _new_constant(graph, f"{reader.name}/position", np.array(at[0], dtype=np.int64))
            _replace(graph, reader, "Gather", [out, index], {"axis": selection.axis})
        elif at == list(range(len(union))):
            _replace(graph, reader, "Identity", [out], {})
        else:
            index = _new_constant(graph, f"{reader.name}/positions", np.array(at, dtype=np.int64))
            _replace(graph, reader, "Gather", [out, index], {"axis": selection.axis})
    origin = origins.selection_of.get(first.name, first.name)
    if tensor in origins.model_tensors:
        graph.pruned_tensors[tensor] = origin
    for gather in added:
        origins.selection_of[gather.name] = origin
    return True


def _shrunk_reshape(graph: Graph, node: Node, inputs: list[str], selection: _Selection):
    """The op and inputs of `node`, a Reshape, on the selected positions (`_shrunk_shape`)."""
    shape = _shrunk_shape(graph, node, _shape(graph, node.inputs[0]), _shape(graph, node.outputs[0]),
                          selection.axis, len(selection.indices))
    if shape is None:
        return "Identity", inputs[:1]
    return "Reshape", [inputs[0], _new_constant(graph, f"{node.inputs[1]}/pruned", shape)]


def _new_constant(graph: Graph, stem: str, value: np.ndarray) -> str:
    name, n = stem, 1
    while name in graph.constants or name in graph.producer:
        n += 1
        name = f"{stem}{n}"
    graph.constants[name] = value
    return name


def _new_node_name(graph: Graph, stem: str) -> str:
    """A name no node and no tensor of the graph has (a deleted node's may come back as a
    tensor's stem)."""
    taken = set(graph.nodes) | graph.tensor_names() | set(graph.value_info)
    name, n = stem, 1
    while name in taken or f"{name}/selected" in taken or f"{name}/indices" in taken:
        n += 1
        name = f"{stem} ({n})"
    return name


def _set_info(graph: Graph, name: str, like: str, selection: _Selection) -> None:
    """`name` holds the selected positions of `like` (the axis kept)."""
    info = graph.tensor_info(like)
    if info is None or info.shape is None:
        return
    shape = list(info.shape)
    shape[selection.axis] = len(selection.indices)
    graph.value_info[name] = TensorInfo(name, info.dtype, tuple(shape))


def _gather(graph: Graph, tensor: str, selection: _Selection, name: str, like: Node) -> Node:
    indices = _new_constant(graph, f"{name}/indices", np.array(selection.indices, dtype=np.int64))
    out = f"{name}/selected"
    _set_info(graph, out, tensor, selection)
    return _node(name, "Gather", [tensor, indices], [out], {"axis": selection.axis}, like)


def _replace(graph: Graph, node: Node, op_type: str, inputs: list[str], attrs: dict) -> None:
    graph.nodes[node.name] = _node(node.name, op_type, inputs, list(node.outputs), attrs, node)
