"""The run-time delta check: Explainer warns when summation-to-delta breaks, and says why."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.diagnostics import ConvergenceWarning


def _model(nodes, inits, n_in, n_out):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relu_maxpool():
    """Relu -> MaxPool(1x2) -> Gemm: the pattern where the paper's max rule meets dx = 0."""
    inits = [numpy_helper.from_array(np.array([0, 1, 1, 4], np.int64), "to4"),
             numpy_helper.from_array(np.array([0, 2], np.int64), "to2"),
             numpy_helper.from_array(np.array([[1.5], [-0.7]], np.float32), "w")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "to4"], ["r4"]),
             helper.make_node("MaxPool", ["r4"], ["p"], kernel_shape=[1, 2], strides=[1, 2], name="pool"),
             helper.make_node("Reshape", ["p", "to2"], ["p2"]), helper.make_node("Gemm", ["p2", "w"], ["o"])]
    return _model(nodes, inits, 4, 1)


# after the ReLU the actual row is [0, 0, 2, 1] and the reference [0, 2, 0.5, 0.1]: the actual
# argmax of the first window (its first position) has dx = 0 while y - y0 = -2
X = np.array([[-1.0, -3.0, 2.0, 1.0], [1.0, 0.5, 2.0, 3.0]], np.float32)
X0 = np.array([[-1.0, 2.0, 0.5, 0.1]], np.float32)


@pytest.mark.parametrize("precision", ["model", "float64"])
def test_paper_max_rule_with_dx_zero_at_the_argmax_warns(precision):
    ex = liftir.Explainer(_relu_maxpool(), max_rule="paper", precision=precision)
    with pytest.warns(ConvergenceWarning) as record:
        _, delta = ex.attribute(X, baselines=X0, target=0, return_convergence_delta=True)
    assert abs(delta[0]) > 1.0  # the window's y - y0 = -2 times weight 1.5 is lost
    assert len(record) == 1
    message = str(record[0].message)
    assert "'pool' (MaxPool" in message and "max_rule='cross_max'" in message
    assert "precision='float64'" not in message  # not a round-off miss: float64 is no cure
    # the default rule conserves on the same inputs, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, delta = liftir.Explainer(_relu_maxpool(), precision=precision).attribute(
            X, baselines=X0, target=0, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-5


def _cancelling():
    """h = 1000 x1 - 1000 x2 + 0.3 -> Relu -> 2 t: with x1 ~ x2 the contributions of x1 and
    x2 cancel to 1e-5 of their size, below float32's resolution of h."""
    inits = [numpy_helper.from_array(np.array([[1000.0], [-1000.0]], np.float32), "w"),
             numpy_helper.from_array(np.array([0.3], np.float32), "b"),
             numpy_helper.from_array(np.array([[2.0]], np.float32), "v")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "v"], ["o"])]
    return _model(nodes, inits, 2, 1)


def test_float32_cancelling_revealcancel_net_warns_and_float64_cures():
    x = np.array([[1.0 + 1e-5 * k, 1.0] for k in (1, 3, -2, 7)], np.float32)
    with pytest.warns(ConvergenceWarning, match="precision='float64'"):
        _, delta32 = liftir.Explainer(_cancelling(), "deeplift_revealcancel").attribute(
            x, target=0, return_convergence_delta=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ex = liftir.Explainer(_cancelling(), "deeplift_revealcancel", precision="float64")
        _, delta64 = ex.attribute(x, target=0, return_convergence_delta=True)
    diff = ex.predict(x)[:, 0] - ex.predict(np.zeros_like(x))[:, 0]
    assert np.abs(delta32).max() > 1e-3 * np.abs(diff).min()
    assert np.abs(delta64).max() < 1e-9 * np.abs(diff).max()


def _offset_line():
    """o = x1 + x2 + 100: outputs near 101, whose float32 ulp is 2^-17 (7.6e-6)."""
    inits = [numpy_helper.from_array(np.array([[1.0], [1.0]], np.float32), "w"),
             numpy_helper.from_array(np.array([100.0], np.float32), "b")]
    return _model([helper.make_node("Gemm", ["x", "w", "b"], ["o"])], inits, 2, 1)


@pytest.mark.parametrize("engine", ["interpreter", "compiled"])
def test_output_change_below_the_outputs_rounding_does_not_warn(engine):
    """A reference a hair from the input (a variant's reference allele: one base of thousands)
    moves the output by less than its own float32 ulp. f(x) - f(x0) of the rounded outputs is
    then 0 while the exact linear rule's attributions sum to the true 3 * 2^-20: |delta| is
    100% of the output difference, and was warned about (with a per-node check costing 3x
    the attribution) though no rule can do better. It is within the outputs' rounding, so no
    warning; a real miss of the same model still warns (the tests above)."""
    x = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    x0 = x.copy()
    x0[:, 1] += np.float32(3 * 2.0 ** -20)  # 0.375 ulp of the output: f(x0) rounds to f(x)
    ex = liftir.Explainer(_offset_line(), engine=engine)
    assert np.array_equal(ex.predict(x), ex.predict(x0))  # the outputs cannot tell them apart
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        a, delta = ex.attribute(x, baselines=x0, target=0, return_convergence_delta=True)
    np.testing.assert_allclose(a.astype(np.float64), (x - x0).astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(np.abs(delta), 3 * 2.0 ** -20, rtol=1e-6)  # the true change, all of it missed


def test_healthy_model_costs_no_extra_forward(monkeypatch):
    calls = []
    original = liftir.scheduler.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(liftir.scheduler, "forward", counting)
    ex = liftir.Explainer(_relu_maxpool())
    ex.attribute(X, baselines=X0, target=0)  # measures the memory of a row once (cached)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ex.attribute(X, baselines=X0, target=0)
    assert len(calls) == 1
    with pytest.warns(ConvergenceWarning):  # the diagnosis runs only when the delta is off
        liftir.Explainer(_relu_maxpool(), max_rule="paper").attribute(X, baselines=X0, target=0)
    assert len(calls) > 2


def test_gradient_methods_are_not_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        liftir.Explainer(_relu_maxpool(), "saliency").attribute(X, target=0)
        liftir.Explainer(_relu_maxpool(), "integrated_gradients").attribute(X, baselines=X0, target=0, n_steps=4)
