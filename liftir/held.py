"""Integer (token-id, categorical) inputs: held as given, attributed at their embeddings.

DeepLIFT and its relatives need differences of real numbers, and a token id has none to
give. As Captum's LayerIntegratedGradients / LayerDeepLift do on an embedding layer,
liftir holds integer inputs as given (the actual rows their ids, the reference rows the
reference's own ids, e.g. all [PAD]) and attributes to the float tensors computed
directly from them: the embedding lookups, and any cast of a mask to float. Every node
whose activation inputs are all integer tensors of this kind is "held": it is evaluated
(ONNX's reference implementation on the host, or the onnxruntime forward) but has no
multipliers, so it needs no rule. Summation-to-delta then holds against
f(actual ids) - f(reference ids).
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .backend import to_host
from .folding import evaluate_node
from .graph import Graph
from .rule import Rule

#: ops whose inputs after the first are positions, never values that carry a difference
INDEXING = frozenset({"Gather", "GatherElements", "GatherND"})


def held_region(graph: Graph, static: set[str], integer_inputs: list[str],
                has_rule=lambda node: False) -> tuple[set[str], list[str]]:
    """(held nodes, the float tensors computed directly from integer inputs).

    Held: nodes whose activation inputs are all integer tensors (or floats of the ids that
    only index arithmetic reads: `only_id_arithmetic`), nodes computing, from those and
    the attributed floats of the ids, integers that only gathers read as indices
    (`index_only`), and nodes of float
    activations whose outputs are all integer or bool and that have no rule of their own
    (`has_rule(node)`): comparisons and boolean logic do have rules (rules/selection.py: a
    condition that changes between reference and actual carries part of the difference
    through Where, which is what keeps Where conserving), so they are not held.
    """
    from_ints = set(integer_inputs)  # integer tensors computed from integer inputs only
    cut: set[str] = set()  # integer/bool tensors (and floats computed from them) of float computations
    nodes: set[str] = set()
    frontier: list[str] = []
    host = set(graph.constants)

    def is_float(name):
        info = graph.tensor_info(name)
        return info is None or info.dtype is None or info.dtype.kind == "f"

    outputs_of_graph = {o.name for o in graph.outputs}
    index_memo: dict[str, bool] = {}

    def index_only(name) -> bool:
        """An integer/bool tensor whose value reaches floats only as gather indices (where the
        change of ids shows as the change of the gathered float, the embedding)."""
        if name not in index_memo:
            index_memo[name] = False  # (a DAG: no cycle can ask again)
            readers = [graph.nodes[c] for c in graph.consumers.get(name, []) if c not in static]
            index_memo[name] = name not in outputs_of_graph and all(
                (n.op_type in INDEXING and name in n.inputs[1:] and name not in n.inputs[:1])
                or (any(n.outputs) and all(not o or (not is_float(o) and index_only(o)) for o in n.outputs))
                for n in readers)
        return index_memo[name]

    def only_id_arithmetic(name) -> bool:
        """A float tensor computed from ids that only index arithmetic reads (Keras' Embedding
        computes its gather index through Cast(ids, float) < 0): held with the ids, not
        attributed. A float read into a mask (a Where condition, a cast back to float) is
        not: its change carries part of the difference."""
        readers = [graph.nodes[c] for c in graph.consumers.get(name, []) if c not in static]
        return bool(readers) and name not in outputs_of_graph and all(
            any(n.outputs) and all(not o or (not is_float(o) and index_only(o)) for o in n.outputs)
            for n in readers)

    for name in graph.order:
        node = graph.nodes[name]
        if name in static:
            host.update(o for o in node.outputs if o)
            continue
        active = [i for i in node.all_inputs if i and i not in host]
        outputs = [o for o in node.outputs if o]
        if active and all(i in from_ints for i in active):
            nodes.add(name)
            for o in outputs:
                (frontier.append if is_float(o) and not only_id_arithmetic(o) else from_ints.add)(o)
        elif active and outputs and all(i in from_ints or i in frontier for i in active) and all(
                not is_float(o) and index_only(o) for o in outputs):
            nodes.add(name)  # index arithmetic on an attributed float of the ids: no multipliers
            from_ints.update(outputs)
        elif active and (all(i in from_ints or i in cut for i in active)
                         or (not any(is_float(o) for o in outputs) and not has_rule(node))):
            nodes.add(name)
            cut.update(outputs)
    # a float tensor no output of the model is computed from (beyond its shape: an unrolled
    # loop's last state update that nothing reads) carries no attribution
    live = {graph.producer[o.name] for o in graph.outputs if o.name in graph.producer}
    for producer in list(live):
        live |= nx.ancestors(graph.dag, producer)
    frontier = [t for t in frontier if t in outputs_of_graph or any(
        c not in static and c in live for c in graph.consumers.get(t, []))]
    return nodes, frontier


class HeldNode(Rule):
    """Forward only: ONNX's reference implementation of the op, on host arrays."""

    def forward(self, ctx, *inputs):
        xp = ctx.xp
        host = [None if v is None else np.asarray(to_host(v)) for v in inputs]
        results = evaluate_node(ctx.node, host)
        out = tuple(xp.asarray(r) for r in results)
        return out if len(out) > 1 else out[0]

    def backward(self, ctx, *grads):  # never called: the scheduler stops at held nodes
        raise NotImplementedError("held nodes carry no multipliers")


HELD = HeldNode()
