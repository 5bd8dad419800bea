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

from .graph import Graph
from .threads import cpu_threads


class OrtForward:
    """One onnxruntime session computing every tensor the rules may read."""

    def __init__(self, graph: Graph, order: list[str], outputs: tuple[str, ...]):
        nodes = [graph.nodes[name] for name in order]
        if any(n.op_type in ("LSTM", "GRU", "RNN") and n.attrs.get("layout", 0) == 1 for n in nodes):
            # onnxruntime runs no batch-first recurrent op (and logs an error trying): the rules will do
            raise ValueError("onnxruntime does not run recurrent ops with layout=1")
        produced = [o for node in nodes for o in node.outputs if o]
        used = {i for node in nodes for i in node.inputs if i}
        initializers = [numpy_helper.from_array(np.asarray(v), name)
                        for name, v in graph.constants.items() if name in used]
        inputs = [helper.make_tensor_value_info(
            i.name, helper.np_dtype_to_tensor_dtype(i.dtype),
            None if i.shape is None else ["batch"] + [d if isinstance(d, int) and d > 0 else None
                                                     for d in i.shape[1:]])
            for i in graph.inputs]
        model = helper.make_model(
            helper.make_graph([node.proto for node in nodes], "liftir_forward", inputs,
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
