"""Normalization layers (rules/normalization.py) and division by an activation (rules/product.py).

- Torch modules (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d/2d, nn.RMSNorm and a
  hand-written RMSNorm, a quotient of two activations) in small MLP / conv contexts, each
  exported with the TorchScript exporter at opsets 14 and 17 and with the dynamo exporter
  (once per session): forward == torch, saliency == torch.autograd, DeepLIFT conserves,
  integrated gradients == Captum's.
- The dedicated rules equal the decomposed graphs exactly: the opset-14 export (where
  LayerNorm is ReduceMean/Sub/Pow/Sqrt/Div), and the ONNX function bodies.
- Each rule's multipliers against a slow float64 implementation of the composition it
  claims (explicit divided differences and Jacobian-style products, no closed forms).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import liftir
from liftir import scheduler
from liftir.functions import expand_functions
from liftir.registry import lookup
from onnx_builders import op_model, value_info

EXPORTERS = ("ts14", "ts17", "dynamo")


class HandRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w: exports at every opset (torch's own RMSNorm needs dynamo)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Quotient(nn.Module):
    """a / (1 + b^2) and a / |b|-ish: Div of two activations, numerator and divisor both live."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.a(x) / (1.5 + torch.tanh(self.b(x))))


class Block(nn.Module):
    """A pre-norm transformer block, batch-first (ViT-like): LN, one attention head with
    scores divided by sqrt(d), a residual, LN, a GELU MLP, mean pooling."""

    def __init__(self, d=8):
        super().__init__()
        self.embed, self.ln1, self.ln2 = nn.Linear(3, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head, self.d = nn.Linear(d, 3), d

    def forward(self, x):
        h = self.embed(x)
        z = self.ln1(h)
        attention = torch.softmax(self.q(z) @ self.k(z).transpose(-1, -2) / self.d ** 0.5, -1)
        h = h + attention @ self.v(z)
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def _mlp(norm, d=8):
    return nn.Sequential(nn.Linear(5, d), norm, nn.Tanh(), nn.Linear(d, 3))


def _conv(norm, c=4):
    return nn.Sequential(nn.Conv2d(2, c, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(c * 16, 3))


def _conv1d(norm, c=4):
    return nn.Sequential(nn.Conv1d(2, c, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(c * 6, 3))


MODELS = {  # name -> (builder, per-sample input shape, exporters)
    "layernorm": (lambda: _mlp(nn.LayerNorm(8)), (5,), EXPORTERS),
    "layernorm_2d": (lambda: _conv(nn.LayerNorm([4, 4, 4])), (2, 4, 4), ("ts14", "ts17")),
    "rmsnorm_hand": (lambda: _mlp(HandRMSNorm(8)), (5,), EXPORTERS),
    "rmsnorm_torch": (lambda: _mlp(nn.RMSNorm(8, eps=1e-6)), (5,), ("dynamo",)),
    "groupnorm": (lambda: _conv(nn.GroupNorm(2, 4)), (2, 4, 4), EXPORTERS),
    "instancenorm2d": (lambda: _conv(nn.InstanceNorm2d(4, affine=True)), (2, 4, 4), ("ts14", "dynamo")),
    "instancenorm1d": (lambda: _conv1d(nn.InstanceNorm1d(4, affine=True)), (2, 6), ("ts17",)),
    "quotient": (Quotient, (5,), EXPORTERS),
    "transformer_block": (Block, (5, 3), EXPORTERS),
}
CASES = [(name, kind) for name, (_, _, kinds) in MODELS.items() for kind in kinds]


def _module(name):
    torch.manual_seed(sum(map(ord, name)))
    m = MODELS[name][0]().eval()
    with torch.no_grad():  # move the affine parameters off their identity initialization
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _export(m, shape, kind):
    x = torch.randn((3,) + shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            return torch.onnx.export(m, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},),
                                     external_data=False, verbose=False, report=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=int(kind[2:]), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(name, kind):
        if name not in cache:
            cache[name] = {"module": _module(name)}
        if kind not in cache[name]:
            cache[name][kind] = _export(cache[name]["module"], MODELS[name][1], kind)
        return cache[name]["module"], cache[name][kind]
    return get


def _data(name, n=4):
    rng = np.random.default_rng(sum(map(ord, name)))
    shape = (n,) + MODELS[name][1]
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _op_types(m):
    return {node.op_type for node in m.graph.node}


def test_exports_use_the_ops_under_test(exported):
    """What each exporter emits (so the cases below exercise what they claim)."""
    assert {"LayerNormalization"} <= _op_types(exported("layernorm", "ts17")[1])
    assert {"LayerNormalization"} <= _op_types(exported("layernorm", "dynamo")[1])
    assert {"Div", "Pow", "Sqrt", "ReduceMean"} <= _op_types(exported("layernorm", "ts14")[1])
    assert "LayerNormalization" not in _op_types(exported("layernorm", "ts14")[1])
    assert "InstanceNormalization" in _op_types(exported("groupnorm", "ts14")[1])
    assert "InstanceNormalization" in _op_types(exported("instancenorm2d", "dynamo")[1])
    assert {"Div"} <= _op_types(exported("quotient", "ts17")[1])


@pytest.mark.parametrize("name,kind", CASES)
def test_torch_exports_forward_saliency_and_conservation(exported, name, kind):
    module, m = exported(name, kind)
    x, x0 = _data(name)
    np.testing.assert_allclose(liftir.Explainer(m).predict(x), module(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    xt = torch.from_numpy(x).requires_grad_()
    module(xt)[:, 1].sum().backward()
    grad = xt.grad.numpy()
    saliency = liftir.Explainer(m, method="saliency").attribute(x, target=1)
    assert np.abs(saliency - grad).max() <= 1e-4 * np.abs(grad).max()
    ex = liftir.Explainer(m, method="deeplift")
    attr, delta = ex.attribute(x, baselines=x0, target="all", return_convergence_delta=True)
    scale = max(1.0, float(np.abs(ex.predict(x)).max()), float(np.abs(ex.predict(x0)).max()))
    assert np.abs(delta).max() <= 1e-5 * scale, delta
    ex64 = liftir.Explainer(m, method="deeplift", precision="float64")
    _, delta64 = ex64.attribute(x.astype(np.float64), baselines=x0.astype(np.float64), target="all",
                                return_convergence_delta=True)
    assert np.abs(delta64).max() <= 1e-12 * scale, delta64


@pytest.mark.parametrize("name,kinds", [("layernorm", EXPORTERS), ("rmsnorm_hand", EXPORTERS),
                                        ("groupnorm", EXPORTERS), ("transformer_block", ("ts14", "ts17"))])
def test_one_rule_whichever_exporter(exported, name, kinds):
    """The dedicated rules (LayerNormalization at opset 17 and in dynamo, InstanceNormalization
    for GroupNorm) give the decomposed opset-14 graph's attributions, in float64 to round-off.
    (The transformer block's dynamo export has one Gelu op where TorchScript writes x * Phi(x):
    Rescale on the whole versus the product rule, different DeepLIFT rules by design.)"""
    x, x0 = _data(name)
    results = {}
    for kind in kinds:
        ex = liftir.Explainer(exported(name, kind)[1], method="deeplift", precision="float64")
        results[kind] = ex.attribute(x.astype(np.float64), baselines=x0.astype(np.float64), target="all")
    for kind, attr in results.items():
        np.testing.assert_allclose(attr, results["ts14"], rtol=1e-9, atol=1e-12, err_msg=kind)


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "quotient", "transformer_block"])
def test_integrated_gradients_equals_captum(exported, name):
    from captum.attr import IntegratedGradients
    module, m = exported(name, "ts17")
    x, x0 = _data(name)
    ours = liftir.Explainer(m, method="integrated_gradients", precision="float64").attribute(
        x.astype(np.float64), baselines=x0.astype(np.float64), target=2, n_steps=24)
    ref = IntegratedGradients(module.double()).attribute(
        torch.from_numpy(x.astype(np.float64)), baselines=torch.from_numpy(x0.astype(np.float64)),
        target=2, n_steps=24).numpy()
    module.float()
    # Captum multiplies float64 gradients by its quadrature weights cast to float32
    # (integrated_gradients.py: torch.tensor(step_sizes).float()): ~3e-8 of relative error
    assert np.abs(ours - ref).max() <= 1e-7 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "quotient"])
def test_captum_deeplift_does_not_conserve_through_normalizations(exported, name):
    """Captum's DeepLift has rules for nn.Module nonlinearities only: LayerNorm, GroupNorm and a
    tensor division are backpropagated with their gradient, so its attributions do not sum to
    the output difference. liftir's do; the two therefore differ here by design."""
    from captum.attr import DeepLift
    module, m = exported(name, "ts17")
    x, x0 = _data(name)
    x64, x064 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(x0.astype(np.float64))
    ref = DeepLift(module.double()).attribute(x64, baselines=x064, target=0).detach().numpy()
    dy = (module(x64)[:, 0] - module(x064)[:, 0]).detach().numpy()
    module.float()
    captum_gap = np.abs(ref.reshape(len(x), -1).sum(1) - dy).max()
    ours, delta = liftir.Explainer(m, precision="float64").attribute(
        x.astype(np.float64), baselines=x0.astype(np.float64), target=0, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-12 * max(1.0, np.abs(dy).max())
    assert captum_gap > 1e-3 * np.abs(dy).max()


# ---- the rules' math, slowly, in float64 ----------------------------------------------------

def _multipliers(m, x, x0, seed):
    """Input multipliers (K, P, ...) straight from the scheduler, rules' own forward."""
    ex = liftir.Explainer(m, method="deeplift" if x0 is not None else "saliency", final_activation="keep")
    mode = "gradient" if x0 is None else "deeplift"
    feeds = {ex.input_names[0]: x if x0 is None else np.concatenate([x, x0])}
    run = scheduler.forward(ex.plan, np, feeds, len(x), 0 if x0 is None else len(x0), (ex.output,), mode,
                            ex.options, engine="rules")
    grads = scheduler.backward(run, {ex.output: seed}, tuple(ex.input_names), (ex.output,))
    return grads[ex.input_names[0]], run.actual(ex.output), run.reference(ex.output)


def _group_jacobian(x, x0, eps, centre):
    """The composed DeepLIFT multipliers of n = c * r for one group (D,): M[j, i] = m(x_i -> n_j).

    Built from the rules one at a time: centring (affine), c^2 by Rescale as a divided
    difference, the mean (affine), r = (v + eps)^-1/2 by Rescale as a divided difference,
    then the product rule on c * r. With x0 None, the same chain of derivatives."""
    d = x.size
    centring = np.eye(d) - 1.0 / d if centre else np.eye(d)
    c = centring @ x
    c0 = c if x0 is None else centring @ x0
    v, v0 = np.mean(c * c), np.mean(c0 * c0)
    rsqrt = lambda t: 1 / np.sqrt(t + eps)  # noqa: E731
    if x0 is None or abs(v - v0) < 1e-300:
        m_square, m_r = 2 * c, -0.5 * (v + eps) ** -1.5
    else:
        m_square = np.where(c != c0, (c * c - c0 * c0) / np.where(c != c0, c - c0, 1), 2 * c)
        m_r = (rsqrt(v) - rsqrt(v0)) / (v - v0)
    r_mid = rsqrt(v) if x0 is None else (rsqrt(v) + rsqrt(v0)) / 2
    c_mid = c if x0 is None else (c + c0) / 2
    dv_dc = m_square / d  # (D,)
    jac_c = np.diag(np.full(d, r_mid)) + np.outer(c_mid, m_r * dv_dc)
    return jac_c @ centring


def _reference(x, x0, g, groups_of, eps, centre, scale_of):
    """Multipliers of x for y = n * scale (+ bias), looping over samples and groups."""
    out = np.zeros(g.shape)
    for k in range(g.shape[0]):
        for p in range(x.shape[0]):
            for idx in groups_of(x.shape[1:]):
                ref = None if x0 is None else x0[min(p, len(x0) - 1)][idx]
                jac = _group_jacobian(x[p][idx].ravel(), None if ref is None else ref.ravel(), eps, centre)
                gp = (g[k, p] * scale_of(x.shape[1:]))[idx].ravel()
                out[k, p][idx] = (gp @ jac).reshape(x[p][idx].shape)
    return out


def _all(shape):
    return [tuple(slice(None) for _ in shape)]


def _per_channel(shape):
    return [(ch,) for ch in range(shape[0])]


def _per_group(groups):
    def of(shape):
        per = shape[0] // groups
        return [(slice(i * per, (i + 1) * per),) for i in range(groups)]
    return of


def _leading(shape):  # layer norm over the last axis of (N, A, D)
    return [(a,) for a in range(shape[0])]


def _with_output_shape(m, shape):
    """For ops whose output shape ONNX's inference cannot tell (GroupNormalization)."""
    m.graph.output[0].CopyFrom(value_info("y0", shape, np.float64))
    onnx.checker.check_model(m)
    return m


RNG = np.random.default_rng(2022)
F64 = np.float64
SCALE_C, BIAS_C = RNG.uniform(0.5, 1.5, 3), RNG.standard_normal(3)
SCALE_D, BIAS_D = RNG.uniform(0.5, 1.5, 5), RNG.standard_normal(5)
RULE_CASES = {
    "LayerNormalization": (op_model("LayerNormalization", [(2, 4, 5), SCALE_D, BIAS_D], {"epsilon": 1e-3},
                                    17, dtype=F64), (4, 5), _leading, True, lambda s: SCALE_D, 1e-3),
    "LayerNormalization_axis1": (op_model("LayerNormalization", [(2, 3, 5), np.ones((3, 5)) * SCALE_D, None],
                                          {"axis": 1}, 17, dtype=F64), (3, 5), _all, True,
                                 lambda s: np.ones((3, 5)) * SCALE_D, 1e-5),
    "InstanceNormalization": (op_model("InstanceNormalization", [(2, 3, 4, 2), SCALE_C, BIAS_C], {}, 17, dtype=F64),
                              (3, 4, 2), _per_channel, True, lambda s: SCALE_C.reshape(3, 1, 1), 1e-5),
    "GroupNormalization": (_with_output_shape(op_model(
        "GroupNormalization", [(2, 6, 4), np.repeat(SCALE_C, 2), np.repeat(BIAS_C, 2)],
        {"num_groups": 3, "epsilon": 1e-2}, 21, dtype=F64, check=False), (2, 6, 4)), (6, 4),
                           _per_group(3), True, lambda s: np.repeat(SCALE_C, 2).reshape(6, 1), 1e-2),
    "RMSNormalization": (op_model("RMSNormalization", [(2, 4, 5), SCALE_D], {}, 23, dtype=F64),
                         (4, 5), _leading, False, lambda s: SCALE_D, 1e-5),
}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
@pytest.mark.parametrize("mode", ["deeplift", "gradient"])
def test_rule_multipliers_equal_a_slow_float64_composition(name, mode):
    m, shape, groups_of, centre, scale_of, eps = RULE_CASES[name]
    eps = float(np.float32(eps))  # as the model stores it
    x = RNG.standard_normal((3,) + shape) * 2
    x0 = None if mode == "gradient" else RNG.standard_normal((1,) + shape)
    g = RNG.standard_normal((2, 3) + shape)
    got, y, y0 = _multipliers(m, x, x0, g)
    np.testing.assert_allclose(got, _reference(x, x0, g, groups_of, eps, centre, scale_of), rtol=1e-10, atol=1e-12)
    if x0 is not None:  # summation-to-delta for every output neuron (seeded one at a time through g)
        lhs = (got * (x - x0)).reshape(2, 3, -1).sum(-1)
        rhs = (g * (y - y0)).reshape(2, 3, -1).sum(-1)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_dedicated_rule_equals_its_onnx_function_body(name):
    """The same node expanded into its ONNX body (composing liftir's Div, Mul, ReduceMean, ...
    rules) gives the dedicated rule's attributions, in float64 to round-off. InstanceNorm has
    no body: nothing to compare."""
    m = RULE_CASES[name][0]
    op = m.graph.node[0].op_type
    expanded = onnx.ModelProto()
    expanded.CopyFrom(onnx.shape_inference.infer_shapes(m))
    n = expand_functions(expanded, lambda o, d, v: o != op and lookup(o, d, v) is not None)
    if op == "InstanceNormalization":
        assert n == 0
        return
    assert n == 1 and op not in _op_types(expanded)
    shape = RULE_CASES[name][1]
    x, x0 = RNG.standard_normal((3,) + shape), RNG.standard_normal((1,) + shape)
    target = (0,) * len(shape)
    # the bodies compute in stash_type (float32); float64 precision runs their Casts in double
    ex, ex_body = liftir.Explainer(m, precision="float64"), liftir.Explainer(expanded, precision="float64")
    # LayerNormalization's body flattens (N, 4, 5) to (4N, 5): liftir/batch_axis.py follows the
    # samples through the merged axis, so the body explains like the dedicated rule
    np.testing.assert_allclose(ex.attribute(x, baselines=x0, target=target),
                               ex_body.attribute(x, baselines=x0, target=target), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ex.predict(x), ex_body.predict(x), rtol=1e-12)


def test_quotient_rule_is_the_product_rule_on_the_reciprocal():
    """Div(a, b) = Mul(a, Reciprocal(b)): the same multipliers, and both conserve a/b - a0/b0."""
    from onnx_builders import model
    from onnx import helper
    div = model([helper.make_node("Div", ["a", "b"], ["y"])], {"a": (2, 3), "b": (2, 3)}, ["y"], opset=17)
    mul = model([helper.make_node("Reciprocal", ["b"], ["r"]), helper.make_node("Mul", ["a", "r"], ["y"])],
                {"a": (2, 3), "b": (2, 3)}, ["y"], opset=17)
    a, b = RNG.standard_normal((4, 3)), RNG.uniform(0.5, 2, (4, 3)) * RNG.choice([-1, 1], (4, 3))
    a0, b0 = RNG.standard_normal((1, 3)), RNG.uniform(0.5, 2, (1, 3))
    for target in range(3):
        ours, delta = liftir.Explainer(div, precision="float64").attribute(
            (a, b), baselines=(a0, b0), target=target, return_convergence_delta=True)
        other = liftir.Explainer(mul, precision="float64").attribute((a, b), baselines=(a0, b0), target=target)
        np.testing.assert_allclose(ours[0], other[0], rtol=1e-12)
        np.testing.assert_allclose(ours[1], other[1], rtol=1e-10)  # Reciprocal's quotient rounds
        # by hand: m_a = (1/b + 1/b0)/2, m_b = -(a + a0)/(2 b b0)
        np.testing.assert_allclose(ours[0][:, target], ((1 / b + 1 / b0) / 2 * (a - a0))[:, target], rtol=1e-12)
        np.testing.assert_allclose(ours[1][:, target], (-(a + a0) / (2 * b * b0) * (b - b0))[:, target], rtol=1e-12)
        assert np.abs(delta).max() <= 1e-13 * np.abs(a / b).max()


@pytest.mark.parametrize("name", ["layernorm", "groupnorm", "quotient"])
@pytest.mark.parametrize("method", ["deeplift_shap", "deeplift_revealcancel"])
def test_other_deeplift_methods_conserve(exported, name, method):
    _, m = exported(name, "ts17")
    x, x0 = _data(name)
    ex = liftir.Explainer(m, method=method, precision="float64")
    refs = np.concatenate([x0, x0[::-1] * 0.5]).astype(np.float64) if method == "deeplift_shap" else x0.astype(np.float64)
    attr, delta = ex.attribute(x.astype(np.float64), baselines=refs, target=1, return_convergence_delta=True)
    assert np.all(np.isfinite(attr))
    assert np.abs(delta).max() <= 1e-10 * max(1.0, float(np.abs(ex.predict(x.astype(np.float64))).max()))


@pytest.mark.parametrize("name", ["transformer_block", "groupnorm", "instancenorm2d", "rmsnorm_hand", "quotient"])
def test_cupy_subset_backend_matches_numpy(exported, name):
    """The new rules call only functions CuPy also has (the stand-in of test_array_api_subset)."""
    from test_array_api_subset import subset_module
    kind = "dynamo" if name in ("instancenorm2d",) else "ts17"
    _, m = exported(name, kind)
    x, x0 = _data(name)
    for method in ("deeplift", "saliency"):
        reference = liftir.Explainer(m, method).attribute(x, baselines=x0, target=2)
        ex = liftir.Explainer(m, method)
        ex.xp = subset_module()
        np.testing.assert_allclose(ex.attribute(x, baselines=x0, target=2), reference, rtol=1e-5, atol=1e-6)


SINGLE_OPS = {  # op -> (inputs, attributes, opset, target)
    "ReduceSumSquare": ([(2, 3, 4), np.array([2], np.int64)], {"keepdims": 0}, 18, 1),
    "ReduceL1": ([(2, 3, 4), np.array([2], np.int64)], {"keepdims": 0}, 18, 1),
    "ReduceL2": ([(2, 3, 4), np.array([2], np.int64)], {"keepdims": 0}, 18, 1),
    "RMSNormalization": ([(2, 3, 4), SCALE_D[:4]], {}, 23, (1, 2)),
}


@pytest.mark.parametrize("op", sorted(SINGLE_OPS))
def test_cupy_subset_backend_single_ops(op):
    from test_array_api_subset import subset_module
    inputs, attrs, opset, target = SINGLE_OPS[op]
    m = op_model(op, inputs, attrs, opset)
    x, x0 = RNG.standard_normal((3, 3, 4)).astype(np.float32), RNG.standard_normal((1, 3, 4)).astype(np.float32)
    for method in ("deeplift", "saliency"):
        reference = liftir.Explainer(m, method).attribute(x, baselines=x0, target=target)
        ex = liftir.Explainer(m, method)
        ex.xp = subset_module()
        np.testing.assert_allclose(ex.attribute(x, baselines=x0, target=target), reference, rtol=1e-5, atol=1e-6)
