"""ONNX function expansion: an op with no rule of its own is replaced by its schema's body.

Many standard ops are defined in `onnx.defs` by a function body over simpler ops
(LayerNormalization, GroupNormalization, RMSNormalization, Gelu, HardSwish, Mish,
Softsign, Celu, ReduceL2, ...), some of them context-dependent (the body depends on the
node's attributes and input types). When the graph is read, every node whose op has no
rule but has such a body, valid at the model's opset, is inlined: so liftir's coverage
grows with the ONNX standard, and DeepLIFT on the body composes the rules of its ops
(which conserve, so the expansion does too). A dedicated rule, where one is registered,
always wins: it is faster and may be more accurate.

Expansion happens on the ModelProto before the IR is built, so the inlined nodes are
ordinary nodes everywhere (folding, the onnxruntime forward, `liftir check`). Their names
keep the original's, "ln1 (expanded LayerNormalization)/Div", so an error inside names
the node the user knows. A body is inlined only if each of its nodes has a rule, is itself
expandable, or computes from constants and shapes alone; otherwise the node stays, and is
reported as unsupported under its own name.
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import defs, helper

#: ops whose output depends only on their inputs' shapes (folding.SHAPE_OF_OPS) or nothing
_SHAPE_OR_CONSTANT = frozenset({"Shape", "Size", "Constant"})
_MAX_DEPTH = 8

HasRule = Callable[[str, str, int], bool]


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _schema(op_type: str, domain: str, opset: int):
    try:
        return defs.get_schema(op_type, opset, domain)
    except Exception:  # onnx.defs.SchemaError: not a standard op at this opset
        return None


def _function_version(versions, opset: int) -> int | None:
    """The newest body version the model's opset can use (bodies are versioned by the opset
    of the ops they use; a body stays valid until the next version)."""
    usable = [v for v in versions if v <= opset]
    return max(usable) if usable else None


def function_body(node: onnx.NodeProto, opset: int, input_types: list[onnx.TypeProto | None]
                  ) -> onnx.FunctionProto | None:
    """The schema's function body for `node` at the model's `opset`, or None if it has none."""
    domain = _domain(node.domain)
    schema = _schema(node.op_type, domain, opset)
    if schema is None:
        return None
    if schema.has_function:
        version = _function_version(schema.function_opset_versions, opset)
        if version is not None:
            return _as_function(schema.get_function_with_opset_version(version))
    if schema.has_context_dependent_function:
        version = _function_version(schema.context_dependent_function_opset_versions, opset)
        if version is None or any(t is None for t in input_types):
            return None  # the body depends on input types shape inference could not give
        try:
            data = schema.get_context_dependent_function_with_opset_version(
                version, node.SerializeToString(), [t.SerializeToString() for t in input_types])
        except Exception:  # the schema's builder refuses this node (e.g. an unsupported type)
            return None
        body = _as_function(data)
        return body if body.node else None
    return None


def _as_function(data) -> onnx.FunctionProto:
    """onnx.defs hands out bodies serialized (bytes) or as protos, depending on the call."""
    if isinstance(data, onnx.FunctionProto):
        return data
    body = onnx.FunctionProto()
    body.ParseFromString(data)
    return body


def _attribute(ref: onnx.AttributeProto, node_attrs: dict, defaults: dict) -> onnx.AttributeProto | None:
    """A body attribute, with a reference (ref_attr_name) resolved to the node's value."""
    if not ref.ref_attr_name:
        return ref
    source = node_attrs.get(ref.ref_attr_name, defaults.get(ref.ref_attr_name))
    if source is None:
        return None  # neither given nor defaulted: the body op's own default applies
    attr = onnx.AttributeProto()
    attr.CopyFrom(source)
    attr.name = ref.name
    return attr


def inline(node: onnx.NodeProto, body: onnx.FunctionProto, name: str, taken: set[str],
           types: dict[str, onnx.TypeProto], constants: set[str],
           schema_defaults: dict[str, onnx.AttributeProto] | None = None) -> list[onnx.NodeProto]:
    """The body's nodes with formal names bound to the node's tensors, internal tensors and
    node names prefixed with `name` (unique in the graph), attribute references resolved.
    `types` are the graph's known tensor types, `constants` its initializers,
    `schema_defaults` the op schema's attribute defaults (Selu's alpha, ...), used where the
    node leaves an attribute out and the body names no default of its own."""
    prefix = f"{name} (expanded {node.op_type})/"
    rename: dict[str, str] = {"": ""}
    for formal, actual in zip(body.input, list(node.input) + [""] * len(body.input)):
        rename[formal] = actual
    for formal, actual in zip(body.output, list(node.output) + [""] * len(body.output)):
        if actual:
            rename[formal] = actual

    def bind(tensor: str) -> str:
        if tensor not in rename:
            fresh, k = prefix + tensor, 1
            while fresh in taken:
                fresh, k = f"{prefix}{tensor}_{k}", k + 1
            taken.add(fresh)
            rename[tensor] = fresh
        return rename[tensor]

    node_attrs = {a.name: a for a in node.attribute}
    defaults = dict(schema_defaults or {})
    defaults.update({a.name: a for a in body.attribute_proto})
    static = _static_tensors(node, body, constants)
    nodes = []
    for index, inner in enumerate(body.node):
        attrs = [a for a in (_attribute(a, node_attrs, defaults) for a in inner.attribute) if a is not None]
        inputs = [bind(t) for t in inner.input]
        outputs = [bind(t) for t in inner.output]
        op_type = inner.op_type
        like = types.get(inputs[1]) if op_type == "CastLike" and len(inputs) > 1 else None
        if like is not None and inner.input[0] in static:
            # a body constant cast to an activation's type: a plain Cast, so that it folds
            op_type, inputs = "Cast", inputs[:1]
            attrs = [helper.make_attribute("to", like.tensor_type.elem_type)]
        new = helper.make_node(op_type, inputs, outputs, name=f"{prefix}{inner.name or inner.op_type}_{index}",
                               domain=inner.domain, doc_string=f"expanded from {node.op_type} node {name!r}")
        new.attribute.extend(attrs)
        nodes.append(new)
    return nodes


def _static_tensors(node: onnx.NodeProto, body: onnx.FunctionProto, constants: set[str]) -> set[str]:
    """Body tensors computed from constants (formal inputs bound to initializers, Constant
    nodes) and activation shapes alone: folded or evaluated on the host, they need no rule.
    A CastLike of one only borrows an activation's type: `inline` makes it a Cast."""
    static = {formal for formal, actual in zip(body.input, node.input) if actual in constants}
    for inner in body.node:
        if (inner.op_type in _SHAPE_OR_CONSTANT or all(not t or t in static for t in inner.input)
                or (inner.op_type == "CastLike" and inner.input[0] in static)):
            static.update(inner.output)
    return static


def _types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types = {vi.name: vi.type for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    for init in graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


class _Expander:
    def __init__(self, model: onnx.ModelProto, has_rule: HasRule):
        self.opsets = {_domain(o.domain): o.version for o in model.opset_import}
        self.has_rule = has_rule
        self.constants = {init.name for init in model.graph.initializer}

    def body_for(self, node, types):
        opset = self.opsets.get(_domain(node.domain))
        if opset is None or self.has_rule(node.op_type, _domain(node.domain), opset):
            return None
        body = function_body(node, opset, [types.get(t) if t else helper.make_tensor_type_proto(0, None)
                                           for t in node.input])
        if body is None or any(_domain(o.domain) not in self.opsets for o in body.opset_import):
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in body.node for a in n.attribute):
            return None  # control flow in a body: no rules for it anyway
        return body

    def schema_defaults(self, node) -> dict[str, onnx.AttributeProto]:
        """The attribute defaults of the node's op schema (those that have one)."""
        schema = _schema(node.op_type, _domain(node.domain), self.opsets.get(_domain(node.domain), 0))
        if schema is None:
            return {}
        return {n: a.default_value for n, a in schema.attributes.items() if a.default_value.type}

    def coverable(self, node, body, depth=0) -> bool:
        """Every body node has a rule, expands in turn, or computes from constants and shapes."""
        static = _static_tensors(node, body, self.constants)
        for inner in body.node:
            if all(not o or o in static for o in inner.output):
                continue
            opset = self.opsets.get(_domain(inner.domain), 0)
            if self.has_rule(inner.op_type, _domain(inner.domain), opset):
                continue
            if depth >= _MAX_DEPTH:
                return False
            nested = self.body_for(inner, {})  # nested context-dependent bodies need types: refused
            if nested is None or not self.coverable(inner, nested, depth + 1):
                return False
        return True


def expand_functions(model: onnx.ModelProto, has_rule: HasRule) -> int:
    """Inline, in place, every node of `model.graph` that `has_rule(op, domain, opset)` says
    has no rule and whose schema gives a coverable body; nested bodies too. Returns how many
    nodes were expanded. `model` should carry inferred types (value_info) for the inputs of
    context-dependent ops."""
    expander = _Expander(model, has_rule)
    graph = model.graph
    taken = {t for n in graph.node for t in list(n.input) + list(n.output)} | {n.name for n in graph.node}
    taken |= {vi.name for vi in graph.input} | {init.name for init in graph.initializer}
    expanded = 0
    for _ in range(_MAX_DEPTH):
        types = _types(graph)
        new_nodes, changed = [], False
        for index, node in enumerate(graph.node):
            body = expander.body_for(node, types)
            if body is None or not expander.coverable(node, body):
                new_nodes.append(node)
                continue
            new_nodes.extend(inline(node, body, node.name or f"{node.op_type}_{index}", taken,
                                    types, expander.constants, expander.schema_defaults(node)))
            changed = True
            expanded += 1
        if not changed:
            break
        del graph.node[:]
        graph.node.extend(new_nodes)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            del graph.value_info[:]
            graph.value_info.extend(inferred.graph.value_info)
        except Exception:  # types of nested context-dependent bodies stay unknown: they stay
            pass
    return expanded
