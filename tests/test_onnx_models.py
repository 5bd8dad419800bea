"""Every ONNX model liftir builds for onnxruntime opens in an onnxruntime older than the
installed onnx (liftir/onnx_models.py).

helper.make_model stamps onnx's newest IR version; onnxruntime 1.31 beside onnx 1.23
refused every such model ("Unsupported model IR version: 14, max supported IR version:
13"), so the forward fell back to the rules and the conv kernels failed. Here
onnxruntime is made to refuse what an old one (1.16: IR 9, liftir's lowest supported
version) would, and both engines must still run everything in onnxruntime.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import liftir
from liftir.onnx_models import MIN_IR_VERSION, make_model

OLD_MAX_IR = 9  # onnxruntime 1.16


@pytest.fixture
def old_onnxruntime(monkeypatch):
    """onnxruntime.InferenceSession refusing models above IR 9, as onnxruntime 1.16 does;
    records the IR version of every model liftir hands it as bytes."""
    real = ort.InferenceSession
    seen = []

    def session(model, *args, **kwargs):
        if isinstance(model, (bytes, bytearray)):
            ir = onnx.load_from_string(bytes(model)).ir_version
            seen.append(ir)
            if ir > OLD_MAX_IR:
                raise RuntimeError(f"Unsupported model IR version: {ir}, max supported IR version: {OLD_MAX_IR}")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def test_made_models_carry_the_lowest_ir_version_their_opsets_need():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    assert onnx.IR_VERSION > MIN_IR_VERSION  # what helper.make_model alone would write
    assert make_model(graph, [helper.make_opsetid("", 17)]).ir_version == 8
    assert make_model(graph, [helper.make_opsetid("", 13)]).ir_version == MIN_IR_VERSION
    assert make_model(graph, [helper.make_opsetid("", 23)]).ir_version == 11
    onnx.checker.check_model(make_model(graph, [helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("engine", ["interpreter", "compiled"])
def test_an_older_onnxruntime_runs_every_liftir_session(old_onnxruntime, engine, caplog):
    zoo = pytest.importorskip("zoo")
    net = zoo.build("vgg_maxpool", relu_before_pool=True)
    proto = zoo.export(net, zoo.make_input("vgg_maxpool", 2), None, dynamo=False)
    proto.ir_version = 8  # the user's export: one this onnxruntime reads
    x = zoo.make_input("vgg_maxpool", 3, seed=1).numpy()
    x0 = np.zeros_like(x[:1])
    with caplog.at_level(logging.WARNING, logger="liftir"):
        ex = liftir.Explainer(proto, "deeplift", engine=engine)
        attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert old_onnxruntime and max(old_onnxruntime) <= OLD_MAX_IR
    assert not [r for r in caplog.records if "onnxruntime" in r.getMessage()], caplog.text
    if engine == "compiled":
        assert all(p is not None for p in ex._compiled.passes.values()), ex._compiled.reasons
    scale = max(1.0, float(np.abs(ex.predict(x)).max()))
    assert np.abs(delta).max() <= 1e-4 * scale
