"""DeepLIFT-SHAP with each sample's own references (N, B, ...): dinucleotide shuffles."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.genomics import dinucleotide_shuffle, one_hot_encode
from liftir.memory import MemoryBudgetWarning


def _dna_model(length=30):
    """One-hot (N, L, 4) -> Conv1d over (N, 4, L) -> ReLU -> global max -> score."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 5)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32) * 0.1
    v = rng.standard_normal((6, 1)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["xt", "w", "b"], ["c"], kernel_shape=[5], pads=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalMaxPool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "v"], ["y"])]
    graph = helper.make_graph(nodes, "dna", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", length, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (v, "v"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_own_references_equal_one_sample_at_a_time():
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGT"), 30)) for _ in range(5)]
    x = one_hot_encode(seqs)
    refs = dinucleotide_shuffle(x, n_shuffles=4, seed=0)  # (N, B, L, 4)
    ex = liftir.Explainer(_dna_model(), "deeplift_shap")
    attr, delta = ex.attribute(x, baselines=refs, return_convergence_delta=True)
    one_by_one = np.concatenate([ex.attribute(x[i:i + 1], baselines=refs[i]) for i in range(len(x))])
    np.testing.assert_allclose(attr, one_by_one, rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() < 1e-5
    # batching keeps each sample with its own references
    np.testing.assert_allclose(ex.attribute(x, baselines=refs, batch_size=2), attr, rtol=1e-6, atol=1e-7)
    # and it is the mean of plain DeepLIFT over the references
    plain = liftir.Explainer(_dna_model())
    mean = np.mean([plain.attribute(x, baselines=refs[:, b]) for b in range(refs.shape[1])], axis=0)
    np.testing.assert_allclose(attr, mean, rtol=1e-5, atol=1e-6)


def test_pair_multipliers_are_each_pairs_deeplift():
    """Explainer.pair_multipliers: the multipliers of every (sample, reference) pair, which
    DeepLIFT-SHAP averages and TF-MoDISco's hypothetical scores need one by one."""
    rng = np.random.default_rng(2)
    x = one_hot_encode(["".join(rng.choice(list("ACGT"), 30)) for _ in range(4)])
    refs = dinucleotide_shuffle(x, n_shuffles=3, seed=1)  # (N, B, L, 4)
    model = _dna_model()
    ex = liftir.Explainer(model, "deeplift_shap")
    m, diff = ex.pair_multipliers(x, refs)
    assert m.shape == refs.shape and m.dtype == np.float32 and diff.shape == (4, 3) and diff.dtype == np.float64
    # the explained differences are onnxruntime's f(x) - f(r_b)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fx = session.run(None, {"x": x})[0][:, 0].astype(np.float64)
    fr = session.run(None, {"x": refs.reshape(-1, 30, 4)})[0][:, 0].astype(np.float64).reshape(4, 3)
    np.testing.assert_allclose(diff, fx[:, None] - fr, rtol=1e-5, atol=1e-6)
    # summation-to-delta holds for every pair
    sums = (m.astype(np.float64) * (x[:, None] - refs)).reshape(4, 3, -1).sum(axis=2)
    assert np.abs(sums - diff).max() < 1e-5
    # each pair is plain DeepLIFT with that reference; their mean times (x - r) is DeepLIFT-SHAP
    plain = liftir.Explainer(model)
    for b in range(3):
        np.testing.assert_allclose(m[:, b], plain.attribute(x, refs[:, b], multiply_by_inputs=False),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((m * (x[:, None] - refs)).mean(axis=1), ex.attribute(x, refs), rtol=1e-5, atol=1e-6)
    # the passes (batch_size, memory budget) never change the numbers; shared references too
    for options in ({"batch_size": 2}, {"max_memory": None}, {"max_memory": 1}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoryBudgetWarning)  # max_memory=1: one pair per pass
            m2, d2 = ex.pair_multipliers(x, refs, **options)
        np.testing.assert_allclose(m2, m, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d2, diff, rtol=1e-6, atol=1e-7)
    shared, shared_diff = ex.pair_multipliers(x, refs[0])
    np.testing.assert_allclose(shared[0], m[0], rtol=1e-6, atol=1e-7)
    assert shared.shape == (4,) + refs.shape[1:] and shared_diff.shape == (4, 3)
    with pytest.raises(liftir.InputError, match="pair_multipliers needs method"):
        liftir.Explainer(model, "saliency").pair_multipliers(x, refs)
