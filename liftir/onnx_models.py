"""The ONNX models liftir builds for onnxruntime (forward sessions, conv kernels, compiled
passes): made so that any onnxruntime that knows their ops opens them."""
from __future__ import annotations

import onnx
from onnx import helper


def make_model(graph: onnx.GraphProto, opset_imports, **kwargs) -> onnx.ModelProto:
    """`helper.make_model` for a model liftir builds to run in onnxruntime.

    helper.make_model stamps the installed onnx's newest IR version (14 for onnx 1.23), and
    an onnxruntime built before that onnx refuses the model although it knows every op in
    it (onnxruntime 1.31: "Unsupported model IR version: 14, max supported IR version: 13").
    The lowest IR version the model's opsets need is one every onnxruntime that runs those
    opsets reads; at least 8 (model-local functions; onnxruntime 1.12 on), below which
    initializers must also be listed as graph inputs.
    """
    model = helper.make_model(graph, opset_imports=opset_imports, **kwargs)
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(needed, MIN_IR_VERSION)
    return model


#: the oldest IR version liftir writes (onnxruntime >= 1.12 reads it)
MIN_IR_VERSION = 8
