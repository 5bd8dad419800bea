"""Move a node that only an If reads into the If's branches, so that a branch which passes
the value through writes it instead of copying it.

A rule's shortcut (`liftir.rule.branch`) is an ONNX If whose fast branch usually returns
one of its arguments unchanged (no fill needed, no masked row): the branch must then copy
it (an Identity, one full-size pass, the cost of the op that made it). When the value's
producer has no other reader, running the producer inside each branch instead costs the
same one execution and spares the copy: the branch that passed the value through now
produces it as its output. Only one branch runs, so nothing is computed twice; the
values are the same bits.
"""
from __future__ import annotations

import collections

import onnx
from onnx import helper

from .tracer import node_reads


def sink_into_branches(nodes: list, kept: set[str]) -> list:
    """`nodes` (a topologically ordered graph body) with every single-reader producer of a
    value an If branch passes through moved into that If's branches. `kept`: names read
    outside `nodes` (the graph outputs), which stay where they are."""
    readers = collections.Counter()
    for node in nodes:
        for name in set(node_reads(node)):
            readers[name] += 1
    index = {out: i for i, node in enumerate(nodes) for out in node.output}
    moved: dict[int, int] = {}  # producer position -> the If's position it moves into
    for position, node in enumerate(nodes):
        if node.op_type != "If":
            continue
        for value in _passed_through(node):
            at = index.get(value)
            if (at is None or at in moved or value in kept or readers[value] != 1
                    or not _movable(nodes[at])):
                continue
            moved[at] = position
    into = collections.defaultdict(list)
    for at, position in sorted(moved.items()):
        into[position].append(nodes[at])
    result = []
    for position, node in enumerate(nodes):
        if position in moved:
            continue
        result.append(_with_producers(node, into[position]) if node.op_type == "If" else node)
    return result


def _passed_through(node, made_above: frozenset = frozenset()) -> list[str]:
    """Outer values that a branch of the If `node`, or of an If inside it, returns through an
    Identity (`made_above`: values made in the enclosing branches, not outer here)."""
    values = []
    for attr in node.attribute:
        if attr.type != onnx.AttributeProto.GRAPH:
            continue
        made = made_above | {o for n in attr.g.node for o in n.output}
        for n in attr.g.node:
            if n.op_type == "Identity" and n.input[0] not in made and n.output[0] in _outputs(attr.g):
                values.append(n.input[0])
            elif n.op_type == "If":
                values += _passed_through(n, made)
    return list(dict.fromkeys(values))


def _outputs(graph) -> set[str]:
    return {o.name for o in graph.output}


def _movable(node) -> bool:
    """A plain single-output node (no subgraphs of its own)."""
    return len(node.output) == 1 and not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _with_producers(node, producers: list):
    """A copy of the If `node` whose branches start with `producers` (those that read them);
    a branch output that was an Identity of a producer's value becomes that producer's own
    output. The branches' own Ifs are treated the same way."""
    branches = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            branches[attr.name] = _branch_with(attr.g, producers, suffix=f"/{attr.name}")
    others = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH}
    return helper.make_node("If", list(node.input), list(node.output), name=node.name, **others, **branches)


def _branch_with(graph, producers: list, suffix: str):
    inside = collections.Counter(i for n in graph.node for i in set(node_reads(n)))
    outputs = _outputs(graph)
    renamed = {}  # producer value -> branch output, where the branch only passed it through
    body = []
    for n in graph.node:
        value = n.input[0] if n.op_type == "Identity" else None
        if value is not None and n.output[0] in outputs and inside[value] == 1 and any(
                value in p.output for p in producers):
            renamed[value] = n.output[0]
            continue
        body.append(n)
    head = []
    for p in producers:
        if not inside[p.output[0]]:
            continue  # this branch does not read it: it runs only in the other
        copy = onnx.NodeProto()
        copy.CopyFrom(p)
        copy.name = p.name + suffix
        copy.output[0] = renamed.get(p.output[0], p.output[0])
        head.append(copy)
    result = onnx.GraphProto()
    result.CopyFrom(graph)
    del result.node[:]
    result.node.extend(sink_into_branches(head + body, outputs))
    return result
