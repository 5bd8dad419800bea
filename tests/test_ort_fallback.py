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
