"""The compiled engine on the architecture zoo's transformers and recurrent nets.

Every transformer / recurrent model of tests/test_architectures.py (timm ViT, DeiT,
ConvNeXt, MLP-Mixer, Swin; torch MultiheadAttention; Hugging Face BERT, GPT-2 and Llama
from token ids, attributed at their embeddings; LSTM / GRU, uni- and bidirectional; the
Enformer-style conv + attention net) runs DeepLIFT with ``engine="compiled"`` as one ONNX
graph, with no pass left to the interpreter, and gives the interpreter's attributions (to
1e-5 of the largest, float32) with summation-to-delta against onnxruntime's own
f(x) - f(x0). The models and exports are test_architectures.py's (built once per session).

To stay within about a minute on two cores, every architecture runs at one export (the
TorchScript exporter at opset 17) and a representative few at the others: opset 14
(LayerNorm written out as ReduceMean / Pow / Sqrt / Div) for ViT, BERT, GPT-2 and the
bidirectional LSTM, and the dynamo exporter (its Where / GatherND / Expand idioms) for ViT,
Swin, ConvNeXt, BERT, GPT-2, GRU and the Enformer-style net. Saliency, integrated gradients
and RevealCancel are checked on a few models at opset 17.
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import liftir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_architectures as ta  # noqa: E402 - skips with it (timm, transformers, captum)

REL = 1e-5  # compiled against the interpreter, relative to the largest attribution
DELTA = ta.DL32_TOL  # summation-to-delta, relative to max |f(x) - f(x0)| (float32)

TRANSFORMERS = ["vit", "deit", "convnext", "mixer", "swin", "torch_mha", "bert", "gpt2", "llama"]
RECURRENT = ["lstm", "lstm_bi", "gru", "gru_bi", "enformer_small"]
CASES = ([(name, "ts17") for name in TRANSFORMERS + RECURRENT]
         + [(name, "ts14") for name in ("vit", "bert", "gpt2", "lstm_bi")]
         + [(name, "dynamo") for name in ("vit", "swin", "convnext", "bert", "gpt2", "gru", "enformer_small")])


def _engines(ex):
    """The compiled engines of an Explainer and of the cut Explainers it delegates to
    (integrated gradients of a token-id model walks its path at the embeddings)."""
    yield ex._compiled
    for inner in ex._cuts.values():
        yield from _engines(inner)


def _assert_all_compiled(ex, records):
    passes = [p for engine in _engines(ex) for p in engine.passes.values()]
    reasons = [r for engine in _engines(ex) for r in engine.reasons.values()]
    assert passes and all(p is not None for p in passes), reasons
    fallbacks = [r.getMessage() for r in records if "cannot compile" in r.getMessage()]
    assert not fallbacks, fallbacks


def _inputs(name):
    """(feeds, baselines, the argument forms attribute takes) for one zoo architecture."""
    arch = ta.ARCHS[name]
    _, feeds = ta._feeds(arch, 2, seed=3)
    base = ta._reference(arch, feeds)
    if arch.embedding is None:
        return feeds, base, feeds["input"], base["input"]
    return feeds, base, feeds, base


def _attributions(ex, result):
    """The attributions as a list of arrays, one per attributed tensor."""
    if isinstance(result, dict):
        return [result[k] for k in ex.attributed if k in result]
    return [result]


def _output_change(proto, feeds, base, target):
    """f(x) - f(x0) from onnxruntime; integer inputs the baselines leave out (the attention
    mask) keep each sample's value."""
    ref = {**feeds, **{k: np.broadcast_to(v, feeds[k].shape) for k, v in base.items()}}
    return ta._ort(proto, feeds)[:, target] - ta._ort(proto, ref)[:, target]


@pytest.mark.parametrize("name,how", CASES)
def test_compiled_deeplift_equals_the_interpreter_on_the_zoo(name, how, caplog):
    proto = ta.exported(name, how)
    feeds, base, args, baselines = _inputs(name)
    target = ta._target(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = liftir.Explainer(proto, "deeplift")
        want, want_delta = interp.attribute(args, baselines=baselines, target=target, return_convergence_delta=True)
        with caplog.at_level(logging.WARNING, logger="liftir"):
            comp = liftir.Explainer(proto, "deeplift", engine="compiled")
            got, delta = comp.attribute(args, baselines=baselines, target=target, return_convergence_delta=True)
    _assert_all_compiled(comp, caplog.records)
    want, got = _attributions(interp, want), _attributions(comp, got)
    assert len(got) == len(want)
    scale = max(float(np.abs(w).max()) for w in want)
    for w, g in zip(want, got):
        assert w.shape == g.shape and g.dtype == np.float32
        assert float(np.abs(w - g).max()) <= REL * scale
    # summation-to-delta against onnxruntime's forward, from the attributions themselves
    diff = _output_change(proto, feeds, base, target).astype(np.float64)
    total = sum(g.astype(np.float64).reshape(g.shape[0], -1).sum(axis=1) for g in got)
    tol = DELTA * float(np.abs(diff).max())
    assert float(np.abs(total - diff).max()) <= tol
    assert float(np.abs(delta).max()) <= tol and float(np.abs(delta - want_delta).max()) <= tol


@pytest.mark.parametrize("name,method", [(name, method) for name in ["vit", "bert", "gru_bi", "enformer_small"]
                                         for method in ["saliency", "integrated_gradients", "deeplift_revealcancel"]]
                         + [("llama", "deeplift_revealcancel")])
def test_other_compiled_methods_equal_the_interpreter(name, method, caplog):
    proto = ta.exported(name, "ts17")
    _, _, args, baselines = _inputs(name)
    target = ta._target(name)
    kwargs = {"n_steps": ta.STEPS} if method == "integrated_gradients" else {}
    if method != "saliency":
        kwargs["baselines"] = baselines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = liftir.Explainer(proto, method)
        want = _attributions(interp, interp.attribute(args, target=target, **kwargs))
        with caplog.at_level(logging.WARNING, logger="liftir"):
            comp = liftir.Explainer(proto, method, engine="compiled")
            got = _attributions(comp, comp.attribute(args, target=target, **kwargs))
    _assert_all_compiled(comp, caplog.records)
    scale = max(float(np.abs(w).max()) for w in want)
    for w, g in zip(want, got):
        assert float(np.abs(w - g).max()) <= REL * scale


def _softmax_mask_graph(mask_value):
    """x (N, 4, 6) plus a mask computed from x itself (keys masked where x[:, 0] < -0.5),
    then a Softmax op (not written out): a mask that differs between input and reference."""
    rng = np.random.default_rng(2)
    consts = {"neg": np.array(mask_value, np.float32), "zero": np.array(0.0, np.float32),
              "thr": np.array(-0.5, np.float32), "row": np.array(0, np.int64), "ax1": np.array([1], np.int64),
              "head": rng.standard_normal((24, 3)).astype(np.float32), "flat": np.array([-1, 24], np.int64)}
    nodes = [helper.make_node("Gather", ["x", "row"], ["first"], axis=1, name="first_row"),
             helper.make_node("Less", ["first", "thr"], ["c"], name="below"),
             helper.make_node("Where", ["c", "neg", "zero"], ["m2"], name="mask_where"),
             helper.make_node("Unsqueeze", ["m2", "ax1"], ["mask"], name="mask_unsqueeze"),
             helper.make_node("Add", ["x", "mask"], ["s"], name="add_mask"),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1, name="attention_softmax"),
             helper.make_node("Mul", ["a", "x"], ["ax"], name="weigh"),
             helper.make_node("Reshape", ["ax", "flat"], ["h"], name="flatten"),
             helper.make_node("MatMul", ["h", "head"], ["y"], name="head_matmul")]
    graph = helper.make_graph(nodes, "switched_softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mask_value", [-np.inf, float(np.finfo(np.float32).min)])
def test_compiled_softmax_where_the_interpreter_refuses_a_switched_mask(mask_value):
    """The interpreter refuses a Softmax whose input is masked in one pass only (no
    multiplier carries an infinite or finfo.min change). A compiled pass has no values to
    refuse on: it gives those rows no multipliers (finite attributions, never NaN), and the
    ConvergenceWarning of the missed delta quotes the interpreter's refusal by node name."""
    from liftir.diagnostics import ConvergenceWarning
    from liftir.errors import RuleError
    model = _softmax_mask_graph(mask_value)
    x = np.random.default_rng(3).standard_normal((3, 4, 6)).astype(np.float32)
    x[:, 0, :3] = -1.0  # keys 0-2 masked in the input, not in the reference (x0 = 0)
    x[:, 0, 3:] = np.abs(x[:, 0, 3:])  # the others in neither
    x0 = np.zeros((1, 4, 6), np.float32)
    with pytest.raises(RuleError, match="Softmax node 'attention_softmax'.*masked"):
        liftir.Explainer(model).attribute(x, baselines=x0, target=1)
    ex = liftir.Explainer(model, engine="compiled")
    with pytest.warns(ConvergenceWarning, match="attention_softmax"):
        attr, delta = ex.attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    assert all(p is not None for p in ex._compiled.passes.values()) and ex._compiled.passes
    assert np.isfinite(attr).all() and np.isfinite(delta).all()
    # a mask equal in both passes is no refusal: the compiled pass conserves
    x_same = x.copy()
    x0_same = np.broadcast_to(x0, x.shape).copy()
    x0_same[:, 0, :3] = -1.0
    attr, delta = ex.attribute(x_same, baselines=x0_same, target=1, return_convergence_delta=True)
    want = liftir.Explainer(model).attribute(x_same, baselines=x0_same, target=1)
    assert np.abs(attr - want).max() <= REL * np.abs(want).max()
    assert np.abs(delta).max() <= 1e-5 * max(1.0, float(np.abs(attr).sum(axis=(1, 2)).max()))
