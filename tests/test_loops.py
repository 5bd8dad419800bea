"""ONNX control flow read as plain nodes (liftir/loops.py): a Loop with a constant trip
count and a condition that folds to constants is unrolled, an If with a constant
condition inlined; anything else is refused by node name. Hand-built with onnx.helper,
checked against onnxruntime (forward; saliency by central differences of its float64
forward) and summation-to-delta."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP, helper, numpy_helper

import liftir
from liftir.errors import ModelLoadError

N, T, F, H = 3, 4, 2, 3
D = TP.DOUBLE


def _rnn_loop(trips=T, cond_body=None, trip_node=None, extra_outer=(), h0_const=True, limit=100, steps=T,
              extra_consts=None):
    """x (N, T, F) -> time-major xs (outer) -> Loop: h = tanh(xs[i] W + h U + b), scan of h
    -> y (N, 2). The body reads xs (an activation) and W (a constant) from the outer scope;
    with a constant h0 every explicit input of the Loop is a constant."""
    rng = np.random.default_rng(0)
    consts = {"W": rng.normal(size=(F, H)), "U": rng.normal(size=(H, H)) * 0.5, "b": rng.normal(size=H),
              "V": rng.normal(size=(steps * H, 2)), "M": np.array(trips, np.int64), "cond0": np.array(True),
              "limit": np.array(limit, np.int64), "one": np.array(1, np.int64),
              "shape": np.array([0, -1], np.int64), "h0": np.zeros((1, H)), **(extra_consts or {})}
    body_nodes = [
        helper.make_node("Gather", ["xs", "i"], ["xt"], axis=0),
        helper.make_node("MatMul", ["xt", "W"], ["a"]),
        helper.make_node("MatMul", ["h", "U_in"], ["r"]),
        helper.make_node("Add", ["a", "r"], ["s"]),
        helper.make_node("Add", ["s", "b_body"], ["s2"]),
        helper.make_node("Tanh", ["s2"], ["h_out"]),
        helper.make_node("Identity", ["h_out"], ["scan"]),
        helper.make_node("Identity", ["U_in"], ["U_out"]),
    ] + (cond_body or [helper.make_node("Add", ["i", "one"], ["i1"]),
                       helper.make_node("Less", ["i1", "limit"], ["cond_out"])])
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c", TP.BOOL, []),
         helper.make_tensor_value_info("h", D, None), helper.make_tensor_value_info("U_in", D, [H, H])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []), helper.make_tensor_value_info("h_out", D, None),
         helper.make_tensor_value_info("U_out", D, [H, H]), helper.make_tensor_value_info("scan", D, None)],
        [numpy_helper.from_array(consts.pop("b"), "b_body")])
    outer = [helper.make_node("Transpose", ["x"], ["xs"], perm=[1, 0, 2])] + list(extra_outer)
    if trip_node is not None:
        outer.append(trip_node)
    h0 = "h0"
    if not h0_const:  # zeros shaped by the input: a static ConstantOfShape
        outer += [helper.make_node("Shape", ["x"], ["xshape"], start=0, end=1),
                  helper.make_node("Concat", ["xshape", "hdim"], ["hshape"], axis=0),
                  helper.make_node("ConstantOfShape", ["hshape"], ["h0x"],
                                   value=numpy_helper.from_array(np.zeros(1))), ]
        consts["hdim"] = np.array([H], np.int64)
        h0 = "h0x"
    outer += [
        helper.make_node("Loop", ["M", "cond0", h0, "U"], ["h_last", "U_last", "hs"], body=body, name="rnn_loop"),
        helper.make_node("Transpose", ["hs"], ["hs_b"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["hs_b", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "V"], ["y0"]),
        helper.make_node("ReduceSum", ["h_last", "axis1"], ["hsum"], keepdims=1),
        helper.make_node("Add", ["y0", "hsum"], ["y"]),
    ]
    consts["axis1"] = np.array([1], np.int64)
    graph = helper.make_graph(outer, "loop_rnn", [helper.make_tensor_value_info("x", D, ["N", T, F])],
                              [helper.make_tensor_value_info("y", D, ["N", 2])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("h0_const", [True, False], ids=["constant_h0", "static_h0"])
def test_unrolled_loop_equals_onnxruntime_and_conserves(h0_const):
    model = _rnn_loop(h0_const=h0_const)
    rng = np.random.default_rng(1)
    x, x0 = rng.normal(size=(N, T, F)), rng.normal(size=(1, T, F))
    ex = liftir.Explainer(model, "deeplift")
    assert not any(n.op_type == "Loop" for n in ex.graph.nodes.values())
    np.testing.assert_allclose(ex.predict(x), _ort(model, x), rtol=1e-12, atol=1e-12)
    attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    change = _ort(model, x)[:, 1] - _ort(model, np.broadcast_to(x0, x.shape).copy())[:, 1]
    assert np.abs(delta).max() <= 1e-9 * np.abs(change).max()
    np.testing.assert_allclose(attr.reshape(N, -1).sum(1), change, rtol=1e-9)
    # saliency against central differences of onnxruntime's float64 forward
    grad = liftir.Explainer(model, "saliency").attribute(x, target=1)
    eps, direction = 1e-6, rng.normal(size=x.shape)
    numeric = (_ort(model, x + eps * direction)[:, 1] - _ort(model, x - eps * direction)[:, 1]) / (2 * eps)
    np.testing.assert_allclose((grad * direction).reshape(N, -1).sum(1), numeric, rtol=1e-6, atol=1e-9)


def test_a_condition_that_ends_the_loop_early_is_followed():
    """cond_out = (i + 1 < 2): two iterations of a trip count of 4; the scan has 2 steps."""
    model = _rnn_loop(limit=2, steps=2)
    rng = np.random.default_rng(2)
    x, x0 = rng.normal(size=(N, T, F)), rng.normal(size=(1, T, F))
    ex = liftir.Explainer(model, "deeplift")
    np.testing.assert_allclose(ex.predict(x), _ort(model, x), rtol=1e-12, atol=1e-12)
    attr, delta = ex.attribute(x, baselines=x0, target=0, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-12
    assert np.all(attr[:, 2:] == 0)  # the steps the loop never reached


def test_a_trip_count_computed_from_the_input_is_refused_by_name():
    trip = helper.make_node("Cast", ["xmax"], ["M_x"], to=TP.INT64)
    reduce = helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0)
    model = _rnn_loop(extra_outer=[reduce, trip])
    model.graph.node[[n.name for n in model.graph.node].index("rnn_loop")].input[0] = "M_x"
    with pytest.raises(ModelLoadError, match=r"Loop node 'rnn_loop' cannot be unrolled: its trip count 'M_x'"):
        liftir.Explainer(model)


def test_a_condition_computed_from_the_state_is_refused_by_name():
    cond = [helper.make_node("ReduceSum", ["h_out"], ["hs_sum"], keepdims=0),
            helper.make_node("Less", ["hs_sum", "ten"], ["cond_out"])]
    model = _rnn_loop(cond_body=cond, extra_consts={"ten": np.array(10.0)})  # read from the outer scope
    with pytest.raises(ModelLoadError, match=r"'rnn_loop' cannot be unrolled: whether iteration 1 runs"):
        liftir.Explainer(model)


def test_an_if_with_a_constant_condition_is_inlined():
    """If(constant) whose branches read an activation of the outer graph (a capture, so it
    does not fold): the taken branch becomes plain nodes."""
    then = helper.make_graph([helper.make_node("Tanh", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", D, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", D, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["z"], then_branch=then, else_branch=other, name="branch"),
         helper.make_node("Mul", ["z", "x"], ["y"])], "if",
        [helper.make_tensor_value_info("x", D, ["N", 3])], [helper.make_tensor_value_info("y", D, ["N", 3])],
        [numpy_helper.from_array(np.array(True), "flag")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, x0 = np.random.default_rng(3).normal(size=(2, 3)), np.zeros((1, 3))
    ex = liftir.Explainer(model, "deeplift")
    assert {n.op_type for n in ex.graph.nodes.values()} == {"Tanh", "Identity", "Mul"}
    np.testing.assert_allclose(ex.predict(x), _ort(model, x), rtol=1e-12)
    attr, delta = ex.attribute(x, baselines=x0, target=0, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-12


def test_a_loop_of_shape_arithmetic_stays_static():
    """A Loop computing from shapes only (here: doubling the feature count 3 times) is
    evaluated per input shape like other shape arithmetic, not unrolled or refused."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Add", ["n", "n"], ["n_out"])], "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c", TP.BOOL, []),
         helper.make_tensor_value_info("n", TP.INT64, [1])],
        [helper.make_tensor_value_info("c_out", TP.BOOL, []), helper.make_tensor_value_info("n_out", TP.INT64, [1])])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
         helper.make_node("Loop", ["M", "cond", "s"], ["n8"], body=body, name="shape_loop"),
         helper.make_node("Concat", ["minus1", "n8"], ["shape"], axis=0),
         helper.make_node("Tile", ["x", "reps"], ["xt"]), helper.make_node("Reshape", ["xt", "shape"], ["y"])],
        "static", [helper.make_tensor_value_info("x", D, ["N", 2])], [helper.make_tensor_value_info("y", D, ["N", 16])],
        [numpy_helper.from_array(np.array(3, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
         numpy_helper.from_array(np.array([1, 8], np.int64), "reps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(4).normal(size=(2, 2))
    ex = liftir.Explainer(model, "saliency")
    assert "shape_loop" in ex.graph.nodes
    np.testing.assert_allclose(ex.predict(x), _ort(model, x))


def test_unrolling_is_bounded_by_the_folding_budget():
    """A Loop over activations with a huge constant trip count is refused before unrolling."""
    from liftir.errors import FoldingLimitError
    with pytest.raises(FoldingLimitError, match=r"'rnn_loop'.*unroll a Loop of 1000000000 iterations"):
        liftir.Explainer(_rnn_loop(trips=10**9))
