"""Training-mode Dropout / BatchNormalization are refused when the Explainer is built."""
from __future__ import annotations

import numpy as np
import pytest

import liftir
from liftir.errors import ModelLoadError
from onnx_builders import helper, model

W = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)


def _dropout_net(training):
    consts = {"W": W, "ratio": np.array(0.5, np.float32)}
    inputs = ["h", "ratio"]
    if training is not None:
        consts["training"] = np.array(training)
        inputs.append("training")
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Dropout", inputs, ["d"], name="drop"),
             helper.make_node("Gemm", ["d", "W"], ["o"])]
    return model(nodes, {"x": (2, 6)}, ["o"], consts, opset=13)


def _batchnorm_net(training_mode):
    c = 3
    consts = {"s": np.full(c, 1.5, np.float32), "b": np.zeros(c, np.float32),
              "m": np.full(c, 0.2, np.float32), "v": np.full(c, 2.0, np.float32)}
    outs = ["y", "rm", "rv"] if training_mode else ["y"]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outs, name="bn",
                              training_mode=training_mode)]
    return model(nodes, {"x": (2, c, 4)}, ["y"], consts, opset=15)


def test_training_mode_dropout_is_refused_with_its_name():
    with pytest.raises(ModelLoadError, match=r"'drop' \(Dropout\).*eval mode"):
        liftir.Explainer(_dropout_net(True))


def test_training_mode_batchnorm_is_refused_with_its_name():
    with pytest.raises(ModelLoadError, match=r"'bn' \(BatchNormalization\)"):
        liftir.Explainer(_batchnorm_net(1))


@pytest.mark.parametrize("training", [None, False])
def test_inference_dropout_conserves(training):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    _, delta = liftir.Explainer(_dropout_net(training)).attribute(x, target=1, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-5


def test_inference_batchnorm_conserves():
    x = np.random.default_rng(2).standard_normal((4, 3, 4)).astype(np.float32)
    _, delta = liftir.Explainer(_batchnorm_net(0)).attribute(x, target=(1, 2), return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-5
