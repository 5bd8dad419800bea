"""Every method against its Captum counterpart (float64 model, float64 inputs) on an MLP
(ReLU/Sigmoid/Tanh) and a small VGG-style conv net with MaxPool, exported to ONNX;
plus multi-target, layer and neuron attribution, and the errors bad arguments get.

Tolerance as in test_captum: max|liftir - reference| <= 1e-5 * max|reference|.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import (Deconvolution, DeepLiftShap, GuidedBackprop, InputXGradient,
                         IntegratedGradients, LayerDeepLift, LayerDeepLiftShap, LayerGradientXActivation,
                         NeuronDeconvolution, NeuronDeepLift, NeuronDeepLiftShap, NeuronGradient,
                         NeuronGuidedBackprop, NeuronIntegratedGradients, Saliency)
from torch import nn

import attr_refs as R
import liftir
import zoo
from liftir.rule import Elementwise

pytestmark = pytest.mark.filterwarnings("ignore")

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
KEYS = ["mlp", "convpool"]
N = 3
TARGETS = {"mlp": [4, 0, 2], "convpool": [5, 1, 3]}


@pytest.fixture(scope="session")
def exported():
    """(key, dynamo) -> float32 ModelProto, exported once per session (shared via attr_refs)."""
    return R.proto


def _x(key):
    return R.inputs(key, N, 1), R.inputs(key, N, 2)


def _label(*parts):
    return " ".join(str(p) for p in parts)


# --------------------------------------------------------------------------- gradient family

GRADIENT_METHODS = {
    "saliency": (Saliency, {"abs": False}),
    "input_x_gradient": (InputXGradient, {}),
    "guided_backprop": (GuidedBackprop, {}),
    "deconvnet": (Deconvolution, {}),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_match_captum(method, key, dynamo, exported):
    """Gradient-family backward passes, with MaxPool routed through the actual pass's
    switches (as torch autograd does); no reference input, no delta."""
    x, _ = _x(key)
    t = TARGETS[key]
    ex = liftir.Explainer(exported(key, dynamo), method=method)
    a, delta = ex.attribute(x, target=t, return_convergence_delta=True)
    cls, kw = GRADIENT_METHODS[method]
    c = R.captum(cls, key, call=(x,), target=t, **kw)
    assert delta is None and a.shape == x.shape
    R.assert_close(a, c, _label(method, key, "dynamo" if dynamo else "torchscript"))


@pytest.mark.parametrize("key", KEYS)
def test_saliency_abs(key):
    """abs=True is Captum's Saliency default (|gradient|); liftir's default is signed."""
    x, _ = _x(key)
    ex = R.explainer(key, method="saliency")
    a = ex.attribute(x, target=TARGETS[key], abs=True)
    c = R.captum(Saliency, key, call=(x,), target=TARGETS[key], abs=True)
    R.assert_close(a, c, _label("saliency-abs", key))
    signed = ex.attribute(x, target=TARGETS[key])
    assert (signed < 0).any() and np.array_equal(np.abs(signed), a)
    with pytest.raises(liftir.InputError, match="abs=True is an option of method 'saliency'"):
        R.explainer(key, method="guided_backprop").attribute(x, target=0, abs=True)


@pytest.mark.parametrize("key", KEYS)
def test_guided_and_deconvnet_differ_from_gradient(key):
    """Guard against a method silently falling back to the plain gradient."""
    x, _ = _x(key)
    sal = R.explainer(key, method="saliency").attribute(x, target=1)
    for method in ("guided_backprop", "deconvnet"):
        assert R.rel(R.explainer(key, method=method).attribute(x, target=1), sal) > 1e-2


# --------------------------------------------------------------------------- integrated gradients

IG_RULES = ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"]
IG_STEPS = {"mlp": 40, "convpool": 20}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("integration", IG_RULES)
def test_integrated_gradients_matches_captum(integration, key):
    """Same quadrature nodes and weights as Captum for these four rules; liftir's delta
    is Captum's completeness residual."""
    x, x0 = _x(key)
    t = TARGETS[key]
    n = IG_STEPS[key]
    a, delta = R.explainer(key, method="integrated_gradients").attribute(
        x, x0, target=t, n_steps=n, integration=integration, return_convergence_delta=True)
    c, cdelta = R.captum(IntegratedGradients, key, call=(x,), baselines=x0, target=t, n_steps=n,
                         method=integration, return_convergence_delta=True)
    R.assert_close(a, c, _label("integrated_gradients", integration, key))
    diff = np.abs(R.forward64(key, x) - R.forward64(key, x0))[np.arange(N), t]
    assert np.abs(delta - cdelta).max() <= 1e-5 * diff.max()


def test_trapezoid_exact_on_linear_model(tmp_path):
    """liftir's riemann_trapezoid uses the true trapezoid weights 1/(n-1), halved ends
    (they sum to 1): exact on a linear model for any n_steps >= 2. Captum's weights are
    1/n, halved ends (sum (n-1)/n): it recovers only (n-1)/n of the difference."""
    lin = zoo._init_(nn.Linear(10, 3), 0)
    proto = zoo.export(lin, torch.randn(2, 10), None)
    x = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    x0 = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    w = lin.weight.detach().numpy().astype(np.float64)
    dx = x.astype(np.float64) - x0
    lin64 = copy.deepcopy(lin).double()
    ex = liftir.Explainer(proto, method="integrated_gradients")
    for n in (2, 3, 7):
        a, delta = ex.attribute(x, x0, target=2, n_steps=n, integration="riemann_trapezoid",
                                return_convergence_delta=True)
        R.assert_close(a, w[2] * dx, f"trapezoid linear n={n}", tol=1e-6)
        assert np.abs(delta).max() < 1e-5
        c = IntegratedGradients(lin64).attribute(R.t64(x), R.t64(x0), target=2, n_steps=n,
                                                 method="riemann_trapezoid").detach().numpy()
        # 1e-7: Captum builds its step sizes as a float32 tensor even for a float64 model
        R.assert_close(c, (n - 1) / n * w[2] * dx, f"captum trapezoid linear n={n}", tol=1e-7)


@pytest.mark.parametrize("key", KEYS)
def test_trapezoid_is_captum_times_n_over_n_minus_1(key):
    """The one deliberate difference from Captum: the weight factor n/(n-1), exactly."""
    x, x0 = _x(key)
    t = TARGETS[key]
    n = 16
    a = R.explainer(key, method="integrated_gradients").attribute(
        x, x0, target=t, n_steps=n, integration="riemann_trapezoid")
    c = R.captum(IntegratedGradients, key, call=(x,), baselines=x0, target=t, n_steps=n,
                 method="riemann_trapezoid")
    R.assert_close(a * ((n - 1) / n), c, _label("trapezoid*(n-1)/n", key))


def test_trapezoid_residual_shrinks_with_steps():
    """Completeness residual of liftir's trapezoid rule falls as n_steps grows (MLP)."""
    x, x0 = _x("mlp")
    ex = R.explainer("mlp", method="integrated_gradients")
    residual = []
    for n in (4, 16, 64, 256):
        _, delta = ex.attribute(x, x0, target=TARGETS["mlp"], n_steps=n, integration="riemann_trapezoid",
                                return_convergence_delta=True)
        residual.append(np.abs(delta).max())
    diff = np.abs(R.forward64("mlp", x) - R.forward64("mlp", x0)).max()
    assert all(b < a for a, b in zip(residual, residual[1:])), residual
    assert residual[-1] < 1e-3 * diff, residual


@pytest.mark.parametrize("key", KEYS)
def test_integrated_gradients_internal_batch_size(key):
    """Splitting the quadrature points over several passes changes nothing."""
    x, x0 = _x(key)
    ex = R.explainer(key, method="integrated_gradients")
    a = ex.attribute(x, x0, target=1, n_steps=10)
    b = ex.attribute(x, x0, target=1, n_steps=10, internal_batch_size=7)
    R.assert_close(b, a, _label("ig internal_batch_size", key), tol=1e-6)


# --------------------------------------------------------------------------- DeepLIFT-SHAP

@pytest.mark.parametrize("key", KEYS)
def test_deeplift_shap_matches_captum(key):
    """Mean over a distribution of references of DeepLIFT; liftir's delta (N,) is the mean
    of Captum's per-pair deltas (N*B,), ~0."""
    x, _ = _x(key)
    refs = R.inputs(key, 8 if key == "mlp" else 6, 5)
    t = TARGETS[key]
    a, delta = R.explainer(key, method="deeplift_shap").attribute(x, refs, target=t, return_convergence_delta=True)
    c, cdelta = R.captum(DeepLiftShap, key, call=(x,), baselines=refs, target=t, return_convergence_delta=True)
    R.assert_close(a, c, _label("deeplift_shap", key))
    assert delta.shape == (N,) and cdelta.shape == (N * refs.shape[0],)
    f = R.forward64(key, x)[np.arange(N), t]
    f0 = R.forward64(key, refs)[:, t].T.mean(axis=1)  # (N,) mean over references
    scale = np.abs(f - f0).max()
    assert np.abs(delta).max() <= 1e-5 * scale
    assert np.abs(cdelta.reshape(N, -1).mean(1)).max() < 1e-10
    # the attributions sum to f(x) - E[f(x0)] (float64 check of what delta claims)
    assert np.abs(a.astype(np.float64).reshape(N, -1).sum(1) - (f - f0)).max() <= 1e-5 * scale


def test_deeplift_shap_one_reference_is_deeplift():
    x, x0 = _x("convpool")
    a = R.explainer("convpool", method="deeplift_shap").attribute(x, x0[:1], target=2)
    b = R.explainer("convpool").attribute(x, x0[:1], target=2)
    R.assert_close(a, b, "shap(1 ref) vs deeplift", tol=1e-6)


# --------------------------------------------------------------------------- multi-target

ALL_METHODS = ["deeplift", "saliency", "input_x_gradient", "guided_backprop", "deconvnet",
               "integrated_gradients", "deeplift_shap"]


def _args(method, key):
    x, x0 = _x(key)
    if method == "deeplift_shap":
        return x, R.inputs(key, 4, 5), {}
    if method == "integrated_gradients":
        return x, x0, {"n_steps": 8}
    if method == "deeplift":
        return x, x0, {}
    return x, None, {}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_multi_target_equals_one_at_a_time(method):
    """target="all" on the MLP and an (N, K) / (1, K) array on the conv net: one backward
    pass for K targets gives (N, K, ...) equal to K single-target calls, and (N, K) deltas
    (~0 for DeepLIFT, the per-target residual for integrated gradients, None otherwise)."""
    for key, target in [("mlp", "all"), ("convpool", np.array([[0, 5, 2], [3, 3, 1], [4, 0, 5]])),
                        ("convpool", np.array([[2, 4]]))]:
        x, x0, kw = _args(method, key)
        ex = R.explainer(key, method=method)
        a, delta = ex.attribute(x, x0, target=target, return_convergence_delta=True, **kw)
        classes = np.broadcast_to(np.arange(5)[None] if isinstance(target, str) else target,
                                  (N, 5 if isinstance(target, str) else target.shape[1]))
        k = classes.shape[1]
        assert a.shape == (N, k) + x.shape[1:]
        for j in range(k):
            one, d1 = ex.attribute(x, x0, target=classes[:, j].tolist(), return_convergence_delta=True, **kw)
            R.assert_close(a[:, j], one, _label("multi-target", method, key, j), tol=1e-6)
            if d1 is None:
                assert delta is None
            else:
                assert delta.shape == (N, k)
                np.testing.assert_allclose(delta[:, j], d1, rtol=0, atol=1e-6 * max(1.0, np.abs(d1).max()))
        if method in ("deeplift", "deeplift_shap"):
            assert np.abs(delta).max() < 1e-5


# --------------------------------------------------------------------------- layer attribution

# key -> [(Sequential index of the module, ONNX op type, occurrence)]
LAYERS = {"mlp": [(1, "Relu", 0), (5, "Tanh", 0)], "convpool": [(3, "MaxPool", 0), (5, "Relu", 1)]}


def _layer_cases():
    return [pytest.param(key, *layer, id=f"{key}-{layer[1]}{layer[2]}") for key in KEYS for layer in LAYERS[key]]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("key,index,op,occurrence", _layer_cases())
def test_layer_attribution_matches_captum(key, index, op, occurrence, dynamo, exported):
    """layer=<hidden tensor> equals Captum's LayerDeepLift, LayerDeepLiftShap and
    LayerGradientXActivation (with and without the activation factor) at that module's
    output; layer DeepLIFT still sums to delta."""
    proto = exported(key, dynamo)
    layer = R.tensor_of(proto, op, occurrence)
    x, x0 = _x(key)
    t = TARGETS[key]
    tag = f"{key}-{op}{occurrence} {'dynamo' if dynamo else 'torchscript'}"

    a, delta = liftir.Explainer(proto).attribute(x, x0, target=t, layer=layer, return_convergence_delta=True)
    c = R.captum(LayerDeepLift, key, index, call=(x,), baselines=x0, target=t)
    R.assert_close(a, c, f"layer deeplift {tag}")
    assert np.abs(delta).max() < 1e-5

    refs = R.inputs(key, 4, 5)
    a = liftir.Explainer(proto, method="deeplift_shap").attribute(x, refs, target=t, layer=layer)
    c = R.captum(LayerDeepLiftShap, key, index, call=(x,), baselines=refs, target=t)
    R.assert_close(a, c, f"layer deeplift_shap {tag}")

    a = liftir.Explainer(proto, method="input_x_gradient").attribute(x, target=t, layer=layer)
    c = R.captum(LayerGradientXActivation, key, index, call=(x,), target=t)
    R.assert_close(a, c, f"layer input_x_gradient {tag}")

    a = liftir.Explainer(proto, method="saliency").attribute(x, target=t, layer=layer)
    m = R.model64(key)
    c = LayerGradientXActivation(m, m[index], multiply_by_inputs=False).attribute(R.t64(x), target=t)
    R.assert_close(a, c.detach().numpy(), f"layer saliency {tag}")


# --------------------------------------------------------------------------- neuron targets

# key -> [(Sequential index, op type, occurrence, neuron index over the non-batch axes)]
NEURONS = {"mlp": [(3, "Sigmoid", 0, (7,))],
           "convpool": [(3, "MaxPool", 0, (2, 3, 4)), (5, "Relu", 1, (2, 1, 2))]}
NEURON_REFS = {
    "deeplift": lambda key, i, sel, x, x0: R.captum(NeuronDeepLift, key, i, call=(x, sel), baselines=x0),
    "saliency": lambda key, i, sel, x, x0: R.captum(NeuronGradient, key, i, call=(x, sel)),
    "input_x_gradient": lambda key, i, sel, x, x0: R.captum(NeuronGradient, key, i, call=(x, sel)) * x,
    "guided_backprop": lambda key, i, sel, x, x0: R.captum(NeuronGuidedBackprop, key, i, call=(x, sel)),
    "deconvnet": lambda key, i, sel, x, x0: R.captum(NeuronDeconvolution, key, i, call=(x, sel)),
    "integrated_gradients": lambda key, i, sel, x, x0: R.captum(
        NeuronIntegratedGradients, key, i, call=(x, sel), baselines=x0, n_steps=16),
    "deeplift_shap": lambda key, i, sel, x, x0: R.captum(NeuronDeepLiftShap, key, i, call=(x, sel),
                                                         baselines=R.inputs(key, 4, 5)),
}


def _neuron_cases():
    return [pytest.param(key, *nrn, id=f"{key}-{nrn[1]}{nrn[2]}") for key in KEYS for nrn in NEURONS[key]]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("key,index,op,occurrence,neuron", _neuron_cases())
def test_neuron_target_matches_captum(key, index, op, occurrence, neuron, method):
    """output=<intermediate tensor> with a tuple target explains that one neuron: Captum's
    Neuron* classes (NeuronGradient * x for input_x_gradient). The MLP case is a Sigmoid
    output, which final_activation="strip" must not strip (it is not a model output)."""
    proto = R.proto(key)
    output = R.tensor_of(proto, op, occurrence)
    x, x0 = _x(key)
    base = {"deeplift": x0, "integrated_gradients": x0, "deeplift_shap": R.inputs(key, 4, 5)}.get(method)
    kw = {"n_steps": 16} if method == "integrated_gradients" else {}
    a = R.explainer(key, method=method).attribute(x, base, target=neuron, output=output, **kw)
    c = NEURON_REFS[method](key, index, neuron, x, x0)
    assert np.abs(c).max() > 0  # a live neuron
    R.assert_close(a, c, _label("neuron", method, key, op, occurrence))


def test_neuron_deeplift_sums_to_neuron_delta():
    """Summation-to-delta for an intermediate neuron: sum of attributions = a(x) - a(x0)."""
    key, (_, op, occ, neuron) = "convpool", NEURONS["convpool"][1]
    x, x0 = _x(key)
    ex = R.explainer(key)
    output = R.tensor_of(R.proto(key), op, occ)
    a, delta = ex.attribute(x, x0, target=neuron, output=output, return_convergence_delta=True)
    act = ex.predict(x, output=output)[(slice(None),) + neuron]
    act0 = ex.predict(x0, output=output)[(slice(None),) + neuron]
    assert np.abs(delta).max() < 1e-5 * np.abs(act - act0).max()


# --------------------------------------------------------------------------- batching

@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "integrated_gradients"])
def test_batch_size_chunks_equal_one_pass(method):
    """batch_size= splits the samples (per-sample baselines and targets follow)."""
    x, x0 = R.inputs("convpool", 5, 1), R.inputs("convpool", 5, 2)
    t = [0, 1, 2, 3, 4]
    base = None if method == "guided_backprop" else x0
    kw = {"n_steps": 6} if method == "integrated_gradients" else {}
    ex = R.explainer("convpool", method=method)
    a = ex.attribute(x, base, target=t, **kw)
    b = ex.attribute(x, base, target=t, batch_size=2, **kw)
    R.assert_close(b, a, f"batch_size {method}", tol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_unknown_method():
    with pytest.raises(liftir.InputError, match="unknown method 'lrp'.*deeplift"):
        R.explainer("mlp", method="lrp")


class _DeepLiftOnlyRelu(Elementwise):
    """A user rule that serves DeepLIFT only."""

    modes = ("deeplift",)
    piecewise_linear = True

    def f(self, xp, x, ctx):
        return xp.maximum(x, 0)

    def df(self, xp, x, ctx):
        return (x > 0).astype(x.dtype)


def test_method_without_a_rule_for_an_op():
    """A rule that lacks a method's mode makes that method fail up front, naming every node."""
    proto = R.proto("convpool")
    liftir.Explainer(proto, method="deeplift", rules={"Relu": _DeepLiftOnlyRelu})  # fine
    with pytest.raises(liftir.UnsupportedOpError, match="guided_backprop") as info:
        liftir.Explainer(proto, method="guided_backprop", rules={"Relu": _DeepLiftOnlyRelu})
    assert [op for _, _, op in info.value.missing] == ["Relu"] * 3
    assert info.value.method == "guided_backprop"


@pytest.mark.parametrize("shape", [(5, 21), (2, 5, 20), (5, 2, 10)])
def test_deeplift_shap_wrong_reference_shape(shape):
    x, _ = _x("mlp")
    ex = R.explainer("mlp", method="deeplift_shap")
    with pytest.raises(liftir.InputError, match="baselines"):
        ex.attribute(x, np.zeros(shape, np.float32), target=0)


@pytest.mark.parametrize("n_steps", [0, -3, 2.5, True, "10"])
def test_bad_n_steps(n_steps):
    x, x0 = _x("mlp")
    with pytest.raises(liftir.InputError, match="n_steps"):
        R.explainer("mlp", method="integrated_gradients").attribute(x, x0, target=0, n_steps=n_steps)


@pytest.mark.parametrize("integration", ["simpson", "gauss", "riemann", ""])
def test_bad_integration(integration):
    x, x0 = _x("mlp")
    with pytest.raises(liftir.InputError, match="integration rule.*gausslegendre"):
        R.explainer("mlp", method="integrated_gradients").attribute(x, x0, target=0, integration=integration)


def test_other_integrated_gradients_errors():
    x, x0 = _x("mlp")
    ex = R.explainer("mlp", method="integrated_gradients")
    with pytest.raises(liftir.InputError, match="n_steps >= 2"):
        ex.attribute(x, x0, target=0, n_steps=1, integration="riemann_trapezoid")
    with pytest.raises(liftir.InputError, match="internal_batch_size"):
        ex.attribute(x, x0, target=0, internal_batch_size=0)
    with pytest.raises(liftir.InputError, match="no_such_tensor"):
        ex.attribute(x, x0, target=0, layer="no_such_tensor")
    layer, delta = ex.attribute(x, x0, target=0, layer=R.tensor_of(R.proto("mlp"), "Relu"),
                                return_convergence_delta=True)  # tests/test_ids_methods.py: == Captum
    assert layer.shape[0] == x.shape[0] and np.all(np.isfinite(delta))
    a = ex.attribute(x, x0, target=0, n_steps=1)  # one Gauss-Legendre point is allowed
    assert a.shape == x.shape


def test_bad_targets_and_layers():
    x, x0 = _x("convpool")
    ex = R.explainer("convpool")
    with pytest.raises(liftir.InputError, match="out of range"):
        ex.attribute(x, x0, target=np.array([[0, 6]]))
    with pytest.raises(liftir.InputError, match="out of range"):
        ex.attribute(x, x0, target=(2, 3, 99), output=R.tensor_of(R.proto("convpool"), "MaxPool"))
    with pytest.raises(liftir.InputError, match="no tensor named"):
        ex.attribute(x, x0, target=0, layer="no_such_tensor")
    with pytest.raises(liftir.InputError, match="target"):
        ex.attribute(x, x0, target="every")
