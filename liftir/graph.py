"""The intermediate representation: an ONNX graph as a networkx DAG of decoded nodes.

Reading ONNX happens here and nowhere else. Nodes carry decoded attributes (plain
Python values and NumPy arrays, never protobuf), initializers become NumPy constants,
and the DAG's edges are the tensors flowing between nodes. Loading parses and checks
the protobuf; it never executes anything from the model (ONNX holds no code, and
liftir never loads the custom-op libraries a model may name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelLoadError

DEFAULT_DOMAIN = ""
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass
class Node:
    """One op of the graph, with attributes decoded to Python/NumPy values."""

    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    opset: int
    index: int
    proto: onnx.NodeProto = field(repr=False)

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type


@dataclass(frozen=True)
class TensorInfo:
    """Name, element type and (possibly symbolic) shape of a graph input or output."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None


@dataclass
class Graph:
    """An ONNX graph as a DAG. `dag` nodes are node names; edge attribute `tensors`."""

    dag: nx.DiGraph
    nodes: dict[str, Node]
    order: list[str]
    constants: dict[str, np.ndarray]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    value_info: dict[str, TensorInfo]
    opsets: dict[str, int]
    producer: dict[str, str]
    consumers: dict[str, list[str]]

    def tensor_info(self, name: str) -> TensorInfo | None:
        for info in self.inputs + self.outputs:
            if info.name == name:
                return info
        return self.value_info.get(name)

    def tensor_names(self) -> set[str]:
        names = {i.name for i in self.inputs} | set(self.constants)
        for node in self.nodes.values():
            names.update(o for o in node.outputs if o)
        return names

    def rebuild(self) -> None:
        """Recompute DAG, topological order and producer/consumer maps after nodes changed."""
        self.producer = {o: n.name for n in self.nodes.values() for o in n.outputs if o}
        self.consumers = {}
        dag = nx.DiGraph()
        for node in self.nodes.values():
            dag.add_node(node.name, node=node)
            for t in node.inputs:
                if not t:
                    continue
                self.consumers.setdefault(t, []).append(node.name)
                src = self.producer.get(t)
                if src is not None:
                    if dag.has_edge(src, node.name):
                        dag.edges[src, node.name]["tensors"].append(t)
                    else:
                        dag.add_edge(src, node.name, tensors=[t])
        if not nx.is_directed_acyclic_graph(dag):
            raise ModelLoadError("the ONNX graph has a cycle; ONNX graphs must be acyclic")
        self.dag = dag
        index = {name: node.index for name, node in self.nodes.items()}
        self.order = list(nx.lexicographical_topological_sort(dag, key=lambda n: index[n]))


def read_model(source: Any) -> onnx.ModelProto:
    """Parse a path, bytes or ModelProto into a checked ModelProto (a copy, never the caller's)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model = _parse_bytes(bytes(source), "the given bytes")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ModelLoadError(f"no ONNX model file at {path!r}")
        with open(path, "rb") as f:
            model = _parse_bytes(f.read(), repr(path))
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:  # missing or unsafe external data file
            raise ModelLoadError(f"{path!r}: cannot load its external tensor data: {exc}") from exc
    else:
        raise ModelLoadError(
            f"expected a path, bytes or onnx.ModelProto, got {type(source).__name__}")
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError("the ONNX model has no graph or an empty graph")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise ModelLoadError(f"the ONNX model does not pass onnx.checker: {exc}") from exc
    return model


def _parse_bytes(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError: truncated or not ONNX
        raise ModelLoadError(f"{what} is not a readable ONNX model (truncated or another format): {exc}") from exc
    if not model.HasField("graph"):
        raise ModelLoadError(f"{what} is not an ONNX model (no graph found)")
    return model


def _decode_attribute(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [v.decode("utf-8") if isinstance(v, bytes) else
                numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v for v in value]
    return value


def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    ttype = vi.type.tensor_type
    dtype = _np_dtype(ttype.elem_type) if ttype.elem_type else None
    shape = None
    if ttype.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in ttype.shape.dim)
    return TensorInfo(vi.name, dtype, shape)


def build_graph(model: onnx.ModelProto) -> Graph:
    """Turn a checked ModelProto into the IR (no folding yet)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model  # shape inference is a help, not a requirement
    g = inferred.graph
    opsets = {(o.domain if o.domain != "ai.onnx" else DEFAULT_DOMAIN): o.version for o in inferred.opset_import}
    constants = {init.name: numpy_helper.to_array(init) for init in g.initializer}
    inputs = [_tensor_info(vi) for vi in g.input if vi.name not in constants]
    outputs = [_tensor_info(vi) for vi in g.output]
    value_info = {vi.name: _tensor_info(vi) for vi in g.value_info}
    nodes: dict[str, Node] = {}
    for index, proto in enumerate(g.node):
        domain = proto.domain if proto.domain != "ai.onnx" else DEFAULT_DOMAIN
        name = proto.name or f"{proto.op_type}_{index}"
        if name in nodes:
            name = f"{name}_{index}"
        nodes[name] = Node(
            name=name, op_type=proto.op_type, domain=domain,
            inputs=tuple(proto.input), outputs=tuple(proto.output),
            attrs={a.name: _decode_attribute(a) for a in proto.attribute},
            opset=opsets.get(domain, 1), index=index, proto=proto)
    graph = Graph(nx.DiGraph(), nodes, [], constants, inputs, outputs, value_info, opsets, {}, {})
    graph.rebuild()
    return graph


def promote_to_float64(graph: Graph) -> None:
    """Run the whole graph in float64: float constants, inputs and casts to floats.

    For users who want multipliers free of float32 round-off (e.g. the paper's max rule,
    whose multipliers can explode where the actual max is below the reference max).
    """
    double = onnx.TensorProto.DOUBLE
    for name, value in graph.constants.items():
        if value.dtype.kind == "f":
            graph.constants[name] = value.astype(np.float64)
    graph.inputs = [TensorInfo(i.name, np.dtype(np.float64), i.shape) if i.dtype is not None
                    and i.dtype.kind == "f" else i for i in graph.inputs]
    for node in graph.nodes.values():
        # the attributes and the proto (which ONNX's reference evaluator runs for static nodes)
        if node.op_type == "Cast" and _np_dtype(node.attrs.get("to", 0)) in (np.float16, np.float32):
            node.attrs = dict(node.attrs, to=double)
            node.proto = _with_attribute(node.proto, helper.make_attribute("to", double))
        elif node.op_type == "ConstantOfShape" and isinstance(node.attrs.get("value"), np.ndarray) \
                and node.attrs["value"].dtype.kind == "f":
            value = node.attrs["value"].astype(np.float64)
            node.attrs = dict(node.attrs, value=value)
            node.proto = _with_attribute(node.proto, helper.make_attribute("value", numpy_helper.from_array(value)))


def _with_attribute(proto: onnx.NodeProto, attr: onnx.AttributeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(proto)
    kept = [a for a in copy.attribute if a.name != attr.name]
    del copy.attribute[:]
    copy.attribute.extend(kept + [attr])
    return copy
