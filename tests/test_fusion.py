"""Exported GELU chains read as one Gelu node (liftir/fusion.py).

Anchors nobody here wrote: the torch model's own output and torch.autograd's gradient, and
DeepLIFT's multiplier of a univariate region, dy/dx, computed in float64 from math.erfc on
the torch model's weights (every conserving rule set gives that region nothing else, so it
is what the five unfused nodes' rules compose to as well). Chains that must not fuse are
built by hand: a second reader of an inner tensor, a constant that is not sqrt 2, 1 or 1/2.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import liftir
from liftir.diagnostics import ConvergenceWarning
from liftir.errors import InputError
from onnx_builders import export_torch, helper, model

torch = pytest.importorskip("torch")

FEATURES, HIDDEN, CLASSES = 6, 16, 3
_erfc = np.vectorize(math.erfc)


def _gelu64(z, sqrt2=math.sqrt(2)):
    return 0.5 * z * _erfc(-z / sqrt2)


class _Net(torch.nn.Module):
    """Linear -> GELU (as `form` writes it) -> Linear."""

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)
        self.form = form

    def forward(self, x):
        z = self.fc1(x)
        if self.form == "nn.GELU":
            h = torch.nn.functional.gelu(z)
        elif self.form == "half-first":  # HF's python gelu: x * 0.5 * (1 + erf(x / sqrt 2))
            h = z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        else:  # "times-inverse": 0.5 x (1 + erf(x * 1/sqrt 2))
            h = z * (1.0 + torch.erf(z * (1 / math.sqrt(2.0)))) * 0.5
        return self.fc2(h)


def _data():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1.5, (8, FEATURES)).astype(np.float32)
    x0 = rng.normal(0, 0.3, (1, FEATURES)).astype(np.float32)
    return x, x0


def _fused(ex):
    return [n for n in ex.graph.nodes.values() if n.expansion]


def _deeplift64(net, x, x0, target, sqrt2=math.sqrt(2)):
    """(x - x0) W1^T (m_h * W2[t]), m_h = dgelu/dz in float64 (the region's only multiplier)."""
    w1, b1 = (p.detach().double().numpy() for p in (net.fc1.weight, net.fc1.bias))
    w2 = net.fc2.weight.detach().double().numpy()
    z, z0 = x.astype(np.float64) @ w1.T + b1, x0.astype(np.float64) @ w1.T + b1
    m_h = (_gelu64(z, sqrt2) - _gelu64(z0, sqrt2)) / (z - z0)
    return (x.astype(np.float64) - x0.astype(np.float64)) * ((m_h * w2[target]) @ w1)


@pytest.mark.parametrize("exporter", [14, 17])
@pytest.mark.parametrize("form", ["nn.GELU", "half-first", "times-inverse"])
def test_exported_gelu_fuses_and_keeps_every_anchor(form, exporter):
    net = _Net(form).eval()
    x, x0 = _data()
    proto = export_torch(net, torch.from_numpy(x), exporter)
    target = 1
    xt = torch.from_numpy(x).requires_grad_(True)
    out = net(xt)
    grad = torch.autograd.grad(out[:, target].sum(), xt)[0].numpy()
    truth = _deeplift64(net, x, x0, target)
    for engine in ("interpreter", "compiled"):
        ex = liftir.Explainer(proto, "deeplift", engine=engine)
        fused = _fused(ex)
        assert [n.op_type for n in fused] == ["Gelu"], (form, exporter, engine)
        assert not any(n.op_type == "Erf" for n in ex.graph.nodes.values())
        np.testing.assert_allclose(ex.predict(x), out.detach().numpy(), rtol=1e-5, atol=1e-6)
        attr, delta = ex.attribute(x, baselines=x0, target=target, return_convergence_delta=True)
        scale = np.abs(truth).max()
        np.testing.assert_allclose(attr, truth, rtol=0, atol=1e-5 * scale, err_msg=engine)
        assert np.abs(delta).max() <= 1e-5 * (np.abs(attr).sum(axis=1).max() + 1e-6), engine
        sal = liftir.Explainer(proto, "saliency", engine=engine).attribute(x, target=target)
        np.testing.assert_allclose(sal, grad, rtol=0, atol=1e-5 * np.abs(grad).max(), err_msg=engine)


def test_float64_keeps_the_models_nodes_and_agrees():
    net = _Net("nn.GELU").eval()
    x, x0 = _data()
    proto = export_torch(net, torch.from_numpy(x), 17)
    ex64 = liftir.Explainer(proto, "deeplift", precision="float64")
    assert not _fused(ex64) and any(n.op_type == "Erf" for n in ex64.graph.nodes.values())
    a64, delta = ex64.attribute(x, baselines=x0, target=2, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-9 * (np.abs(a64).sum(axis=1).max() + 1e-12)
    # the exported divisor is sqrt 2 rounded to float32, which float64 keeps as written
    truth = _deeplift64(net, x, x0, 2, sqrt2=float(np.float32(math.sqrt(2))))
    np.testing.assert_allclose(a64, truth, rtol=0, atol=1e-12 * np.abs(truth).max())


def test_inner_tensor_names_the_fused_node():
    net = _Net("nn.GELU").eval()
    x, x0 = _data()
    proto = export_torch(net, torch.from_numpy(x), 17)
    erf_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Erf")
    ex = liftir.Explainer(proto, "deeplift")
    with pytest.raises(InputError, match="fused GELU"):
        ex.attribute(x, baselines=x0, target=0, layer=erf_out)
    # the model's nodes as written still let it be named (the erf alone is no cut of the
    # graph, z reaches the output around it, so its attributions need not sum to the delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        liftir.Explainer(proto, "deeplift", precision="float64").attribute(x, baselines=x0, target=0, layer=erf_out)


def test_compiled_export_runs_the_models_own_nodes():
    """The standalone explainer of an opset-17 model stays opset-17 ONNX: the fused node's
    forward is the model's Div/Erf/Add/Mul chain (opset 17 has no Gelu op)."""
    net = _Net("nn.GELU").eval()
    x, _ = _data()
    proto = export_torch(net, torch.from_numpy(x), 17)
    exported = liftir.Explainer(proto, "deeplift", engine="compiled").compile(batch_size=2, target=0)
    ops = {n.op_type for n in exported.graph.node}
    assert "Erf" in ops and "Gelu" not in ops


def _chain(sqrt2=math.sqrt(2), one=1.0, half=0.5, extra_reader=False, inner_output=False, inverse_first=False):
    """x -> MatMul -> [Div sqrt2, Erf, Add one, Mul z, Mul half] -> MatMul -> y, by hand
    (`inverse_first`: Mul(1/sqrt2, z), the constant the first operand)."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(4, 5)).astype(np.float32)
    w2 = rng.normal(size=(5, 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["z"]),
             (helper.make_node("Mul", ["inverse", "z"], ["u"]) if inverse_first
              else helper.make_node("Div", ["z", "sqrt2"], ["u"])),
             helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["z", "a"], ["p"]),
             helper.make_node("Mul", ["p", "half"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    outputs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Mul", ["e", "e"], ["e2"]))
        nodes.append(helper.make_node("ReduceSum", ["e2"], ["s"], keepdims=0, axes=[1]))
        nodes.append(helper.make_node("Unsqueeze", ["s"], ["s_col"], axes=[1]))
        nodes.append(helper.make_node("Add", ["y", "s_col"], ["y2"]))
        outputs = ["y2"]
    if inner_output:
        outputs = ["y", "e"]
    inits = {"w1": w1, "w2": w2, "sqrt2": np.float32(sqrt2), "one": np.float32(one),
             "half": np.float32(half), "inverse": np.float32(1 / sqrt2)}
    return model(nodes, {"x": (1, 4)}, outputs, inits, opset=12)


@pytest.mark.parametrize("case, kwargs, fuses", [
    ("as exported", {}, True),
    ("times 1/sqrt2, constant first", {"inverse_first": True}, True),
    ("times 1/1.5", {"inverse_first": True, "sqrt2": 1.5}, False),
    ("divisor 1.5", {"sqrt2": 1.5}, False),
    ("adds 2", {"one": 2.0}, False),
    ("times 0.4", {"half": 0.4}, False),
    ("erf read twice", {"extra_reader": True}, False),
    ("erf a graph output", {"inner_output": True}, False),
])
def test_only_the_exact_single_use_chain_fuses(case, kwargs, fuses):
    m = _chain(**kwargs)
    ex = liftir.Explainer(m, "deeplift", output=m.graph.output[0].name)
    assert bool(_fused(ex)) == fuses, case
    rng = np.random.default_rng(4)
    x, x0 = rng.normal(size=(6, 4)).astype(np.float32), np.zeros((1, 4), np.float32)
    attr, delta = ex.attribute(x, baselines=x0, target=0, return_convergence_delta=True)
    assert np.abs(delta).max() <= 1e-5 * (np.abs(attr).sum(axis=1).max() + 1e-6), case


@pytest.mark.parametrize("op", ["Erf", "Mul", "Gelu"])
def test_a_user_rule_for_a_chain_op_keeps_the_chain(op):
    """rules= for an op of the chain (or for Gelu) must not be bypassed by the fusion."""
    from liftir.registry import lookup
    m = _chain()
    mine = type(lookup(op, "", 20))()  # the built-in rule's class, a user's instance
    ex = liftir.Explainer(m, "deeplift", rules={op: mine})
    assert not _fused(ex)
    assert any(n.op_type == "Erf" for n in ex.graph.nodes.values())
