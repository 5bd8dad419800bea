"""DeepLIFT-SHAP with each sample's own references (N, B, ...): dinucleotide shuffles."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import liftir
from liftir.genomics import dinucleotide_shuffle, one_hot_encode


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
