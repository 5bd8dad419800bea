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
from typing import Any, Mapping

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelLoadError
from .functions import expand_functions
from .registry import lookup

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
    #: names a subgraph (Loop/If/Scan body) reads from the enclosing graph: inputs of this
    #: node too (topological order, folding), though the node proto does not list them
    captures: tuple[str, ...] = ()
    #: the nodes onnxruntime runs for this one, when it stands for several of the model's
    #: (liftir/fusion.py: an exported GELU read as one Gelu); empty: `proto` itself
    expansion: tuple[onnx.NodeProto, ...] = ()

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    @property
    def forward_reads(self) -> tuple[str, ...]:
        """What onnxruntime's run of this node reads: its inputs, or its expansion's."""
        if not self.expansion:
            return self.inputs
        return tuple(dict.fromkeys(i for p in self.expansion for i in p.input if i))

    @property
    def all_inputs(self) -> tuple[str, ...]:
        """The node's inputs, then the outer-scope names its subgraphs capture."""
        return self.inputs + self.captures


def subgraph_captures(proto: onnx.NodeProto) -> tuple[str, ...]:
    """Names the node's subgraph attributes read but do not define (outer-scope values)."""
    found: dict[str, None] = {}

    def visit(graph: onnx.GraphProto, outer_defined: set[str]) -> None:
        defined = set(outer_defined) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        defined |= {t.values.name for t in graph.sparse_initializer}
        for node in graph.node:
            for name in node.input:
                if name and name not in defined:
                    found.setdefault(name)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                    visit(sub, defined)
            defined.update(o for o in node.output if o)
        for out in graph.output:
            if out.name and out.name not in defined:
                found.setdefault(out.name)

    for attr in proto.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
            visit(sub, set())
    return tuple(found)


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
    #: tensors of the model a fused node replaced (liftir/fusion.py) -> that node's name
    fused_tensors: dict[str, str] = field(default_factory=dict)
    #: tensors computed only at the positions a selection reads (liftir/pruning.py) -> that selection
    pruned_tensors: dict[str, str] = field(default_factory=dict)

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
            for t in node.all_inputs:
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
    """Parse a path, bytes or ModelProto into a checked ModelProto (a copy, never the caller's).

    `example:NAME` names a model shipped in liftir.data. A model from memory must hold all
    its tensors (it never reads a file); a model from a path may keep tensors in external
    files, read only from inside the model's own folder.
    """
    from .data import resolve_model  # `example:NAME`, resolved here for every caller
    source = resolve_model(source)
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _refuse_external_data(model, "the given onnx.ModelProto")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model = _parse_bytes(bytes(source), "the given bytes")
        _refuse_external_data(model, "the given bytes")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            what = "a directory" if os.path.isdir(path) else "nothing"
            raise ModelLoadError(f"no ONNX model file at {path!r} ({what} there)")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ModelLoadError(f"cannot read the ONNX model file {path!r}: {exc}") from exc
        model = _parse_bytes(data, repr(path))
        _load_external_data(model, path)
    else:
        raise ModelLoadError(
            f"expected a path, bytes or onnx.ModelProto, got {type(source).__name__}")
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError("the ONNX model has no graph or an empty graph")
    _check_opsets(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise ModelLoadError(f"the ONNX model does not pass onnx.checker: {exc}") from exc
    return model


def _check_opsets(model: onnx.ModelProto) -> None:
    """Refuse opsets of the standard domains newer than this onnx knows: their ops' meaning
    is unknown here (onnx.checker lets them through; onnxruntime refuses them)."""
    newest = {"": onnx.defs.onnx_opset_version(), "ai.onnx.ml": max(
        s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.domain == "ai.onnx.ml")}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        if domain in newest and not 1 <= entry.version <= newest[domain]:
            raise ModelLoadError(
                f"the model imports opset {entry.version} of the ONNX domain {entry.domain or 'ai.onnx'!r}; "
                f"this onnx {onnx.__version__} knows opsets 1 to {newest[domain]}: re-export with an "
                f"opset in that range, or upgrade onnx")


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers, attributes, subgraphs, functions."""
    def in_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from in_nodes([node])

    def in_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
                        attr.sparse_tensors):
                    yield sparse.values
                    yield sparse.indices
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for sub in attr.graphs:
                    yield from in_graph(sub)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _refuse_external_data(model: onnx.ModelProto, what: str) -> None:
    """A model in memory has no folder: reading its external files would read the cwd."""
    external = _external_tensors(model)
    if external:
        names = ", ".join(repr(t.name) for t in external[:5])
        raise ModelLoadError(
            f"{what} keeps {len(external)} tensor(s) ({names}) in external data files; a model "
            f"given in memory is never allowed to read files. Pass the model's path instead (its "
            f"external files are read from its own folder), or embed the data "
            f"(onnx.load(path) then onnx.save(model, path, save_as_external_data=False)).")


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    """Read external tensor data into the model, only from files inside the model's folder.

    A location must be relative, without `..`, and must resolve (symlinks followed) to a
    regular file inside the folder; offset and length must lie within the file.
    """
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in _external_tensors(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path!r}: tensor {tensor.name!r} keeps its data in external file {location!r}"
        parts = location.replace("\\", "/").split("/")
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or \
                os.path.splitdrive(location)[0] or ".." in parts:
            raise ModelLoadError(f"{where}: external data must be a relative path inside the model's "
                                 f"folder (no absolute path, no '..')")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, target]) != folder:
            raise ModelLoadError(f"{where}, which resolves outside the model's folder {folder!r} "
                                 f"(a symlink?); refused")
        if not os.path.isfile(target):
            raise ModelLoadError(f"{where}, which does not exist in the model's folder {folder!r}")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise ModelLoadError(f"{where}: its offset/length are not integers") from None
        size = os.path.getsize(target)
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise ModelLoadError(f"{where}: offset {offset} and length {length} lie outside the "
                                 f"file ({size} bytes)")
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read() if length is None else f.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


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


def tensor_info_of(vi: onnx.ValueInfoProto) -> TensorInfo:
    ttype = vi.type.tensor_type
    dtype = _np_dtype(ttype.elem_type) if ttype.elem_type else None
    shape = None
    if ttype.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in ttype.shape.dim)
    return TensorInfo(vi.name, dtype, shape)


def build_graph(model: onnx.ModelProto, rules: Mapping | None = None) -> Graph:
    """Turn a checked ModelProto into the IR (no folding yet).

    Ops with no rule (given `rules`, the Explainer's overrides) but an ONNX function body
    are expanded into that body here (liftir/functions.py); `model` itself is not changed.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:
        inferred = onnx.ModelProto()
        inferred.CopyFrom(model)  # shape inference is a help, not a requirement
    expand_functions(inferred, lambda op, domain, opset: lookup(op, domain, opset, rules) is not None)
    g = inferred.graph
    opsets = {(o.domain if o.domain != "ai.onnx" else DEFAULT_DOMAIN): o.version for o in inferred.opset_import}
    constants = {init.name: numpy_helper.to_array(init) for init in g.initializer}
    inputs = [tensor_info_of(vi) for vi in g.input if vi.name not in constants]
    outputs = [tensor_info_of(vi) for vi in g.output]
    value_info = {vi.name: tensor_info_of(vi) for vi in g.value_info}
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
            opset=opsets.get(domain, 1), index=index, proto=proto, captures=subgraph_captures(proto))
    graph = Graph(nx.DiGraph(), nodes, [], constants, inputs, outputs, value_info, opsets, {}, {})
    graph.rebuild()
    return graph


def add_subgraph_value_info(graph: Graph, sub: onnx.GraphProto, rename) -> None:
    """Record the element types and shapes a subgraph declares for its tensors, under the
    names `rename(name)` they get once the subgraph is inlined (liftir/loops.py); held
    integer/bool tensors are told from floats by these types (liftir/held.py)."""
    for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
        new = rename(vi.name)  # None: a name that keeps its outer meaning
        if new is not None and vi.type.HasField("tensor_type"):
            info = tensor_info_of(vi)
            if new not in graph.value_info:
                graph.value_info[new] = TensorInfo(new, info.dtype, info.shape)


# Ops whose output element type is an attribute (`to` / `dtype`), not their inputs' type.
DTYPE_ATTRIBUTES = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "EyeLike": "dtype",
                    "Bernoulli": "dtype"}
_SMALL_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def promote_to_float64(graph: Graph) -> None:
    """Run the whole graph in float64: every float constant, input, output and every op
    that makes floats of its own type (Cast to, ConstantOfShape value, Constant value_*,
    RandomNormal dtype, EyeLike dtype, ...), subgraphs included.

    For users who want multipliers free of float32 round-off (e.g. the paper's max rule,
    whose multipliers can explode where the actual max is below the reference max). Both
    the decoded attributes (read by the rules) and the node protos (run by ONNX's reference
    evaluator for shape arithmetic) are rewritten, so that no float32 is left to meet a
    float64 (a traced `torch.zeros(..., dtype=x.dtype) + bias` would otherwise fail).
    """
    for name, value in graph.constants.items():
        if value.dtype.kind == "f":
            graph.constants[name] = value.astype(np.float64)

    def promoted(info: TensorInfo) -> TensorInfo:
        is_float = info.dtype is not None and info.dtype.kind == "f"
        return TensorInfo(info.name, np.dtype(np.float64), info.shape) if is_float else info

    graph.inputs = [promoted(i) for i in graph.inputs]
    graph.outputs = [promoted(o) for o in graph.outputs]
    graph.value_info = {k: promoted(v) for k, v in graph.value_info.items()}
    for node in graph.nodes.values():
        proto = onnx.NodeProto()  # a copy: the loaded ModelProto stays as it was read
        proto.CopyFrom(node.proto)
        if _promote_node_proto(proto):
            node.proto = proto
            node.attrs = {a.name: _decode_attribute(a) for a in proto.attribute}


def _promote_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type in _SMALL_FLOATS:
        value = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


def _promote_value_info(vi: onnx.ValueInfoProto) -> None:
    if vi.type.tensor_type.elem_type in _SMALL_FLOATS:
        vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE


def _promote_node_proto(proto: onnx.NodeProto) -> bool:
    """Rewrite one node proto in place so it makes float64; True if anything changed."""
    before = proto.SerializeToString()
    dtype_attr = DTYPE_ATTRIBUTES.get(proto.op_type) if proto.domain in ("", "ai.onnx") else None
    for attr in list(proto.attribute):
        if attr.name == dtype_attr and attr.i in _SMALL_FLOATS:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.name in ("value_float", "value_floats") and proto.op_type == "Constant":
            value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float64)
            proto.attribute.remove(attr)
            proto.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        elif attr.type == onnx.AttributeProto.TENSOR:  # ConstantOfShape / Constant value, ...
            _promote_tensor(attr.t)
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                _promote_tensor(t)
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
            for t in sub.initializer:
                _promote_tensor(t)
            for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
                _promote_value_info(vi)
            for inner in sub.node:
                _promote_node_proto(inner)
    return proto.SerializeToString() != before
