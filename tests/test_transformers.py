"""Real transformer exports: the batch axis wherever the exporter puts it, token-id inputs.

Models come from tests/zoo_transformers.py (timm and transformers code, random weights),
exported once per session. Anchors nobody here wrote: saliency equals torch.autograd on
the same module, integrated gradients equals Captum in float64, DeepLIFT conserves
f(x) - f(x0) as onnxruntime computes it. tests/zoo_transformers.py keeps test-only
gradient rules for ops a registry might lack (`stand_in_rules`); liftir's registry serves
LayerNormalization, Where and Div itself now, so they stand in for nothing here.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime
import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("timm") is None:  # installed with --no-deps (see .ci/run)
    pytest.skip("timm is not installed: pip install --no-deps timm", allow_module_level=True)

import liftir  # noqa: E402
from liftir.errors import BatchAxisError, RuleError  # noqa: E402
from liftir.registry import lookup  # noqa: E402

import zoo_transformers as zt  # noqa: E402

IMAGE_CASES = [("vit", "ts17"), ("swin", "ts17"), ("mixer", "ts17"), ("convnext", "ts17"), ("torch_mha", "ts14"),
               ("torch_mha", "dynamo")]
TEXT_CASES = [("bert", "ts17"), ("gpt2", "ts17"), ("bert", "dynamo"), ("gpt2", "dynamo"), ("llama", "ts17")]


def exported(name: str, how: str):
    return zt.exported(name, how)  # shared with tests/test_architectures.py


def _ort(proto, feeds):
    return onnxruntime.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]


def _missing_deeplift_rules(proto) -> list[str]:
    ops = {n.op_type for n in proto.graph.node}
    return sorted(op for op in ops & {"LayerNormalization", "Where"}
                  if lookup(op, "", 17) is None or not lookup(op, "", 17).supports("deeplift"))


@pytest.mark.parametrize("name,how", IMAGE_CASES)
def test_saliency_equals_autograd_wherever_the_batch_moves(name, how):
    model, proto = exported(name, how)
    x = zt.MODELS[name].inputs(3, seed=1)[0]
    ex = liftir.Explainer(proto, method="saliency", rules=zt.stand_in_rules())
    got = ex.attribute(x.numpy(), target=1)
    xt = x.clone().requires_grad_(True)
    model(xt)[:, 1].sum().backward()
    want = xt.grad.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_integrated_gradients_equal_captum_float64_on_vit():
    from captum.attr import IntegratedGradients
    model, proto = exported("vit", "ts17")
    x = zt.MODELS["vit"].inputs(2, seed=2)[0]
    ex = liftir.Explainer(proto, method="integrated_gradients", rules=zt.stand_in_rules())
    got = ex.attribute(x.numpy(), target=3, n_steps=16)
    want = IntegratedGradients(zt.build("vit").double()).attribute(
        x.double(), target=3, n_steps=16, method="gausslegendre").numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


IMAGE_MODELS = ("vit", "deit", "convnext", "mixer", "swin")


@pytest.mark.parametrize("how", zt.EXPORTS)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_deeplift_conserves_on_moved_batch_axes(name, how):
    """DeepLIFT with liftir's own LayerNormalization, Where, Div and attention rules, on every
    image architecture and exporter: summation-to-delta against onnxruntime's f(x) - f(x0)
    to 1e-4 relative in float32 and 1e-9 in float64 (measured: <= 6.3e-6 and <= 1.9e-14)."""
    model, proto = exported(name, how)
    missing = _missing_deeplift_rules(proto)
    assert not missing, f"no DeepLIFT rule in liftir's registry for {missing}"
    x = zt.MODELS[name].inputs(2, seed=3)[0].numpy()
    x0 = 0.1 * zt.MODELS[name].inputs(1, seed=4)[0].numpy()
    diff = _ort(proto, {"input": x})[:, 2] - _ort(proto, {"input": x0})[0, 2]
    scale = np.abs(diff).max()
    ex = liftir.Explainer(proto)
    attr, delta = ex.attribute(x, baselines=x0, target=2, return_convergence_delta=True)
    assert np.abs(attr.reshape(2, -1).sum(1) - diff).max() <= 1e-4 * scale
    assert np.abs(delta).max() <= 1e-4 * scale
    ex64 = liftir.Explainer(proto, precision="float64")
    attr64, delta64 = ex64.attribute(x.astype(np.float64), baselines=x0.astype(np.float64), target=2,
                                     return_convergence_delta=True)
    assert np.abs(delta64).max() <= 1e-9 * scale
    np.testing.assert_allclose(attr, attr64, atol=1e-4 * np.abs(attr64).max())  # float32 tracks float64


def test_layer_attribution_of_a_moved_tensor_comes_back_samples_first():
    """torch MHA's (L, N, E) layout: the layer's saliency is (N, L, E), each sample's own."""
    model, proto = exported("torch_mha", "ts14")
    x = zt.MODELS["torch_mha"].inputs(3, seed=5)[0]
    ex = liftir.Explainer(proto, method="saliency")
    layer = next(n.output[0] for n in proto.graph.node if n.op_type == "Transpose")
    got = ex.attribute(x.numpy(), target=0, layer=layer)
    store = {}

    def keep(module, args, out):
        out.retain_grad()
        store["h"] = out

    handle = model.embed.register_forward_hook(keep)
    model(x)[:, 0].sum().backward()
    handle.remove()
    want = store["h"].grad.numpy()  # (N, L, E): the embedding before the transpose to (L, N, E)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _text_feeds(n, seed):
    ids, mask = zt.MODELS["bert"].inputs(n, seed=seed)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


@pytest.mark.parametrize("name,how", TEXT_CASES)
def test_token_ids_are_held_and_saliency_is_at_the_embedding(name, how):
    model, proto = exported(name, how)
    feeds = _text_feeds(3, seed=6)
    ex = liftir.Explainer(proto, method="saliency", rules=zt.stand_in_rules())
    word = ex.attributed[0]
    assert ex.graph.nodes[ex.graph.producer[word]].op_type == "Gather"  # the word-embedding lookup comes first
    got = ex.attribute(feeds, target=1)
    assert set(got) == set(ex.attributed)
    emb = model.model.get_input_embeddings()
    store = {}

    def keep(module, args, out):
        out.retain_grad()
        store["e"] = out

    handle = emb.register_forward_hook(keep)
    model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))[:, 1].sum().backward()
    handle.remove()
    want = store["e"].grad.numpy()
    assert np.abs(got[word] - want).max() <= 1e-4 * np.abs(want).max()


# every exporter on BERT and GPT-2; Llama's exports differ from GPT-2's in their rotary Sin/Cos of
# (static) positions only, so one (its dynamo export, 8 s, also conserves: <= 3.3e-7, 6.2e-16)
MASKED_CASES = [(name, how) for name in ("bert", "gpt2") for how in zt.EXPORTS] + [("llama", "ts17")]


def _pad_reference(feeds):
    """The reference rows onnxruntime sees: all-[PAD] ids (0) under each sample's own mask."""
    return {"input_ids": np.zeros_like(feeds["input_ids"]), "attention_mask": feeds["attention_mask"]}


@pytest.mark.parametrize("name,how", MASKED_CASES)
def test_deeplift_conserves_through_attention_masks(name, how):
    """BERT (a padded sample: its mask adds -inf / finfo.min to two keys), GPT-2 (causal and
    padding masks, learned positions) and Llama (rotary positions, grouped-query attention),
    every exporter: DeepLIFT from all-[PAD] ids, the attention mask held at each sample's
    own, conserves f(ids) - f(pad) as onnxruntime computes it to 1e-4 relative in float32
    and 1e-9 in float64 (measured: <= 6.4e-7 and <= 1.9e-15), with no NaN; the mask
    tensors, equal in both passes, get exactly nothing."""
    model, proto = exported(name, how)
    feeds = _text_feeds(3, seed=13)
    assert not feeds["attention_mask"][0].all()  # sample 0 is padded
    diff = _ort(proto, feeds)[:, 2] - _ort(proto, _pad_reference(feeds))[:, 2]
    scale = np.abs(diff).max()
    pad = {"input_ids": np.zeros((1, zt.SEQ), np.int64)}
    for precision, rtol in (("model", 1e-4), ("float64", 1e-9)):
        ex = liftir.Explainer(proto, precision=precision)
        attr, delta = ex.attribute(feeds, baselines=pad, target=2, return_convergence_delta=True)
        assert all(np.isfinite(a).all() for a in attr.values())
        word, *masks = ex.attributed
        assert masks and not any(attr[m].any() for m in masks)
        assert np.abs(delta).max() <= rtol * scale
        if precision == "model":  # float64 computes its own forward, ~1e-6 from onnxruntime's float32
            assert np.abs(attr[word].reshape(3, -1).sum(1) - diff).max() <= 1e-4 * scale


@pytest.mark.parametrize("name,how", [("bert", "ts17"), ("gpt2", "ts17"), ("llama", "ts17")])
def test_revealcancel_conserves_through_minus_inf_masks(name, how):
    """RevealCancel's split of each difference into d+ and d- meets the -inf masks too. On
    Llama it also meets an Expand to the stacked rows' count (its rotary positions) and
    RMSNorm's Sqrt, whose split points leave the domain (see test_revealcancel.py)."""
    _, proto = exported(name, how)
    feeds = _text_feeds(3, seed=16)
    scale = np.abs(_ort(proto, feeds)[:, 0] - _ort(proto, _pad_reference(feeds))[:, 0]).max()
    pad = {"input_ids": np.zeros((1, zt.SEQ), np.int64)}
    for precision, rtol in (("model", 1e-4), ("float64", 1e-9)):
        attr, delta = liftir.Explainer(proto, method="deeplift_revealcancel", precision=precision).attribute(
            feeds, baselines=pad, target=0, return_convergence_delta=True)
        assert all(np.isfinite(a).all() for a in attr.values())
        assert np.abs(delta).max() <= rtol * scale


@pytest.mark.parametrize("name,how", [("bert", "ts17"), ("gpt2", "dynamo")])
def test_liftir_check_conserves_node_by_node_through_attention_masks(name, how):
    """`liftir check` (random multipliers at every output neuron, each node's own
    summation-to-delta) on id models: summed over the embeddings the ids are attributed at."""
    from liftir.check import check_model
    _, proto = exported(name, how)
    report = check_model(proto, _text_feeds(3, seed=15), {"input_ids": np.zeros((1, zt.SEQ), np.int64)})
    assert report.ok, report.failures


def test_an_attention_mask_that_differs_from_the_reference_is_refused_by_node_name():
    """A key masked in the input but not in the reference: the scores differ by -inf, which
    no multiplier carries; the Softmax rule says so instead of returning NaN."""
    _, proto = exported("bert", "ts17")
    feeds = _text_feeds(2, seed=14)
    reference = {"input_ids": np.zeros((1, zt.SEQ), np.int64), "attention_mask": np.ones((1, zt.SEQ), np.int64)}
    with pytest.raises(RuleError, match="Softmax node .*attention mask that differs"):
        liftir.Explainer(proto).attribute(feeds, baselines=reference, target=0)


@pytest.fixture(scope="module")
def bag():
    return zt.bag_of_embeddings()


def test_deeplift_on_ids_conserves_f_ids_minus_f_reference_ids(bag):
    model, proto = bag
    ids = np.random.default_rng(0).integers(1, 20, (4, 5))
    pad = np.zeros((1, 5), np.int64)
    ex = liftir.Explainer(proto)
    attr, delta = ex.attribute(ids, baselines=pad, target=2, return_convergence_delta=True)
    (name,) = ex.attributed
    diff = _ort(proto, {"ids": ids})[:, 2] - _ort(proto, {"ids": pad})[0, 2]
    assert attr[name].shape == (4, 5, 6)
    np.testing.assert_allclose(attr[name].reshape(4, -1).sum(1), diff, rtol=1e-5, atol=1e-5)
    assert np.abs(delta).max() < 1e-5
    # without a reference for the ids they are held at their actual value: nothing changes
    held = ex.attribute(ids, target=2)
    assert np.abs(held[name]).max() == 0


def test_layer_names_any_float_tensor_of_an_id_model(bag):
    model, proto = bag
    ids = np.random.default_rng(1).integers(1, 20, (3, 5))
    ex = liftir.Explainer(proto)
    hidden = next(n.output[0] for n in proto.graph.node if n.op_type == "ReduceMean")
    attr, delta = ex.attribute(ids, baselines=np.zeros((1, 5), np.int64), target=0, layer=hidden,
                               return_convergence_delta=True)
    assert attr.shape == (3, 6)
    assert np.abs(delta).max() < 1e-5


def test_an_op_that_mixes_samples_is_refused_by_node_name():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="to_columns", perm=[1, 0]),
             helper.make_node("MatMul", ["xt", "x"], ["y"], name="gram_over_batch")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(BatchAxisError, match="gram_over_batch"):  # when the Explainer is built
        liftir.Explainer(m, method="saliency")


def test_shape_of_a_static_tensor_in_float64():
    """The rules' forward (float64) evaluates Shape of folded/static tensors (was a KeyError)."""
    model, proto = exported("vit", "ts17")
    x = zt.MODELS["vit"].inputs(2, seed=7)[0]
    ex = liftir.Explainer(proto, method="saliency", rules=zt.stand_in_rules(), precision="float64")
    got = ex.attribute(x.numpy(), target=1)
    xt = x.double().clone().requires_grad_(True)
    zt.build("vit").double()(xt)[:, 1].sum().backward()
    want = xt.grad.numpy()
    # the export stores float32 constants (e.g. attention's 1/sqrt(d)): agreement to ~1e-8 of the max
    assert got.dtype == np.float64
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("how", ["ts14", "dynamo"])
def test_deeplift_on_torch_attention_with_the_batch_on_axis_1(how):
    """nn.MultiheadAttention computes in (L, N, E) and (N*heads, L, d): every op has a DeepLIFT
    rule, so conservation is checked against onnxruntime and node by node (liftir check)."""
    from liftir.check import check_model
    _, proto = exported("torch_mha", how)
    x = zt.MODELS["torch_mha"].inputs(3, seed=8)[0].numpy()
    x0 = 0.3 * zt.MODELS["torch_mha"].inputs(1, seed=9)[0].numpy()
    attr, delta = liftir.Explainer(proto).attribute(x, baselines=x0, target=1, return_convergence_delta=True)
    diff = _ort(proto, {"input": x})[:, 1] - _ort(proto, {"input": x0})[0, 1]
    assert np.abs(diff).min() > 1e-3  # a difference worth conserving
    assert np.abs(attr.reshape(3, -1).sum(1) - diff).max() <= 1e-5 * (1 + np.abs(diff).max())
    assert np.abs(delta).max() <= 1e-5 * (1 + np.abs(diff).max())
    assert check_model(proto, samples=3).ok


def test_deeplift_shap_and_revealcancel_where_the_batch_moved():
    """DeepLIFT-SHAP's pairs are expanded along the moved batch axis: it equals the mean of
    DeepLIFT over each reference; RevealCancel conserves."""
    _, proto = exported("torch_mha", "ts14")
    spec = zt.MODELS["torch_mha"]
    x = spec.inputs(2, seed=10)[0].numpy()
    refs = 0.5 * spec.inputs(3, seed=11)[0].numpy()
    shap, delta = liftir.Explainer(proto, method="deeplift_shap").attribute(
        x, baselines=refs, target=0, return_convergence_delta=True)
    single = liftir.Explainer(proto)
    mean = np.mean([single.attribute(x, baselines=r, target=0) for r in refs], axis=0)
    np.testing.assert_allclose(shap, mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
    assert np.abs(delta).max() < 1e-5
    rc, delta = liftir.Explainer(proto, method="deeplift_revealcancel", precision="float64").attribute(
        x, baselines=refs[0], target=0, return_convergence_delta=True)
    assert np.abs(delta).max() < 1e-9


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_opset14_exports_in_float64_load_and_match_autograd(name):
    """Opset 14 spells LayerNorm out (ReduceMean, Pow, Sqrt, Div by an activation): these
    exports used to raise raw KeyErrors (Shape of a folded or static tensor) and, in float64,
    mixed float32 casts into the static shape arithmetic. A test-only gradient Div stands in
    for division by an activation."""
    model, proto = exported(name, "ts14")
    spec = zt.MODELS[name]
    x = spec.inputs(2, seed=12)
    rules = {**zt.stand_in_rules(), "Div": zt.gradient_div()}
    ex = liftir.Explainer(proto, method="saliency", rules=rules, precision="float64")
    model = model.double()
    try:
        if spec.text:
            got = ex.attribute({"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()}, target=1)[ex.attributed[0]]
            store = {}
            handle = model.model.bert.embeddings.word_embeddings.register_forward_hook(
                lambda m, a, out: (out.retain_grad(), store.update(e=out)) and None)
            model(*x)[:, 1].sum().backward()
            handle.remove()
            want = store["e"].grad.numpy()
        else:
            got = ex.attribute(x[0].numpy(), target=1)
            xt = x[0].double().clone().requires_grad_(True)
            model(xt)[:, 1].sum().backward()
            want = xt.grad.numpy()
    finally:
        model.float()
    assert got.dtype == np.float64
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
