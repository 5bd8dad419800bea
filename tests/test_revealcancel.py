"""RevealCancel (Shrikumar, Greenside & Kundaje 2017) on its paper's example and on random graphs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir


def _model(nodes, inits, n_in, n_out):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _min_network():
    """min(x1, x2) = x1 - relu(x1 - x2), the paper's example of cancelling evidence."""
    wa = numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32), "wa")
    wb = numpy_helper.from_array(np.array([[1.0], [0.0]], np.float32), "wb")
    return _model([helper.make_node("MatMul", ["x", "wa"], ["d"]), helper.make_node("Relu", ["d"], ["r"]),
                   helper.make_node("MatMul", ["x", "wb"], ["x1"]), helper.make_node("Sub", ["x1", "r"], ["o"])],
                  [wa, wb], 2, 1)


def test_min_example_splits_evenly_where_rescale_does_not():
    x = np.array([[3.0, 4.0], [4.0, 3.0], [2.0, 2.0]], np.float32)
    rescale = liftir.Explainer(_min_network(), "deeplift").attribute(x, target=0)
    reveal, delta = liftir.Explainer(_min_network(), "deeplift_revealcancel").attribute(
        x, target=0, return_convergence_delta=True)
    # Rescale gives all of min(x1, x2) to one input; RevealCancel half to each (paper, Fig. 3)
    np.testing.assert_allclose(rescale, [[3, 0], [0, 3], [2, 0]], atol=1e-6)
    np.testing.assert_allclose(reveal, [[1.5, 1.5], [1.5, 1.5], [1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(delta, 0, atol=1e-6)


def _mlp(seed, sizes=(6, 12, 12, 3), acts=("Relu", "Tanh")):
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(b).astype(np.float32) * 0.3, f"b{i}")]
        out = "o" if i == len(sizes) - 2 else f"z{i}"
        nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [out]))
        if out != "o":
            nodes.append(helper.make_node(acts[i % len(acts)], [out], [f"a{i}"]))
            h = f"a{i}"
    return _model(nodes, inits, sizes[0], sizes[-1])


@pytest.mark.parametrize("seed", range(4))
def test_summation_to_delta_on_random_networks(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    x0 = rng.standard_normal((1, 6)).astype(np.float32) * 0.2
    ex = liftir.Explainer(_mlp(seed), "deeplift_revealcancel")
    attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    scale = np.abs(attr).sum(axis=1).max()
    assert np.abs(delta).max() <= 1e-5 * max(scale, 1.0)
    # it is a different rule from Rescale, not a copy of it
    assert not np.allclose(attr, liftir.Explainer(_mlp(seed)).attribute(x, baselines=x0, target=1), atol=1e-4)


def test_float64_conserves_where_float32_cancels():
    """Deep nets with |W| growth: float32 warns, float64 conserves to round-off."""
    rng = np.random.default_rng(0)
    sizes = (8,) + (64,) * 6 + (2,)
    model = _mlp(3, sizes=sizes, acts=("Relu",))
    x = rng.standard_normal((4, 8)).astype(np.float32) * 3
    _, delta64 = liftir.Explainer(model, "deeplift_revealcancel", precision="float64").attribute(
        x, target=0, return_convergence_delta=True)
    assert np.abs(delta64).max() < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, delta32 = liftir.Explainer(model, "deeplift_revealcancel").attribute(
            x, target=0, return_convergence_delta=True)
    assert np.isfinite(delta32).all()
