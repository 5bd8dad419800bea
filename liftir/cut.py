"""Cut a model at some of its tensors: they become its inputs, what computes only them goes.

Integrated gradients walks a straight path between reference and actual inputs, and token
ids have no path between them. As Captum's LayerIntegratedGradients does on an embedding
layer, liftir walks the path at the embeddings instead: the model cut at them takes the
embeddings as float inputs, and the integer inputs still read downstream (an attention
mask) stay inputs, held at their actual values along the path.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .errors import ModelLoadError


def cut_at(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose inputs are `tensors` plus the original inputs still read.

    Nodes are kept when an output they give (other than a cut tensor) is needed for the
    graph's outputs; a kept node that also wrote a cut tensor writes it under a new name,
    so that the cut tensor's value is always the one fed."""
    cut = set(tensors)
    from .loops import flat_model, has_control_flow  # noqa: PLC0415
    if has_control_flow(model):  # tensors of an unrolled loop body exist only in the flat model
        model = flat_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    missing = [t for t in tensors if t not in types]
    if missing:
        raise ModelLoadError(f"cannot cut the model at {missing}: their types are unknown")
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed and o not in cut for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in reversed(kept):
        copy = out.graph.node.add()
        copy.CopyFrom(node)
        for k, o in enumerate(copy.output):
            if o in cut:
                copy.output[k] = o + "::before_cut"
    inputs = [vi for vi in graph.input if vi.name in needed]
    del out.graph.input[:]
    for t in tensors:
        vi = helper.make_value_info(t, types[t].type)
        out.graph.input.append(vi)
    out.graph.input.extend(inputs)
    initializers = [t for t in graph.initializer if t.name in needed]
    del out.graph.initializer[:]
    out.graph.initializer.extend(initializers)
    keep_info = [vi for vi in graph.value_info if vi.name in needed and vi.name not in cut]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep_info)
    return out
