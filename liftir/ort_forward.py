"""The forward pass on onnxruntime, for NumPy float32 runs of standard-domain graphs.

The batched forward over [actual; reference] is a plain inference, and onnxruntime runs it
as one session about twice as fast as driving kernels op by op (shared/measurements). The
session computes the folded graph with every tensor the backward pass reads exposed as an
output. Rules' own forwards stay the reference implementation (CuPy, float64, custom ops,
and any graph onnxruntime refuses fall back to them), and the test suite checks both
against each other through `Explainer.predict`.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .graph import Graph, Node
from .onnx_models import make_model
from .threads import session_options


_RECURRENT = ("LSTM", "GRU", "RNN")


def runnable(ir_node: Node) -> list[onnx.NodeProto]:
    """The node as onnxruntime can run it. A fused node runs the model's own nodes it stands
    for (liftir/fusion.py). liftir rewrites recurrent ops batch first
    (layout 1, liftir/layout.py), which onnxruntime has no kernel for: there the op runs
    time major (layout 0) between transposes, the same values under the same names."""
    if ir_node.expansion:
        return list(ir_node.expansion)
    node = ir_node.proto
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    if node.op_type not in _RECURRENT or layout != 1:
        return [node]
    tag = f"liftir_time_major/{node.name or node.output[0]}"
    before, inputs = [], list(node.input)
    for i in (0, 5, 6):  # X (N, T, F) -> (T, N, F); initial_h, initial_c (N, D, H) -> (D, N, H)
        if i < len(inputs) and inputs[i]:
            moved = f"{tag}/in{i}"
            before.append(helper.make_node("Transpose", [inputs[i]], [moved], perm=[1, 0, 2], name=f"{moved}/T"))
            inputs[i] = moved
    outputs, after = [], []
    for i, out in enumerate(node.output):  # Y (T, D, N, H) -> (N, T, D, H); Y_h, Y_c (D, N, H) -> (N, D, H)
        if not out:
            outputs.append("")
            continue
        raw = f"{tag}/out{i}"
        outputs.append(raw)
        after.append(helper.make_node("Transpose", [raw], [out], perm=[2, 0, 1, 3] if i == 0 else [1, 0, 2],
                                      name=f"{raw}/T"))
    attrs = [a for a in node.attribute if a.name != "layout"]
    op = helper.make_node(node.op_type, inputs, outputs, name=node.name, domain=node.domain)
    op.attribute.extend(attrs)
    return before + [op] + after


class OrtForward:
    """One onnxruntime session computing every tensor the rules may read (or those `exposed`)."""

    def __init__(self, graph: Graph, order: list[str], outputs: tuple[str, ...],
                 exposed: frozenset[str] | None = None):
        nodes = [graph.nodes[name] for name in order]
        produced = [o for node in nodes for o in node.outputs if o and (exposed is None or o in exposed)]
        used = {i for node in nodes for i in node.forward_reads if i}
        initializers = [numpy_helper.from_array(np.asarray(v), name)
                        for name, v in graph.constants.items() if name in used]
        inputs = [helper.make_tensor_value_info(
            i.name, helper.np_dtype_to_tensor_dtype(i.dtype),
            None if i.shape is None else ["batch"] + [d if isinstance(d, int) and d > 0 else None
                                                     for d in i.shape[1:]])
            for i in graph.inputs]
        model = make_model(
            helper.make_graph([p for node in nodes for p in runnable(node)], "liftir_forward", inputs,
                              [onnx.ValueInfoProto(name=o) for o in produced], initializers),
            opset_imports=[helper.make_opsetid(domain, version) for domain, version in graph.opsets.items()])
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                 if vi.type.tensor_type.elem_type}
        keep = [o for o in produced if o in types]
        del model.graph.output[:]
        for o in keep:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[o])
            vi.type.tensor_type.ClearField("shape")
            model.graph.output.append(vi)
        options = session_options(shared_arena=True)  # the full and the exposing forward: one arena
        options.log_severity_level = 4  # a failure falls back to the rules, logged by liftir in one line
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.names = keep
        self.input_names = [i.name for i in graph.inputs]
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.names, {k: feeds[k] for k in self.input_names}, self.run_options)
        return dict(zip(self.names, values))
