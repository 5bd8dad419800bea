"""The non-NumPy code path (what CuPy runs), exercised without a GPU.

Rules and kernels take a fast path when `xp is numpy` (onnxruntime sessions, threads,
putmask). Here the Explainer gets a stand-in array module that forwards to NumPy but
(1) is not NumPy, so every CuPy-side branch runs, and (2) exposes only functions CuPy
also provides, so a NumPy-only call in a rule fails here before it fails on a GPU.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir

# NumPy functions liftir may call through `xp`, each of which CuPy provides as well.
CUPY_SUBSET = """
abs absolute add arange arctan argmax array asarray ascontiguousarray bincount bool_ broadcast_to ceil clip
concatenate cos cosh divide dtype einsum empty empty_like exp expand_dims expm1 float16 float32 float64
floor full full_like int8 int16 int32 int64 log log1p logaddexp matmul maximum mean minimum moveaxis
multiply ndarray nonzero ones ones_like pad repeat reshape round sign sin sinh split sqrt squeeze stack
subtract sum swapaxes take take_along_axis tanh tensordot tile transpose where zeros zeros_like lib
""".split()


def subset_module():
    module = types.ModuleType("fakecupy")
    for name in CUPY_SUBSET:
        setattr(module, name, getattr(np, name))
    return module


def _net():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 2, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((4, 6, 3, 3)).astype(np.float32) * 0.3
    fc = rng.standard_normal((4 * 3 * 3, 5)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c2"], ["s2"]),
             helper.make_node("Flatten", ["s2"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (fc, "fc"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("method", ["deeplift", "saliency", "guided_backprop", "deeplift_revealcancel"])
def test_subset_backend_matches_numpy(method):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
    x0 = rng.standard_normal((1, 2, 10, 10)).astype(np.float32) * 0.1
    reference = liftir.Explainer(_net(), method).attribute(x, baselines=x0, target=2)
    ex = liftir.Explainer(_net(), method)
    ex.xp = subset_module()
    got, delta = ex.attribute(x, baselines=x0, target=2, return_convergence_delta=True)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    if delta is not None:
        assert np.abs(delta).max() < 1e-5
