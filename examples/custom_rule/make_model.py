"""Write swish_mlp.onnx: Gemm -> com.example::Swish -> Gemm, a model onnxruntime cannot run.

    python make_model.py [OUT.onnx]
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "com.example"


def make_model(n_in: int = 8, hidden: int = 16, n_out: int = 3, beta: float = 1.5,
               seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = {
        "W1": (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "W2": (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(n_out)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Swish", ["h"], ["s"], name="swish1", domain=DOMAIN, beta=beta),
        helper.make_node("Gemm", ["s", "W2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "swish_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="liftir-swish example")
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "swish_mlp.onnx"
    onnx.save(make_model(), out)
    print(f"wrote {out}")
