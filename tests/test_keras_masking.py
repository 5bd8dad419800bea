"""Keras recurrent layers through tf2onnx: masking, go_backwards, Bidirectional.

tf2onnx writes each Keras LSTM/GRU/SimpleRNN as an ONNX `Loop` over the time steps whose
body masks the state with `Cast(mask, float)` products; liftir unrolls the Loop when the
graph is read (liftir/loops.py). The models and their TensorFlow anchors (outputs,
saliency by tf.GradientTape, integrated gradients computed in TensorFlow) are shipped in
tests/data, written by tests/data/make_keras_masking.py: TensorFlow is not needed here.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import onnxruntime as ort
import pytest

import liftir

# bigru_sequences' masked mean is 0/0 for an all-padded row (the zero rows of the Explainer's
# probe, integrated gradients' zero reference): NumPy says so, as Keras computes it too
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
DATA = os.path.join(os.path.dirname(__file__), "data")
FLOAT_MODELS = ["lstm", "gru_backwards", "simplernn", "bilstm", "bigru_sequences"]
IG_STEPS = 16


def _path(name):
    return os.path.join(DATA, f"keras_{name}.onnx")


@functools.lru_cache(maxsize=None)
def _explainer(name, method, precision="model"):
    return liftir.Explainer(_path(name), method, precision=precision)


def _anchors(name):
    with np.load(os.path.join(DATA, f"keras_{name}.npz")) as f:
        return {k: f[k] for k in f.files}


def _onnxruntime(name, feeds):
    return ort.InferenceSession(_path(name), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _padded(x):
    """The all-zero (masked) time steps of each sample."""
    return np.abs(x).sum(-1) == 0


@pytest.mark.parametrize("name", FLOAT_MODELS)
def test_loops_are_unrolled_and_the_forward_equals_onnxruntime_and_keras(name):
    a = _anchors(f"masking_{name}")
    ex = _explainer(f"masking_{name}", "saliency")
    assert not any(n.op_type == "Loop" for n in ex.graph.nodes.values())
    got = ex.predict(a["x"])
    np.testing.assert_allclose(got, _onnxruntime(f"masking_{name}", {"x": a["x"]}), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, a["output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FLOAT_MODELS)
def test_saliency_and_integrated_gradients_equal_tensorflow(name):
    a = _anchors(f"masking_{name}")
    x = a["x"]
    sal = _explainer(f"masking_{name}", "saliency").attribute(x, target=0)
    scale = np.abs(a["saliency"]).max()
    assert np.abs(sal - a["saliency"]).max() <= 1e-5 * scale
    assert np.all(sal[_padded(x)] == 0)  # Masking multiplies padded steps by 0
    ig = _explainer(f"masking_{name}", "integrated_gradients")
    for baseline, key in ((np.zeros_like(x[:1]), "ig_zero"), (a["same_mask"], "ig_same_mask")):
        got = ig.attribute(x, baselines=baseline, target=0, n_steps=IG_STEPS)
        assert np.abs(got - a[key]).max() <= 1e-5 * np.abs(a[key]).max(), key
        assert np.all(got[_padded(x)] == 0)


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.parametrize("precision", ["model", "float64"])
def test_deeplift_conserves_through_the_masks(name, precision):
    """The zero reference is masked at every step (the mask itself carries part of the
    difference, through Cast(bool -> float) and the product rule); the other reference
    keeps the input's mask. Padded steps get exactly 0. (The masked mean of
    `bigru_sequences` is 0/0 = NaN for a fully masked sequence, in Keras too: no zero
    reference there.)"""
    a = _anchors(f"masking_{name}")
    x = a["x"]
    ex = _explainer(f"masking_{name}", "deeplift", precision)
    out = ex.predict(x)
    tol = 1e-9 if precision == "float64" else 2e-6
    baselines = [a["same_mask"]] + ([] if name == "bigru_sequences" else [np.zeros_like(x[:1])])
    for baseline in baselines:
        attr, delta = ex.attribute(x, baselines=baseline, target=0, return_convergence_delta=True)
        change = out[:, 0] - ex.predict(np.broadcast_to(baseline, x.shape))[:, 0]
        assert np.abs(delta).max() <= tol * np.abs(change).max(), (precision, delta)
        np.testing.assert_allclose(attr.reshape(len(x), -1).sum(1), change, rtol=0, atol=2 * tol * np.abs(change).max())
        assert np.all(attr[_padded(x)] == 0)


def test_embedding_mask_zero_ids_are_held_and_attributed_at_the_embedding():
    """Embedding(mask_zero=True) -> GRU: the ids are held, the Embedding's own index
    arithmetic (Cast(ids, float) < 0) is held with them, and attributions come for the
    embedding lookup and the mask casts that multiply the state."""
    a = _anchors("embedding_gru")
    ids = a["ids"]
    ex = _explainer("embedding_gru", "deeplift", "float64")
    emb = next(t for t in ex.attributed if t.endswith("GatherV2:0"))
    assert not any("Less__" in t for t in ex.attributed)  # the index arithmetic is not attributed
    np.testing.assert_allclose(ex.predict(ids), _onnxruntime("embedding_gru", {"ids": ids}), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ex.predict(ids), a["output"], rtol=1e-5, atol=1e-6)
    for reference in (np.zeros_like(ids[:1]), a["same_mask"]):  # all padding; the same mask
        attr, delta = ex.attribute(ids, baselines=reference, target=0, return_convergence_delta=True)
        change = ex.predict(ids)[:, 0] - ex.predict(np.broadcast_to(reference, ids.shape))[:, 0]
        assert np.abs(delta).max() <= 1e-9 * np.abs(change).max()
        total = sum(v.reshape(len(ids), -1).sum(1) for v in attr.values())
        np.testing.assert_allclose(total, change, rtol=0, atol=1e-9 * np.abs(change).max())
        assert np.all(attr[emb][ids == 0] == 0)  # padding gets nothing
    sal = _explainer("embedding_gru", "saliency").attribute(ids, target=0)[emb]
    assert np.abs(sal - a["saliency"]).max() <= 1e-5 * np.abs(a["saliency"]).max()
    # integrated gradients walks the path at the embeddings (the model cut inside the unrolled
    # loop, liftir/cut.py); with the mask kept it is TensorFlow's path
    ig = _explainer("embedding_gru", "integrated_gradients").attribute(ids, baselines=a["same_mask"], target=0,
                                                                       n_steps=IG_STEPS)
    assert np.abs(ig[emb] - a["ig_same_mask"]).max() <= 1e-5 * np.abs(a["ig_same_mask"]).max()
    assert not any(v.any() for k, v in ig.items() if k != emb)  # the masks did not move


# ---- the rules Keras' masking reaches, against float64 hand-written formulas ----------------
def _model(nodes, inputs, consts, out_shape=("N", 1)):
    from onnx import helper, numpy_helper
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", 11, list(out_shape))],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mask_type", ["float", "bool", "int32"])
def test_cast_of_a_mask_carries_its_change(mask_type):
    """y = sum_i x_i m_i w_i + m_i with m = Cast(Not(Equal(x, 0))) (Keras' Masking, the mask
    cast to `mask_type` then to float). DeepLIFT (Rescale on the comparison, m = 1 on the
    casts, the product rule): a_i = m'_i w_i dx_i + dm_i (x'_i w_i + 1), primes the means of
    actual and reference. The cast from bool used to drop dm_i (a silent miss of
    summation-to-delta)."""
    from onnx import TensorProto as TP, helper
    to = {"float": TP.DOUBLE, "bool": TP.BOOL, "int32": TP.INT32}[mask_type]
    nodes = [helper.make_node("Equal", ["x", "zero"], ["eq"]), helper.make_node("Not", ["eq"], ["ne"]),
             helper.make_node("Cast", ["ne"], ["m0"], to=to), helper.make_node("Cast", ["m0"], ["m"], to=TP.DOUBLE),
             helper.make_node("Mul", ["x", "m"], ["xm"]), helper.make_node("Mul", ["xm", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "m"], ["s"]), helper.make_node("ReduceSum", ["s", "axis"], ["y"])]
    w = np.array([1.0, -2.0, 3.0, 0.5])
    model = _model(nodes, [helper.make_tensor_value_info("x", TP.DOUBLE, ["N", 4])],
                   {"zero": np.array(0.0), "w": w, "axis": np.array([1])})
    x = np.array([[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 0.5, 0.0]])
    x0 = np.array([[0.0, 0.0, 1.0, 0.0]])
    m, m0 = (x != 0).astype(float), (x0 != 0).astype(float)
    expected = (m + m0) / 2 * w * (x - x0) + (m - m0) * ((x + x0) / 2 * w + 1)
    attr, delta = liftir.Explainer(model, "deeplift").attribute(x, baselines=x0, target=0,
                                                                return_convergence_delta=True)
    np.testing.assert_allclose(attr, expected, rtol=1e-14, atol=1e-15)
    assert np.abs(delta).max() <= 1e-14
    # saliency: the comparison is flat, so only the masked product's slope m_i w_i is left
    sal = liftir.Explainer(model, "saliency").attribute(x, target=0)
    np.testing.assert_array_equal(sal, m * w)


def test_cast_from_float_to_bool_is_a_step():
    """y = sum_i w_i Cast(Cast(x_i, bool), float): DeepLIFT gives w_i [x_i != 0] - [x0_i != 0]
    (the Rescale of a step), saliency 0; it used to pass the multiplier 1 through."""
    from onnx import TensorProto as TP, helper
    nodes = [helper.make_node("Cast", ["x"], ["b"], to=TP.BOOL), helper.make_node("Cast", ["b"], ["f"], to=TP.DOUBLE),
             helper.make_node("Mul", ["f", "w"], ["s"]), helper.make_node("ReduceSum", ["s", "axis"], ["y"])]
    w = np.array([1.0, -2.0, 3.0, 0.5])
    model = _model(nodes, [helper.make_tensor_value_info("x", TP.DOUBLE, ["N", 4])], {"w": w, "axis": np.array([1])})
    x, x0 = np.array([[1.0, 0.0, 2.0, -1.0]]), np.array([[0.0, 0.0, 1.0, 0.0]])
    attr, delta = liftir.Explainer(model, "deeplift").attribute(x, baselines=x0, target=0,
                                                                return_convergence_delta=True)
    np.testing.assert_allclose(attr, w * ((x != 0).astype(float) - (x0 != 0)), rtol=0, atol=1e-15)
    assert np.abs(delta).max() <= 1e-15
    assert not liftir.Explainer(model, "saliency").attribute(x, target=0).any()


def test_reverse_sequence_is_a_permutation_per_sample():
    """y = sum(ReverseSequence(x, lens) * W) with per-sample lengths given as a held input:
    the attribution of x[b, t] is dx[b, t] W[L_b - 1 - t] for t < L_b, dx[b, t] W[t] after."""
    from onnx import TensorProto as TP, helper
    steps, feats = 4, 2
    nodes = [helper.make_node("ReverseSequence", ["x", "lens"], ["r"], batch_axis=0, time_axis=1),
             helper.make_node("Mul", ["r", "W"], ["s"]), helper.make_node("Flatten", ["s"], ["f"]),
             helper.make_node("ReduceSum", ["f", "axes"], ["y"])]
    rng = np.random.default_rng(0)
    W = rng.normal(size=(steps, feats))
    model = _model(nodes, [helper.make_tensor_value_info("x", TP.DOUBLE, ["N", steps, feats]),
                           helper.make_tensor_value_info("lens", TP.INT64, ["N"])],
                   {"W": W, "axes": np.array([1])})
    x, x0 = rng.normal(size=(3, steps, feats)), rng.normal(size=(1, steps, feats))
    lens = np.array([4, 2, 3])
    t = np.arange(steps)
    index = np.where(t[None] < lens[:, None], lens[:, None] - 1 - t[None], t[None])  # (N, T)
    expected = (x - x0) * W[index]
    ex = liftir.Explainer(model, "deeplift")
    np.testing.assert_allclose(ex.predict((x, lens)), ort.InferenceSession(model.SerializeToString()).run(
        None, {"x": x, "lens": lens})[0], rtol=1e-14)
    attr, delta = ex.attribute((x, lens), baselines={"x": x0}, target=0, return_convergence_delta=True)
    np.testing.assert_allclose(attr["x"] if isinstance(attr, dict) else attr[0], expected, rtol=1e-13, atol=1e-14)
    assert np.abs(delta).max() <= 1e-13
    sal = liftir.Explainer(model, "saliency").attribute((x, lens), target=0)
    np.testing.assert_allclose(sal["x"] if isinstance(sal, dict) else sal[0], np.broadcast_to(W[index], x.shape))


def test_only_index_arithmetic_of_ids_is_held():
    """ids -> Cast(float): read into a gather index (Keras' Embedding: Cast(ids) < 0 picks
    ids + V) it is held with the ids; read into a Where condition it carries the change of
    the condition and stays attributed. Both conserve from a reference with other ids."""
    from onnx import TensorProto as TP, helper
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TP.DOUBLE),
             helper.make_node("Less", ["f", "zero"], ["neg"]), helper.make_node("Cast", ["neg"], ["negi"], to=TP.INT64),
             helper.make_node("Mul", ["negi", "V"], ["shift"]), helper.make_node("Add", ["ids", "shift"], ["index"]),
             helper.make_node("Gather", ["table", "index"], ["emb"], axis=0),  # (N, T, 2)
             helper.make_node("Greater", ["f", "two"], ["big"]), helper.make_node("Unsqueeze", ["big", "last"], ["big3"]),
             helper.make_node("Neg", ["emb"], ["nemb"]), helper.make_node("Where", ["big3", "emb", "nemb"], ["w"]),
             helper.make_node("Flatten", ["w"], ["flat"]), helper.make_node("ReduceSum", ["flat", "axis"], ["y"])]
    table = np.random.default_rng(5).normal(size=(6, 2))
    model = _model(nodes, [helper.make_tensor_value_info("ids", TP.INT64, ["N", 4])],
                   {"zero": np.array(0.0), "two": np.array(2.5), "V": np.array(6), "table": table,
                    "last": np.array([-1]), "axis": np.array([1])})
    ex = liftir.Explainer(model, "deeplift")
    assert sorted(ex.attributed) == ["emb", "f"]  # the condition's Cast, not the index arithmetic's
    ids, ref = np.array([[1, 4, 5, -2], [3, 0, 2, 5]]), np.array([[4, 1, 5, 3]])
    attr, delta = ex.attribute(ids, baselines=ref, target=0, return_convergence_delta=True)
    change = ex.predict(ids)[:, 0] - ex.predict(np.broadcast_to(ref, ids.shape))[:, 0]
    np.testing.assert_allclose(ex.predict(ids), ort.InferenceSession(model.SerializeToString()).run(
        None, {"ids": ids})[0], rtol=1e-14)
    assert np.abs(delta).max() <= 1e-12 * np.abs(change).max()
    assert np.abs(attr["f"]).max() > 0  # the condition switched: part of the difference is its


@pytest.mark.parametrize("method", ["deeplift", "saliency"])
def test_cupy_subset_backend(method):
    """The unrolled Bidirectional LSTM (ReverseSequence, mask casts) on the stand-in for
    CuPy's array module (tests/test_array_api_subset.py): the same numbers as NumPy."""
    from test_array_api_subset import subset_module
    a = _anchors("masking_bilstm")
    x = a["x"]
    reference = _explainer("masking_bilstm", method).attribute(x, baselines=0.0, target=0)
    ex = liftir.Explainer(_path("masking_bilstm"), method)
    ex.xp = subset_module()
    got = ex.attribute(x, baselines=0.0, target=0)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-7)
