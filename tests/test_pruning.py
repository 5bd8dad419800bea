"""Computing only the positions the output reads (liftir/pruning.py).

The rewrite moves a selection of constant positions (a class token's Gather, a last token's,
a Slice) above the ops that compute each position from the same position of their inputs.
Anchors: onnxruntime running the model as written (the pruned graph's forward, by the
rules' own forwards, must equal it), and liftir on the same model with prune=False in
float64, where the rules are the same and only the removed positions are missing, which
have no path to the output: attributions must agree to float64 rounding and conserve. Each
case says how many tensors it shortens, so that a case whose selection silently stops
moving fails; the cases that must not move (a softmax over the selected axis, a second
reader, a MatMul's columns) say 0. The zoo's transformers (timm ViT, HF BERT and GPT-2,
exported as the benchmarks export them) are checked against their own prune=False
attributions, with the tensors their last block must shorten named.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import liftir
from liftir.errors import InputError
from onnx_builders import model, run_ort

N, T, E = 3, 5, 4
RNG = np.random.default_rng(11)


def _w(*shape):
    return RNG.normal(0, 0.7, shape).astype(np.float32)


def _i64(*values):
    return np.array(values, dtype=np.int64)


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


_HEAD = [n("MatMul", ["picked", "w_out"], ["y"])]  # [N, E] -> [N, 3]


def _case(nodes, consts, head=True, x_shape=(N, T, E), out_features=E):
    """x -> nodes -> "picked" [N, out_features] -> a dense head y [N, 3] (or "picked" itself)."""
    consts = dict(consts)
    if head:
        consts["w_out"] = _w(out_features, 3)
        nodes = nodes + _HEAD
    return model(nodes, {"x": x_shape}, ["y" if head else "picked"], consts)


CASES = {
    # elementwise with broadcast constants along the selected axis ([T, 1]) and across it ([E])
    "elementwise": (lambda: _case([
        n("Add", ["x", "b"], ["a"]), n("Mul", ["a", "per_step"], ["m"]), n("Tanh", ["m"], ["t"]),
        n("Greater", ["t", "zero"], ["pos"]), n("Mul", ["t", "tenth"], ["neg"]),
        n("Where", ["pos", "t", "neg"], ["leaky"]), n("Gather", ["leaky", "last"], ["picked"], axis=1)],
        {"b": _w(E), "per_step": _w(T, 1), "zero": np.float32(0), "tenth": np.float32(0.1),
         "last": np.int64(-1)}), 6),
    # a dense layer, LayerNorm and a softmax over the features, a class token's selection
    "dense_norm_softmax": (lambda: _case([
        n("MatMul", ["x", "w1"], ["h"]), n("Add", ["h", "b1"], ["hb"]),
        n("LayerNormalization", ["hb", "gamma", "beta"], ["ln"], axis=-1),
        n("Softmax", ["ln"], ["sm"], axis=-1), n("Gather", ["sm", "first"], ["picked"], axis=1)],
        {"w1": _w(E, 6), "b1": _w(6), "gamma": _w(6), "beta": _w(6), "first": np.int64(0)},
        out_features=6), 4),
    # one attention head: the query's projection, the scores, the softmax and P V keep one row
    "attention": (lambda: _case([
        n("MatMul", ["x", "wq"], ["q"]), n("MatMul", ["x", "wk"], ["k"]), n("MatMul", ["x", "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s"]),
        n("Mul", ["s", "scale"], ["ss"]), n("Softmax", ["ss"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["o"]),
        n("Gather", ["o", "first"], ["picked"], axis=1)],
        {"wq": _w(E, E), "wk": _w(E, E), "wv": _w(E, E), "scale": np.float32(0.5), "first": np.int64(0)}), 5),
    # heads split and merged by constant reshapes, a Transpose of the head axes, two positions
    "reshape_transpose": (lambda: _case([
        n("Reshape", ["x", "heads"], ["xh"]), n("Transpose", ["xh"], ["xt"], perm=[0, 1, 3, 2]),
        n("Relu", ["xt"], ["r"]), n("Reshape", ["r", "merged"], ["xm"]),
        n("Gather", ["xm", "two"], ["g"], axis=1), n("ReduceSum", ["g", "axis1"], ["picked"], keepdims=0)],
        {"heads": _i64(0, T, 2, 2), "merged": _i64(0, T, 4), "two": _i64(0, 3), "axis1": _i64(1)}), 4),
    # the selected axis moved by a Transpose, and reduced away in front of it (keepdims=0)
    "transposed": (lambda: _case([
        n("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), n("Tanh", ["xt"], ["t"]),
        n("Gather", ["t", "two"], ["g"], axis=2), n("ReduceSum", ["g", "axis2"], ["picked"], keepdims=0)],
        {"two": _i64(1, 3), "axis2": _i64(2)}), 2),
    "reduced_before": (lambda: _case([
        n("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), n("ReduceMax", ["xt"], ["mx"], axes=[1], keepdims=0),
        n("Gather", ["mx", "three"], ["picked"], axis=1)],
        {"three": _i64(0, 2, 4)}, out_features=3), 2),
    # a decomposed LayerNorm (opset-14 exports): reductions over the features, kept and dropped
    "reductions": (lambda: _case([
        n("ReduceMean", ["x"], ["mu"], axes=[2], keepdims=1), n("Sub", ["x", "mu"], ["c"]),
        n("Mul", ["c", "c"], ["c2"]), n("ReduceMean", ["c2"], ["var"], axes=[-1], keepdims=1),
        n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["c", "sd"], ["z"]),
        n("ReduceSumSquare", ["z"], ["energy"], axes=[2], keepdims=0),
        n("Gather", ["energy", "mid"], ["picked"], axis=1)],
        {"eps": np.float32(1e-5), "mid": _i64(2, 4)}, head=False), 8),
    # two branches concatenated along the features, a strided Slice of the positions
    "concat_slice": (lambda: _case([
        n("Relu", ["x"], ["r"]), n("Neg", ["x"], ["ng"]), n("Concat", ["r", "ng"], ["cat"], axis=2),
        n("Slice", ["cat", "start", "end", "axis1", "step"], ["sl"]),
        n("ReduceMax", ["sl"], ["picked"], axes=[1], keepdims=0)],
        {"start": _i64(1), "end": _i64(2 ** 62), "axis1": _i64(1), "step": _i64(2)}, out_features=2 * E), 3),
    # Conv1D as dynamo writes it: Reshape to rows, Gemm (transB), Reshape back by shape arithmetic
    "gemm_rows": (lambda: _case([
        n("Reshape", ["x", "flat"], ["rows"]), n("Gemm", ["rows", "w", "b"], ["lin"], transB=1),
        n("Shape", ["x"], ["xs"], start=0, end=2), n("Concat", ["xs", "width"], ["back"], axis=0),
        n("Reshape", ["lin", "back"], ["unflat"]), n("Relu", ["unflat"], ["r"]),
        n("Gather", ["r", "last"], ["picked"], axis=1)],
        {"flat": _i64(-1, 4), "w": _w(6, 4), "b": _w(6), "width": _i64(6), "last": np.int64(-1)},
        x_shape=(N, T, 2, 2), out_features=6), 4),
    # two different tokens read (DeiT's class and distillation heads): their union moves
    "two_selections": (lambda: _case([
        n("MatMul", ["x", "w1"], ["h"]), n("Tanh", ["h"], ["t"]),
        n("Gather", ["t", "first"], ["a"], axis=1), n("Gather", ["t", "third"], ["b"], axis=1),
        n("Add", ["a", "b"], ["picked"])],
        {"w1": _w(E, E), "first": np.int64(0), "third": np.int64(2)}), 2),
    # must not move: the softmax mixes the selected axis; a second reader; a MatMul's columns
    "softmax_over_axis": (lambda: _case([
        n("Softmax", ["x"], ["p"], axis=1), n("Gather", ["p", "first"], ["picked"], axis=1)],
        {"first": np.int64(0)}), 0),
    "second_reader": (lambda: _case([
        n("Relu", ["x"], ["r"]), n("Gather", ["r", "first"], ["g"], axis=1),
        n("ReduceMean", ["r"], ["mean"], axes=[1], keepdims=0), n("Add", ["g", "mean"], ["picked"])],
        {"first": np.int64(0)}), 0),
    "columns": (lambda: _case([
        n("MatMul", ["x", "w1"], ["h"]), n("Gather", ["h", "cols"], ["g"], axis=2),
        n("ReduceSum", ["g", "axis1"], ["picked"], keepdims=0)],
        {"w1": _w(E, 6), "cols": _i64(0, 2, 3, 5), "axis1": _i64(1)}), 0),
}
def _inputs():
    rng = np.random.default_rng(3)
    return rng.normal(0, 1, (N, T, E)).astype(np.float32), rng.normal(0, 0.3, (1, T, E)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_graphs_compute_the_model_and_its_attributions(case):
    build, shortened = CASES[case]
    m = build()
    x, x0 = _inputs()
    x = x.reshape((N,) + tuple(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]))
    x0 = x0.reshape((1,) + x.shape[1:])  # the gemm_rows case's x is [N, T, 2, 2]
    pruned = liftir.Explainer(m, "deeplift", precision="float64")
    whole = liftir.Explainer(m, "deeplift", precision="float64", prune=False)
    assert len(pruned.graph.pruned_tensors) == shortened, sorted(pruned.graph.pruned_tensors)
    assert not whole.graph.pruned_tensors
    (truth,) = run_ort(m, {"x": x})
    np.testing.assert_allclose(liftir.Explainer(m, "deeplift").predict(x), truth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pruned.predict(x), truth, rtol=1e-5, atol=1e-6)
    for target in range(truth.shape[1]):
        a, delta = pruned.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
        b = whole.attribute(x, baselines=x0, target=target)
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale + 1e-300)
        change = pruned.predict(x)[:, target] - pruned.predict(x0)[:, target]
        assert np.abs(delta).max() <= 1e-9 * max(1.0, np.abs(change).max())
    saliency = liftir.Explainer(m, "saliency").attribute(x, target=0)
    np.testing.assert_allclose(saliency, liftir.Explainer(m, "saliency", prune=False).attribute(x, target=0),
                               rtol=1e-5, atol=1e-6 * np.abs(saliency).max())


def test_a_shortened_tensor_named_as_layer_says_how_to_keep_it():
    m = CASES["dense_norm_softmax"][0]()
    x, x0 = _inputs()
    with pytest.raises(InputError, match="prune=False"):
        liftir.Explainer(m, "deeplift").attribute(x, baselines=x0, target=0, layer="ln")
    whole = liftir.Explainer(m, "deeplift", prune=False)
    at_layer, delta = whole.attribute(x, baselines=x0, target=0, layer="ln", return_convergence_delta=True)
    assert at_layer.shape == (N, T, 6) and np.abs(at_layer[:, 1:]).max() == 0  # only the class token reaches y
    assert np.abs(delta).max() < 1e-5


def test_an_output_named_when_the_explainer_is_built_stays_whole():
    m = CASES["dense_norm_softmax"][0]()
    x, _ = _inputs()
    ex = liftir.Explainer(m, "deeplift", output="sm")
    assert "sm" not in ex.graph.pruned_tensors
    assert ex.predict(x).shape == (N, T, 6)


# ---- the zoo's transformers ---------------------------------------------------------------
torch = pytest.importorskip("torch")

#: (exporter, tensors its last block must shorten)
_ZOO = {  # the head's input; the MLP and the attention's softmax of the last block
    "deit": ("ts17", ["/norm/LayerNormalization_output_0", "/blocks/blocks.1/mlp/fc1/MatMul_output_0"]),
    "vit": ("ts17", ["/norm/LayerNormalization_output_0", "/blocks/blocks.1/mlp/fc1/MatMul_output_0",
                     "/blocks/blocks.1/attn/Softmax_output_0"]),
    "bert": ("dynamo", ["layer_norm_4", "gelu_1", "scaled_dot_product_attention_1"]),
    "gpt2": ("dynamo", ["linear", "layer_norm_4", "tanh_1", "addmm_6", "scaled_dot_product_attention_1"]),
}


@pytest.mark.parametrize("name", sorted(_ZOO))
def test_the_zoo_transformers_last_block_runs_on_its_token(name):
    zt = pytest.importorskip("zoo_transformers")
    how, names = _ZOO[name]
    spec = zt.MODELS[name]
    _, m = zt.exported(name, how)
    feeds = {k: v.numpy() for k, v in zip(spec.input_names(), spec.inputs(4, seed=2))}
    first = spec.input_names()[0]
    baselines = {first: np.zeros_like(feeds[first][:1])}  # [PAD] ids, or a black image
    pruned, whole = liftir.Explainer(m, "deeplift"), liftir.Explainer(m, "deeplift", prune=False)
    missing = [t for t in names if t not in pruned.graph.pruned_tensors]
    assert not missing, (missing, sorted(pruned.graph.pruned_tensors))
    a, delta = pruned.attribute(feeds if spec.text else feeds[first], baselines=baselines if spec.text else
                                baselines[first], target=1, return_convergence_delta=True)
    b = whole.attribute(feeds if spec.text else feeds[first], baselines=baselines if spec.text else
                        baselines[first], target=1)
    a, b = (np.concatenate([np.ravel(v) for v in (r.values() if isinstance(r, dict) else [r])]) for r in (a, b))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    change = np.abs(pruned.predict(feeds if spec.text else feeds[first])).max()
    assert np.abs(delta).max() <= 1e-4 * max(1.0, change)
