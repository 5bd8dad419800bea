"""Exported decompositions of GELU read back as one Gelu node.

The TorchScript exporter (and any opset below 20, which has no Gelu op) writes nn.GELU as

    y = Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)       (or Mul(x, 1/sqrt 2), or the
                                                              0.5 taken first: Mul(Mul(x, 0.5), ...))

A region with one activation input is univariate, and every conserving rule set gives it
the same DeepLIFT multiplier, dy/dx (the product rule on x * (1 + erf) and Rescale on the
erf compose to it exactly), so reading the five nodes as one Gelu changes the attributions
by float32 rounding only. It is cheaper: one Rescale instead of a Rescale, a product rule
and three linear steps in the backward, and a forward whose intermediate tensors no rule
reads, which onnxruntime then fuses into its own Gelu kernel (ViT at opset 17: DeepLIFT
0.88x compiled, 0.76x interpreted). The float32 error against float64 grows a little (the
quotient of y's rounded values carries y's rounding where the chain carried erf's: ViT
1.05e-6 -> 1.60e-6 of the largest attribution), the same quotient dynamo's Gelu op gets.
The tanh form is left alone (see `_HEADS`), and so is every chain whose ops a user rule serves.

onnxruntime still runs the model's own five nodes (`Node.expansion`), so the forward values
are the model's; the Gelu rule reads only x and y. The fused tensors leave the graph:
`fused_tensors` maps each to the node that replaced it, for the error that names it. Not
applied in float64 (`precision="float64"` explains the model's nodes as written).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import helper

from .graph import Graph, Node
from .registry import is_builtin, lookup

_SQRT2 = math.sqrt(2.0)


def _scalar(graph: Graph, tensor: str) -> float | None:
    value = graph.constants.get(tensor)
    if value is None or np.asarray(value).size != 1 or np.asarray(value).dtype.kind != "f":
        return None
    return float(np.asarray(value).reshape(()))


def _close(value: float | None, target: float, dtype=np.float32) -> bool:
    """`value` is `target` rounded to a float type (the exporter writes sqrt 2 as a float32)."""
    return value is not None and abs(value - target) <= 4 * float(np.finfo(dtype).eps) * abs(target)


def _other(node: Node, tensor: str) -> str | None:
    """The input of a binary node that is not `tensor` (None if both or neither are)."""
    ins = list(node.inputs)
    if len(ins) != 2 or ins.count(tensor) != 1:
        return None
    return ins[1 - ins.index(tensor)]


class _Chain:
    """Matching helpers over one graph: single consumers, standard ops, scalar constants."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.outputs = {o.name for o in graph.outputs}

    def only_consumer(self, tensor: str, op_type: str) -> Node | None:
        users = self.graph.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs:
            return None
        node = self.graph.nodes[users[0]]
        return node if node.op_type == op_type and node.domain == "" else None

    def producer(self, tensor: str, op_types: tuple[str, ...]) -> Node | None:
        node = self.graph.nodes.get(self.graph.producer.get(tensor, ""))
        return node if node is not None and node.op_type in op_types and node.domain == "" else None

    def times_constant(self, node: Node | None, data: str, target: float) -> bool:
        return node is not None and _close(_scalar(self.graph, _other(node, data) or ""), target)

    def single_use(self, node: Node | None) -> bool:
        """`node`'s output is read by one node and is no graph output (it may be fused away)."""
        return (node is not None and len(self.graph.consumers.get(node.outputs[0], [])) == 1
                and node.outputs[0] not in self.outputs)


def _erf_head(chain: _Chain, erf: Node) -> tuple[str, list[Node]] | None:
    """(x, [scale]) for erf(x / sqrt 2), the scale a Div by sqrt 2 or a Mul by 1/sqrt 2."""
    scale = chain.producer(erf.inputs[0], ("Div", "Mul"))
    if not chain.single_use(scale) or len(scale.inputs) != 2:
        return None
    if scale.op_type == "Div":
        x, matches = scale.inputs[0], _close(_scalar(chain.graph, scale.inputs[1]), _SQRT2)
    else:
        x = next((i for i in scale.inputs if i not in chain.graph.constants), "")
        matches = chain.times_constant(scale, x, 1 / _SQRT2)
    return (x, [scale]) if matches and x and x not in chain.graph.constants else None


def _tail(chain: _Chain, core: Node, x: str) -> list[Node] | None:
    """The nodes making 0.5 x (1 + core): Add 1, then Mul x and Mul 0.5, or Mul (x 0.5)."""
    plus = chain.only_consumer(core.outputs[0], "Add")
    if plus is None or not chain.times_constant(plus, core.outputs[0], 1.0):
        return None
    product = chain.only_consumer(plus.outputs[0], "Mul")
    if product is None:
        return None
    other = _other(product, plus.outputs[0])
    if other == x:  # x (1 + core), then the half
        half = chain.only_consumer(product.outputs[0], "Mul")
        if half is None or not chain.times_constant(half, product.outputs[0], 0.5):
            return None
        return [plus, product, half]
    halved = chain.producer(other or "", ("Mul",))  # (x 0.5) (1 + core)
    if not chain.single_use(halved) or x not in halved.inputs or not chain.times_constant(halved, x, 0.5):
        return None
    return [halved, plus, product]


#: the op at a chain's heart -> how to match what feeds it, and the Gelu it makes. Not the
#: tanh form (GPT-2's NewGELU): read as one Gelu its quotient of recomputed values was 4.6x
#: further from float64 than the chain's closed-form Tanh and Pow rules (2.05e-6 against
#: 4.5e-7 of the max) and the interpreter 1.6x slower, for a compiled pass 0.79x
_HEADS = {"Erf": (_erf_head, "none")}


def _fused_name(nodes: list[Node], core: Node) -> str:
    """The path the exporter gave the activation ("/blocks.0/mlp/act"), else the core's name."""
    names = [n.name for n in nodes]
    prefix = core.name[: max(0, core.name.rfind("/"))]
    if prefix and all(n.startswith(prefix + "/") for n in names):
        return f"{prefix} (fused GELU)"
    return f"{core.name} (fused GELU)"


#: the ops a fused chain stands for, and the one it becomes
_CHAIN_OPS = ("Div", "Mul", "Erf", "Add", "Gelu")


def _built_in_rules_only(graph: Graph, overrides) -> bool:
    """No user rule (`rules=` or a registered plugin) serves an op of the chain: fusing
    would bypass it (or route the chain to a user's Gelu it was not written for)."""
    opset = graph.opsets.get("", 1)
    return all(rule is not None and is_builtin(rule)
               for rule in (lookup(op, "", opset, overrides) for op in _CHAIN_OPS))


def fuse_gelu(graph: Graph, overrides=None) -> int:
    """Replace every exported erf-GELU chain by one Gelu node; returns how many. Nothing is
    fused where a user rule serves one of the chain's ops (`overrides`: the Explainer's
    `rules=`)."""
    if not _built_in_rules_only(graph, overrides):
        return 0
    chain = _Chain(graph)
    fused = 0
    for name in list(graph.order):
        core = graph.nodes.get(name)
        if core is None or core.op_type not in _HEADS or core.domain != "":
            continue
        head, approximate = _HEADS[core.op_type]
        found = head(chain, core)
        tail = found and _tail(chain, core, found[0])
        if not tail:
            continue
        x, nodes = found[0], sorted(found[1] + [core] + tail, key=lambda n: n.index)
        y = tail[-1].outputs[0]  # the last Mul, in both orders
        new_name = _fused_name(nodes, core)
        if new_name in graph.nodes:
            new_name = f"{core.name} (fused GELU)"
        for node in nodes:
            del graph.nodes[node.name]
            for out in node.outputs:
                if out != y:
                    graph.fused_tensors[out] = new_name
        attrs = {} if approximate == "none" else {"approximate": approximate}
        proto = helper.make_node("Gelu", [x], [y], name=new_name, **attrs)
        graph.nodes[new_name] = Node(name=new_name, op_type="Gelu", domain="", inputs=(x,), outputs=(y,),
                                     attrs=attrs, opset=graph.opsets.get("", 1), index=nodes[-1].index,
                                     proto=proto, expansion=tuple(n.proto for n in nodes))
        graph.rebuild()
        chain = _Chain(graph)
        fused += 1
    return fused
