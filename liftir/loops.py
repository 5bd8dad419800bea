"""Control flow as plain nodes: Loops with a constant trip count unrolled, Ifs with a
constant condition inlined, when the graph is read.

Keras recurrent layers (LSTM, GRU, SimpleRNN; masking, go_backwards, Bidirectional) reach
ONNX through tf2onnx as a `Loop` over the time steps, with a fixed trip count (the
sequence length) and a condition computed from loop counters only. Unrolled, the body
is plain ops with rules (affine maps, Rescale, the product rule), so every method
explains it exactly, as it does PyTorch's LSTM. Each iteration's copy is folded as it is
made: the iteration number is a constant there, so the counters and the condition fold
to constants, which is how the condition is proved true for every iteration but the
last. A Loop whose trip count or condition depends on the input (or its shape) cannot be
unrolled once at load and is refused, naming the node.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .budget import budget
from .errors import ModelLoadError
from .folding import NONDETERMINISTIC_OPS, evaluate_node
from .graph import Graph, Node, _decode_attribute, add_subgraph_value_info, subgraph_captures

STANDARD = ("", "ai.onnx")


def inline_control_flow(graph: Graph) -> int:
    """Unroll every Loop and inline every If with a constant condition; returns how many.

    Loops nested in a body are copied with it and unrolled on the next call (the caller,
    folding.fold_constants, repeats until nothing is left)."""
    from .folding import static_nodes  # noqa: PLC0415
    static = static_nodes(graph)  # shape arithmetic: evaluated per input shape, never unrolled
    count = 0
    for name in list(graph.order):
        node = graph.nodes.get(name)
        if node is None or node.domain not in STANDARD or name in static:
            continue
        if node.op_type == "Loop":
            _unroll(graph, node)
            count += 1
        elif node.op_type == "If" and node.inputs and node.inputs[0] in graph.constants:
            _inline_if(graph, node)
            count += 1
    if count:
        graph.rebuild()
    return count


def _refuse(node: Node, why: str) -> None:
    raise ModelLoadError(
        f"Loop node {node.name!r} cannot be unrolled: {why}. liftir unrolls loops whose trip "
        f"count and condition are constants (after constant folding); export with fixed sizes "
        f"(e.g. a Keras Input with a fixed sequence length)")


def _unroll(graph: Graph, loop: Node) -> None:
    body: onnx.GraphProto = loop.attrs["body"]
    trip_name = loop.inputs[0] if loop.inputs else ""
    cond_name = loop.inputs[1] if len(loop.inputs) > 1 else ""
    state = list(loop.inputs[2:])
    n_carried = len(state)
    n_scan = len(body.output) - 1 - n_carried
    if trip_name and trip_name not in graph.constants:
        _refuse(loop, f"its trip count {trip_name!r} is computed from the model's inputs or their shapes")
    if cond_name and cond_name not in graph.constants:
        _refuse(loop, f"its initial condition {cond_name!r} is computed from the model's inputs")
    trips = int(np.asarray(graph.constants[trip_name]).reshape(-1)[0]) if trip_name else None
    go = bool(np.asarray(graph.constants[cond_name]).reshape(-1)[0]) if cond_name else True
    scans: list[list[str]] = [[] for _ in range(n_scan)]
    with budget() as bud:
        bud.node = loop.name
        if trips is not None and trips > bud.max_iterations - bud.iterations:
            bud.refuse(f"unroll a Loop of {trips} iterations")
        i = 0
        while go and (trips is None or i < trips):
            bud.count_iteration("Loop")
            prefix = f"{loop.name}/iter{i}/"
            bindings = {body.input[0].name: _const(graph, prefix + "iteration_num", np.array(i, np.int64)),
                        body.input[1].name: _const(graph, prefix + "cond_in", np.array(True))}
            bindings.update(zip((v.name for v in body.input[2:]), state))
            outs = _emit(graph, loop, body, prefix, bindings)
            state = outs[1:1 + n_carried]
            for k, name in enumerate(outs[1 + n_carried:]):
                scans[k].append(name)
            i += 1
            if trips is None or i < trips:  # the last iteration's condition is never read
                if outs[0] not in graph.constants:
                    _refuse(loop, f"whether iteration {i} runs (body output {body.output[0].name!r}) is "
                                  f"computed from the model's inputs")
                go = bool(np.asarray(graph.constants[outs[0]]).reshape(-1)[0])
    for j, (out, source) in enumerate(zip(loop.outputs[:n_carried], state)):
        if out:
            _alias(graph, loop, out, source, f"{loop.name}/final_{j}")
    for k, out in enumerate(loop.outputs[n_carried:n_carried + n_scan]):
        if not out:
            continue
        if not scans[k]:
            _refuse(loop, f"it runs no iteration, so its scan output {out!r} has no shape")
        _stack(graph, loop, out, scans[k], f"{loop.name}/scan_{k}")
    del graph.nodes[loop.name]


def _inline_if(graph: Graph, node: Node) -> None:
    taken = bool(np.asarray(graph.constants[node.inputs[0]]).reshape(-1)[0])
    branch = node.attrs["then_branch" if taken else "else_branch"]
    outs = _emit(graph, node, branch, f"{node.name}/{'then' if taken else 'else'}/", {})
    for j, (out, source) in enumerate(zip(node.outputs, outs)):
        if out:
            _alias(graph, node, out, source, f"{node.name}/output_{j}")
    del graph.nodes[node.name]


def _emit(graph: Graph, owner: Node, sub: onnx.GraphProto, prefix: str,
          bindings: dict[str, str]) -> list[str]:
    """Copy `sub`'s nodes into `graph` (names prefixed, inputs bound to outer tensors,
    captures kept), folding those whose inputs are constants; its outputs' new names."""
    local = {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output if o}

    def rename(name: str) -> str:
        if name in bindings:
            return bindings[name]
        return prefix + name if name in local else name

    for init in sub.initializer:
        graph.constants[prefix + init.name] = numpy_helper.to_array(init)
    add_subgraph_value_info(graph, sub, lambda n: prefix + n if n in local else None)
    for j, inner in enumerate(sub.node):
        proto = onnx.NodeProto()
        proto.CopyFrom(inner)
        proto.name = prefix + (inner.name or f"{inner.op_type}_{j}")
        while proto.name in graph.nodes:
            proto.name += "_"
        proto.input[:] = [rename(i) if i else "" for i in inner.input]
        proto.output[:] = [prefix + o if o else "" for o in inner.output]
        for attr in proto.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_free(g, rename, set())
        domain = "" if proto.domain in STANDARD else proto.domain
        node = Node(name=proto.name, op_type=proto.op_type, domain=domain, inputs=tuple(proto.input),
                    outputs=tuple(proto.output), attrs={a.name: _decode_attribute(a) for a in proto.attribute},
                    opset=graph.opsets.get(domain, 1), index=owner.index, proto=proto,
                    captures=subgraph_captures(proto))
        if domain == "" and node.op_type not in NONDETERMINISTIC_OPS and all(
                not i or i in graph.constants for i in node.all_inputs):
            values = evaluate_node(node, [graph.constants.get(i) if i else None for i in node.inputs],
                                   {c: graph.constants[c] for c in node.captures})
            for out, value in zip(node.outputs, values):
                if out:
                    graph.constants[out] = value
        else:
            graph.nodes[node.name] = node
    return [rename(o.name) for o in sub.output]


def _rename_free(sub: onnx.GraphProto, rename: Callable[[str], str], outer: set[str]) -> None:
    """Rename, in place, the names a nested subgraph reads from the copied scope."""
    defined = set(outer) | {i.name for i in sub.input} | {t.name for t in sub.initializer}
    for node in sub.node:
        node.input[:] = [i if not i or i in defined else rename(i) for i in node.input]
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_free(g, rename, defined)
        defined.update(o for o in node.output if o)
    for out in sub.output:
        if out.name not in defined:
            out.name = rename(out.name)


def _const(graph: Graph, name: str, value: np.ndarray) -> str:
    graph.constants[name] = value
    return name


def _add(graph: Graph, owner: Node, op_type: str, inputs: list[str], outputs: list[str], name: str,
         **attrs) -> None:
    proto = helper.make_node(op_type, inputs, outputs, name=name, **attrs)
    graph.nodes[name] = Node(name=name, op_type=op_type, domain="", inputs=tuple(inputs),
                             outputs=tuple(outputs), attrs=dict(attrs), opset=graph.opsets.get("", 1),
                             index=owner.index, proto=proto)


def _alias(graph: Graph, owner: Node, out: str, source: str, name: str) -> None:
    """`out` (the control-flow node's output name, which consumers read) := `source`."""
    if source in graph.constants:
        graph.constants[out] = graph.constants[source]
    else:
        _add(graph, owner, "Identity", [source], [out], name)


def _stack(graph: Graph, owner: Node, out: str, pieces: list[str], name: str) -> None:
    """A Loop's scan output: the per-iteration values stacked on a new axis 0."""
    if all(p in graph.constants for p in pieces):
        graph.constants[out] = np.stack([np.asarray(graph.constants[p]) for p in pieces])
        return
    opset = graph.opsets.get("", 1)
    axes = _const(graph, f"{name}/axes", np.array([0], np.int64))
    expanded = []
    for t, piece in enumerate(pieces):
        target = out if len(pieces) == 1 else f"{name}/step{t}"
        if piece in graph.constants:
            graph.constants[target] = np.expand_dims(np.asarray(graph.constants[piece]), 0)
        elif opset >= 13:
            _add(graph, owner, "Unsqueeze", [piece, axes], [target], f"{name}/unsqueeze{t}")
        else:
            _add(graph, owner, "Unsqueeze", [piece], [target], f"{name}/unsqueeze{t}", axes=[0])
        expanded.append(target)
    if len(pieces) > 1:
        _add(graph, owner, "Concat", expanded, [out], f"{name}/concat", axis=0)


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("Loop", "If") and n.domain in STANDARD for n in model.graph.node)


def flat_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its Loops unrolled and constant Ifs inlined, as a ModelProto: what
    liftir/cut.py cuts when a tensor to cut at exists only in an unrolled loop body (the
    embeddings of a Keras Embedding feeding an RNN)."""
    from .folding import fold_constants  # noqa: PLC0415 - folding imports this module lazily
    from .graph import build_graph  # noqa: PLC0415
    graph = build_graph(model)
    fold_constants(graph)
    nodes = [graph.nodes[name].proto for name in graph.order]
    read = {i for n in graph.nodes.values() for i in n.all_inputs if i} | {o.name for o in graph.outputs}
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in graph.constants.items() if k in read]
    inputs = [vi for vi in model.graph.input if vi.name not in graph.constants]
    value_info = [helper.make_tensor_value_info(i.name, helper.np_dtype_to_tensor_dtype(i.dtype),
                                                None if i.shape is None else list(i.shape))
                  for i in graph.value_info.values() if i.dtype is not None and i.name not in graph.constants]
    flat = helper.make_graph(nodes, model.graph.name, inputs, list(model.graph.output), initializers,
                             value_info=value_info)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(flat)
    return out
