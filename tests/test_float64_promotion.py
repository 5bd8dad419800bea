"""`precision="float64"` runs everything in double precision, including the shape-derived
values ONNX's reference evaluator computes at run time from ops that name their own float
type (ConstantOfShape value, Cast to, EyeLike dtype, Constant value_float, ...). Checked on
a real TorchScript export that builds zeros of the input's dtype, against torch in float64.
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.graph import _promote_node_proto

torch = pytest.importorskip("torch")


class ZerosOfInputDtype(torch.nn.Module):
    """bpnet-lite's ControlWrapper pattern: zeros of the input's dtype and batch, plus a
    parameter (a shape-derived value meeting a weight), a full_like and a ones_like."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 4, generator=gen))
        self.offset = torch.nn.Parameter(torch.randn(3, generator=gen))

    def forward(self, x):
        zeros = torch.zeros(x.shape[0], 3, dtype=x.dtype) + self.offset
        half = torch.full((x.shape[0], 4), 0.5, dtype=x.dtype)
        return torch.relu(self.lin(x * half + torch.ones_like(x))) + zeros


def _export(module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), torch.randn(2, 4), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def test_a_torch_export_building_zeros_of_the_input_dtype_runs_in_float64():
    module = ZerosOfInputDtype()
    m = _export(module)
    assert "ConstantOfShape" in {n.op_type for n in m.graph.node}
    x = np.random.default_rng(0).standard_normal((5, 4))
    x0 = np.random.default_rng(1).standard_normal((1, 4))
    with torch.no_grad():
        want = module.double()(torch.from_numpy(x)).numpy()
    ex = liftir.Explainer(m, precision="float64")
    got = ex.predict(x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert attr.dtype == np.float64
    np.testing.assert_allclose(delta, 0, atol=1e-12)
    saliency = liftir.Explainer(m, method="saliency", precision="float64").attribute(x, target=1)
    xt = torch.from_numpy(x).requires_grad_(True)
    module(xt)[:, 1].sum().backward()
    np.testing.assert_allclose(saliency, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # the model as loaded is untouched: in model precision it runs in float32, same numbers
    # (x * full(...) is a product with a shape-derived operand spanning all stacked rows)
    ex32 = liftir.Explainer(m)
    assert ex32.predict(x.astype(np.float32)).dtype == np.float32
    attr32, delta32 = ex32.attribute(x.astype(np.float32), baselines=x0.astype(np.float32), target=1,
                                     return_convergence_delta=True)
    np.testing.assert_allclose(attr32, attr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(delta32, 0, atol=1e-5)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_every_op_with_its_own_float_type_is_promoted_on_the_static_path():
    """Shape(x) feeds ConstantOfShape / Cast / EyeLike (run at call time by ONNX's reference
    evaluator), whose float32 outputs meet float64 weights."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
        helper.make_node("Mul", ["z", "b"], ["zb"]),  # static: float32 zeros meet a weight
        helper.make_node("Slice", ["s", "one", "two"], ["k"]),
        helper.make_node("Concat", ["k", "k"], ["kk"], axis=0),
        helper.make_node("ConstantOfShape", ["kk"], ["square"]),
        helper.make_node("EyeLike", ["square"], ["eye"], dtype=TensorProto.FLOAT),
        helper.make_node("Mul", ["eye", "w"], ["weye"]),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["kf", "b0"], ["scale"]),
        helper.make_node("Add", ["x", "zb"], ["h"]),
        helper.make_node("MatMul", ["h", "weye"], ["p"]),
        helper.make_node("Mul", ["p", "scale"], ["y"]),
    ]
    consts = {"b": np.arange(4, dtype=np.float32), "w": np.float32(2.0), "b0": np.array([0.25], np.float32),
              "one": np.array([1], np.int64), "two": np.array([2], np.int64)}
    graph = helper.make_graph(nodes, "g", [_vi("x", TensorProto.FLOAT, ["N", 4])], [_vi("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    x = np.random.default_rng(0).standard_normal((3, 4))
    want = (x + 1.5 * np.arange(4)) @ (2 * np.eye(4)) * (4 * 0.25)
    ex = liftir.Explainer(m, precision="float64")
    np.testing.assert_allclose(ex.predict(x), want, rtol=1e-14)
    attr, delta = ex.attribute(x, target=2, return_convergence_delta=True)
    np.testing.assert_allclose(delta, 0, atol=1e-12)


@pytest.mark.parametrize("node, check", [
    (helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16), lambda n: n.attribute[0].i == TensorProto.DOUBLE),
    (helper.make_node("Cast", ["a"], ["b"], to=TensorProto.INT64), lambda n: n.attribute[0].i == TensorProto.INT64),
    (helper.make_node("RandomNormalLike", ["a"], ["b"], dtype=TensorProto.FLOAT),
     lambda n: n.attribute[0].i == TensorProto.DOUBLE),
    (helper.make_node("RandomUniform", [], ["b"], shape=[2], dtype=TensorProto.FLOAT),
     lambda n: {a.name: a.i for a in n.attribute}["dtype"] == TensorProto.DOUBLE),
    (helper.make_node("EyeLike", ["a"], ["b"], dtype=TensorProto.FLOAT), lambda n: n.attribute[0].i == TensorProto.DOUBLE),
    (helper.make_node("Constant", [], ["b"], value_float=2.0),
     lambda n: numpy_helper.to_array(n.attribute[0].t).dtype == np.float64),
    (helper.make_node("Constant", [], ["b"], value_floats=[1.0, 2.0]),
     lambda n: numpy_helper.to_array(n.attribute[0].t).tolist() == [1.0, 2.0]
     and n.attribute[0].t.data_type == TensorProto.DOUBLE),
    (helper.make_node("Constant", [], ["b"], value_int=3), lambda n: n.attribute[0].i == 3),
    (helper.make_node("ConstantOfShape", ["a"], ["b"], value=numpy_helper.from_array(np.array([0], np.float32))),
     lambda n: n.attribute[0].t.data_type == TensorProto.DOUBLE),
    (helper.make_node("ConstantOfShape", ["a"], ["b"], value=numpy_helper.from_array(np.array([0], np.int64))),
     lambda n: n.attribute[0].t.data_type == TensorProto.INT64),
], ids=["Cast-f16", "Cast-int", "RandomNormalLike", "RandomUniform", "EyeLike", "value_float", "value_floats",
        "value_int", "ConstantOfShape", "ConstantOfShape-int"])
def test_node_protos_are_promoted(node, check):
    _promote_node_proto(node)
    assert check(node)


def test_subgraph_bodies_are_promoted():
    body = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(np.array([1], np.float32)))],
        "body", [], [_vi("z", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([2], np.int64), "s"), numpy_helper.from_array(np.ones(2, np.float32), "w")])
    node = helper.make_node("If", ["c"], ["out"], then_branch=body, else_branch=body)
    assert _promote_node_proto(node)
    for attr in node.attribute:
        assert attr.g.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
        assert attr.g.node[0].attribute[0].t.data_type == TensorProto.DOUBLE
        assert attr.g.initializer[1].data_type == TensorProto.DOUBLE
        assert attr.g.initializer[0].data_type == TensorProto.INT64
