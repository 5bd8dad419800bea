"""Tiny ONNX models built with onnx.helper, and onnxruntime as the reference to run them.

Tests describe a model as a list of nodes plus which tensors are activations (float inputs
with a symbolic batch dim 'N') and which are constants (initializers), so a single-op case
is one line and a few-op graph a few.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BATCH = "N"


def _elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def value_info(name: str, shape: Iterable | None, dtype=np.float32, batch: bool = True):
    """A graph input/output; with `batch`, axis 0 of `shape` becomes the symbolic 'N'."""
    if shape is not None:
        shape = list(shape)
        if batch and shape:
            shape[0] = BATCH
    return helper.make_tensor_value_info(name, _elem_type(dtype), shape)


def model(nodes, inputs: dict[str, tuple], outputs: Iterable[str] | dict[str, Any],
          consts: dict[str, np.ndarray] | None = None, opset: int = 17,
          extra_opsets: dict[str, int] | None = None, input_dtypes: dict[str, Any] | None = None,
          output_shapes: dict[str, tuple] | None = None, check: bool = True) -> onnx.ModelProto:
    """Assemble a model. `outputs` maps name -> dtype (default float32); output shapes come
    from shape inference unless given in `output_shapes` (for what inference cannot tell)."""
    output_shapes = output_shapes or {}
    input_dtypes = input_dtypes or {}
    if not isinstance(outputs, dict):
        outputs = {name: np.float32 for name in outputs}
    graph = helper.make_graph(
        list(nodes), "liftir_test",
        [value_info(n, s, input_dtypes.get(n, np.float32)) for n, s in inputs.items()],
        [value_info(n, output_shapes.get(n), d, batch=False) for n, d in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (consts or {}).items()])
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="liftir-tests")
    if check:  # the checker wants outputs with shapes: take them from shape inference
        if len(output_shapes) < len(outputs):
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
            m.graph.ClearField("output")
            m.graph.output.extend(inferred.graph.output)
        onnx.checker.check_model(m)
    return m


def op_model(op_type: str, inputs: list, attrs: dict | None = None, opset: int = 17,
             n_outputs: int = 1, output_dtypes: list | None = None, domain: str = "",
             dtype=np.float32, check: bool = True) -> onnx.ModelProto:
    """One node. Each entry of `inputs` is a shape (an activation of `dtype`, batch on axis 0),
    a NumPy array (a constant initializer) or None (an omitted optional input)."""
    names, feeds, consts = [], {}, {}
    for i, item in enumerate(inputs):
        if item is None:
            names.append("")
        elif isinstance(item, (np.ndarray, np.generic)):
            names.append(f"c{i}")
            consts[f"c{i}"] = np.asarray(item)
        else:
            names.append(f"x{i}")
            feeds[f"x{i}"] = tuple(item)
    outs = [f"y{j}" for j in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, name=f"{op_type.lower()}_node", domain=domain,
                            **(attrs or {}))
    dtypes = output_dtypes or [dtype] * n_outputs
    return model([node], feeds, dict(zip(outs, dtypes)), consts, opset,
                 input_dtypes={name: dtype for name in feeds}, check=check)


def input_shapes(m: onnx.ModelProto, batch: int = 2) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of a model's graph inputs, with `batch` for the symbolic dim."""
    inits = {i.name for i in m.graph.initializer}
    shapes = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(batch if d.dim_param else d.dim_value for d in dims)
    return shapes


def random_feeds(m: onnx.ModelProto, rng: np.random.Generator, batch: int = 2,
                 low: float = -2.0, high: float = 2.0) -> dict[str, np.ndarray]:
    return {name: rng.uniform(low, high, shape).astype(np.float32)
            for name, shape in input_shapes(m, batch).items()}


def session(m: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the op as written
    return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_ort(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every graph output of `m` on `feeds`, computed by onnxruntime on the CPU."""
    return session(m).run(None, feeds)


def rules_only(explainer):
    """Make `explainer` run its forward through liftir's rules, not one onnxruntime session
    (the default for NumPy float32), so that a test exercises the rules' own forwards."""
    explainer.plan.use_onnxruntime = False
    return explainer


__all__ = ["BATCH", "TensorProto", "helper", "input_shapes", "model", "op_model", "random_feeds",
           "rules_only", "run_ort", "session", "value_info"]


def export_torch(module, x, exporter) -> onnx.ModelProto:
    """A torch module with one input "x" of dynamic batch N, exported with `exporter`: an
    opset number (the TorchScript exporter) or "dynamo". torch is imported here only, so
    the ONNX-only tests need no torch."""
    import io
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(module, (x,), dynamo=True, verbose=False,
                                     dynamic_shapes={"x": {0: torch.export.Dim("N")}}).model_proto
        f = io.BytesIO()
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=exporter, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
        return onnx.load_from_string(f.getvalue())
