"""When onnxruntime cannot run the forward, liftir says so in one line and its rules take over."""
from __future__ import annotations

import logging

import numpy as np

import liftir
from onnx_builders import helper, model


def _frozen_batch_net():
    """A batch size of 2 frozen into the Reshapes, as fixed-batch exports do: onnxruntime
    fails on the N + 1 stacked rows, liftir's Reshape rule keeps axis 0 as the batch."""
    rng = np.random.default_rng(0)
    consts = {"s3": np.array([2, 3, 4], np.int64), "s2": np.array([2, 12], np.int64),
              "W": rng.standard_normal((12, 3)).astype(np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "s3"], ["r"]), helper.make_node("Relu", ["r"], ["h"]),
             helper.make_node("Reshape", ["h", "s2"], ["f"], name="flatten_frozen"),
             helper.make_node("Gemm", ["f", "W"], ["o"])]
    return model(nodes, {"x": (2, 12)}, ["o"], consts, opset=17)


def test_fallback_is_logged_once_and_onnxruntime_stays_quiet(capfd, caplog):
    x = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32)
    ex = liftir.Explainer(_frozen_batch_net())
    with caplog.at_level(logging.WARNING, logger="liftir"):
        _, delta = ex.attribute(x, target=0, return_convergence_delta=True)
        ex.attribute(x, target=1)  # the failed session is not retried, nor logged again
    assert np.abs(delta).max() < 1e-5
    records = [r for r in caplog.records if r.name == "liftir"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "onnxruntime" in message and "rules compute the forward" in message and "\n" not in message
    assert "[E:onnxruntime" not in capfd.readouterr().err


def _expand_then_reduce(rows: int):
    """Expand (N, 1, 2) -> (N, rows, 2) -> ReduceSum over the expanded axis: what onnxruntime
    cannot allocate at giant sizes, leaving the rules' forward to do it."""
    consts = {"shape": np.array([1, rows, 2], np.int64), "axes": np.array([1], np.int64),
              "W": np.array([[0.5], [-1.5]], np.float32)}
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=0),
             helper.make_node("Gemm", ["s", "W"], ["o"])]
    return model(nodes, {"x": (2, 1, 2)}, ["o"], consts, opset=17)


def test_rules_forward_sums_a_huge_expand_accurately():
    """NumPy adds along an outer axis one float32 term at a time: 2^20 terms were 1% off
    (2^24 equal terms stop growing: the fallback's sum came out ~90% low)."""
    rows = 2 ** 20
    net = _expand_then_reduce(rows)
    x = np.array([[[1.1, 0.7]], [[0.3, -2.0]]], np.float32)
    from onnx_builders import rules_only
    # exact in float64 (onnxruntime's own float32 ReduceSum is ~1% off here too)
    expected = rows * x.reshape(2, 2).astype(np.float64) @ np.array([[0.5], [-1.5]])
    np.testing.assert_allclose(liftir.Explainer(net, "saliency").predict(x), expected, rtol=1e-6)
    ex = rules_only(liftir.Explainer(net))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", liftir.diagnostics.ConvergenceWarning)
        attr, delta = ex.attribute(x, target=0, return_convergence_delta=True)
    np.testing.assert_allclose(attr.reshape(2, 2), x.reshape(2, 2) * rows * np.array([0.5, -1.5]), rtol=1e-6)
    assert np.abs(delta).max() <= 1e-6 * np.abs(attr).sum()
