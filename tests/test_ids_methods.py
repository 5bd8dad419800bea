"""Integrated gradients and DeepLIFT-SHAP of models with integer (token-id) inputs.

Ids have no path between them: integrated gradients walks the path between the
reference's and the actual embeddings (the model cut there, liftir/cut.py), the other
inputs held at their actual values, which is what Captum's LayerIntegratedGradients on the
embedding layer computes; checked against it in float64. DeepLIFT-SHAP averages DeepLIFT
over reference id sets: checked against its own definition, and it conserves.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import liftir

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("transformers")

import zoo_transformers as zt  # noqa: E402


@pytest.fixture(scope="module")
def bag():
    return zt.bag_of_embeddings()


def test_integrated_gradients_on_ids_equal_captum_layer_integrated_gradients(bag):
    model, proto = bag
    rng = np.random.default_rng(0)
    ids, pad = rng.integers(1, 20, (4, 5)), np.zeros((1, 5), np.int64)
    ex = liftir.Explainer(proto, "integrated_gradients", precision="float64")
    ours, delta = ex.attribute(ids, baselines=pad, target=2, n_steps=24, return_convergence_delta=True)
    assert list(ours) == ex.attributed and ours[ex.attributed[0]].shape == (4, 5, 6)
    double = zt.BagOfEmbeddings().double().eval()
    double.load_state_dict(model.state_dict())
    lig = captum_attr.LayerIntegratedGradients(double, double.emb)
    theirs, their_delta = lig.attribute(torch.tensor(ids), baselines=torch.tensor(np.repeat(pad, 4, 0)), target=2,
                                        n_steps=24, method="gausslegendre", return_convergence_delta=True)
    # Captum rounds its quadrature weights to float32 (`torch.tensor(step_sizes).float()`)
    np.testing.assert_allclose(ours[ex.attributed[0]], theirs.numpy(), rtol=1e-6, atol=1e-7 * theirs.abs().max().item())
    np.testing.assert_allclose(delta, their_delta.numpy(), atol=1e-6)
    # no reference for the ids: they are held at their actual values, and nothing moves
    assert np.abs(ex.attribute(ids, target=2, n_steps=4)[ex.attributed[0]]).max() == 0


def test_deeplift_shap_on_ids_is_the_mean_of_deeplift_over_reference_id_sets(bag):
    _, proto = bag
    rng = np.random.default_rng(1)
    ids, refs = rng.integers(1, 20, (4, 5)), rng.integers(0, 20, (3, 5))
    shap = liftir.Explainer(proto, "deeplift_shap")
    got, delta = shap.attribute(ids, baselines=refs, target=1, return_convergence_delta=True)
    (name,) = shap.attributed
    deeplift = liftir.Explainer(proto)
    want = np.mean([deeplift.attribute(ids, baselines=refs[j:j + 1], target=1)[name] for j in range(3)], axis=0)
    np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)
    f = deeplift.predict
    expected = f(ids)[:, 1] - f(refs)[:, 1].mean()
    np.testing.assert_allclose(got[name].reshape(4, -1).sum(1), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(delta).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_integrated_gradients_on_bert_ids_equal_captum_at_the_word_embeddings():
    model = zt.build("bert").eval()
    proto = zt.export(model, zt.MODELS["bert"], "ts17")
    ids, mask = zt.MODELS["bert"].inputs(2, seed=3)
    pad = torch.zeros_like(ids)
    ex = liftir.Explainer(proto, "integrated_gradients", precision="float64")
    ours, delta = ex.attribute({"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                               baselines={"input_ids": pad.numpy()}, target=1, n_steps=8,
                               return_convergence_delta=True)
    word = ex.attributed[0]
    double = zt.build("bert").double().eval()
    double.load_state_dict(model.state_dict())
    lig = captum_attr.LayerIntegratedGradients(double, double.model.bert.embeddings.word_embeddings)
    theirs, their_delta = lig.attribute(ids, baselines=pad, target=1, n_steps=8, method="gausslegendre",
                                        additional_forward_args=(mask,), return_convergence_delta=True)
    theirs = theirs.numpy()
    np.testing.assert_allclose(ours[word], theirs, rtol=1e-6, atol=1e-6 * np.abs(theirs).max())
    np.testing.assert_allclose(delta, their_delta.numpy(), atol=1e-6 * np.abs(theirs).sum())
    for name in ex.attributed[1:]:  # the mask (held at its actual value) and the rest move nothing
        assert np.abs(ours[name]).max() == 0


def test_integrated_gradients_at_a_layer_equal_captum_layer_integrated_gradients():
    """layer= walks the path at a hidden tensor, the inputs held at their actual values."""
    import torch.nn as nn
    from onnx_builders import export_torch
    torch.manual_seed(4)
    module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Softplus(), nn.Linear(6, 3)).eval()
    proto = export_torch(module, torch.randn(2, 5), 17)
    hidden = next(n.output[0] for n in proto.graph.node if n.op_type == "Tanh")
    rng = np.random.default_rng(5)
    x, x0 = rng.standard_normal((4, 5)), rng.standard_normal((1, 5))
    ex = liftir.Explainer(proto, "integrated_gradients", precision="float64")
    ours, delta = ex.attribute(x, baselines=x0, target=2, layer=hidden, n_steps=16, return_convergence_delta=True)
    double = module.double()
    lig = captum_attr.LayerIntegratedGradients(double, double[1])
    theirs, their_delta = lig.attribute(torch.tensor(x), baselines=torch.tensor(np.repeat(x0, 4, 0)), target=2,
                                        n_steps=16, method="gausslegendre", return_convergence_delta=True)
    assert ours.shape == (4, 7)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-7 * theirs.abs().max().item())
    np.testing.assert_allclose(delta, their_delta.numpy(), atol=1e-6)
    with pytest.raises(liftir.errors.InputError, match="is an input"):
        ex.attribute(x, baselines=x0, target=2, layer=ex.input_names[0])


@pytest.mark.parametrize("masks_differ", [False, True])
def test_a_held_input_equal_in_every_sample_shares_one_reference_row(masks_differ):
    """A text model's batch: a float input with one reference row and an integer mask held at
    each sample's value. Where the masks are the same in every sample the reference is one
    row, forwarded once (as for zeros_like(x)); where they differ each sample keeps its own.
    Either way every sample's attributions are those it gets explained alone, and they sum to
    f(x) - f(x0)."""
    from onnx_builders import model

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=1), helper.make_node("Mul", ["x", "maskf"], ["xm"]),
             helper.make_node("Tanh", ["xm"], ["t"]), helper.make_node("MatMul", ["t", "w"], ["y"])]
    proto = model(nodes, {"x": (2, 6), "mask": (2, 6)}, ["y"], {"w": rng.standard_normal((6, 3)).astype(np.float32)},
                  input_dtypes={"mask": np.int64})
    x = rng.standard_normal((5, 6)).astype(np.float32)
    mask = np.ones((5, 6), np.int64)
    mask[:, 4:] = 0
    if masks_differ:
        mask[2, 1] = 0
    base = {"x": rng.standard_normal((1, 6)).astype(np.float32)}
    ex = liftir.Explainer(proto, "deeplift")
    batch = ex.batch({"x": x, "mask": mask}, base)
    assert [r.shape[0] for r in batch.baselines] == ([5, 5] if masks_differ else [1, 1])
    got, delta = ex.attribute({"x": x, "mask": mask}, base, target=1, return_convergence_delta=True)
    alone = [ex.attribute({"x": x[i:i + 1], "mask": mask[i:i + 1]}, base, target=1)["x"] for i in range(5)]
    np.testing.assert_allclose(got["x"], np.concatenate(alone), rtol=1e-6, atol=1e-7)
    f = ex.predict
    expected = f({"x": x, "mask": mask})[:, 1] - f({"x": np.repeat(base["x"], 5, 0), "mask": mask})[:, 1]
    np.testing.assert_allclose(got["x"].sum(1), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() <= 1e-5 * max(1.0, np.abs(expected).max())
