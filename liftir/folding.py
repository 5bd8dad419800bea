"""Constant folding and shape-only ("static") tensors.

Exporters emit a lot of shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat ->
Reshape). None of it carries attribution, so none of it should need a rule:
- nodes whose inputs are all constants are evaluated once at load and disappear;
- nodes that depend only on constants and on *shapes* of activations (through Shape or
  Size) are "static": evaluated on the host at run time, once per input shape.
Both use ONNX's own reference evaluator, so their semantics are the standard's, under a
budget (liftir/budget.py) so that a small model cannot ask for unbounded work at load.
"""
from __future__ import annotations

import numpy as np

from .budget import FoldingLimitError, budget, run_node
from .errors import ModelLoadError
from .graph import Graph, Node

SHAPE_OF_OPS = frozenset({"Shape", "Size"})
# Ops whose value is not a function of their inputs: never folded.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                  "RandomUniformLike", "Multinomial", "Bernoulli"})


def _gather_elements(node: Node, data: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    """GatherElements as the standard defines it. onnx.reference's own goes through np.choose,
    which takes at most 32/64 choices: every HF BERT exported with dynamo gathers its
    position ids from a 512-long buffer and failed to load."""
    axis = node.attrs.get("axis", 0) % data.ndim
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    if idx.size and (idx.min() < 0 or idx.max() >= data.shape[axis]):
        raise ValueError(f"index out of range for axis {axis} of size {data.shape[axis]}")
    window = tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(idx.shape))
    return [np.take_along_axis(data[window], idx, axis=axis)]


# Ops whose onnx.reference implementation fails on valid models: evaluated here instead.
_HOST_KERNELS = {"GatherElements": _gather_elements}


def evaluate_node(node: Node, inputs: list[np.ndarray | None],
                  captured: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run one node with ONNX's reference implementation on host arrays; `captured` holds
    the outer-scope values its subgraphs read (node.captures)."""
    if node.op_type in _HOST_KERNELS and node.domain in ("", "ai.onnx"):
        try:
            return _HOST_KERNELS[node.op_type](node, *inputs)
        except Exception as exc:
            raise ModelLoadError(f"cannot evaluate constant node {node.name!r} ({node.op_type}): {exc}") from exc
    feeds = {name: value for name, value in zip(node.inputs, inputs) if name}
    feeds.update(captured or {})
    try:
        results = run_node(node.proto, {node.domain: node.opset}, feeds, node.name)
    except Exception as exc:
        limit = _limit_error(exc)
        if limit is not None:
            raise limit from None
        raise ModelLoadError(f"cannot evaluate constant node {node.name!r} ({node.op_type}): {exc}") from exc
    return [np.asarray(r) for r in results]


def _limit_error(exc: BaseException | None) -> FoldingLimitError | None:
    """The budget refusal behind `exc`, if the reference evaluator wrapped one."""
    while exc is not None:
        if isinstance(exc, FoldingLimitError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def fold_constants(graph: Graph) -> int:
    """Evaluate and remove every node computable from constants alone. Returns how many.

    The whole pass shares one budget (liftir.budget.LIMITS): past it, FoldingLimitError.
    """
    from .loops import inline_control_flow  # noqa: PLC0415 - loops.py uses this module
    with budget():
        folded = _fold(graph)
        while inline_control_flow(graph):  # unrolled bodies fold per iteration, nested ones next
            folded += _fold(graph)
        return folded


def _fold(graph: Graph) -> int:
    folded = 0
    for name in list(graph.order):
        node = graph.nodes[name]
        if node.op_type in NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if not all(i == "" or i in graph.constants for i in node.all_inputs):
            continue  # a subgraph reading an activation of the outer graph is not constant
        values = evaluate_node(node, [graph.constants.get(i) if i else None for i in node.inputs],
                               {c: graph.constants[c] for c in node.captures})
        for out, value in zip(node.outputs, values):
            if out:
                graph.constants[out] = value
        del graph.nodes[name]
        folded += 1
    if folded:
        graph.rebuild()
    return folded


def static_nodes(graph: Graph) -> set[str]:
    """Nodes whose outputs depend only on constants and on activation shapes."""
    static_tensors: set[str] = set()
    result: set[str] = set()
    for name in graph.order:
        node = graph.nodes[name]
        if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC_OPS:
            continue
        if node.op_type in SHAPE_OF_OPS or all(
                not i or i in graph.constants or i in static_tensors for i in node.all_inputs):
            result.add(name)
            static_tensors.update(o for o in node.outputs if o)
    return result


def evaluate_static(graph: Graph, node: Node, shapes: dict[str, tuple[int, ...]],
                    values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate a static node given the run's activation shapes and host static values."""
    if node.op_type in SHAPE_OF_OPS:
        source = node.inputs[0]  # an activation, or itself static (Size of a Shape)
        shape = shapes[source] if source in shapes else np.shape(values[source])
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", None)
        return [np.array(shape[start:end], dtype=np.int64)]
    inputs = [(graph.constants[i] if i in graph.constants else values[i]) if i else None
              for i in node.inputs]
    captured = {c: graph.constants[c] if c in graph.constants else values[c] for c in node.captures}
    return evaluate_node(node, inputs, captured)
