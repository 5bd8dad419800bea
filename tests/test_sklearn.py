"""A scikit-learn pipeline through skl2onnx, explained with no workaround.

skl2onnx classifiers carry a label head (ArgMax, ai.onnx.ml ops) next to the
probabilities, a Scaler from the ai.onnx.ml domain, and end Softmax -> Identity: liftir
must need rules only on the way to the explained output, serve the Scaler, and see the
final Softmax through the Identity.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import liftir

skl2onnx = pytest.importorskip("skl2onnx")
sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def pipeline():
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=400, random_state=0))
    with np.errstate(all="ignore"):
        clf.fit(x, y)
    proto = to_onnx(clf, x[:1], options={id(clf[-1]): {"zipmap": False}}, target_opset=17)
    return proto, x


def test_probabilities_explained_with_the_label_head_left_alone(pipeline):
    proto, x = pipeline
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert ("ai.onnx.ml", "Scaler") in ops and ("", "ArgMax") in ops
    ex = liftir.Explainer(proto, output="probabilities")
    attr, delta = ex.attribute(x[:20], baselines=x.mean(0, keepdims=True), target=2,
                               return_convergence_delta=True)
    assert attr.shape == (20, 4)
    assert np.abs(delta).max() < 1e-5
    # the final Softmax (followed by an Identity) is stripped: explained at the logits, 2.5
    explained, stripped = ex.explained_tensor("probabilities")
    assert stripped == "Softmax" and explained != "probabilities"


def test_forward_matches_onnxruntime(pipeline):
    proto, x = pipeline
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {session.get_inputs()[0].name: x})[0]
    got = liftir.Explainer(proto, output="probabilities").predict(x, output="probabilities")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_label_head_is_reported_when_explained(pipeline):
    proto, x = pipeline
    ex = liftir.Explainer(proto, output="probabilities")
    with pytest.raises(liftir.LiftirError):
        ex.attribute(x[:2], output="label")
