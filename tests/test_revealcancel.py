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
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
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


def test_deep_network_conserves_in_both_precisions():
    """Eight weight layers: the split restarts at each, so d+ and d- do not grow with depth
    (carried through |W| they cancelled in float32) and float32 conserves too."""
    rng = np.random.default_rng(0)
    sizes = (8,) + (64,) * 6 + (2,)
    model = _mlp(3, sizes=sizes, acts=("Relu",))
    x = rng.standard_normal((4, 8)).astype(np.float32) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", liftir.diagnostics.ConvergenceWarning)
        ex = liftir.Explainer(model, "deeplift_revealcancel", precision="float64")
        _, delta64 = ex.attribute(x, target=0, return_convergence_delta=True)
        _, delta32 = liftir.Explainer(model, "deeplift_revealcancel").attribute(
            x, target=0, return_convergence_delta=True)
    diff = np.abs(ex.predict(x)[:, 0] - ex.predict(np.zeros_like(x))[:, 0])
    assert np.abs(delta64).max() < 1e-12 * diff.max()
    assert np.abs(delta32).max() < 1e-5 * diff.max()


def _small_resnet18(dynamo: bool):
    """ResNet-18's layout (conv-BN-ReLU-MaxPool(3, 2) stem, 8 basic blocks with residual adds)
    at a quarter of the width on 3x16x16, built from tests/zoo.py (torchvision does not
    install beside the pinned torch)."""
    import torch
    from torch import nn

    import zoo

    stem = nn.Sequential(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1))
    stages, cin = [], 16
    for i, w in enumerate((16, 32, 64, 128)):
        stages += [zoo.BasicBlock(cin, w, stride=1 if i == 0 else 2), zoo.BasicBlock(w, w)]
        cin = w
    net = zoo._init_(zoo._ResNet(stem, stages, cin, 10), 0, calib_shape=(8, 3, 16, 16))
    x = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    return zoo.export(net, x, dynamo=dynamo), x.numpy()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_resnet18_layout_conserves(dynamo):
    """Residual adds, a ReLU-fed overlapping MaxPool and BatchNorm folded into 20 convs: the
    split restarts at every weight layer, so d+ and d- stay the size of the differences and
    summation-to-delta holds (carrying the split through |W| made them grow to 1e20 and
    summed the attributions to ~0, float64 included)."""
    model, x = _small_resnet18(dynamo)
    assert {"Add", "MaxPool", "Conv"} <= {n.op_type for n in model.graph.node}
    for precision, tol in (("model", 1e-4), ("float64", 1e-10)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", liftir.diagnostics.ConvergenceWarning)
            ex = liftir.Explainer(model, "deeplift_revealcancel", precision=precision)
            attr, delta = ex.attribute(x, target=3, return_convergence_delta=True)
        diff = ex.predict(x)[:, 3] - ex.predict(np.zeros_like(x))[:, 3]
        assert np.abs(diff).min() > 1e-3
        assert np.abs(delta).max() <= tol * np.abs(diff).max(), (precision, delta, diff)
        np.testing.assert_allclose(attr.reshape(4, -1).sum(axis=1, dtype=np.float64), diff,
                                   rtol=tol * 10, atol=tol * np.abs(diff).max())


def _pooled_residual_model(seed):
    """Gemm-Relu-MaxPool-Gemm with a residual Add around a Relu: pooled and residual paths."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0]), n)
             for n, s in (("w0", (8, 16)), ("w1", (16, 16)), ("w2", (16, 2)))]
    inits += [numpy_helper.from_array(np.array([0, 1, 4, 4], np.int64), "shape"),
              numpy_helper.from_array(np.array([0, 16], np.int64), "flat"),
              numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.3, "b0")]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Add", ["r", "r1"], ["s"]), helper.make_node("Reshape", ["s", "shape"], ["s4"]),
             helper.make_node("MaxPool", ["s4"], ["p"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
             helper.make_node("Reshape", ["p", "flat"], ["pf"]), helper.make_node("Gemm", ["pf", "w2"], ["o"])]
    return _model(nodes, inits, 8, 2)


@pytest.mark.parametrize("seed", range(3))
def test_pooled_residual_graph_conserves(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    x0 = rng.standard_normal((1, 8)).astype(np.float32) * 0.5
    model = _pooled_residual_model(seed)
    _, delta = liftir.Explainer(model, "deeplift_revealcancel", precision="float64").attribute(
        x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-12
    attr, delta = liftir.Explainer(model, "deeplift_revealcancel").attribute(
        x, baselines=x0, target=1, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-5 * max(np.abs(attr).sum(axis=1).max(), 1.0)


def _sqrt_network():
    """sqrt(x1 - x2 + 1): the negative part of the difference can take x0 + d- below 0."""
    w = numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32), "w")
    b = numpy_helper.from_array(np.array([1.0], np.float32), "b")
    return _model([helper.make_node("Gemm", ["x", "w", "b"], ["u"]), helper.make_node("Sqrt", ["u"], ["o"])],
                  [w, b], 2, 1)


@pytest.mark.parametrize("engine", ["interpreter", "compiled"])
def test_split_points_outside_the_domain_take_the_rescale_multiplier(engine):
    """x0 = 0 (u0 = 1). Sample 0: x = (3, 2.5), u = 1.5, but x0 + d- = 1 - 2.5 < 0, where
    sqrt is not defined: both parts take the Rescale multiplier m = (sqrt(1.5) - 1) / 0.5,
    so x1 gets 3 m and x2 gets -2.5 m. Sample 1: x = (3, 0.5), every split point inside the
    domain: the RevealCancel rule's own parts. Checked in float64 against these formulas."""
    x = np.array([[3.0, 2.5], [3.0, 0.5]])
    m = (np.sqrt(1.5) - 1) / 0.5
    pos = 0.5 * (np.sqrt(4.0) - 1) + 0.5 * (np.sqrt(3.5) - np.sqrt(0.5))
    neg = 0.5 * (np.sqrt(0.5) - 1) + 0.5 * (np.sqrt(3.5) - np.sqrt(4.0))
    want = np.array([[3 * m, -2.5 * m], [pos, neg]])
    if engine == "interpreter":
        attr, delta = liftir.Explainer(_sqrt_network(), "deeplift_revealcancel", precision="float64").attribute(
            x, baselines=np.zeros((1, 2)), target=0, return_convergence_delta=True)
        np.testing.assert_allclose(attr, want, rtol=0, atol=1e-14)
        assert np.abs(delta).max() <= 1e-15
    else:  # float32: the compiled pass equals the interpreter and conserves
        x32 = x.astype(np.float32)
        got, delta = liftir.Explainer(_sqrt_network(), "deeplift_revealcancel", engine="compiled").attribute(
            x32, baselines=np.zeros((1, 2), np.float32), target=0, return_convergence_delta=True)
        ref = liftir.Explainer(_sqrt_network(), "deeplift_revealcancel").attribute(
            x32, baselines=np.zeros((1, 2), np.float32), target=0)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert np.abs(delta).max() <= 1e-6
