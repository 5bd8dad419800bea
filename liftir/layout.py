"""Batch-first rewrite of time-major recurrent ops.

liftir keeps the samples on axis 0 of every tensor. PyTorch exports nn.LSTM/GRU/RNN (with
either exporter) as a time-major ONNX op (layout 0: X [T, N, F], Y [T, D, N, H]) between
transposes:

    x [N, T, F] -> Transpose(1, 0, 2) -> LSTM -> Y -> Transpose(0, 2, 1, 3) -> Reshape [T, N, D*H]
                -> Transpose(1, 0, 2) -> [N, T, D*H]          (or Y -> Squeeze(1) -> Transpose)
    Y_h [D, N, H] -> Gather(axis 0, i) -> [N, H]               (h_n[-1])

Every tensor in between has its batch on axis 1 (the same holds for the dynamo exporter's
adaptive average pool: Transpose -> GatherND -> Transpose, see `batch_first_selections`). This pass rewrites such a chain into the
same op with layout 1 (batch first), whose Y [N, T, D, H] becomes [N, T, D*H] by one
Reshape, and whose Y_h [N, D, H] is read by Gather on axis 1. Outputs are unchanged (tested
against onnxruntime on the original model). Chains of other shapes are left alone and the
recurrent rule refuses them with a clear error.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import Graph, Node, TensorInfo

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def _perm(node: Node | None, perm: list[int]) -> bool:
    return node is not None and node.op_type == "Transpose" and list(node.attrs.get("perm", [])) == perm


def _only_consumer(graph: Graph, tensor: str) -> Node | None:
    users = graph.consumers.get(tensor, [])
    return graph.nodes[users[0]] if len(users) == 1 else None


def _squeeze_axes(graph: Graph, node: Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1] in graph.constants:
        return np.atleast_1d(graph.constants[node.inputs[1]]).tolist()
    return None


def _new_node(graph: Graph, op_type: str, inputs, outputs, index: int, name: str, **attrs) -> Node:
    proto = helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)
    node = Node(name=name, op_type=op_type, domain="", inputs=tuple(inputs), outputs=tuple(outputs),
                attrs=dict(attrs), opset=graph.opsets.get("", 1), index=index, proto=proto)
    graph.nodes[name] = node
    return node


def _const(graph: Graph, name: str, value) -> str:
    graph.constants[name] = np.asarray(value, dtype=np.int64)
    return name


def batch_first(graph: Graph) -> int:
    """All of this module's rewrites; returns how many chains were rewritten."""
    return unsorted_packing(graph) + batch_first_recurrent(graph) + batch_first_selections(graph)


def _rewire(graph: Graph, node: Node, old: str, new: str) -> None:
    """`node` reading tensor `new` wherever it read `old` (its proto too, which the
    onnxruntime forward runs)."""
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    del proto.input[:]
    proto.input.extend(new if i == old else i for i in node.inputs)
    graph.nodes[node.name] = dataclasses.replace(node, inputs=tuple(proto.input), proto=proto)


def _before_casts(graph: Graph, tensor: str) -> str:
    node = graph.nodes.get(graph.producer.get(tensor, ""))
    while node is not None and node.op_type == "Cast":
        tensor = node.inputs[0]
        node = graph.nodes.get(graph.producer.get(tensor, ""))
    return tensor


def _is_range_from_zero(graph: Graph, tensor: str) -> bool:
    node = graph.nodes.get(graph.producer.get(tensor, ""))
    if node is None or node.op_type != "Range":
        return False
    start, delta = (graph.constants.get(node.inputs[i]) for i in (0, 2))
    return start is not None and delta is not None and int(np.asarray(start)) == 0 and int(np.asarray(delta)) == 1


VIEWS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


def unsorted_packing(graph: Graph) -> int:
    """Undo the sort of the batch that `pack_padded_sequence(..., enforce_sorted=False)`
    exports around a recurrent op (TorchScript exporter):

        order = TopK(lengths, N)[1];  X -> Gather(order) -> Transpose -> LSTM(sequence_lens =
        TopK(lengths, N)[0]) -> views -> Gather(inverse),  inverse = ScatterElements(.., order,
        Range(0, N))

    The op keeps its rows apart, so sorting its rows and gathering them back cancel: the op
    reads X and the lengths as given and the gathers by `inverse` go. Without this, liftir's
    stacked batch of actual and reference rows would be sorted as one batch, by a Gather
    whose indices are computed (refused). Initial states must not depend on the order
    (absent, constants, ConstantOfShape); every use of the outputs must end in a Gather by
    the inverse, through views; other chains are left alone."""
    return _rewrite_recurrent(graph, lambda node: len(node.inputs) >= 5 and bool(node.inputs[4]), _unsort)


def _rewrite_recurrent(graph: Graph, accepts, rewrite) -> int:
    """Apply `rewrite(graph, node)` to every recurrent node `accepts`, rebuilding the graph's
    indexes after each change. Returns how many were rewritten."""
    rewritten = 0
    for name in list(graph.order):
        node = graph.nodes.get(name)
        if node is None or node.op_type not in RECURRENT_OPS or not accepts(node):
            continue
        if rewrite(graph, node):
            rewritten += 1
            graph.rebuild()
    return rewritten


def _unsort(graph: Graph, node: Node) -> bool:
    producer, consumers = graph.producer, graph.consumers
    topk = graph.nodes.get(producer.get(_before_casts(graph, node.inputs[4]), ""))
    if topk is None or topk.op_type != "TopK" or _before_casts(graph, node.inputs[4]) != topk.outputs[0] \
            or topk.attrs.get("largest", 1) != 1 or len(topk.inputs) < 2:
        return False
    lengths = topk.inputs[0]
    # K = Gather(Shape(lengths), -1) (or 0) of the 1-D lengths: the whole batch
    k = graph.nodes.get(producer.get(topk.inputs[1], ""))
    shape = graph.nodes.get(producer.get(k.inputs[0], "")) if k is not None and k.op_type == "Gather" else None
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] != lengths or k.inputs[1] not in graph.constants \
            or np.asarray(graph.constants[k.inputs[1]]).reshape(-1).tolist() not in ([0], [-1]):
        return False
    order = topk.outputs[1]
    into = graph.nodes.get(producer.get(node.inputs[0], ""))
    sort = graph.nodes.get(producer.get(into.inputs[0], "")) if _perm(into, [1, 0, 2]) else None
    if sort is None or sort.op_type != "Gather" or sort.attrs.get("axis", 0) != 0 \
            or _before_casts(graph, sort.inputs[1]) != order:
        return False
    for index in (5, 6):
        state = node.inputs[index] if index < len(node.inputs) else ""
        feeder = graph.nodes.get(producer.get(state, ""))
        if state and state not in graph.constants and (feeder is None or feeder.op_type != "ConstantOfShape"):
            return False
    inverse = {o for n in graph.nodes.values() if n.op_type == "ScatterElements" and n.attrs.get("axis", 0) == 0
               and _before_casts(graph, n.inputs[1]) == order and _is_range_from_zero(graph, n.inputs[2])
               for o in n.outputs}
    graph_outputs = {o.name for o in graph.outputs}
    unsort, stack = [], [o for o in node.outputs if o]
    while stack:
        tensor = stack.pop()
        if tensor in graph_outputs:
            return False
        for user in (graph.nodes[u] for u in consumers.get(tensor, [])):
            if user.op_type == "Gather" and user.inputs[0] == tensor and user.inputs[1] in inverse:
                unsort.append(user)
            elif user.op_type in VIEWS and user.inputs[0] == tensor:
                stack.extend(o for o in user.outputs if o)
            elif user.op_type != "Shape":
                return False
    if not unsort:
        return False
    base = node.name
    as_given = f"{base}/lengths_as_given"
    _new_node(graph, "Cast", [lengths], [as_given], node.index, f"{base}/unsorted/lengths", to=TensorProto.INT32)
    known = graph.tensor_info(lengths)  # integer: held, as the lengths are (liftir/held.py)
    graph.value_info[as_given] = TensorInfo(as_given, np.dtype(np.int32), known.shape if known else None)
    _rewire(graph, node, node.inputs[4], as_given)
    _rewire(graph, into, into.inputs[0], sort.inputs[0])
    for gather in unsort:
        out = gather.outputs[0]
        if out in graph_outputs:
            del graph.nodes[gather.name]
            _new_node(graph, "Identity", [gather.inputs[0]], [out], gather.index, f"{gather.name}/unsorted")
            continue
        for user in list(consumers.get(out, [])):
            _rewire(graph, graph.nodes[user], out, gather.inputs[0])
        del graph.nodes[gather.name]
    return True


def _shape_of(graph: Graph, tensor: str):
    info = graph.tensor_info(tensor)
    if info is None or info.shape is None or not all(isinstance(d, int) and d > 0 for d in info.shape[1:]):
        return None
    return tuple(info.shape[1:])


def batch_first_selections(graph: Graph) -> int:
    """Rewrite Transpose -> GatherND/Gather (constant indices) -> Transpose chains that move
    the batch away and back (the dynamo exporter's adaptive average pool) into one Gather
    of the flattened sample. The flat positions come from running the chain on a probe
    sample whose values are their own positions, so the semantics stay the standard's."""
    from .folding import evaluate_node  # noqa: PLC0415 (folding imports graph, as we do)

    rewritten = 0
    for name in list(graph.order):
        start = graph.nodes.get(name)
        if start is None or start.op_type != "Transpose" or list(start.attrs.get("perm", [0]))[0] == 0:
            continue
        shape = _shape_of(graph, start.inputs[0])
        if shape is None:
            continue
        chain, node, axis = [], start, 0
        while node is not None:
            if node.op_type == "Transpose":
                axis = list(node.attrs["perm"]).index(axis)
            elif node.op_type == "GatherND" and node.attrs.get("batch_dims", 0) == 0 \
                    and node.inputs[1] in graph.constants:
                idx = graph.constants[node.inputs[1]]
                if axis < idx.shape[-1]:
                    break
                axis = axis - idx.shape[-1] + idx.ndim - 1
            elif node.op_type == "Gather" and node.inputs[1] in graph.constants:
                a = node.attrs.get("axis", 0)
                if a == axis:
                    break
                axis = axis if axis < a else axis + graph.constants[node.inputs[1]].ndim - 1
            else:
                break
            chain.append(node)
            if axis == 0:
                break
            node = _only_consumer(graph, node.outputs[0])
        graph_outputs = {o.name for o in graph.outputs}
        if axis != 0 or len(chain) < 2 or any(o in graph_outputs for n in chain[:-1] for o in n.outputs):
            continue
        probe = np.arange(int(np.prod(shape)), dtype=np.float64).reshape((1,) + shape)
        value = probe
        for n in chain:
            inputs = [value] + [graph.constants.get(i) for i in n.inputs[1:]]
            value = evaluate_node(n, inputs)[0]
        base = chain[0].name
        flat = f"{base}/flat_sample"
        _new_node(graph, "Reshape", [start.inputs[0], _const(graph, f"{base}/flatten", [0, -1])], [flat],
                  start.index, f"{base}/batch_first/flatten")
        positions = _const(graph, f"{base}/positions", value[0].astype(np.int64))
        _new_node(graph, "Gather", [flat, positions], [chain[-1].outputs[0]], chain[-1].index,
                  f"{base}/batch_first/gather", axis=1)
        for n in chain:
            del graph.nodes[n.name]
        graph.rebuild()
        rewritten += 1
    return rewritten


def batch_first_recurrent(graph: Graph) -> int:
    """Rewrite every matching time-major recurrent chain to layout 1. Returns how many."""
    return _rewrite_recurrent(graph, lambda node: node.attrs.get("layout", 0) == 0, _rewrite)


def _rewrite(graph: Graph, node: Node) -> bool:
    producer = graph.producer
    outputs = list(node.outputs) + [""] * (3 - len(node.outputs))
    y, y_h, y_c = outputs[:3]
    into = graph.nodes.get(producer.get(node.inputs[0], ""))
    if not _perm(into, [1, 0, 2]):
        return False
    # the packed-sequence export also reads the transposed X's shape (for zero initial
    # states): the Transpose then stays for those Shape nodes, and the op reads X itself
    others = [graph.nodes[u] for u in graph.consumers.get(node.inputs[0], []) if u != node.name]
    if any(o.op_type != "Shape" for o in others):
        return False
    base = node.name
    graph_outputs = {o.name for o in graph.outputs}
    if graph_outputs & {y, y_h, y_c}:
        return False
    remove = [node.name] if others else [into.name, node.name]
    add = []  # (op, inputs, outputs, attrs) for the nodes that replace the chain
    new_y, new_h, new_c = f"{base}/Y_batch_first", f"{base}/Y_h_batch_first", f"{base}/Y_c_batch_first"

    # Y: -> Transpose(0, 2, 1, 3) -> Reshape (to rank 3) -> Transpose(1, 0, 2), or -> Squeeze(1) -> Transpose
    if y and graph.consumers.get(y):
        users = [graph.nodes[u] for u in graph.consumers[y]]
        first = users[0] if len(users) == 1 else None
        if _perm(first, [0, 2, 1, 3]):
            mid = [graph.nodes[u] for u in graph.consumers.get(first.outputs[0], [])]
            reshape = [m for m in mid if m.op_type == "Reshape"]
            if len(reshape) != 1 or any(m.op_type not in ("Reshape", "Shape") for m in mid):
                return False
            last = _only_consumer(graph, reshape[0].outputs[0])
            remove += [first.name, reshape[0].name]
        elif first is not None and first.op_type == "Squeeze" and _squeeze_axes(graph, first) == [1]:
            last = _only_consumer(graph, first.outputs[0])
            remove.append(first.name)
        else:
            return False
        if not _perm(last, [1, 0, 2]):
            return False
        remove.append(last.name)
        add.append(("Reshape", [new_y, _const(graph, f"{base}/merge_directions", [0, 0, -1])],
                    [last.outputs[0]], {}, last.index))
    # Y_h, Y_c: read by Gather(axis 0) (h_n[i]), Squeeze(0) (one direction) or Transpose(1, 0, 2)
    for old, new in ((y_h, new_h), (y_c, new_c)):
        for user in [graph.nodes[u] for u in graph.consumers.get(old, [])] if old else []:
            if user.op_type == "Gather" and user.attrs.get("axis", 0) == 0:
                add.append(("Gather", [new, user.inputs[1]], list(user.outputs), {"axis": 1}, user.index))
            elif user.op_type == "Squeeze" and _squeeze_axes(graph, user) == [0]:
                add.append(("Reshape", [new, _const(graph, f"{base}/drop_direction", [0, -1])],
                            list(user.outputs), {}, user.index))
            elif _perm(user, [1, 0, 2]):
                add.append(("Identity", [new], list(user.outputs), {}, user.index))
            else:
                return False
            remove.append(user.name)
    # the recurrent op itself, batch first; initial states [D, N, H] -> [N, D, H]
    inputs = list(node.inputs)
    inputs[0] = into.inputs[0]
    for index in (5, 6):
        if index < len(inputs) and inputs[index]:
            state = inputs[index]
            feeder = graph.nodes.get(producer.get(state, ""))
            if state in graph.constants:
                inputs[index] = f"{base}/state{index}_batch_first"
                graph.constants[inputs[index]] = np.ascontiguousarray(graph.constants[state].transpose(1, 0, 2))
            elif _perm(feeder, [1, 0, 2]):  # a batch-first state transposed for the op: use it as is
                inputs[index] = feeder.inputs[0]
                if len(graph.consumers.get(state, [])) == 1:
                    remove.append(feeder.name)
            else:
                inputs[index] = f"{base}/state{index}_batch_first"
                add.append(("Transpose", [state], [inputs[index]], {"perm": [1, 0, 2]}, node.index))
    attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
    add.append((node.op_type, inputs, [new_y if y else "", new_h if y_h else "", new_c if y_c else ""]
                [:len(node.outputs)], dict(attrs, layout=1), node.index))
    kept = {o for _, _, outs, _, _ in add for o in outs}
    if any(o in graph_outputs and o not in kept for dead in remove for o in graph.nodes[dead].outputs):
        return False  # an intermediate tensor of the chain is a model output: leave it be
    for dead in remove:
        del graph.nodes[dead]
    for k, (op, ins, outs, attrs, index) in enumerate(add):
        # the op keeps its own name, which its rule's errors give
        _new_node(graph, op, ins, outs, index, base if op == node.op_type else f"{base}/batch_first/{k}", **attrs)
    _drop_dangling(graph)
    return True


def _drop_dangling(graph: Graph) -> None:
    """Remove the shape arithmetic that read the replaced tensors (it fed only their Reshape)."""
    available = {i.name for i in graph.inputs} | set(graph.constants)
    while True:
        produced = {o for n in graph.nodes.values() for o in n.outputs if o}
        dangling = [name for name, n in graph.nodes.items()
                    if any(i and i not in produced and i not in available for i in n.inputs)]
        if not dangling:
            return
        for name in dangling:
            del graph.nodes[name]
